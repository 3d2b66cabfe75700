"""Policy networks: shapes, the policy protocol, the Grad-CAM++ layer, smoothness, errors."""
from __future__ import annotations

import pytest
import torch

from agents import ARCHS, make_policy_network
from marl_fgmf.protocol import check_obs

SHAPES = [(21, 21, 3), (32, 32, 3), (42, 42, 3), (32, 32, 6), (7, 9, 1)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("obs_shape", SHAPES)
def test_policy_protocol_shapes(arch, obs_shape):
    net = make_policy_network(arch, obs_shape, n_actions=5)
    obs = torch.rand(4, *obs_shape)
    logits, values = net(obs), net.value(obs)
    assert logits.shape == (4, 5) and values.shape == (4,)
    both = net.forward_both(obs)
    torch.testing.assert_close(both[0], logits)
    torch.testing.assert_close(both[1], values)
    captured = []
    handle = net.cam_layer.register_forward_hook(lambda m, i, o: captured.append(o))
    net(obs)
    handle.remove()
    assert captured[0].dim() == 4 and captured[0].shape[0] == 4
    assert tuple(captured[0].shape[1:]) == tuple(net.encoder.feature_shape)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_rows_are_independent(arch):
    """Row i of a batched call equals the unbatched call on row i (no batch mixing)."""
    torch.manual_seed(0)
    net = make_policy_network(arch, (21, 21, 3), 5).double().eval()
    obs = torch.rand(3, 21, 21, 3, dtype=torch.double)
    batched = net(obs)
    for i in range(3):
        torch.testing.assert_close(batched[i:i + 1], net(obs[i:i + 1]))


@pytest.mark.parametrize("arch", ARCHS)
def test_smooth_default_has_input_curvature(arch):
    """SiLU/GELU networks have a non-vanishing input Hessian of log pi (ReLU's is ~0)."""
    torch.manual_seed(0)
    net = make_policy_network(arch, (21, 21, 3), 5).double()
    with torch.no_grad():
        net.pi.weight.mul_(100)  # leave the near-uniform init so the softmax is not flat
    from marl_fgmf.scorpio import double_backward_safe
    x = torch.rand(2, 21, 21, 3, dtype=torch.double, requires_grad=True)
    with double_backward_safe():  # the fused attention kernel has no second derivative
        lp = torch.log_softmax(net(x), -1)[:, 0].sum()
    (g,) = torch.autograd.grad(lp, x, create_graph=True)
    (hv,) = torch.autograd.grad((g * torch.randn_like(x)).sum(), x)
    assert hv.abs().max() > 1e-6


def test_relu_option_and_errors():
    net = make_policy_network("cnn", (21, 21, 3), 4, activation="relu")
    assert any(isinstance(m, torch.nn.ReLU) for m in net.modules())
    with pytest.raises(ValueError, match="unknown arch 'mlp'; allowed: cnn, vit, hybrid"):
        make_policy_network("mlp", (21, 21, 3), 5)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        make_policy_network("cnn", (21, 21, 3), 5, activation="swish")
    with pytest.raises(ValueError, match=r"obs_shape must be \(H, W, C\)"):
        make_policy_network("cnn", (21, 21), 5)
    with pytest.raises(ValueError, match="n_actions must be >= 1"):
        make_policy_network("cnn", (21, 21, 3), 0)


def test_check_obs_messages():
    """The protocol's one observation check (marl_fgmf.protocol), as the networks' callers
    meet it."""
    with pytest.raises(ValueError, match=r"shape \(B, H, W, C\)"):
        check_obs(torch.rand(21, 21, 3))
    with pytest.raises(ValueError, match="does not match"):
        check_obs(torch.rand(1, 21, 21, 3), (32, 32, 3))
    with pytest.raises(ValueError, match="divide uint8 frames by 255"):
        check_obs(torch.zeros(1, 21, 21, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_obs(torch.rand(1, 21, 21, 3) * 255)
    with pytest.raises(ValueError, match="finite"):
        check_obs(torch.full((1, 21, 21, 3), float("nan")))
    check_obs(torch.rand(2, 21, 21, 3), (21, 21, 3))  # a good batch passes


def test_input_filter_slot_is_applied_first():
    net = make_policy_network("cnn", (21, 21, 3), 5)
    obs = torch.rand(2, 21, 21, 3)
    before = net(obs)
    net.input_filter = torch.nn.Identity()
    torch.testing.assert_close(net(obs), before)

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    net.input_filter = Zero()
    torch.testing.assert_close(net(obs), net(torch.zeros_like(obs)))
