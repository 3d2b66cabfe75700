"""The gradient-masking audit: flags a planted masked policy, not a plain trained one.

The plain policies are small CNNs behaviour-cloned from beacon's scripted optimal policy (a few
seconds each, no RLlib), two training seeds, so the verdict does not hinge on one network.
The masked policy is the same network behind a zero-gradient quantizing input filter.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from agents import make_policy_network
from marl_fgmf.audit import (CHECK_NAMES, AuditReport, audit, has_input_filter, is_stochastic,
                             mcnemar_greater)

EPS = 8 / 255
# a budget that keeps the test quick; the verdicts below hold for the defaults too
FAST = dict(steps=(1, 10, 30), restarts=(1, 3), n_queries=150)


class ZeroGradQuantizer(nn.Module):
    """Rounds observations to multiples of 1/k. ``torch.round`` has a zero derivative, so no
    gradient reaches the input (NOT straight-through): the textbook masked defence."""

    def __init__(self, k: int = 8):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * self.k) / self.k


class NoisyFilter(nn.Module):
    """A randomized input filter (Gaussian noise in every forward): a stochastic policy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 0.05 * torch.randn_like(x)).clamp(0, 1)


class ConstantPolicy(nn.Module):
    """Logits that ignore the observation: robust for real, nothing to mask."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.0, 1.0, 0.5, -1.0, 0.2]))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(obs.shape[0], -1) + 0.0 * obs.flatten(1).sum(1, keepdim=True)


@pytest.fixture(scope="module", params=[0, 1], ids=["bc-seed0", "bc-seed1"])
def trained(request, clone_beacon_policy) -> tuple[nn.Module, torch.Tensor]:
    return clone_beacon_policy(seed=request.param)


def failed(report: AuditReport) -> set[str]:
    return {c.name for c in report.checks if not c.passed}


# ---------------------------------------------------------------------- the acceptance pair
def test_plain_trained_policy_is_not_flagged(trained):
    policy, obs = trained
    for seed in (0, 1):
        report = audit(policy, obs, EPS, seed=seed, **FAST)
        assert not report.flagged, report.to_text()
        assert [c.name for c in report.checks] == list(CHECK_NAMES)
        # and the attacks really bite: this is a vulnerable policy, not an inert one
        assert report.success["pgd-grad@1"] > 0.9, report.to_text()
        assert report.success["white-box (any)"] > report.success["random"], report.to_text()
        assert not report.checks[4].applicable  # no filter, deterministic: BPDA/EOT n/a


def test_planted_zero_gradient_quantizer_is_flagged(trained):
    policy, obs = trained
    masked = copy.deepcopy(policy)
    masked.input_filter = ZeroGradQuantizer(8)
    x = obs[:4].clone().requires_grad_(True)
    masked(x).logsumexp(1).sum().backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0, "the planted layer must mask"
    report = audit(masked, obs, EPS, **FAST)
    assert report.flagged, report.to_text()
    bad = failed(report)
    # the gradient cannot move the iterate, and only non-gradient attacks reach large budgets
    assert {"steps_and_restarts", "large_budget"} <= bad, report.to_text()
    assert report.checks[2].numbers["gradient_progress"] < 0.5
    assert report.checks[3].numbers["pgd_large"] < 0.1 < 0.9 < report.checks[3].numbers["reachable_large"]
    assert report.checks[4].applicable and report.policy["input_filter"] == "ZeroGradQuantizer"
    assert "FLAGGED" in report.to_text() and "**FAIL**" in report.to_markdown()


def test_masked_policy_with_coarser_quantizer_fails_the_bpda_check(trained):
    """k=4 steps are coarse: the plain attack does nothing, BPDA through the filter wins."""
    policy, obs = trained
    masked = copy.deepcopy(policy)
    masked.input_filter = ZeroGradQuantizer(4)
    with torch.no_grad():
        agree = (masked(obs).argmax(1) == policy(obs).argmax(1)).float().mean()
    if agree < 0.8:
        pytest.skip("the coarse quantizer changes this network's clean actions too much")
    report = audit(masked, obs, 16 / 255, **FAST)
    assert report.flagged, report.to_text()
    check = report.checks[4]
    # the adaptive check itself fails (not only the other symptoms of the same masking)
    assert check.name == "adaptive_attack" and check.applicable, report.to_text()
    assert not check.passed and "adaptive_attack" in failed(report), report.to_text()
    nums = check.numbers
    assert nums["input_filter"] is True and nums["stochastic"] is False
    assert nums["plain_attack"] == "pgd30" and nums["best_adaptive"] == "bpda-pgd30"
    assert nums["plain"] <= 0.05, report.to_text()
    # BPDA beats plain PGD by at least the margin, significantly (McNemar p < alpha)
    assert nums["diff"] == pytest.approx(nums["bpda-pgd30"] - nums["plain"])
    assert nums["diff"] >= nums["margin"] == 0.05, report.to_text()
    assert nums["p"] < nums["alpha"] == 0.01, report.to_text()
    assert nums["adaptive_only"] > nums["plain_only"], report.to_text()
    assert report.success["bpda-pgd30"] == nums["bpda-pgd30"]
    assert check.message.startswith("the adaptive attack beats the plain one: bpda-pgd30")


# ---------------------------------------------------------------------- robust is not masked
def test_input_insensitive_policy_is_not_flagged():
    """A policy no input can move is robust for real: flat success must not flag it."""
    obs = torch.rand(32, 21, 21, 3, generator=torch.Generator().manual_seed(0))
    report = audit(ConstantPolicy(), obs, EPS, **FAST)
    assert not report.flagged, report.to_text()
    assert report.checks[3].numbers["reachable_large"] == 0.0
    assert "input-insensitive" in report.checks[3].message


def test_stochastic_policy_gets_eot_and_bpda():
    torch.manual_seed(0)
    net = make_policy_network("cnn", (21, 21, 3), 5, channels=(4, 8, 8), hidden=16).eval()
    net.input_filter = NoisyFilter()
    obs = torch.rand(16, 21, 21, 3, generator=torch.Generator().manual_seed(1))
    assert is_stochastic(net, obs) and has_input_filter(net)
    state = torch.random.get_rng_state()
    report = audit(net, obs, EPS, steps=(1, 3), restarts=(1, 2), n_queries=20, eot_samples=2,
                   ladder_points=2, large_random_draws=2)
    assert torch.equal(state, torch.random.get_rng_state()), "the caller's RNG was consumed"
    assert report.policy["stochastic"] is True
    assert {"eot-pgd3", "bpda-pgd3", "eot-bpda-pgd3"} <= set(report.success)
    assert report.checks[4].applicable


# ---------------------------------------------------------------------- pieces
def test_mcnemar_exact_one_sided():
    a = torch.tensor([1] * 8 + [0] * 56, dtype=torch.bool)
    b = torch.zeros(64, dtype=torch.bool)
    t = mcnemar_greater(a, b)
    assert t["a_only"] == 8 and t["b_only"] == 0
    assert t["p"] == pytest.approx(0.5 ** 8)
    assert t["diff"] == pytest.approx(8 / 64)
    same = mcnemar_greater(a, a)
    assert same["p"] == 1.0 and same["diff"] == 0.0
    # 6 vs 2 discordant: P[Bin(8, 1/2) >= 6] = (28 + 8 + 1) / 256
    c = torch.tensor([1] * 6 + [0] * 2 + [0] * 56, dtype=torch.bool)
    d = torch.tensor([0] * 6 + [1] * 2 + [0] * 56, dtype=torch.bool)
    assert mcnemar_greater(c, d)["p"] == pytest.approx(37 / 256)


def test_report_round_trips_through_json(trained):
    policy, obs = trained
    report = audit(policy, obs[:16], EPS, steps=(1, 3), restarts=(1, 2), n_queries=20)
    data = json.loads(json.dumps(report.to_dict()))
    back = AuditReport.from_dict(data)
    assert back.flagged == report.flagged
    assert [c.name for c in back.checks] == [c.name for c in report.checks]
    assert back.checks[0].numbers == pytest.approx(report.checks[0].numbers)
    md = report.to_markdown(title="p")
    for c in report.checks:
        assert c.title in md
    text = report.to_text()
    assert all(c.title in text for c in report.checks)


@pytest.mark.parametrize("kwargs, message", [
    ({"eps": 2.0}, "eps must be in (0, 1]"),
    ({"eps": "8/0"}, "eps must be a number"),
    ({"steps": ()}, "steps must be a non-empty sequence"),
    ({"restarts": (0, 2)}, "restarts must be a non-empty sequence of integers >= 1"),
    ({"objective": "dlr"}, "objective must be 'margin' or 'ce'"),
    ({"n_queries": 0}, "n_queries must be an integer >= 1"),
    ({"margin": 1.5}, "margin must be in [0, 1]"),
])
def test_bad_settings_raise_one_line(kwargs, message):
    net = make_policy_network("cnn", (21, 21, 3), 5, channels=(4, 8, 8), hidden=16)
    kwargs = {"eps": EPS, **kwargs}
    eps = kwargs.pop("eps")
    with pytest.raises(ValueError, match=None) as info:
        audit(net, torch.rand(4, 21, 21, 3), eps, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_observations_raise():
    net = make_policy_network("cnn", (21, 21, 3), 5, channels=(4, 8, 8), hidden=16)
    with pytest.raises(ValueError, match="shape"):
        audit(net, torch.rand(21, 21, 3), EPS)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        audit(net, torch.rand(2, 21, 21, 3) * 255, EPS)


# ---------------------------------------------------------------------- the CLI
def _cli(*args: str, cwd=None) -> "subprocess.CompletedProcess":
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "marl_fgmf.cli", "audit", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def test_audit_cli_on_a_trained_checkpoint(ray_session, tmp_path):
    from agents.train import TrainConfig, train
    train(TrainConfig(train_batch_size=200, minibatch_size=100, num_epochs=1,
                      num_envs_per_env_runner=2, iterations=1, defense="sgam"),
          tmp_path / "run", progress=False)
    # a relative checkpoint path, as users type it
    proc = _cli("--checkpoint", "run", "--n-obs", "8", "--episodes", "1", "--steps", "1,3",
                "--restarts", "1,2", "--n-queries", "20", "--out", "audit.json", "--quiet",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for title in ("1. gradient-free (Square) vs white-box", "2. random noise vs FGSM",
                  "3. PGD steps and restarts", "4. success as eps grows",
                  "5. adaptive (BPDA/EOT) vs plain"):
        assert title in proc.stdout
    data = json.loads((tmp_path / "audit.json").read_text())
    report = AuditReport.from_dict(data["policies"]["shared"])
    assert report.policy["input_filter"] == "SGAM" and report.checks[4].applicable
    verdict = "FLAGGED" if report.flagged else "not flagged"
    assert verdict in proc.stdout.splitlines()[-2]


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/no/such/run"], "checkpoint not found: /no/such/run"),
    (["--checkpoint", ".", "--env", "moon"], "unknown env 'moon'"),
    (["--checkpoint", ".", "--eps", "3"], "eps must be in (0, 1]"),
    (["--checkpoint", ".", "--steps", "0,5"], "expected positive integers"),
])
def test_audit_cli_bad_input_one_line_exit_2(args, message, tmp_path):
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
