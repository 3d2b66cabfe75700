"""Tests of the analytic attacks (attacks/): budgets, seeding, errors, modes, strength.

Tiny random policies (cnn / vit / hybrid) keep the file fast on one CPU core. Their policy
heads are re-initialised with gain 1 (the PPO init uses 0.01, which makes an untrained policy
almost uniform and every attack trivially "succeed" or fail on ties).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from agents import make_policy_network
from attacks import (APGD, ATTACKS, BPDA, EOT, FGSM, PGD, Attack, Ensemble, RandomNoise, Square,
                     StraightThrough, apgd_checkpoints, make_attack)
from marl_fgmf.protocol import allow_masked_gradients


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = {
    "cnn": dict(channels=(4, 8, 8), hidden=16),
    "vit": dict(patch=3, dim=8, depth=1, heads=2, hidden=16),
    "hybrid": dict(channels=(4, 8), depth=1, heads=2, hidden=16),
}
HYPO = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def tiny_policy(arch: str = "cnn", obs_shape=(9, 9, 3), n_actions: int = 5, seed: int = 0,
                gain: float = 1.0) -> nn.Module:
    torch.manual_seed(seed)
    net = make_policy_network(arch, obs_shape, n_actions, **TINY[arch])
    nn.init.orthogonal_(net.pi.weight, gain=gain)
    return net.eval()


def random_obs(batch: int, shape=(9, 9, 3), seed: int = 0, saturate: float = 0.1) -> torch.Tensor:
    """Uniform observations with a fraction of exact 0 and 1 pixels (the [0, 1] boundary)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *shape), generator=g)
    u = torch.rand((batch, *shape), generator=g)
    x = torch.where(u < saturate / 2, torch.zeros_like(x), x)
    return torch.where(u > 1 - saturate / 2, torch.ones_like(x), x)


FIXED_OBJECTIVE = ("apgdt", "fab", "autoattack")


def quick_settings(name: str, norm: str = "linf") -> dict:
    """Small budgets for every registered attack (so the whole file stays fast)."""
    return {
        "random": dict(norm=norm),
        "fgsm": dict(norm=norm),
        "pgd": dict(norm=norm, steps=3, restarts=2),
        "apgd": dict(norm=norm, steps=5),
        "apgdt": dict(norm=norm, steps=3, n_target_classes=2),
        "fab": dict(norm=norm, steps=3, n_target_classes=2),
        "autoattack": dict(steps=2, n_queries=6, n_target_classes=2),
        "square": dict(n_queries=12),
        "bpda": dict(attack="pgd", norm=norm, steps=2),
        "eot": dict(attack="pgd", norm=norm, steps=2, samples=2),
        "ensemble": (dict(attacks=["fgsm", "pgd", "square"], steps=2, n_queries=6)
                     if norm == "linf" else dict(attacks=["fgsm", "pgd"], norm=norm, steps=2)),
    }[name]


def assert_in_ball(adv: torch.Tensor, obs: torch.Tensor, eps: float, norm: str) -> None:
    assert adv.shape == obs.shape and adv.dtype == obs.dtype
    assert torch.isfinite(adv).all()
    assert adv.min() >= 0.0 and adv.max() <= 1.0, "adversarial obs left [0, 1]"
    delta = (adv - obs).flatten(1)
    if norm == "linf":
        worst = delta.abs().amax(dim=1).max().item()
        assert worst <= eps + 1e-6, f"Linf {worst} > eps {eps}"
    else:
        worst = delta.norm(dim=1).max().item()
        assert worst <= eps * (1 + 1e-5) + 1e-6, f"L2 {worst} > eps {eps}"


