"""The SA-PPO baseline (marl_fgmf.adv_training): config checks, the random row draw, the
inner maximization and the regularizer by its definition."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from agents import make_policy_network
from marl_fgmf.adv_training import AdvTrainingConfig, kl_pgd, sa_kl_regularizer, select_rows
from marl_fgmf.perturbation import linf_pgd

OBS = (9, 9, 3)
pytestmark = pytest.mark.usefixtures("one_thread")


class Counting(nn.Module):
    """Counts forward calls (and those made with a graph)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.calls, self.graph_calls = net, 0, 0

    def forward(self, x):
        self.calls += 1
        self.graph_calls += int(torch.is_grad_enabled())
        return self.net(x)


@pytest.fixture
def policy():
    torch.manual_seed(0)
    net = make_policy_network("cnn", OBS, 5, channels=(4, 8, 8), hidden=16).double()
    nn.init.normal_(net.pi.weight, std=1.0)  # not near-uniform: KL moves
    return net


def obs_batch(b: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, *OBS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def kl(p_log, q_log):
    return (p_log.exp() * (p_log - q_log)).sum(-1)


@pytest.mark.parametrize("name,value,message", [
    ("steps", 2.5, "adv steps must be an integer >= 1"),
    ("steps", 0, "adv steps must be an integer >= 1"),
    ("steps", True, "adv steps must be an integer >= 1"),
    ("eps", 0.0, r"adv eps must be in \(0, 1\]"),
    ("eps", 2.0, r"adv eps must be in \(0, 1\]"),
    ("kappa", -1.0, "adv kappa must be >= 0"),
    ("reg_fraction", 0.0, r"adv reg_fraction must be in \(0, 1\]"),
    ("max_reg_samples", 1.5, "adv max_reg_samples must be an integer >= 1"),
    ("step_size", 0.0, "adv step_size must be None or a number > 0"),
    ("seed", 1.0, "adv seed must be None or an integer"),
])
def test_config_rejects_bad_values_in_one_line(name, value, message):
    with pytest.raises(ValueError, match=message) as err:
        AdvTrainingConfig(**{name: value})
    assert "\n" not in str(err.value)


def test_config_round_trip():
    cfg = AdvTrainingConfig(steps=5, seed=3)
    assert AdvTrainingConfig(**cfg.to_dict()) == cfg


def test_rows_are_a_random_draw_not_the_first_n():
    cfg = AdvTrainingConfig(reg_fraction=0.25, max_reg_samples=128)
    a = select_rows(64, cfg, torch.Generator().manual_seed(0))
    assert a.numel() == 16 and a.unique().numel() == 16 and int(a.max()) < 64
    assert not torch.equal(a.sort().values, torch.arange(16))
    assert torch.equal(a, select_rows(64, cfg, torch.Generator().manual_seed(0)))  # seeded
    assert not torch.equal(a, select_rows(64, cfg, torch.Generator().manual_seed(1)))
    assert select_rows(1000, cfg).numel() == 128                   # capped
    assert select_rows(2, cfg).numel() == 1                        # at least one
    # every row has the same chance: over many draws each index appears ~n/B of the time
    counts = torch.zeros(64)
    g = torch.Generator().manual_seed(2)
    for _ in range(400):
        counts[select_rows(64, cfg, g)] += 1
    assert counts.min() > 0.25 * 400 * 0.5 and counts.max() < 0.25 * 400 * 1.6


def test_kl_pgd_is_linf_pgd_on_the_kl_from_a_random_start(policy):
    x = obs_batch(4)
    eps = 8 / 255
    adv = kl_pgd(policy, x, eps, 4, generator=torch.Generator().manual_seed(5))
    target = torch.log_softmax(policy(x), -1).detach()
    ref = linf_pgd(lambda z: kl(target, torch.log_softmax(policy(z), -1)), x, eps, 4,
                   random_start=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(adv, ref)
    assert (adv - x).abs().max() <= eps + 1e-12 and adv.min() >= 0 and adv.max() <= 1
    noise = (x + eps * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(6),
                                       dtype=x.dtype) - 1)).clamp(0, 1)
    kl_adv = kl(target, torch.log_softmax(policy(adv), -1))
    kl_noise = kl(target, torch.log_softmax(policy(noise), -1))
    assert (kl_adv > kl_noise).all()  # the maximization beats random noise


def test_regularizer_equals_its_definition_with_one_clean_forward(policy):
    cfg = AdvTrainingConfig(steps=3, kappa=2.0, reg_fraction=0.5)
    x = obs_batch(8)
    counted = Counting(policy)
    loss, info = sa_kl_regularizer(counted, x, cfg, torch.Generator().manual_seed(9))
    # one clean forward (no graph), steps PGD forwards, one forward with graph on x_adv
    assert counted.calls == cfg.steps + 2
    g = torch.Generator().manual_seed(9)
    rows = select_rows(8, cfg, g)
    sub = x[rows]
    target = torch.log_softmax(policy(sub), -1).detach()
    adv = kl_pgd(policy, sub, cfg.eps, cfg.steps, generator=g, target_log_p=target)
    ref = cfg.kappa * kl(target, torch.log_softmax(policy(adv), -1)).mean()
    assert torch.allclose(loss, ref, rtol=1e-12)
    assert info["adv_n"] == 4 and info["adv_loss"] == pytest.approx(2 * info["adv_kl"])
    grads = torch.autograd.grad(loss, [p for p in policy.parameters()], allow_unused=True)
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)  # trains the policy


def test_regularizer_checks_the_observation_contract(policy):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sa_kl_regularizer(policy, obs_batch(4) * 255, AdvTrainingConfig())
