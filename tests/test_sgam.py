"""SGAM (marl_fgmf.sgam): identity at keep=1, ranges, gradients, distillation, validation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from agents import make_policy_network
from marl_fgmf.attribution import grad_cam_plus_plus
from marl_fgmf.sgam import SGAM, SGAMConfig, attach_sgam, sgam_distillation_loss

OBS = (12, 12, 3)
SMALL = {
    "cnn": dict(channels=(8, 16, 16), hidden=32),
    "vit": dict(patch=3, dim=16, depth=1, heads=2, hidden=32),
    "hybrid": dict(channels=(8, 16), depth=1, heads=2, hidden=32),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(arch: str = "cnn", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = make_policy_network(arch, OBS, 5, **SMALL[arch])
    nn.init.normal_(net.pi.weight, std=1.0)
    return net


def obs_batch(b: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, *OBS, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["cnn", "vit", "hybrid"])
def test_keep_one_is_exactly_identity(arch):
    net = make_net(arch)
    x = obs_batch()
    plain = net(x)
    sgam = attach_sgam(net, keep=1.0)
    assert net.input_filter is sgam
    assert torch.equal(sgam(x), x)
    assert torch.equal(net(x), plain)
    assert torch.equal(sgam.last_mask, torch.ones(x.shape[:3]))


@pytest.mark.parametrize("arch", ["cnn", "vit", "hybrid"])
@pytest.mark.parametrize("smoothing", ["mean", "gaussian"])
def test_mask_and_output_ranges(arch, smoothing):
    net = make_net(arch)
    sgam = attach_sgam(net, keep=0.3, kernel=5, smoothing=smoothing)
    extremes = torch.stack([torch.zeros(OBS), torch.ones(OBS),
                            (torch.rand(OBS) > 0.5).float()])
    x = torch.cat([obs_batch(), extremes])
    out = sgam(x)
    assert out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    m = sgam.last_mask
    assert m.shape == x.shape[:3] and m.min() >= 0 and m.max() <= 1
    assert net(x).shape == (len(x), 5)
    kept = (sgam.mask(obs_batch()) > 0.5).sum(dim=(1, 2))
    assert (kept == round(0.3 * 12 * 12)).all(), kept


def test_output_is_the_defined_blend():
    torch.manual_seed(0)
    sgam = SGAM(3, keep=0.4, kernel=3)
    x = obs_batch(2)
    m = sgam.mask(x)[..., None]
    pad = nn.functional.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate")
    local_mean = nn.functional.avg_pool2d(pad, 3, stride=1).permute(0, 2, 3, 1)
    assert torch.allclose(sgam.smooth(x), local_mean, atol=1e-6)
    assert torch.allclose(sgam(x), m * x + (1 - m) * local_mean, atol=1e-6)
    assert torch.equal(SGAM(3, keep=0.4, kernel=1)(x), x)  # no smoothing: nothing changes
    const = torch.full((1, *OBS), 0.7)
    assert torch.allclose(SGAM(3, keep=0.2, kernel=5, smoothing="gaussian")(const), const)


def test_gradient_flows_to_inputs_and_saliency_head():
    net = make_net("cnn")
    sgam = attach_sgam(net, keep=0.5)
    x = obs_batch().requires_grad_(True)
    torch.log_softmax(net(x), -1)[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in sgam.head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches saliency head parameter {name}"


@pytest.mark.parametrize("arch", ["cnn", "hybrid"])
def test_distillation_loss_decreases_and_trains_only_the_head(arch):
    net = make_net(arch)
    sgam = attach_sgam(net, keep=0.5)
    x = obs_batch(8)
    opt = torch.optim.Adam(sgam.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss, info = sgam_distillation_loss(sgam, net, x, return_info=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(info["distill_loss"])
    assert losses[-1] < 0.7 * losses[0], losses
    assert set(info) == {"distill_loss", "keep_ratio", "top_overlap"}
    assert 0 <= info["keep_ratio"] <= 1 and 0 <= info["top_overlap"] <= 1
    assert all(p.grad is None for p in net.encoder.parameters()), "policy got distillation grads"


def test_distillation_target_is_the_unfiltered_grad_cam():
    net = make_net("cnn")
    x = obs_batch(4)
    target = grad_cam_plus_plus(net, x, normalize=True)
    sgam = attach_sgam(net, keep=0.3, kernel=5)
    assert not torch.allclose(net(x), make_net("cnn")(x)), "the filter should change logits"
    with sgam.bypassed():
        assert torch.equal(net(x), make_net("cnn")(x))
        assert torch.allclose(grad_cam_plus_plus(net, x, normalize=True), target)
    loss = sgam_distillation_loss(sgam, net, x)
    assert loss.dim() == 0 and loss.requires_grad
    expected = nn.functional.mse_loss(sgam.saliency(x), target)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


class NoCamPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_filter = nn.Identity()
        self.obs_shape = OBS
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12 * 12 * 3, 5))

    def forward(self, obs):
        return self.net(self.input_filter(obs))


def test_policy_without_cam_layer_errors_clearly():
    with pytest.raises(ValueError, match="cam_layer"):
        attach_sgam(NoCamPolicy())
    sgam = attach_sgam(NoCamPolicy(), require_cam_layer=False)
    with pytest.raises(ValueError, match="cam_layer"):
        sgam_distillation_loss(sgam, NoCamPolicy(), obs_batch())
    with pytest.raises(ValueError, match="input_filter"):
        attach_sgam(nn.Linear(3, 5))


@pytest.mark.parametrize("kwargs,expected", [
    (dict(keep=0.0), r"keep must be in \(0, 1\]"),
    (dict(keep=1.5), r"keep must be in \(0, 1\]"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=-1.0), "temperature must be a finite number > 0"),
    (dict(kernel=2), "kernel must be an odd integer >= 1"),
    (dict(kernel=0), "kernel must be an odd integer >= 1"),
    (dict(smoothing="median"), "smoothing must be one of"),
    (dict(sigma=0.0), "sigma must be None or a finite number > 0"),
    (dict(head_channels=0), "head_channels must be an integer >= 1"),
])
def test_settings_validation(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        SGAM(3, **kwargs)
    with pytest.raises(ValueError, match=expected):
        SGAMConfig(**kwargs)
    with pytest.raises(ValueError, match=expected):
        attach_sgam(make_net("cnn"), **kwargs)


def test_bad_observations():
    net = make_net("cnn")
    sgam = attach_sgam(net)
    x = obs_batch()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        sgam_distillation_loss(sgam, net, x)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        sgam(torch.rand(2, 12, 12, 4))


def test_config_defaults_match_the_layer():
    sgam = SGAM(3)
    assert {k: v for k, v in sgam.config.items() if k != "in_channels"} == SGAMConfig().to_dict()
    net = make_net("vit")
    attached = attach_sgam(net, **SGAMConfig(keep=0.25).to_dict())
    assert attached.keep == 0.25 and net.input_filter is attached


def test_config_round_trip():
    sgam = SGAM(3, keep=0.25, temperature=0.2, kernel=5, smoothing="gaussian", sigma=1.0)
    clone = SGAM(**sgam.config)
    clone.load_state_dict(sgam.state_dict())
    x = obs_batch(2)
    assert torch.equal(clone(x), sgam(x))


def test_saliency_detached_keeps_the_output_and_input_gradient_not_the_head_gradient():
    net = make_net("cnn")
    sgam = attach_sgam(net, keep=0.5)
    x = obs_batch().requires_grad_(True)
    full = sgam(x)
    with sgam.saliency_detached():
        detached = sgam(x)
        torch.log_softmax(net(x), -1)[:, 0].sum().backward()
    assert torch.equal(full, detached)
    assert x.grad is not None and x.grad.abs().sum() > 0  # through m * x + (1 - m) * s(x)
    assert all(p.grad is None for p in sgam.head.parameters())
    assert not sgam._detached  # restored on exit
    # the head's own distillation loss still trains it
    loss = sgam_distillation_loss(sgam, net, obs_batch())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sgam.head.parameters())


def test_filter_applies_inside_bypassed():
    net = make_net("cnn")
    sgam = attach_sgam(net, keep=0.5)
    x = obs_batch()
    with sgam.bypassed():
        assert torch.equal(sgam(x), x)
        inside = sgam.filter(x)
    assert torch.equal(inside, sgam(x)) and not torch.equal(inside, x)


@pytest.mark.parametrize("keep", [0.01, 0.3, 0.5, 0.9, 0.99])
def test_mask_threshold_is_the_quantile_with_ties(keep):
    """The one-topk threshold equals the two-kthvalue definition, ties included."""
    sgam = SGAM(3, keep=keep)
    c = torch.rand(7, 9, 11, generator=torch.Generator().manual_seed(3))
    for sal in (c, (c * 4).round() / 4):  # ties: only 5 distinct values
        flat = sal.flatten(1)
        d = flat.shape[1]
        n = min(d - 1, max(1, round(keep * d)))
        tau = 0.5 * (flat.kthvalue(d - n + 1, dim=1, keepdim=True).values
                     + flat.kthvalue(d - n, dim=1, keepdim=True).values)
        scale = sgam.temperature * flat.std(dim=1, keepdim=True).clamp_min(1e-6)
        expected = torch.sigmoid((flat - tau) / scale).view_as(sal)
        assert torch.allclose(sgam.mask_from_saliency(sal), expected, atol=1e-7)
