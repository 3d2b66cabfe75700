"""Integrated Gradients and Grad-CAM++ (marl_fgmf.attribution).

SmoothGrad, Occlusion and RISE are tested in tests/test_explainers.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from agents import make_policy_network
from marl_fgmf.attribution import (GradCAMPlusPlus, action_log_prob, grad_cam_plus_plus,
                                   integrated_gradients)

import captum.attr as captum_attr  # a test dependency: missing captum fails, never skips

OBS = (9, 9, 3)
SMALL = {
    "cnn": dict(channels=(8, 16, 16), hidden=32),
    "vit": dict(patch=3, dim=16, depth=1, heads=2, hidden=32),
    "hybrid": dict(channels=(8, 16), depth=1, heads=2, hidden=32),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(arch: str = "cnn", dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = make_policy_network(arch, OBS, 5, **SMALL[arch]).to(dtype)
    nn.init.normal_(net.pi.weight, std=1.0)  # a decisive policy: non-trivial attributions
    return net


def obs_batch(b: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, *OBS, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def captum_ig(net, obs, actions, baseline, steps):
    ig = captum_attr.IntegratedGradients(lambda x: torch.log_softmax(net(x), dim=-1))
    return ig.attribute(obs, baselines=baseline, target=actions, n_steps=steps,
                        method="riemann_right")


# --------------------------------------------------------------------------- IG

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
    ours = integrated_gradients(net, x, actions=actions, baseline=base, steps=10)
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


# --------------------------------------------------------------------------- Grad-CAM++

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
    """Score ``Y = sum_k V_k mean_ij A_kij``: ``g_k = V_k / (h w)`` is constant in space, so
    ``alpha_k = 1 / (2 + S_k g_k)`` with ``S_k = sum_ij A_kij``, ``w_k = h w alpha_k relu(g_k)``
    and ``L = relu(sum_k w_k A_k)``."""
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
def test_grad_cam_pp_shapes_sign_normalization_batching(arch):
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
