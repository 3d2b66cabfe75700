"""The input-gradient guard (issue 9 part 3) and the one observation validator at every entry.

A policy whose forward runs under ``torch.no_grad`` (RLlib's ``forward_inference`` does), whose
input is detached, or whose input layer rounds (a zero gradient) must make every gradient
attack, gradient explainer and SCOR-PIO raise one line naming the cause, never return a zero
perturbation or an all-zero map. Gradient-free methods still run on it; a normal policy gives
the same numbers as without the guard; the audit names the cause.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from agents import make_policy_network
from attacks import APGD, BPDA, EOT, FGSM, PGD, RandomNoise, Square
from marl_fgmf import pgca
from marl_fgmf.attribution import (RISE, IntegratedGradients, Occlusion, SmoothGrad,
                                   integrated_gradients)
from marl_fgmf.audit import AuditReport, audit
from marl_fgmf.audit.checks import likely_cause
from marl_fgmf.audit.report import AuditCheck
from marl_fgmf.protocol import (InputGradientError, allow_masked_gradients,
                                check_input_gradient, diagnose_input_gradient)
from marl_fgmf.scorpio import ScorpioConfig, compute_exploitable_subspace, scorpio_regularizer

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (10, 10, 3)
FAST_AUDIT = dict(steps=(1, 4), restarts=(1, 2), n_queries=30, ladder_points=2,
                  large_random_draws=2)


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return make_policy_network("cnn", SHAPE, 5, channels=(4, 8, 8), hidden=16).eval()


def batch(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


class NoGrad(nn.Module):
    """RLlib's forward_inference in miniature: the whole forward under torch.no_grad."""

    def __init__(self, net: nn.Module, inference_mode: bool = False):
        super().__init__()
        self.net, self.inference_mode = net, inference_mode
        self.obs_shape = net.obs_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with (torch.inference_mode() if self.inference_mode else torch.no_grad()):
            return self.net(x)


class Rounding(nn.Module):
    """A quantizing input layer: torch.round has a zero derivative everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 8) / 8


class Detaching(nn.Module):
    """An input layer that cuts the graph (x.detach()): no path from obs to the logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()


def with_filter(net: nn.Module, layer: nn.Module) -> nn.Module:
    out = copy.deepcopy(net)
    out.input_filter = layer
    return out


GRADIENT_METHODS = {
    "FGSM": lambda p, x: FGSM(p, 8 / 255)(x),
    "PGD": lambda p, x: PGD(p, 8 / 255, steps=2, seed=0)(x),
    "APGD": lambda p, x: APGD(p, 8 / 255, steps=3, seed=0)(x),
    "EOT-PGD": lambda p, x: EOT(PGD(p, 8 / 255, steps=2, seed=0), samples=2)(x),
    "PGCA": lambda p, x: pgca.explain(p, x, steps=2),
    "IG": lambda p, x: integrated_gradients(p, x, steps=2),
    "SmoothGrad": lambda p, x: SmoothGrad(p).attribute(x, n_samples=2),
    "scorpio_regularizer": lambda p, x: scorpio_regularizer(p, x, ScorpioConfig()),
    "exploitable_subspace": lambda p, x: compute_exploitable_subspace(p, x, ScorpioConfig()),
}
NAMES = {"FGSM": "FGSM", "PGD": "PGD", "APGD": "APGD", "EOT-PGD": "PGD", "PGCA": "PGCA",
         "IG": "IntegratedGradients", "SmoothGrad": "SmoothGrad",
         "scorpio_regularizer": "SCOR-PIO", "exploitable_subspace": "SCOR-PIO"}


def raised(fn, policy, obs) -> InputGradientError:
    with pytest.raises(InputGradientError) as info:
        fn(policy, obs)
    err = info.value
    assert isinstance(err, ValueError) and "\n" not in str(err), str(err)
    return err


# ------------------------------------------------------------------ the guard refuses
@pytest.mark.parametrize("method", list(GRADIENT_METHODS))
@pytest.mark.parametrize("inference_mode", [False, True], ids=["no_grad", "inference_mode"])
def test_no_grad_policy_is_refused_naming_no_grad(method, inference_mode):
    err = raised(GRADIENT_METHODS[method], NoGrad(tiny(), inference_mode), batch())
    msg = str(err)
    assert err.cause == "no_grad" and "no grad_fn" in msg, msg
    assert "torch.no_grad()" in msg and "inference_mode" in msg and "forward_inference" in msg
    assert msg.startswith(f"{NAMES[method]} needs input gradients"), msg


@pytest.mark.parametrize("method", list(GRADIENT_METHODS))
def test_rounding_input_layer_is_refused_naming_zero_gradient(method):
    err = raised(GRADIENT_METHODS[method], with_filter(tiny(), Rounding()), batch())
    msg = str(err)
    assert err.cause == "zero" and "exactly zero" in msg and "rounding" in msg, msg
    assert "BPDA" in msg


