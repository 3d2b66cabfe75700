"""marl_fgmf.adapter: a policy declared once (layout, input range, logits) on the policy protocol.

The oracle is the same network written twice: a CleanRL-style agent (channels first, uint8
frames 0-255, ``x / 255`` inside, ReLU) through the adapter, and its rewrite for the protocol
(channels last, [0, 1]) with the same weights. Logits, input gradients and PGD's attack
success (fixed seed) must agree; every bad declaration or input is one line.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks import PGD
from marl_fgmf.adapter import PolicyAdapter, adapt_policy

H, W, C, N_ACTIONS = 12, 12, 3, 5


class CleanRLAgent(nn.Module):
    """CleanRL's Atari agent, shrunk: takes (B, C, H, W) uint8-valued frames 0-255."""

    def __init__(self):
        super().__init__()
        self.network = nn.Sequential(
            nn.Conv2d(C, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
            nn.Flatten(), nn.Linear(8 * 3 * 3, 32), nn.ReLU())
        self.actor = nn.Linear(32, N_ACTIONS)
        self.critic = nn.Linear(32, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.float() / 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.actor(self.features(x))


class ProtocolAgent(CleanRLAgent):
    """The same network rewritten for the protocol: (B, H, W, C) float in [0, 1]."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.permute(0, 3, 1, 2))


class TupleAgent(CleanRLAgent):
    """Returns (logits, value), as many actor-critic modules do."""

    def forward(self, x):
        z = self.features(x)
        return self.actor(z), self.critic(z).squeeze(-1)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    foreign = CleanRLAgent()
    for m in foreign.modules():  # a wider policy head: actions far from equiprobable
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.5)
    native = ProtocolAgent()
    native.load_state_dict(foreign.state_dict())
    return foreign.eval(), native.eval()


@pytest.fixture(scope="module")
def obs():
    return torch.rand(32, H, W, C, generator=torch.Generator().manual_seed(1))


def test_logits_and_gradients_equal_the_rewritten_network(nets, obs):
    foreign, native = nets
    policy = adapt_policy(foreign, layout="NCHW", input_range="uint8", n_actions=N_ACTIONS)
    assert isinstance(policy, PolicyAdapter)
    x1 = obs.clone().requires_grad_(True)
    x2 = obs.clone().requires_grad_(True)
    z1, z2 = policy(x1), native(x2)
    torch.testing.assert_close(z1, z2, rtol=1e-5, atol=1e-5)
    # the frames the foreign module saw: the raw pixel values, channels first, not rounded
    torch.testing.assert_close(policy.convert(obs), obs.permute(0, 3, 1, 2) * 255)
    z1.log_softmax(1)[:, 0].sum().backward()
    z2.log_softmax(1)[:, 0].sum().backward()
    assert x1.grad.abs().sum() > 0
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
    assert policy.obs_shape == (H, W, C) and policy.n_actions == N_ACTIONS  # learnt, declared


def test_pgd_attack_success_equals_the_rewritten_network(nets, obs):
    foreign, native = nets
    policy = adapt_policy(foreign, layout="NCHW", input_range="uint8")
    clean = native(obs).argmax(1)
    results = []
    for p in (policy, native):
        adv = PGD(p, eps=4 / 255, steps=10, seed=0)(obs)
        with torch.no_grad():
            results.append((adv, native(adv).argmax(1) != clean))
    (adv1, s1), (adv2, s2) = results
    assert 0 < int(s1.sum()) < len(obs), "the oracle needs an attack that neither always nor never wins"
    assert torch.equal(s1, s2)
    torch.testing.assert_close(adv1, adv2, rtol=0, atol=1e-5)


def test_tuple_and_dict_outputs_with_declared_logits_and_value(nets, obs):
    foreign, _ = nets
    tup = TupleAgent()
    tup.load_state_dict(foreign.state_dict())
    policy = adapt_policy(tup.eval(), layout="NCHW", input_range="uint8",
                          logits=lambda out: out[0], value=lambda out: out[1])
    want = foreign(obs.permute(0, 3, 1, 2) * 255)
    torch.testing.assert_close(policy(obs), want)
    assert policy.value(obs).shape == (len(obs),)

    class DictAgent(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tup

        def forward(self, x):
            logits, value = self.inner(x)
            return {"logits": logits, "vf": value}

    d = adapt_policy(DictAgent(), layout="NCHW", input_range="float255",
                     logits=lambda out: out["logits"])
    torch.testing.assert_close(d(obs), want)
    assert getattr(d, "value", None) is None  # no critic declared: none claimed


def test_module_value_method_and_unit_nhwc(nets, obs):
    _, native = nets
    native.value = lambda x: native.critic(native.features(x)).squeeze(-1)  # a module critic
    try:
        policy = adapt_policy(native)  # NHWC, unit: the identity conversion
        torch.testing.assert_close(policy(obs), native(obs))
        torch.testing.assert_close(policy.value(obs), native.value(obs))
    finally:
        del native.value


# ----------------------------------------------------------------------------- bad input
def one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


@pytest.mark.parametrize("kwargs, needles", [
    ({"layout": "CHW"}, ("layout must be one of NHWC, NCHW", "'CHW'")),
    ({"input_range": "0-255"}, ("input_range must be one of unit, uint8, float255", "'0-255'")),
    ({"logits": "out[0]"}, ("logits must be a function",)),
    ({"obs_shape": (3, 12)}, ("obs_shape must be (H, W, C)",)),
    ({"n_actions": 0}, ("n_actions must be a positive integer",)),
])
def test_bad_declarations(nets, kwargs, needles):
    with pytest.raises(ValueError) as exc:
        adapt_policy(nets[0], **kwargs)
    one_line(exc, *needles)


def test_not_a_module():
    with pytest.raises(ValueError) as exc:
        adapt_policy(lambda x: x)
    one_line(exc, "module must be a torch.nn.Module", "function")


def test_channels_first_or_0_255_protocol_input_is_refused(nets, obs):
    policy = adapt_policy(nets[0], layout="NCHW", input_range="uint8")
    with pytest.raises(ValueError) as exc:
        policy(obs.permute(0, 3, 1, 2).contiguous())
    one_line(exc, "(B, C, H, W)", "channels last")
    with pytest.raises(ValueError) as exc:
        policy(obs * 255)
    one_line(exc, "[0, 1]", "divide by 255")
    with pytest.raises(ValueError) as exc:
        policy((obs * 255).to(torch.uint8))
    one_line(exc, "floating point", "torch.uint8")
    declared = adapt_policy(nets[0], layout="NCHW", input_range="uint8", obs_shape=(H, W, C))
    declared(obs)  # the first call passes ...
    with pytest.raises(ValueError) as exc:  # ... and later calls still check the shape
        declared(obs[:, :8])
    one_line(exc, "does not match the policy's observation shape (12, 12, 3)")


def test_wrong_layout_declared_names_what_the_module_got(nets, obs):
    policy = adapt_policy(nets[0], layout="NHWC", input_range="uint8")  # it is NCHW
    with pytest.raises(ValueError) as exc:
        policy(obs)
    one_line(exc, "does not accept NHWC input of shape (32, 12, 12, 3)", "float 0-255",
             "check layout= and input_range=")


def test_output_that_is_not_logits(nets, obs):
    foreign, _ = nets
    tup = TupleAgent()
    tup.load_state_dict(foreign.state_dict())
    with pytest.raises(ValueError) as exc:
        adapt_policy(tup, layout="NCHW", input_range="uint8")(obs)
    one_line(exc, "the module returned a tuple of 2", "expected a logits tensor of shape (B, n_actions)",
             "logits=lambda out: out[0]")
    with pytest.raises(ValueError) as exc:
        adapt_policy(foreign, layout="NCHW", input_range="uint8", n_actions=4)(obs)
    one_line(exc, "logits of shape (32, 5)", "expected (B, n_actions) = (32, 4)")
    with pytest.raises(ValueError) as exc:
        adapt_policy(foreign, layout="NCHW", input_range="uint8",
                     logits=lambda out: out.argmax(1, keepdim=True))(obs)
    one_line(exc, "the logits function returned logits of dtype torch.int64", "floating point")
    with pytest.raises(ValueError) as exc:
        adapt_policy(tup, layout="NCHW", input_range="uint8", logits=lambda out: out["pi"])(obs)
    one_line(exc, "the logits function failed on a tuple of 2", "TypeError")
    with pytest.raises(ValueError) as exc:
        adapt_policy(foreign, layout="NCHW", input_range="uint8",
                     logits=lambda out: out / 0.0)(obs)
    one_line(exc, "non-finite logits")
