"""The model-parameter randomization test (marl_fgmf/sanity.py; Adebayo et al., NeurIPS 2018).

A synthetic policy whose logits depend only on a known pixel region (its head's weights are
zero elsewhere): gradient maps light up that region, and after the weights are re-initialized
they spread over the whole frame and decorrelate; the brightness baseline does not move
(correlation 1) and the check flags it. The caller's policy is never modified.
"""
from __future__ import annotations

import copy

import pytest
import scipy.stats
import torch
from torch import nn

from marl_fgmf.attribution import IntegratedGradients, SmoothGrad
from marl_fgmf.sanity import (RandomizationResult, pearson, randomizable_layers,
                              randomization_check, spearman)

H = W = 10
REGION = (slice(2, 5), slice(5, 8))  # the pixels the logits read (before the convolutions)
GRADIENT = dict(n_samples=1, noise_level=0.0)  # SmoothGrad without noise: the plain gradient

pytestmark = pytest.mark.usefixtures("one_thread")


class RegionPolicy(nn.Module):
    """conv -> SiLU -> conv -> SiLU -> linear head reading only the features of REGION; a
    value head that the logits never use."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6 * H * W, 5)
        self.value = nn.Linear(6 * H * W, 1)
        with torch.no_grad():
            keep = torch.zeros(6, H, W)
            keep[:, REGION[0], REGION[1]] = 1.0
            self.head.weight.mul_(keep.flatten() * 4.0)
        self.double()

    def features(self, obs):
        x = nn.functional.silu(self.conv1(obs.permute(0, 3, 1, 2)))
        return nn.functional.silu(self.conv2(x)).flatten(1)

    def forward(self, obs):
        return self.head(self.features(obs))


@pytest.fixture(scope="module")
def obs():
    return torch.rand(6, H, W, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_layers_on_the_logits_path_in_call_order(obs):
    assert randomizable_layers(RegionPolicy(), obs) == ["conv1", "conv2", "head"]  # no "value"


def test_spearman_and_pearson_match_scipy_with_ties():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (3, 5, 5), generator=gen).double()  # many ties
    b = a + torch.randint(0, 3, (3, 5, 5), generator=gen).double()
    ours, ours_r = spearman(a, b), pearson(a, b)
    for i in range(3):
        ref = scipy.stats.spearmanr(a[i].flatten(), b[i].flatten()).statistic
        assert float(ours[i]) == pytest.approx(ref, abs=1e-12)
        ref_r = scipy.stats.pearsonr(a[i].flatten(), b[i].flatten()).statistic
        assert float(ours_r[i]) == pytest.approx(ref_r, abs=1e-12)
    assert torch.isnan(spearman(torch.ones(1, 3, 3), a[:1, :3, :3])).all()  # constant: undefined


def test_gradient_maps_decorrelate_after_full_randomization(obs):
    """Plain gradient and IG of the region policy: concentrated on the region, then, with
    every layer random, rank-uncorrelated with the original; not flagged."""
    policy = RegionPolicy()
    for explainer, settings in ((SmoothGrad, GRADIENT), ("ig", dict(steps=8))):
        res = randomization_check(explainer, policy, obs, mode="cascading", settings=settings)
        assert isinstance(res, RandomizationResult)
        assert res.layers == ("head", "conv2", "conv1")  # top first
        assert res.spearman.shape == res.pearson.shape == res.spearman_signed.shape == (3, 6)
        outside = res.original.clone()
        outside[:, 0:7, 3:10] = 0  # the region dilated by 2 (two 3x3 convolutions)
        assert float(outside.abs().max()) == 0.0  # the original map sits on the region
        final = res.spearman[-1]
        assert float(final.mean()) < 0.3, (explainer, res.spearman.mean(1))
        assert float(res.spearman_signed[-1].abs().mean()) < 0.3
        assert not res.flagged() and res.final_spearman() < 0.3


def test_independent_mode_randomizes_one_layer_at_a_time(obs):
    policy = RegionPolicy()
    res = randomization_check("smoothgrad", policy, obs, mode="independent", settings=GRADIENT)
    assert res.layers == ("head", "conv2", "conv1") and res.mode == "independent"
    # the head alone decides where the map lies: randomizing it decorrelates the map
    assert float(res.spearman[0].mean()) < 0.3
    cascade = randomization_check("smoothgrad", policy, obs, mode="cascading", settings=GRADIENT)
    # step 0 is the same experiment in both modes (the head alone, the same seed)
    assert torch.allclose(res.spearman[0], cascade.spearman[0])
    assert torch.equal(res.randomized[0], cascade.randomized[0])
    assert not res.flagged()


def test_brightness_baseline_is_unaffected_and_flagged(obs):
    policy = RegionPolicy()
    for mode in ("cascading", "independent"):
        res = randomization_check("brightness", policy, obs, mode=mode)
        assert torch.allclose(res.spearman, torch.ones(3, 6, dtype=torch.float64), atol=1e-9)
        assert torch.allclose(res.pearson, torch.ones(3, 6, dtype=torch.float64), atol=1e-9)
        assert res.flagged() and res.final_spearman() == pytest.approx(1.0)


def test_callers_policy_and_random_state_are_unchanged(obs):
    policy = RegionPolicy().train()
    before = copy.deepcopy(policy.state_dict())
    rng = torch.get_rng_state()
    res = randomization_check("ig", policy, obs, mode="cascading", settings=dict(steps=4))
    for key, value in policy.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert policy.training  # its mode too
    assert torch.equal(torch.get_rng_state(), rng)
    assert not torch.equal(res.randomized[-1], res.original)  # the copy did change


def test_seeded_reproducibility(obs):
    policy = RegionPolicy()
    a = randomization_check("smoothgrad", policy, obs, settings=GRADIENT, seed=3)
    b = randomization_check("smoothgrad", policy, obs, settings=GRADIENT, seed=3)
    c = randomization_check("smoothgrad", policy, obs, settings=GRADIENT, seed=4)
    assert torch.equal(a.spearman, b.spearman) and torch.equal(a.randomized, b.randomized)
    assert not torch.equal(a.randomized, c.randomized)


def test_explicit_layers_and_actions(obs):
    policy = RegionPolicy()
    actions = torch.tensor([0, 1, 2, 3, 4, 0])
    res = randomization_check(IntegratedGradients, policy, obs, layers=["conv1"],
                              actions=actions, settings=dict(steps=4))
    assert res.layers == ("conv1",) and torch.equal(res.actions, actions)


class ZeroResetLinear(nn.Linear):
    """A layer whose re-initialization zeroes it: the randomized policy is constant."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # PyTorch's own initialization first
        self.built = True

    def reset_parameters(self):
        if getattr(self, "built", False):
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.bias)
        else:
            super().reset_parameters()


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = ZeroResetLinear(H * W * 3, 5).double()

    def forward(self, obs):
        return self.head(obs.flatten(1))


