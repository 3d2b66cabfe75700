"""SmoothGrad, Occlusion, RISE and the explainer registry of marl_fgmf.attribution.

Agreement with Captum (same window, stride and substrate, via Captum's ``baselines``), batched
equals unbatched, hand-checks, and one-line errors on bad input.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from agents import make_policy_network
from marl_fgmf.attribution import (RISE, Occlusion, SmoothGrad, action_score, gaussian_blur,
                                   make_substrate, masked_scores, patch_masks, rise_masks)
from marl_fgmf.explainers import METHODS, attribution_map, make_explainer, spatial_map

import captum.attr as captum_attr  # a test dependency: missing captum fails, never skips

SHAPE = (11, 11, 3)


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    net = make_policy_network("cnn", SHAPE, 5, channels=(4, 8, 8), hidden=16).double()
    # a larger policy head than the PPO init, so that the actions are not all equiprobable
    nn.init.normal_(net.pi.weight, std=0.5)
    return net.eval()


@pytest.fixture(scope="module")
def obs():
    return torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def log_probs(policy):
    return lambda x: torch.log_softmax(policy(x), dim=-1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------- occlusion
@pytest.mark.parametrize("patch,stride", [(3, 1), (4, 3), (5, 2), ((3, 2), (2, 1))])
def test_occlusion_matches_captum_with_blurred_baseline(policy, obs, patch, stride):
    actions = policy(obs).argmax(-1)
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ref = captum_attr.Occlusion(log_probs(policy)).attribute(
        obs, sliding_window_shapes=(ph, pw, 3), strides=(sh, sw, 3),
        baselines=gaussian_blur(obs, 2.0), target=actions, perturbations_per_eval=64)
    ours = Occlusion(policy).attribute(obs, patch=patch, stride=stride, substrate="blur",
                                       blur_sigma=2.0)
    assert ours.shape == obs.shape[:3]
    assert rel_err(ours, ref[..., 0]) < 1e-4


def test_occlusion_magnitude_matches_captum(policy, obs):
    """|drop| through Captum: forward ``-|log pi(x) - log pi(x_clean)|`` makes Captum's
    ``f(x) - f(x_occluded)`` equal ``|log pi(x) - log pi(x_occluded)|``."""
    actions = policy(obs).argmax(-1)
    clean = log_probs(policy)(obs).detach()

    def forward(x):  # Captum evaluates one occluded copy of the batch at a time
        return -(log_probs(policy)(x) - clean).abs()

    ref = captum_attr.Occlusion(forward).attribute(
        obs, sliding_window_shapes=(3, 3, 3), strides=(2, 2, 3), baselines=0.25,
        target=actions, perturbations_per_eval=1)
    ours = Occlusion(policy).attribute(obs, patch=3, stride=2, substrate=0.25, magnitude=True)
    assert rel_err(ours, ref[..., 0]) < 1e-4


def test_occlusion_batched_equals_unbatched(policy, obs):
    full = Occlusion(policy).attribute(obs, patch=3, stride=1, internal_batch_size=None)
    chunked = Occlusion(policy).attribute(obs, patch=3, stride=1, internal_batch_size=13)
    single = torch.cat([Occlusion(policy).attribute(obs[i:i + 1], patch=3, stride=1)
                        for i in range(len(obs))])
    assert torch.allclose(full, chunked, atol=1e-10)
    assert torch.allclose(full, single, atol=1e-10)


def test_unchanged_windows_are_skipped_exactly(policy):
    """Windows where the substrate equals the observation are not evaluated; the scores are
    the same as evaluating every window."""
    obs = torch.zeros(2, *SHAPE, dtype=torch.float64)
    obs[0, 2:5, 3:6] = 0.8
    obs[1, 7:9, 1:4, 1] = 0.6
    actions = policy(obs).argmax(-1)
    fill = make_substrate(obs, "zero")
    masks = patch_masks(11, 11, 3, 1, dtype=obs.dtype)
    clean = action_score(policy(obs), actions, "log_prob")
    every = masked_scores(policy, obs, fill, masks, actions, "log_prob", 50)
    skipped = masked_scores(policy, obs, fill, masks, actions, "log_prob", 50, clean)
    assert torch.allclose(every, skipped, atol=1e-12)


def test_patch_masks_cover_every_pixel_like_captum():
    masks = patch_masks(7, 7, 3, 3)  # starts 0, 3, 6 (last clipped): ceil(4/3)+1 = 3 per axis
    assert masks.shape == (9, 7, 7)
    assert masks.sum(0).min() >= 1
    assert masks[-1].sum() == 1  # the bottom-right window holds one pixel


def test_log_prob_drop_survives_a_saturated_policy():
    """log_softmax in float32 rounds log pi to 0 when pi ~ 1; the occlusion score must not."""
    logits = torch.tensor([[30.0, 0.0, 0.0], [31.0, 0.0, 0.0]])
    actions = torch.zeros(2, dtype=torch.long)
    scores = action_score(logits, actions, "log_prob")
    expected = -torch.log1p(2 * torch.exp(-logits[:, 0].double()))  # exact: -log(1 + 2e^-z)
    assert torch.log_softmax(logits, -1)[0, 0] == 0  # the float32 failure this avoids
    assert (scores[0] - scores[1]).abs() > 0
    assert torch.allclose(scores, expected, rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------- smoothgrad
def test_smoothgrad_without_noise_is_captum_saliency(policy, obs):
    actions = policy(obs).argmax(-1)
    ref = captum_attr.Saliency(log_probs(policy)).attribute(obs.clone().requires_grad_(),
                                                             target=actions, abs=False)
    ours = SmoothGrad(policy).attribute(obs, n_samples=3, noise_level=0.0)
    assert rel_err(ours, ref) < 1e-4


def test_smoothgrad_hand_check_and_chunking(policy, obs):
    """SG = mean of the gradients at the seeded noisy copies; chunking changes nothing."""
    n, sigma = 4, 0.1
    actions = policy(obs).argmax(-1)
    noise = torch.randn((n, *obs.shape), generator=torch.Generator().manual_seed(7),
                        dtype=obs.dtype)
    grads = []
    for j in range(n):
        x = (obs + sigma * noise[j]).requires_grad_(True)
        lp = log_probs(policy)(x).gather(1, actions[:, None]).sum()
        grads.append(torch.autograd.grad(lp, x)[0])
    expected = torch.stack(grads).mean(0)
    ours = SmoothGrad(policy).attribute(obs, n_samples=n, noise_level=sigma, seed=7)
    chunked = SmoothGrad(policy).attribute(obs, n_samples=n, noise_level=sigma, seed=7,
                                           internal_batch_size=5)
    squared = SmoothGrad(policy).attribute(obs, n_samples=n, noise_level=sigma, seed=7,
                                           squared=True)
    assert rel_err(ours, expected) < 1e-6
    assert torch.allclose(ours, chunked, atol=1e-12)
    assert torch.allclose(squared, torch.stack(grads).square().mean(0), atol=1e-12)


# ------------------------------------------------------------------------------- RISE
def test_rise_masks_are_seeded_smooth_and_in_range():
    m1, m2 = rise_masks(200, 13, 17, grid=4, seed=3), rise_masks(200, 13, 17, grid=4, seed=3)
    assert m1.shape == (200, 13, 17) and torch.equal(m1, m2)
    assert m1.min() >= 0 and m1.max() <= 1
    assert abs(float(m1.mean()) - 0.5) < 0.05
    assert not torch.equal(m1, rise_masks(200, 13, 17, grid=4, seed=4))


def test_rise_equals_its_definition(policy, obs):
    """S = 1/(N p) sum_j pi(a | x * M_j) M_j, checked mask by mask."""
    n, p = 40, 0.5
    actions = policy(obs).argmax(-1)
    masks = rise_masks(n, 11, 11, grid=3, p_keep=p, seed=0, dtype=obs.dtype)
    expected = torch.zeros(obs.shape[:3], dtype=obs.dtype)
    with torch.no_grad():
        for j in range(n):
            probs = torch.softmax(policy(obs * masks[j][None, :, :, None]), -1)
            expected += probs.gather(1, actions[:, None]).view(-1, 1, 1) * masks[j]
    expected /= n * p
    ours = RISE(policy).attribute(obs, n_masks=n, grid=3, p_keep=p, seed=0,
                                  internal_batch_size=17)
    single = torch.cat([RISE(policy).attribute(obs[i:i + 1], n_masks=n, grid=3, seed=0)
                        for i in range(len(obs))])
    assert rel_err(ours, expected) < 1e-10
    assert torch.allclose(ours, single, atol=1e-12)


# ------------------------------------------------------------------------------- registry
def test_registry_names_and_shapes(policy, obs):
    assert set(METHODS) == {"ig", "smoothgrad", "occlusion", "gradcampp", "rise", "pgca"}
    settings = {"ig": dict(steps=4), "smoothgrad": dict(n_samples=2), "occlusion": {},
                "gradcampp": {}, "rise": dict(n_masks=20), "pgca": dict(steps=4)}
    for name, kw in settings.items():
        out = make_explainer(name, policy).attribute(obs[:2], None, **kw)
        assert out.shape[:3] == obs[:2].shape[:3], name
        amap = attribution_map(name, policy, obs[:2], **kw)
        assert amap.shape == obs[:2].shape[:3] and (amap >= 0).all(), name
    assert torch.equal(spatial_map(-torch.ones(1, 2, 2, 3)), torch.full((1, 2, 2), 3.0))


def test_explain_given_actions(policy, obs):
    actions = torch.tensor([0, 1, 2])
    occ = Occlusion(policy).attribute(obs, actions, patch=3, stride=2)
    ref = captum_attr.Occlusion(log_probs(policy)).attribute(
        obs, sliding_window_shapes=(3, 3, 3), strides=(2, 2, 3),
        baselines=gaussian_blur(obs, 2.0), target=actions, perturbations_per_eval=25)
    assert rel_err(occ, ref[..., 0]) < 1e-4


# ------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_one_line_errors(policy, obs):
    with pytest.raises(ValueError, match=r"patch \(12, 12\) is larger than the observation "
                                         r"\(11, 11\)"):
        Occlusion(policy).attribute(obs, patch=12)
    with pytest.raises(ValueError, match="stride"):
        Occlusion(policy).attribute(obs, patch=2, stride=3)
    bad = obs.clone()
    bad[0, 0, 0, 0] = float("nan")
    bad[1, 2, 2, 1] = float("inf")
    for name in ("smoothgrad", "occlusion", "rise"):
        with pytest.raises(ValueError, match=r"got 2 NaN/inf") as info:
            make_explainer(name, policy).attribute(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown attribution method 'lime'"):
        make_explainer("lime", policy)
    with pytest.raises(ValueError, match=r"substrate of shape \(2, 2\) does not broadcast"):
        Occlusion(policy).attribute(obs, substrate=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="internal_batch_size"):
        RISE(policy).attribute(obs, internal_batch_size=0)