@pytest.mark.parametrize("method", ["PGD", "PGCA", "scorpio_regularizer"])
def test_detached_input_is_refused_naming_the_detach(method):
    err = raised(GRADIENT_METHODS[method], with_filter(tiny(), Detaching()), batch())
    assert err.cause == "detached" and "detach" in str(err), str(err)


def test_the_planted_layers_really_mask():
    """The oracles behind the cases above: no grad_fn, no path, and an all-zero gradient."""
    x = batch().requires_grad_(True)
    assert not NoGrad(tiny())(x).requires_grad
    out = with_filter(tiny(), Detaching())(x)
    assert out.requires_grad and torch.autograd.grad(out.sum(), x, allow_unused=True)[0] is None
    (g,) = torch.autograd.grad(with_filter(tiny(), Rounding())(x).sum(), x)
    assert torch.count_nonzero(g) == 0


def test_without_the_guard_fgsm_on_no_grad_would_be_a_silent_zero():
    """What the guard prevents: FGSM's perturbation is exactly 0 on a no_grad policy."""
    obs = batch()
    with allow_masked_gradients():
        adv = FGSM(NoGrad(tiny()), 8 / 255)(obs)
    assert torch.equal(adv, obs)


# ------------------------------------------------------------------ gradient-free methods run
def test_gradient_free_methods_run_on_a_no_grad_policy():
    policy, obs = NoGrad(tiny()), batch()
    for attack in (Square(policy, 8 / 255, n_queries=10, seed=0), RandomNoise(policy, seed=0)):
        adv = attack(obs)
        assert adv.shape == obs.shape and (adv - obs).abs().max() <= 8 / 255 + 1e-6
    assert Occlusion(policy).attribute(obs, patch=3).shape == obs.shape[:3]
    assert RISE(policy).attribute(obs, n_masks=8).shape == obs.shape[:3]


def test_bpda_through_the_rounding_layer_passes_and_plain_pgd_still_refuses():
    policy, obs = with_filter(tiny(), Rounding()), batch()
    adv = BPDA(PGD(policy, 8 / 255, steps=2, seed=0))(obs)  # the swapped tree is checked
    assert adv.shape == obs.shape and isinstance(policy.input_filter, Rounding)
    raised(GRADIENT_METHODS["PGD"], policy, obs)  # the verdict is per module tree


# ------------------------------------------------------------------ good policies: same numbers
def run_all(policy: nn.Module, obs: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"fgsm": FGSM(policy, 8 / 255)(obs),
           "pgd": PGD(policy, 8 / 255, steps=3, seed=0)(obs),
           "apgd": APGD(policy, 8 / 255, steps=4, seed=0)(obs),
           "ig": IntegratedGradients(policy).attribute(obs, steps=4),
           "pgca": pgca.explain(policy, obs, steps=3).consensus}
    torch.manual_seed(0)
    out["R"] = scorpio_regularizer(policy, obs, ScorpioConfig(reg_fraction=0.5, seed=0))[0].detach()
    out["rng"] = torch.rand(4)  # the guard leaves the caller's RNG stream alone
    return out


def test_normal_policy_passes_with_identical_outputs():
    obs = batch()
    torch.manual_seed(7)
    guarded = run_all(tiny(), obs)       # a fresh policy: every guard runs its probe
    torch.manual_seed(7)
    with allow_masked_gradients():
        plain = run_all(tiny(), obs)     # no probe at all
    for key in guarded:
        assert torch.equal(guarded[key], plain[key]), key


class Counting(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


def test_the_guard_probes_once_per_policy():
    policy, obs = Counting(tiny()).eval(), batch()
    check_input_gradient(policy, obs, name="x")
    assert policy.calls == 1
    for _ in range(3):
        check_input_gradient(policy, obs, name="x")
    assert policy.calls == 1, "a passed verdict is cached"
    policy.train()
    check_input_gradient(policy, obs, name="x")
    assert policy.calls == 2, "train mode is a different forward: probed once more"
    fgsm = FGSM(policy.eval(), 8 / 255)
    start = policy.calls
    with allow_masked_gradients():
        fgsm(obs)
    per_call = policy.calls - start
    fgsm(obs)
    fgsm(obs)
    assert policy.calls - start == 3 * per_call, "no probe: the eval verdict is cached"


def test_probe_restores_batchnorm_statistics_in_train_mode():
    net = nn.Sequential(nn.Flatten(), nn.Linear(300, 8), nn.BatchNorm1d(8), nn.Tanh(),
                        nn.Linear(8, 4)).train()
    before = [b.clone() for b in net.buffers()]
    assert diagnose_input_gradient(net, batch()).ok
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))


def test_centred_logits_and_log_probs_are_not_mistaken_for_zero():
    net = tiny()
    centred = lambda x: net(x) - net(x).mean(1, keepdim=True)  # noqa: E731
    log_probs = lambda x: torch.log_softmax(net(x), -1)  # noqa: E731
    for policy in (centred, log_probs):
        assert diagnose_input_gradient(policy, batch()).ok