def ce_loss(policy: nn.Module, x: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return nn.functional.cross_entropy(policy(x), actions, reduction="none")


# ---------------------------------------------------------------------- budgets and shapes
@HYPO
@given(name=st.sampled_from(sorted(ATTACKS)), arch=st.sampled_from(sorted(TINY)),
       norm=st.sampled_from(["linf", "l2"]), eps=st.floats(1e-3, 1.0),
       batch=st.integers(1, 5), side=st.integers(5, 8), channels=st.integers(1, 3),
       n_actions=st.integers(2, 6), objective=st.sampled_from(["ce", "kl", "value", "targeted", "margin"]),
       seed=st.integers(0, 2 ** 16))
def test_every_attack_stays_in_its_ball_and_unit_range(name, arch, norm, eps, batch, side, channels,
                                                       n_actions, objective, seed):
    if name in ("square", "autoattack"):
        norm = "linf"
    shape = (side, side, channels)
    policy = tiny_policy(arch, shape, n_actions, seed=seed % 7)
    obs = random_obs(batch, shape, seed=seed)
    own_objective = name in FIXED_OBJECTIVE  # APGD-T, FAB-T and AutoAttack fix their losses
    attack = make_attack(name, policy, eps=eps, seed=seed, **quick_settings(name, norm),
                         **({} if own_objective else {"objective": objective}))
    if name in ("apgdt", "autoattack") and n_actions < 4:
        with pytest.raises(ValueError, match="needs >= 4 actions"):
            attack(obs)
        return
    adv = attack(obs)
    ensemble_norms = {a.norm for a in getattr(attack, "attacks", [attack])}
    assert_in_ball(adv, obs, eps, norm if len(ensemble_norms) == 1 else "linf")
    assert attack.last_success.shape == (batch,)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_batches_of_agents_and_frames_and_float64_input(name):
    policy = tiny_policy("cnn")
    obs = random_obs(12, seed=1).double()        # e.g. 4 frames x 3 agents, float64 input
    adv = make_attack(name, policy, eps=4 / 255, seed=0, **quick_settings(name))(obs)
    assert adv.dtype == torch.float64 and adv.device == obs.device
    assert_in_ball(adv, obs, 4 / 255, "linf")


def test_l2_attacks_use_the_budget():
    policy = tiny_policy("cnn")
    obs = random_obs(8, seed=2, saturate=0.0)
    for attack in (PGD(policy, eps=0.5, norm="l2", steps=5, seed=0),
                   APGD(policy, eps=0.5, norm="l2", steps=5, seed=0),
                   FGSM(policy, eps=0.5, norm="l2")):
        adv = attack(obs)
        norms = (adv - obs).flatten(1).norm(dim=1)
        assert_in_ball(adv, obs, 0.5, "l2")
        assert norms.mean() > 0.25, f"{attack} barely moved: {norms}"


# ---------------------------------------------------------------------- seeding
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_same_seed_same_perturbation(name):
    policy = tiny_policy("cnn")
    obs = random_obs(6, seed=3)
    a = make_attack(name, policy, eps=8 / 255, seed=11, **quick_settings(name))
    b = make_attack(name, policy, eps=8 / 255, seed=11, **quick_settings(name))
    first = a(obs)
    assert torch.equal(first, b(obs))
    a(obs)                       # the generator advances ...
    a.set_seed(11)               # ... and set_seed rewinds it
    assert torch.equal(first, a(obs))


@pytest.mark.parametrize("name", ["random", "pgd", "square"])  # APGD's 2*eps first step
# lands in the same corner of the ball from any start on a near-linear policy, so it may not differ
def test_different_seeds_differ_and_global_rng_untouched(name):
    policy = tiny_policy("cnn")
    obs = random_obs(4, seed=4)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    x1 = make_attack(name, policy, eps=8 / 255, seed=1, **quick_settings(name))(obs)
    assert torch.equal(torch.rand(3), expected), "a seeded attack consumed the global RNG"
    x2 = make_attack(name, policy, eps=8 / 255, seed=2, **quick_settings(name))(obs)
    assert not torch.equal(x1, x2)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("eps", [0, -0.1, 1.5, float("nan"), "abc", "0/255", None])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be"):
        PGD(tiny_policy(), eps=eps)


def test_eps_fraction_string():
    assert PGD(tiny_policy(), eps="8/255").eps == pytest.approx(8 / 255)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1, got"):
        PGD(tiny_policy(), steps=steps)
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1, got"):
        APGD(tiny_policy(), steps=steps)


def test_unknown_attack_objective_and_setting():
    policy = tiny_policy()
    with pytest.raises(ValueError, match=r"unknown attack 'cw'; allowed: random, fgsm, pgd"):
        make_attack("cw", policy)
    with pytest.raises(ValueError, match=r"unknown objective 'hinge' for PGD; allowed: ce, kl"):
        make_attack("pgd", policy, objective="hinge")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) stepz for attack 'pgd'; allowed: .*steps"):
        make_attack("pgd", policy, stepz=3)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) bogus for attack 'ensemble'"):
        make_attack("ensemble", policy, attacks=["fgsm", "pgd"], bogus=1)
    with pytest.raises(ValueError, match=r"unknown norm 'l2' for Square; allowed: linf"):
        Square(policy, norm="l2")
    with pytest.raises(ValueError, match="target is only used with objective='targeted'"):
        PGD(policy, target=1)