def test_constant_maps_lost_ranking_is_0_and_no_ranking_is_nan(obs):
    """A randomized map that is constant kept none of the ranking (0, not flagged); an original
    map that is constant ranks nothing (NaN, flagged)."""
    class LogitGradient:  # no input-gradient guard: the zeroed policy's gradient is 0
        def __init__(self, policy):
            self.policy = policy

        def attribute(self, obs, actions):
            x = obs.clone().requires_grad_(True)
            logit = self.policy(x).gather(1, actions[:, None]).sum()
            return torch.autograd.grad(logit, x)[0]

    res = randomization_check(LogitGradient, Flat(), obs)
    assert float(res.randomized.abs().max()) == 0.0 and float(res.original.abs().min()) > 0
    assert torch.equal(res.spearman, torch.zeros(1, 6, dtype=torch.float64)) and not res.flagged()

    class Constant:
        def __init__(self, policy):
            self.policy = policy

        def attribute(self, obs, actions=None):
            return torch.ones(obs.shape[:3], dtype=obs.dtype)

    res = randomization_check(Constant, RegionPolicy(), obs)
    assert torch.isnan(res.spearman).all() and res.flagged()


def test_beacon_frames_input_multiplied_maps_keep_their_rank_over_the_black_floor():
    """On beacon's mostly black frames, IG (x times a mean gradient) is 0 on the floor whatever
    the weights: over all pixels it stays rank-correlated (~0.99) and is flagged; over the
    foreground it decorrelates like the plain gradient. Untrained CNN, all layers random."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_baselines
    from agents import make_policy_network

    frames, _ = bench_baselines.collect(12, seed=7)
    frames = frames.float()
    torch.manual_seed(0)
    net = make_policy_network("cnn", (21, 21, 3), 5, channels=(8, 16, 16), hidden=32).eval()
    nn.init.normal_(net.pi.weight, std=0.5)
    ig_all = randomization_check("ig", net, frames, settings=dict(steps=8))
    assert ig_all.layers[0] == "pi" and len(ig_all.layers) == 5
    assert ig_all.final_spearman() > 0.9 and ig_all.flagged()
    ig_fg = randomization_check("ig", net, frames, settings=dict(steps=8), pixels="foreground")
    assert ig_fg.pixels == "foreground" and ig_fg.final_spearman() < 0.4 and not ig_fg.flagged()
    grad = randomization_check("smoothgrad", net, frames, settings=GRADIENT)
    assert grad.final_spearman() < 0.4 and not grad.flagged()


def test_bad_input_one_line(obs):
    policy = RegionPolicy()
    cases = [
        (dict(mode="bottom-up"), "mode must be one of cascading, independent, got 'bottom-up'"),
        (dict(explainer="lime"), "unknown attribution method 'lime'; allowed: ig, "),
        (dict(explainer=3), "explainer must be a method name or a factory"),
        (dict(policy=lambda x: x), "policy must be a torch.nn.Module"),
        (dict(obs=obs * 255), r"must lie in \[0, 1\]"),
        (dict(layers=["nope"]), "layer 'nope' is not a module with parameters of the policy; "
                                "layers on the logits' path: conv1, conv2, head"),
        (dict(settings=[1]), "settings must be a dict"),
        (dict(seed=0.5), "seed must be an integer"),
        (dict(settings={"window": 3}), "unexpected keyword argument 'window'"),
        (dict(pixels="objects"), "pixels must be one of all, foreground, got 'objects'"),
        (dict(layers=["head", "head"]), "layers must name distinct modules"),
        (dict(layers=[]), "layers must name distinct modules, at least one"),
    ]
    for override, message in cases:
        kwargs = dict(explainer="smoothgrad", policy=policy, obs=obs, settings=GRADIENT)
        kwargs.update(override)
        with pytest.raises((ValueError, TypeError), match=message) as info:
            randomization_check(**kwargs)
        assert "\n" not in str(info.value), message