def test_a_non_tensor_output_is_left_to_the_callers_validation():
    class Bad(nn.Module):
        def forward(self, x):
            return [0.0]

    d = diagnose_input_gradient(Bad(), batch())
    assert d.ok and not d.checked
    with pytest.raises(ValueError, match="policy output must be logits"):
        FGSM(Bad(), 8 / 255)(batch())


# ------------------------------------------------------------------ layout and range
class FlatPolicy(nn.Module):
    """A policy declaring obs_shape (4, 4, 3): a channels-first (B, 3, 4, 4) batch has a last
    dimension that looks like a channel count, so only the declared shape gives it away."""

    obs_shape = (4, 4, 3)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(x.flatten(1)))


@pytest.mark.parametrize("entry", ["pgca", "scorpio", "pgd"])
def test_nchw_and_0_255_input_are_refused_at_every_entry(entry):
    call = {"pgca": lambda p, x: pgca.explain(p, x, steps=2),
            "scorpio": lambda p, x: scorpio_regularizer(p, x, ScorpioConfig()),
            "pgd": lambda p, x: PGD(p, 8 / 255, steps=2)(x)}[entry]
    net, obs = tiny(), batch(4)
    nchw = obs.permute(0, 3, 1, 2).contiguous()  # (4, 3, 10, 10)
    with pytest.raises(ValueError, match=r"this looks like \(B, C, H, W\)") as info:
        call(net, nchw)
    msg = str(info.value)  # what it got, what it expects, on one line
    assert "(3, 10, 10)" in msg and "(10, 10, 3)" in msg and "\n" not in msg, msg
    with pytest.raises(ValueError, match=r"\[0, 1\] \(this looks like 0-255: divide by 255\)"):
        call(net, obs * 255)
    flat = FlatPolicy()
    ambiguous = torch.rand(2, 4, 4, 3).permute(0, 3, 1, 2).contiguous()  # (2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"does not match the policy's observation shape "
                                         r"\(4, 4, 3\).*\(B, C, H, W\)"):
        call(flat, ambiguous)
    call(flat, torch.rand(2, 4, 4, 3))  # the declared layout works


# ------------------------------------------------------------------ the audit names the cause
def test_audit_of_a_no_grad_policy_is_flagged_and_names_no_grad():
    report = audit(NoGrad(tiny()), batch(24), 8 / 255, **FAST_AUDIT)
    assert report.flagged and report.cause["cause"] == "no_grad", report.to_text()
    assert report.policy["input_gradient"] == "no_grad"
    assert "likely cause (no_grad)" in report.to_text() and "torch.no_grad()" in report.to_text()
    assert "Likely cause (`no_grad`)" in report.to_markdown()
    back = AuditReport.from_dict(json.loads(report.to_json()))
    assert back.cause == report.cause


def test_audit_of_a_rounding_policy_names_the_quantized_input(clone_beacon_policy):
    policy, obs = clone_beacon_policy(seed=0)
    masked = with_filter(policy, Rounding())
    report = audit(masked, obs[:48], 8 / 255, steps=(1, 10), restarts=(1, 2), n_queries=60)
    assert report.flagged, report.to_text()
    assert report.cause["cause"] == "quantized_input" and "Rounding" in report.cause["text"]
    assert report.policy["input_gradient"] == "zero"
    assert "likely cause (quantized_input)" in report.to_text()
    assert json.loads(report.to_json())["cause"]["cause"] == "quantized_input"


def test_audit_of_a_plain_policy_names_no_cause():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([0.0, 1.0, 0.5]))

        def forward(self, obs):
            return self.bias.expand(obs.shape[0], -1) + 0.0 * obs.flatten(1).sum(1, keepdim=True)

    report = audit(Constant(), batch(16), 8 / 255, **FAST_AUDIT)  # zero gradient, truly robust
    assert not report.flagged and report.cause is None, report.to_text()
    assert report.policy["input_gradient"] == "zero"
    assert "likely cause" not in report.to_text()


def _check(name: str, passed: bool, **numbers) -> AuditCheck:
    return AuditCheck(name, passed, numbers, "")


@pytest.mark.parametrize("adaptive, stochastic, filter_name, cause", [
    ("eot-pgd10", True, None, "randomness"),
    ("bpda-pgd10", False, "SGAM", "input_filter"),
    (None, True, None, "randomness"),
    (None, False, None, "useless_gradients"),
])
def test_likely_cause_from_the_checks(adaptive, stochastic, filter_name, cause):
    ok = {"ok": True, "cause": None, "summary": "", "likely": ""}
    checks = [_check("steps_and_restarts", False)]
    if adaptive:
        checks.append(_check("adaptive_attack", False, best_adaptive=adaptive))
    assert likely_cause(checks, ok, filter_name, stochastic)["cause"] == cause
    assert likely_cause([_check("large_budget", True)], ok, filter_name, stochastic) is None