@pytest.mark.parametrize("bad, message", [
    (lambda x: x * 2, r"obs must lie in \[0, 1\].*got values in \[0, 2\]"),
    (lambda x: x - 1, r"obs must lie in \[0, 1\]"),
    (lambda x: x.index_put((torch.tensor([0]),), torch.tensor(float("nan"))), "obs must be finite, got"),
    (lambda x: x.index_put((torch.tensor([1]),), torch.tensor(float("inf"))), "obs must be finite"),
    (lambda x: (x * 255).to(torch.uint8), "obs must be floating point in \\[0, 1\\].*uint8"),
    (lambda x: x[0], r"obs must have shape \(B, H, W, C\), got \(9, 9, 3\)"),
    (lambda x: x.numpy(), "obs must be a torch.Tensor"),
    (lambda x: x[:0], "batch size 0"),
])
def test_bad_observations(bad, message):
    attack = PGD(tiny_policy(), steps=1)
    with pytest.raises(ValueError, match=message):
        attack(bad(random_obs(3)))


@pytest.mark.parametrize("actions, message", [
    (torch.zeros(4, dtype=torch.long), r"actions must have shape \(3,\) to match obs, got \(4,\)"),
    (torch.zeros(3, 1, dtype=torch.long), r"actions must have shape \(3,\)"),
    (torch.tensor([0, 1, 5]), r"actions must be in 0..4 \(the policy has 5 actions\), got values in \[0, 5\]"),
    (torch.tensor([-1, 0, 0]), r"actions must be in 0..4"),
    (torch.tensor([0.0, 1.0, 2.0]), "actions must hold integer action indices"),
])
def test_bad_actions(actions, message):
    with pytest.raises(ValueError, match=message):
        FGSM(tiny_policy())(random_obs(3), actions)


def test_policy_output_must_be_logits():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x.flatten(1).sum(1) * self.w  # (B,), not (B, n_actions)

    with pytest.raises(ValueError, match=r"policy output must be logits of shape \(B, n_actions\)"):
        FGSM(Flat())(random_obs(2))
    with pytest.raises(ValueError, match="policy must be a torch.nn.Module"):
        FGSM(lambda x: x)


