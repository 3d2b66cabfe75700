"""The attribution package (marl_fgmf.attribution): one section per method file, then the bases.

Each method: agreement with an oracle (Captum where Captum has the method: IG, occlusion,
SmoothGrad at zero noise as Saliency; the closed form or the definition otherwise: Grad-CAM++,
RISE, SmoothGrad with noise), batched equals unbatched, and one-line errors on bad input.
The registry by name is tested in tests/test_explainers.py, PGCA in tests/test_pgca.py.
"""
from __future__ import annotations

import copy
import subprocess
import sys

import captum.attr as captum_attr  # a test dependency: a missing captum fails, never skips
import pytest
import torch
from torch import nn

from agents import make_policy_network
from marl_fgmf.attribution import (RISE, GradCAMPlusPlus, IntegratedGradients, Occlusion,
                                   SmoothGrad, action_log_prob, action_score, gaussian_blur,
                                   grad_cam_plus_plus, integrated_gradients, make_substrate,
                                   masked_scores, patch_masks, rise_masks)

OBS = (9, 9, 3)
SMALL = {
    "cnn": dict(channels=(8, 16, 16), hidden=32),
    "vit": dict(patch=3, dim=16, depth=1, heads=2, hidden=32),
    "hybrid": dict(channels=(8, 16), depth=1, heads=2, hidden=32),
}
SHAPE = (11, 11, 3)  # the perturbation methods' frames

pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(arch: str = "cnn", dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = make_policy_network(arch, OBS, 5, **SMALL[arch]).to(dtype)
    nn.init.normal_(net.pi.weight, std=1.0)  # a decisive policy: non-trivial attributions
    return net


def obs_batch(b: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, *OBS, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def obs():
    return torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def log_probs(policy):
    return lambda x: torch.log_softmax(policy(x), dim=-1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def captum_ig(net, obs, actions, baseline, steps):
    ig = captum_attr.IntegratedGradients(lambda x: torch.log_softmax(net(x), dim=-1))
    return ig.attribute(obs, baselines=baseline, target=actions, n_steps=steps,
                        method="riemann_right")


# =========================================================================== integrated_gradients

@pytest.mark.parametrize("arch", ["cnn", "vit", "hybrid"])
def test_ig_matches_captum_riemann_right(arch):
    net = make_net(arch)
    x = obs_batch(3)
    actions = net(x).argmax(-1)
    ours = integrated_gradients(net, x, steps=16)
    ref = captum_ig(net, x, actions, 0.0, 16)
    assert ref.abs().sum() > 0
    assert rel_err(ours, ref) < 1e-4, f"{arch}: relative error {rel_err(ours, ref):.2e}"


def test_ig_matches_captum_with_baseline_actions_and_float32():
    net = make_net("cnn")
    x = obs_batch(4)
    base = obs_batch(4, seed=7) * 0.5
    actions = torch.tensor([0, 3, 1, 4])
    ours = IntegratedGradients(net).attribute(x, actions=actions, baseline=base, steps=10)
    assert rel_err(ours, captum_ig(net, x, actions, base, 10)) < 1e-4
    ours = integrated_gradients(net, x, baseline=0.25, steps=10)
    assert rel_err(ours, captum_ig(net, x, net(x).argmax(-1), 0.25, 10)) < 1e-4
    net32, x32 = copy.deepcopy(net).float(), x.float()
    ours32 = integrated_gradients(net32, x32, actions=actions, steps=10)
    assert rel_err(ours32, captum_ig(net32, x32, actions, 0.0, 10)) < 1e-4


@pytest.mark.parametrize("arch", ["cnn", "vit", "hybrid"])
def test_ig_completeness(arch):
    """sum_i IG_i -> log pi(a|x) - log pi(a|b); the right Riemann error shrinks as O(1/m)."""
    net = make_net(arch)
    x = obs_batch(3)
    actions = net(x).argmax(-1)
    with torch.no_grad():
        gap = action_log_prob(net, x, actions) - action_log_prob(net, torch.zeros_like(x), actions)
    err = {m: (integrated_gradients(net, x, steps=m).flatten(1).sum(1) - gap).abs()
           for m in (16, 256)}
    assert (err[256] <= 0.01 * gap.abs().max() + 1e-3).all(), (err[256], gap)
    assert err[256].sum() < err[16].sum()


def test_ig_batched_equals_unbatched_and_internal_batch_size_invariance():
    net = make_net("hybrid")
    x = obs_batch(5)
    full = integrated_gradients(net, x, steps=6)
    single = torch.cat([integrated_gradients(net, x[i:i + 1], steps=6) for i in range(5)])
    assert torch.allclose(full, single, rtol=1e-9, atol=1e-12)
    for chunk in (1, 4, 7, 30, 1000):
        chunked = integrated_gradients(net, x, steps=6, internal_batch_size=chunk)
        assert torch.allclose(full, chunked, rtol=1e-9, atol=1e-12), chunk
    one_step = integrated_gradients(net, x, steps=1)  # m = 1: x * grad at x
    xg = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(action_log_prob(net, xg, net(x).argmax(-1)).sum(), xg)[0]
    assert torch.allclose(one_step, x * grad)


def test_ig_bad_input():
    net = make_net("cnn", torch.float32)
    x = obs_batch(2, torch.float32)
    with pytest.raises(ValueError, match="steps"):
        integrated_gradients(net, x, steps=0)
    with pytest.raises(ValueError, match="internal_batch_size"):
        integrated_gradients(net, x, internal_batch_size=0)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        integrated_gradients(net, x[0])
    with pytest.raises(ValueError, match="actions"):
        integrated_gradients(net, x, actions=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="actions"):
        integrated_gradients(net, x, actions=torch.tensor([0, 9]))
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match="finite"):
            integrated_gradients(net, y)
    with pytest.raises(ValueError, match=r"\[0, 1\].*divide by 255"):  # the protocol's range
        integrated_gradients(net, x * 255)


# =========================================================================== smoothgrad

def test_smoothgrad_without_noise_is_captum_saliency(policy, obs):
    actions = policy(obs).argmax(-1)
    ref = captum_attr.Saliency(log_probs(policy)).attribute(obs.clone().requires_grad_(),
                                                             target=actions, abs=False)
    ours = SmoothGrad(policy).attribute(obs, n_samples=3, noise_level=0.0)
    assert max_rel_err(ours, ref) < 1e-4


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
    times_input = SmoothGrad(policy).attribute(obs, n_samples=n, noise_level=sigma, seed=7,
                                               multiply_by_inputs=True)
    assert max_rel_err(ours, expected) < 1e-6
    assert torch.allclose(ours, chunked, atol=1e-12)
    assert torch.allclose(squared, torch.stack(grads).square().mean(0), atol=1e-12)
    assert torch.allclose(times_input, obs * ours, atol=1e-12)


def test_smoothgrad_batched_equals_unbatched(policy, obs):
    """Sample i of a batch is explained from its own noisy copies, row by row: the batched call
    equals the per-observation definition with the batch's noise (no cross-sample leak), and
    with zero noise equals explaining each observation alone."""
    n, sigma, seed = 3, 0.05, 2
    batched = SmoothGrad(policy).attribute(obs, n_samples=n, noise_level=sigma, seed=seed)
    noise = torch.randn((n, *obs.shape), generator=torch.Generator().manual_seed(seed),
                        dtype=obs.dtype)
    actions = policy(obs).argmax(-1)
    for i in range(len(obs)):
        rows = [(obs[i:i + 1] + sigma * noise[j, i:i + 1]).requires_grad_(True) for j in range(n)]
        grads = [torch.autograd.grad(log_probs(policy)(r)[0, actions[i]], r)[0] for r in rows]
        assert torch.allclose(batched[i:i + 1], torch.stack(grads).mean(0), atol=1e-12), i
    clean = SmoothGrad(policy).attribute(obs, n_samples=2, noise_level=0.0)
    single = torch.cat([SmoothGrad(policy).attribute(obs[i:i + 1], n_samples=2, noise_level=0.0)
                        for i in range(len(obs))])
    assert torch.allclose(clean, single, atol=1e-12)


def test_smoothgrad_bad_input(policy, obs):
    with pytest.raises(ValueError, match="n_samples"):
        SmoothGrad(policy).attribute(obs, n_samples=0)
    with pytest.raises(ValueError, match="noise_level"):
        SmoothGrad(policy).attribute(obs, noise_level=-0.1)


# =========================================================================== grad_cam

class GapPolicy(nn.Module):
    """conv -> cam_layer -> global average pool -> linear: Grad-CAM++ has a closed form."""

    def __init__(self, c: int = 3, k: int = 4, n_actions: int = 3):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, k, 3, 2, 1), nn.SiLU())
        self.cam_layer = nn.Identity()
        self.fc = nn.Linear(k, n_actions)

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        return self.conv(obs.permute(0, 3, 1, 2))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.fc(self.cam_layer(self.features(obs)).mean(dim=(2, 3)))