def test_value_objective_needs_a_critic():
    class NoCritic(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(9 * 9 * 3, 4)

        def forward(self, x):
            return self.lin(x.flatten(1))

    with pytest.raises(ValueError, match=r"objective 'value' needs a critic policy.value\(obs\)"):
        PGD(NoCritic(), objective="value")
    with pytest.raises(ValueError, match="objective 'value' needs a critic"):
        PGD(tiny_policy(), objective="value").with_policy(NoCritic())


def test_dlr_refuses_fewer_than_three_actions():
    obs = random_obs(4)
    for n_actions in (1, 2):
        attack = APGD(tiny_policy(n_actions=n_actions), steps=3, objective="dlr")
        with pytest.raises(ValueError, match=rf"objective 'dlr' needs >= 3 actions .* this policy has {n_actions}: use objective='ce' or 'margin'"):
            attack(obs)
    adv = APGD(tiny_policy(n_actions=3), steps=3, objective="dlr", seed=0)(obs)
    assert_in_ball(adv, obs, 8 / 255, "linf")
    # CE and margin work with two actions
    for objective in ("ce", "margin"):
        APGD(tiny_policy(n_actions=2), steps=3, objective=objective, seed=0)(obs)


def test_targeted_target_validation():
    policy = tiny_policy()
    with pytest.raises(ValueError, match=r"target must have shape \(3,\) to match obs"):
        PGD(policy, objective="targeted", target=torch.tensor([0, 1]))(random_obs(3))
    with pytest.raises(ValueError, match=r"target must be in 0..4"):
        PGD(policy, objective="targeted", target=7)(random_obs(3))


# ---------------------------------------------------------------------- modes and side effects
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_policy_mode_restored_and_no_parameter_grads(name):
    policy = tiny_policy("hybrid")
    policy.train()
    policy.encoder.blocks.eval()       # a mixed-mode policy is restored module by module
    modes = [m.training for m in policy.modules()]
    make_attack(name, policy, eps=4 / 255, seed=0, **quick_settings(name))(random_obs(3))
    assert [m.training for m in policy.modules()] == modes
    assert all(p.grad is None for p in policy.parameters())


def test_attack_runs_in_eval_mode():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(self.training)
            return x

    policy = tiny_policy()
    policy.input_filter = Spy()
    policy.train()
    PGD(policy, steps=2, seed=0)(random_obs(2))
    assert seen and not any(seen)
    assert policy.training and policy.input_filter.training


# ---------------------------------------------------------------------- strength
@pytest.fixture(scope="module")
def beacon_policy(clone_beacon_policy) -> tuple[nn.Module, torch.Tensor]:
    """An undefended beacon policy (behaviour-cloned, ~97% action accuracy) and 128 frames."""
    return clone_beacon_policy(seed=0, sgd_steps=400, n_train=2400, n_held_out=128)


def success_rate(attack: Attack, obs: torch.Tensor) -> float:
    attack(obs)
    return attack.last_success.float().mean().item()


def test_on_trained_beacon_policy_pgd_beats_fgsm_beats_random_noise(beacon_policy):
    policy, obs = beacon_policy
    eps = 4 / 255
    rates = {"random": success_rate(RandomNoise(policy, eps=eps, seed=0), obs),
             "fgsm": success_rate(FGSM(policy, eps=eps), obs),
             "pgd": success_rate(PGD(policy, eps=eps, steps=20, seed=0), obs),
             "apgd": success_rate(APGD(policy, eps=eps, steps=20, seed=0), obs),
             "square": success_rate(Square(policy, eps=eps, n_queries=100, seed=0), obs)}
    assert rates["pgd"] > rates["fgsm"] > rates["random"], rates
    assert rates["apgd"] >= rates["fgsm"], rates
    assert rates["square"] > rates["random"], rates


def test_pgd_reaches_at_least_fgsm_loss_on_average(beacon_policy):
    policy, obs = beacon_policy
    clean = policy(obs).argmax(1)
    for eps in (1 / 255, 4 / 255):
        fgsm = ce_loss(policy, FGSM(policy, eps=eps)(obs), clean).mean()
        pgd = ce_loss(policy, PGD(policy, eps=eps, steps=10, seed=0)(obs), clean).mean()
        apgd = ce_loss(policy, APGD(policy, eps=eps, steps=10, seed=0)(obs), clean).mean()
        assert pgd >= fgsm - 1e-6, (eps, pgd, fgsm)
        assert apgd >= fgsm - 1e-6, (eps, apgd, fgsm)


def test_success_rises_with_budget(beacon_policy):
    policy, obs = beacon_policy
    rates = [success_rate(PGD(policy, eps=eps, steps=10, seed=0), obs)
             for eps in (1 / 255, 4 / 255, 32 / 255)]
    assert rates[0] <= rates[1] <= rates[2] and rates[2] == 1.0, rates


def test_more_pgd_steps_and_restarts_never_weaker():
    policy = tiny_policy("cnn", seed=7)
    obs = random_obs(32, seed=7, saturate=0.0)
    clean = policy(obs).argmax(1)
    few = ce_loss(policy, PGD(policy, eps=4 / 255, steps=2, seed=0)(obs), clean)
    many = ce_loss(policy, PGD(policy, eps=4 / 255, steps=2, restarts=3, seed=0)(obs), clean)
    assert (many >= few - 1e-5).all()     # restart 1 is the same run; best is kept per sample


def test_objectives_move_what_they_target(beacon_policy):
    policy, obs = beacon_policy
    with torch.no_grad():
        logits = policy(obs)
        v0 = policy.value(obs)
    adv = PGD(policy, eps=8 / 255, steps=10, objective="value", seed=0)(obs)
    with torch.no_grad():
        assert policy.value(adv).mean() < v0.mean() - 1e-3
    adv = FGSM(policy, eps=8 / 255, objective="kl", seed=0)(obs)
    assert (adv - obs).abs().amax() > 0, "KL FGSM must move despite the zero gradient at x"
    p0 = logits.log_softmax(1)
    with torch.no_grad():
        kl_fgsm = (p0.exp() * (p0 - policy(adv).log_softmax(1))).sum(1).mean()
        adv = PGD(policy, eps=8 / 255, steps=10, objective="kl", seed=0)(obs)
        kl_pgd = (p0.exp() * (p0 - policy(adv).log_softmax(1))).sum(1).mean()
    assert kl_pgd >= kl_fgsm > 0.1, (kl_fgsm, kl_pgd)
    for objective in ("margin", "dlr"):
        attack = PGD(policy, eps=4 / 255, steps=10, objective=objective, seed=0)
        assert success_rate(attack, obs) > 0.5, objective


def test_targeted_moves_toward_the_target(beacon_policy):
    policy, obs = beacon_policy
    with torch.no_grad():
        logits = policy(obs)
    # default target: the worst action (least likely under the clean policy)
    worst = logits.argmin(1)
    attack = PGD(policy, eps=8 / 255, steps=20, objective="targeted", seed=0)
    adv = attack(obs)
    with torch.no_grad():
        before = logits.log_softmax(1).gather(1, worst[:, None]).mean()
        after = policy(adv).log_softmax(1).gather(1, worst[:, None]).mean()
        assert torch.equal(policy(adv).argmax(1) == worst, attack.last_success)
    assert after > before + 1.0
    # explicit targets: a per-sample tensor and a callable (the runner-up action)
    runner_up = logits.argsort(1, descending=True)[:, 1]
    for target in (runner_up, lambda x: policy(x).argsort(1, descending=True)[:, 1]):
        a = PGD(policy, eps=8 / 255, steps=20, objective="targeted", target=target, seed=0)
        with torch.no_grad():
            assert (policy(a(obs)).argmax(1) == runner_up).float().mean() > 0.5

    class WithQ(nn.Module):
        """A policy with a Q-head: the worst action by value is argmin Q (here always 3)."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def action_values(self, x):
            return -nn.functional.one_hot(torch.full((x.shape[0],), 3), 5).float()

    a = PGD(WithQ(policy), eps=8 / 255, steps=5, objective="targeted", seed=0)
    adv = a(obs)
    with torch.no_grad():
        assert torch.equal(a.last_success, policy(adv).argmax(1) == 3)


def test_square_respects_query_budget_and_early_stops(beacon_policy):
    policy, obs = beacon_policy
    attack = Square(policy, eps=8 / 255, n_queries=60, seed=0)
    adv = attack(obs)
    assert_in_ball(adv, obs, 8 / 255, "linf")
    assert attack.last_queries.max() <= 60
    assert attack.last_success.any()
    assert (attack.last_queries[attack.last_success] < 60).all(), "successful samples stop early"
    assert (attack.last_queries[~attack.last_success] == 60).all()
    assert attack.uses_gradients is False


def test_apgd_checkpoint_schedule():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(1) == []
    assert all(0 < w < 10 for w in apgd_checkpoints(10))


# ---------------------------------------------------------------------- BPDA and EOT
class ZeroGradQuantizer(nn.Module):
    """Non-differentiable input layer: rounds to 1/8 steps; no gradient reaches the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x.detach() * 8) / 8


def test_bpda_recovers_strong_attack_through_rounding_layer(beacon_policy):
    trained, obs = beacon_policy
    policy = copy.deepcopy(trained)
    policy.input_filter = ZeroGradQuantizer()
    eps = 8 / 255
    with torch.no_grad():
        assert torch.equal(policy(obs).argmax(1), trained(obs).argmax(1)), "quantizer changed actions"
    with pytest.raises(ValueError, match="no gradient path to obs"):  # the guard refuses it
        PGD(policy, eps=eps, steps=10, seed=0)(obs)
    with allow_masked_gradients():  # what the audit measures: plain PGD finds nothing
        plain_rate = success_rate(PGD(policy, eps=eps, steps=10, seed=0), obs)
    noise_rate = success_rate(RandomNoise(policy, eps=eps, seed=0), obs)
    bpda = BPDA(PGD(policy, eps=eps, steps=10, seed=0))
    adv = bpda(obs)
    bpda_rate = bpda.last_success.float().mean().item()
    assert_in_ball(adv, obs, eps, "linf")
    assert isinstance(policy.input_filter, ZeroGradQuantizer), "the filter must be restored"
    assert plain_rate <= 0.02, plain_rate          # masked: the gradient is zero everywhere
    assert bpda_rate >= 0.2 and bpda_rate >= max(plain_rate, noise_rate) + 0.15, (
        plain_rate, noise_rate, bpda_rate)