def test_grad_cam_pp_closed_form_on_gap_network():
    """The oracle (Captum has Grad-CAM, not Grad-CAM++). Score ``Y = sum_k V_k mean_ij A_kij``:
    ``g_k = V_k / (h w)`` is constant in space, so ``alpha_k = 1 / (2 + S_k g_k)`` with
    ``S_k = sum_ij A_kij``, ``w_k = h w alpha_k relu(g_k)`` and ``L = relu(sum_k w_k A_k)``."""
    torch.manual_seed(0)
    net = GapPolicy().double()
    x = obs_batch(3)
    actions = torch.tensor([0, 2, 1])
    cam = grad_cam_plus_plus(net, x, actions, upsample=False)
    with torch.no_grad():
        a = net.features(x)  # (B, K, h, w)
        hw = a.shape[2] * a.shape[3]
        g = net.fc.weight[actions] / hw  # (B, K)
        s = a.sum(dim=(2, 3))
        w = hw * torch.relu(g) / (2 + s * g)
        expected = torch.relu((w[:, :, None, None] * a).sum(1))
    assert cam.shape == (3, 5, 5)
    assert torch.allclose(cam, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", ["cnn", "vit", "hybrid"])
def test_grad_cam_pp_shapes_sign_normalization_batched_equals_unbatched(arch):
    net = make_net(arch)
    x = obs_batch(4)
    cam = GradCAMPlusPlus(net).attribute(x)
    assert cam.shape == (4, 9, 9) and not cam.requires_grad
    assert (cam >= 0).all()
    coarse = GradCAMPlusPlus(net).attribute(x, upsample=False)
    assert coarse.shape == (4, *net.encoder.feature_shape[1:])
    norm = grad_cam_plus_plus(net, x, normalize=True)
    live = cam.flatten(1).amax(1) > 0
    assert live.any()
    peak = norm.flatten(1).amax(1)
    assert torch.allclose(peak[live], torch.ones_like(peak[live])) and (peak[~live] == 0).all()
    single = torch.cat([grad_cam_plus_plus(net, x[i:i + 1]) for i in range(4)])
    assert torch.allclose(cam, single, rtol=1e-8, atol=1e-12)
    signed = grad_cam_plus_plus(net, x, relu=False, score="log_prob")
    assert signed.shape == cam.shape


def test_grad_cam_pp_create_graph_is_differentiable():
    net = make_net("cnn")
    x = obs_batch(2).requires_grad_(True)
    cam = grad_cam_plus_plus(net, x, create_graph=True)
    assert cam.requires_grad
    (grad,) = torch.autograd.grad(cam.sum(), x)
    assert torch.isfinite(grad).all()


def test_grad_cam_pp_bad_input():
    x = obs_batch(2, torch.float32)
    with pytest.raises(ValueError, match="cam_layer"):
        grad_cam_plus_plus(nn.Sequential(nn.Flatten(), nn.Linear(9 * 9 * 3, 5)), x)
    net = make_net("cnn", torch.float32)
    with pytest.raises(ValueError, match="score"):
        grad_cam_plus_plus(net, x, score="prob")
    y = x.clone()
    y[1, 2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        grad_cam_plus_plus(net, y)


# =========================================================================== occlusion

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
    assert max_rel_err(ours, ref[..., 0]) < 1e-4


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
    assert max_rel_err(ours, ref[..., 0]) < 1e-4


def test_occlusion_given_actions_matches_captum(policy, obs):
    actions = torch.tensor([0, 1, 2])
    occ = Occlusion(policy).attribute(obs, actions, patch=3, stride=2)
    ref = captum_attr.Occlusion(log_probs(policy)).attribute(
        obs, sliding_window_shapes=(3, 3, 3), strides=(2, 2, 3),
        baselines=gaussian_blur(obs, 2.0), target=actions, perturbations_per_eval=25)
    assert max_rel_err(occ, ref[..., 0]) < 1e-4


def test_occlusion_batched_equals_unbatched(policy, obs):
    full = Occlusion(policy).attribute(obs, patch=3, stride=1, internal_batch_size=None)
    chunked = Occlusion(policy).attribute(obs, patch=3, stride=1, internal_batch_size=13)
    single = torch.cat([Occlusion(policy).attribute(obs[i:i + 1], patch=3, stride=1)
                        for i in range(len(obs))])
    assert torch.allclose(full, chunked, atol=1e-10)
    assert torch.allclose(full, single, atol=1e-10)


def test_occlusion_bad_input(policy, obs):
    with pytest.raises(ValueError, match=r"patch \(12, 12\) is larger than the observation "
                                         r"\(11, 11\)"):
        Occlusion(policy).attribute(obs, patch=12)
    with pytest.raises(ValueError, match="stride"):
        Occlusion(policy).attribute(obs, patch=2, stride=3)
    with pytest.raises(ValueError, match=r"substrate of shape \(2, 2\) does not broadcast"):
        Occlusion(policy).attribute(obs, substrate=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="score must be"):
        Occlusion(policy).attribute(obs, score="margin")


# =========================================================================== rise

def test_rise_masks_are_seeded_smooth_and_in_range():
    m1, m2 = rise_masks(200, 13, 17, grid=4, seed=3), rise_masks(200, 13, 17, grid=4, seed=3)
    assert m1.shape == (200, 13, 17) and torch.equal(m1, m2)
    assert m1.min() >= 0 and m1.max() <= 1
    assert abs(float(m1.mean()) - 0.5) < 0.05
    assert not torch.equal(m1, rise_masks(200, 13, 17, grid=4, seed=4))


def test_rise_equals_its_definition_batched_equals_unbatched(policy, obs):
    """The oracle (Captum has no RISE): S = 1/(N p) sum_j pi(a | x * M_j) M_j, mask by mask."""
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
    assert max_rel_err(ours, expected) < 1e-10
    assert torch.allclose(ours, single, atol=1e-12)


def test_rise_bad_input(policy, obs):
    with pytest.raises(ValueError, match="internal_batch_size"):
        RISE(policy).attribute(obs, internal_batch_size=0)
    with pytest.raises(ValueError, match="p_keep"):
        RISE(policy).attribute(obs, p_keep=0.0)


# =========================================================================== base

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


class FrozenPart(nn.Module):
    """A policy in train mode whose feature extractor a user froze in eval mode (dropout off)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("method", [SmoothGrad, Occlusion, RISE])
def test_mode_of_every_submodule_is_restored(policy, obs, method):
    """The explainers run in eval mode and restore each submodule's own flag (the old context
    manager called ``policy.train()`` and switched a frozen submodule back to training)."""
    net = FrozenPart(copy.deepcopy(policy)).train()
    net.drop.eval()
    seen = []
    handle = net.inner.register_forward_hook(lambda m, i, o: seen.append(m.training))
    kwargs = {"RISE": dict(n_masks=4)}.get(method.__name__, {})
    method(net).attribute(obs[:1], **kwargs)
    handle.remove()
    assert seen and not any(seen)  # eval inside
    assert net.training and net.inner.training and not net.drop.training  # restored flag by flag


@pytest.mark.parametrize("method", [IntegratedGradients, SmoothGrad, Occlusion, RISE])
def test_every_method_checks_the_observation_contract(policy, obs, method):
    bad = obs.clone()
    bad[0, 0, 0, 0] = float("nan")
    bad[1, 2, 2, 1] = float("inf")
    with pytest.raises(ValueError, match="2 NaN/inf value") as info:
        method(policy).attribute(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        method(policy).attribute(obs - 0.5)
    with pytest.raises(ValueError, match="floating point"):
        method(policy).attribute((obs * 255).to(torch.uint8))


def test_attribution_does_not_import_pgca_or_the_registry():
    """No cycle: pgca builds on attribution, the registry (explainers) on both."""
    code = ("import sys, marl_fgmf.attribution; "
            "print(sorted(m for m in ('marl_fgmf.pgca', 'marl_fgmf.explainers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    pgca = subprocess.run([sys.executable, "-c", "import sys, marl_fgmf.pgca; "
                           "print('marl_fgmf.explainers' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert pgca.returncode == 0 and pgca.stdout.strip() == "False", pgca.stderr