def test_bpda_interfaces_path_module_backward_and_restore_on_error():
    quant = ZeroGradQuantizer()
    body = tiny_policy("cnn", seed=0)
    policy = nn.Sequential(quant, body).eval()
    obs = random_obs(32, seed=12, saturate=0.0)
    by_name = BPDA(PGD(policy, steps=5, seed=0), preprocess="0")
    by_module = BPDA(PGD(policy, steps=5, seed=0), preprocess=quant)
    assert by_name.preprocess_path == by_module.preprocess_path == "0"
    assert torch.equal(by_name(obs), by_module(obs))
    smooth = BPDA(PGD(policy, steps=5, seed=0), preprocess="0",
                  backward=lambda x: x - torch.sin(16 * math.pi * x) / (16 * math.pi))
    assert_in_ball(smooth(obs), obs, 8 / 255, "linf")
    assert policy[0] is quant
    with pytest.raises(ValueError, match="has no input_filter module"):
        BPDA(PGD(policy))
    with pytest.raises(ValueError, match="not a submodule"):
        BPDA(PGD(policy), preprocess="encoder.nothing")
    with pytest.raises(ValueError, match="must be None"):
        BPDA(PGD(policy), preprocess=ZeroGradQuantizer())
    with pytest.raises(ValueError, match="obs must lie in"):
        by_name(obs * 3)
    assert policy[0] is quant


def test_straight_through_values_and_gradient():
    x = torch.rand(2, 5, 5, 3, requires_grad=True)
    st_layer = StraightThrough(lambda t: torch.round(t * 8) / 8)
    y = st_layer(x)
    assert torch.equal(y, torch.round(x.detach() * 8) / 8)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.ones_like(x))


class NoisyInput(nn.Module):
    """A randomized defence: Gaussian noise on the input at every forward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.05 * torch.randn_like(x)


def test_eot_averages_over_a_stochastic_policy_reproducibly():
    policy = tiny_policy("cnn", seed=1)
    policy.input_filter = NoisyInput()
    obs = random_obs(16, seed=13, saturate=0.0)
    inner = PGD(policy, eps=8 / 255, steps=3, seed=0)
    eot = EOT(inner, samples=4)
    adv = eot(obs)
    assert_in_ball(adv, obs, 8 / 255, "linf")
    assert torch.equal(adv, EOT(PGD(policy, eps=8 / 255, steps=3, seed=0), samples=4)(obs))
    assert inner._eot_samples == 1, "EOT must restore the wrapped attack's sample count"
    # the EOT gradient is the mean of per-pass gradients: less noisy than one pass
    from attacks.base import AttackContext
    x = obs.clone()
    ctx = AttackContext(obs=x, actions=policy(x).argmax(1), clean_logits=policy(x).detach(),
                        target=None, generator=torch.Generator().manual_seed(0))
    one = torch.stack([inner.loss_and_grad(x, ctx)[1] for _ in range(6)])
    inner._eot_samples = 16
    many = torch.stack([inner.loss_and_grad(x, ctx)[1] for _ in range(6)])
    inner._eot_samples = 1
    assert many.var(0).mean() < one.var(0).mean()


def test_eot_train_mode_and_nesting_with_bpda():
    policy = tiny_policy("cnn", seed=2)
    policy.input_filter = ZeroGradQuantizer()
    policy.encoder.head.append(nn.Dropout(0.2))
    policy.eval()
    attack = EOT(BPDA(PGD(policy, steps=2, seed=0)), samples=2, eval_mode=False)
    attack(random_obs(4, seed=14))
    assert not policy.training and isinstance(policy.input_filter, ZeroGradQuantizer)


# ---------------------------------------------------------------------- ensemble and registry
def test_ensemble_takes_the_strongest_member_per_sample():
    policy = tiny_policy("cnn", seed=3)
    obs = random_obs(40, seed=15, saturate=0.0)
    members = [RandomNoise(policy, eps=8 / 255, seed=1), FGSM(policy, eps=4 / 255),
               PGD(policy, eps=8 / 255, steps=5, seed=2)]
    ens = Ensemble(members, skip_successful=False)
    adv = ens(obs)
    clean = policy(obs).argmax(1)
    with torch.no_grad():
        ens_flip = policy(adv).argmax(1) != clean
    ens_loss = ce_loss(policy, adv, clean)
    for member in members:
        member.set_seed(member.seed)
        madv = member(obs)
        with torch.no_grad():
            flip = policy(madv).argmax(1) != clean
        assert (ens_flip | ~flip).all(), "a member flipped a sample the ensemble did not"
        same = ens_flip == flip
        assert (ens_loss[same] >= ce_loss(policy, madv, clean)[same] - 1e-5).all()
    assert ens.last_choice.shape == (40,)
    assert_in_ball(adv, obs, 8 / 255, "linf")
    skip = Ensemble(members)                 # AutoAttack-style: later members skip flipped samples
    skip(obs)
    assert skip.last_success.float().mean() >= max(m.last_success.float().mean() for m in members[:2])


def test_ensemble_needs_one_policy():
    with pytest.raises(ValueError, match="same policy object"):
        Ensemble([FGSM(tiny_policy(seed=0)), FGSM(tiny_policy(seed=1))])
    with pytest.raises(ValueError, match="non-empty sequence"):
        Ensemble([])


def test_make_attack_builds_every_attack_and_routes_wrapper_settings():
    policy = tiny_policy()
    for name in ATTACKS:
        attack = make_attack(name, policy, eps="4/255")
        assert isinstance(attack, Attack) and attack.eps == pytest.approx(4 / 255)
        assert isinstance(attack.settings(), dict) and repr(attack)
    bpda = make_attack("bpda", policy, attack="apgd", steps=7, eps=0.1)
    assert isinstance(bpda.attack, APGD) and bpda.attack.steps == 7 and bpda.eps == 0.1
    eot = make_attack("eot", policy, attack="bpda", samples=3, steps=2)
    assert isinstance(eot.attack, BPDA) and eot.samples == 3 and eot.attack.attack.steps == 2
    ens = make_attack("ensemble", policy, attacks=["fgsm", "pgd"], steps=4, seed=5)
    assert ens.attacks[1].steps == 4 and ens.attacks[1].seed == 6
    assert make_attack("Random-Noise", policy).name == "random"


def test_wrappers_rebind_and_keep_mixed_norm_balls():
    p1, p2 = tiny_policy(seed=1), tiny_policy(seed=2)
    p1.input_filter = ZeroGradQuantizer()
    p2.input_filter = ZeroGradQuantizer()
    bpda = BPDA(EOT(PGD(p1, steps=2, seed=0), samples=2))
    moved = bpda.with_policy(p2)
    assert moved.policy is p2 and moved.attack.attack.policy is p2 and bpda.attack.attack.policy is p1
    assert moved.attack.samples == 2 and moved.preprocess_path == "input_filter"
    obs = random_obs(6, seed=16, saturate=0.0)
    assert_in_ball(moved(obs), obs, 8 / 255, "linf")
    # an ensemble of an L2 and a Linf attack, wrapped: each sample stays in its member's ball
    mixed = BPDA(Ensemble([PGD(p1, eps=0.5, norm="l2", steps=2, seed=0),
                           PGD(p1, eps=4 / 255, steps=2, seed=0)], skip_successful=False))
    adv = mixed(obs)
    choice = mixed.attack.last_choice
    delta = (adv - obs).flatten(1)
    for i in range(len(obs)):
        if choice[i] == 0:
            assert delta[i].norm() <= 0.5 + 1e-5
        elif choice[i] == 1:
            assert delta[i].abs().max() <= 4 / 255 + 1e-6
