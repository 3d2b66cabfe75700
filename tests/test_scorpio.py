"""SCOR-PIO 2.0 (marl_fgmf.scorpio): HVP, exploitable mask, config, regularizer."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from agents import make_policy_network
from marl_fgmf.attribution import integrated_gradients
from marl_fgmf.scorpio import (ExploitableSubspace, IterationSubspaces, ScorpioConfig,
                               compute_exploitable_subspace, double_backward_safe,
                               exploitable_mask, hvp, row_digests, row_keys, scorpio_regularizer,
                               select_keyed_rows, select_sub_batch)

OBS = (9, 9, 3)
SMALL = {
    "cnn": dict(channels=(8, 16, 16), hidden=32),
    "vit": dict(patch=3, dim=16, depth=1, heads=2, hidden=32),
    "hybrid": dict(channels=(8, 16), depth=1, heads=2, hidden=32),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(arch: str = "cnn", dtype: torch.dtype = torch.float64, seed: int = 0,
             activation: str | None = None) -> nn.Module:
    """A small smooth policy whose head is not near-uniform (so curvature is not ~0)."""
    torch.manual_seed(seed)
    kw = dict(SMALL[arch])
    if activation is not None:
        kw["activation"] = activation
    net = make_policy_network(arch, OBS, 5, **kw).to(dtype)
    nn.init.normal_(net.pi.weight, std=1.0)
    return net


def obs_batch(b: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, *OBS, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def attacker_loss(net, actions):
    return lambda x: -torch.log_softmax(net(x), -1).gather(1, actions[:, None]).sum()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- hvp

@pytest.mark.parametrize("arch", ["cnn", "vit", "hybrid"])
def test_hvp_matches_autograd_functional(arch):
    net = make_net(arch)
    x = obs_batch(3)
    v = torch.randn_like(x)
    actions = net(x).argmax(-1)
    loss_fn = attacker_loss(net, actions)
    ours = hvp(loss_fn, x, v)
    with double_backward_safe():
        _, ref = torch.autograd.functional.hvp(loss_fn, x, v)
    assert ours.shape == x.shape
    assert ref.norm() > 0, "reference HVP is zero: test network is degenerate"
    assert rel_err(ours, ref) < 1e-4, f"{arch}: relative error {rel_err(ours, ref):.2e}"


def test_hvp_float32_close_to_float64():
    net = make_net("cnn", torch.float64)
    x = obs_batch(2)
    v = torch.randn_like(x)
    actions = net(x).argmax(-1)
    ref = hvp(attacker_loss(net, actions), x, v)
    net32 = copy.deepcopy(net).float()
    ours = hvp(attacker_loss(net32, actions), x.float(), v.float())
    assert rel_err(ours.double(), ref) < 1e-3


def test_hvp_create_graph_reaches_parameters():
    net = make_net("cnn", torch.float32)
    x = obs_batch(2, torch.float32)
    actions = net(x).argmax(-1)
    hv = hvp(attacker_loss(net, actions), x, torch.randn_like(x), create_graph=True)
    assert hv.requires_grad
    hv.pow(2).sum().backward()
    grads = [p.grad for p in net.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    detached = hvp(attacker_loss(net, actions), x, torch.randn_like(x))
    assert not detached.requires_grad


def test_hvp_is_zero_for_a_linear_loss():
    w = torch.randn(2, *OBS)
    x = obs_batch(2, torch.float32)
    assert torch.equal(hvp(lambda z: (w * z).sum(), x, torch.randn_like(x)), torch.zeros_like(x))


def test_hvp_rejects_bad_shapes():
    x = obs_batch(2, torch.float32)
    with pytest.raises(ValueError, match="shape of x"):
        hvp(lambda z: z.pow(2).sum(), x, torch.randn(3))
    with pytest.raises(ValueError, match="scalar"):
        hvp(lambda z: z.pow(2), x, torch.randn_like(x))


# --------------------------------------------------------------------------- mask

def _top_set(scores: torch.Tensor, frac: float) -> set[int]:
    k = max(1, math.ceil(round(frac * scores.numel(), 6)))
    return set(scores.argsort(descending=True)[:k].tolist())


def test_exploitable_mask_matches_definition():
    torch.manual_seed(0)
    g, a = torch.randn(4, 5, 5, 2), torch.randn(4, 5, 5, 2)
    m = exploitable_mask(g, a, rho=0.3, rho_salient=0.2)
    assert m.dtype == torch.bool and m.shape == g.shape
    for i in range(4):
        sensitive = _top_set(g[i].abs().flatten(), 0.3)
        salient = _top_set(a[i].abs().flatten(), 0.2)
        assert set(m[i].flatten().nonzero().flatten().tolist()) == sensitive - salient


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), d=st.integers(1, 40), rho=st.floats(0.01, 1.0),
       rho_salient=st.floats(0.01, 1.0), seed=st.integers(0, 10_000))
def test_exploitable_mask_properties(n, d, rho, rho_salient, seed):
    gen = torch.Generator().manual_seed(seed)
    g, a = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    m = exploitable_mask(g, a, rho, rho_salient)
    for i in range(n):
        sens = torch.zeros(d, dtype=torch.bool)
        sens[list(_top_set(g[i].abs(), rho))] = True
        sal = torch.zeros(d, dtype=torch.bool)
        sal[list(_top_set(a[i].abs(), rho_salient))] = True
        assert int(sens.sum()) == min(d, max(1, math.ceil(round(rho * d, 6))))
        assert not (m[i] & ~sens).any(), "mask holds a low-|g| coordinate"
        assert not (m[i] & sal).any(), "mask holds a salient coordinate"
        assert torch.equal(m[i], sens & ~sal)
        if m[i].any() and (~sens).any():  # every masked |g| beats every non-sensitive |g|
            assert g[i].abs()[m[i]].min() >= g[i].abs()[~sens].max()


def test_exploitable_mask_edge_cases():
    torch.manual_seed(0)
    g, a = torch.randn(3, 30), torch.randn(3, 30)
    salient = exploitable_mask(torch.ones_like(g), a, 1.0, 0.2)  # rho=1: all sensitive
    assert torch.equal(exploitable_mask(g, a, 1.0, 0.2), salient)
    assert (salient.sum(1) == 30 - 6).all()
    assert not exploitable_mask(g, a, 0.5, 1.0).any(), "rho_salient=1: nothing exploitable"
    assert not exploitable_mask(g, g, 0.3, 0.3).any(), "same ranking, same fraction: empty"
    assert (exploitable_mask(g, a, 1e-6, 1e-6).sum(1) <= 1).all(), "k is at least 1, at most 1"
    assert torch.equal(exploitable_mask(g, a, 0.4, 0.1), exploitable_mask(-g, -a, 0.4, 0.1))
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"rho must be in \(0, 1\]"):
            exploitable_mask(g, a, bad, 0.1)
        with pytest.raises(ValueError, match=r"rho_salient must be in \(0, 1\]"):
            exploitable_mask(g, a, 0.1, bad)
    with pytest.raises(ValueError, match="share"):
        exploitable_mask(g, a[:, :10], 0.1, 0.1)


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("name,value,expected", [
    ("rho", 0.0, r"rho must be in \(0, 1\]"),
    ("rho", 1.01, r"rho must be in \(0, 1\]"),
    ("rho_salient", -0.5, r"rho_salient must be in \(0, 1\]"),
    ("reg_fraction", 0.0, r"reg_fraction must be in \(0, 1\]"),
    ("reg_fraction", float("nan"), r"reg_fraction must be in \(0, 1\]"),
    ("lambda_curv", -1.0, "lambda_curv must be a finite number >= 0"),
    ("lambda_grad", float("inf"), "lambda_grad must be a finite number >= 0"),
    ("ig_steps", 0, "ig_steps must be an integer >= 1"),
    ("ig_steps", 2.5, "ig_steps must be an integer >= 1"),
    ("power_iters", -1, "power_iters must be an integer >= 0"),
    ("max_reg_samples", 0, "max_reg_samples must be None or an integer >= 1"),
    ("ig_internal_batch_size", 0, "ig_internal_batch_size must be None or an integer >= 1"),
])
def test_config_validation(name, value, expected):
    with pytest.raises(ValueError, match=expected):
        ScorpioConfig(**{name: value})


def test_config_defaults_and_round_trip():
    cfg = ScorpioConfig()
    assert 0 < cfg.reg_fraction <= 1 and cfg.ig_steps >= 1 and cfg.power_iters >= 0
    assert ScorpioConfig(**cfg.to_dict()) == cfg
    assert ScorpioConfig(rho=1, rho_salient=1, reg_fraction=1, lambda_curv=0).rho == 1


def test_sub_batch_selection():
    cfg = ScorpioConfig(reg_fraction=0.25)
    assert len(select_sub_batch(10, cfg)) == 3
    assert len(select_sub_batch(1, cfg)) == 1
    assert len(select_sub_batch(100, ScorpioConfig(reg_fraction=0.5, max_reg_samples=7))) == 7
    assert torch.equal(select_sub_batch(5, ScorpioConfig(reg_fraction=1.0)), torch.arange(5))
    seeded = ScorpioConfig(reg_fraction=0.25, seed=3)
    idx = select_sub_batch(40, seeded)
    assert torch.equal(idx, select_sub_batch(40, seeded)) and len(set(idx.tolist())) == 10


# --------------------------------------------------------------------------- regularizer

@pytest.mark.parametrize("arch", ["cnn", "vit", "hybrid"])
def test_regularizer_gradient_nonzero_and_finite(arch):
    net = make_net(arch, torch.float32)
    x = obs_batch(8, torch.float32)
    cfg = ScorpioConfig(reg_fraction=0.5, ig_steps=4)
    reg, info = scorpio_regularizer(net, x, cfg)
    assert reg.dim() == 0 and reg.requires_grad
    reg.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad and p is not net.vf.weight
             and p is not net.vf.bias]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert set(info) >= {"R", "curvature_term", "gradient_term", "curvature", "grad_sq",
                         "curvature_along_v", "mask_fraction", "reg_samples"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in info.values())
    assert info["reg_samples"] == 4
    assert info["R"] == pytest.approx(info["curvature_term"] + info["gradient_term"], rel=1e-5)
    assert info["curvature"] > 0 and 0 < info["mask_fraction"] <= cfg.rho


def test_regularizer_matches_finite_differences():
    net = make_net("cnn", torch.float64)
    x = obs_batch(4)
    cfg = ScorpioConfig(lambda_curv=1.0, lambda_grad=0.5, reg_fraction=1.0, ig_steps=4)
    sub = compute_exploitable_subspace(net, x, cfg)  # mask, v, a* held fixed
    params = [p for p in net.parameters()]
    reg, _ = scorpio_regularizer(net, None, cfg, sub)
    grads = torch.autograd.grad(reg, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    gen = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction))
    h = 1e-5

    def r_at(t: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(t * d)
        val = float(scorpio_regularizer(net, None, cfg, sub)[0].detach())
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(t * d)
        return val

    numeric = (r_at(h) - r_at(-h)) / (2 * h)
    assert abs(analytic) > 0
    assert numeric == pytest.approx(analytic, rel=1e-4), (numeric, analytic)


def test_subspace_definition_on_a_network():
    net = make_net("cnn", torch.float64)
    x = obs_batch(6)
    cfg = ScorpioConfig(reg_fraction=0.5, ig_steps=6, rho=0.3, rho_salient=0.1)
    rows = x[select_sub_batch(len(x), cfg)]
    sub = compute_exploitable_subspace(net, rows, cfg)  # on exactly the rows it is given
    assert torch.equal(sub.obs, rows) and len(sub) == 3
    xs = sub.obs.clone().requires_grad_(True)
    assert torch.equal(sub.actions, net(xs).argmax(-1))
    g = torch.autograd.grad(attacker_loss(net, sub.actions)(xs), xs)[0]
    ig = integrated_gradients(net, sub.obs, actions=sub.actions, steps=6)
    assert torch.equal(sub.mask, exploitable_mask(g, ig, 0.3, 0.1))
    v = sub.direction
    assert torch.allclose(v.flatten(1).norm(dim=1), torch.ones(3, dtype=v.dtype))
    assert sub.mask_fraction == pytest.approx(float(sub.mask.double().mean()))
    assert not v[~sub.mask].any(), "direction leaves the exploitable subspace"
    assert torch.equal(torch.sign(v)[sub.mask], torch.sign(g)[sub.mask])


def test_power_iteration_step_is_masked_normalized_hvp():
    net = make_net("cnn", torch.float64)
    x = obs_batch(3)
    base = ScorpioConfig(reg_fraction=1.0, ig_steps=4)
    v0 = compute_exploitable_subspace(net, x, base)
    v1 = compute_exploitable_subspace(net, x, ScorpioConfig(reg_fraction=1.0, ig_steps=4,
                                                              power_iters=1))
    hv = hvp(attacker_loss(net, v0.actions), x, v0.direction)
    mh = v0.mask.double() * hv
    expected = mh / mh.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(v1.direction, expected, atol=1e-10)


def test_regularizer_with_and_without_precomputed_subspace_agree():
    net = make_net("hybrid", torch.float64)
    x = obs_batch(4)
    cfg = ScorpioConfig(reg_fraction=1.0, ig_steps=4, power_iters=1)
    fresh, info_fresh = scorpio_regularizer(net, x, cfg)
    sub = compute_exploitable_subspace(net, x, cfg)
    reused, info_reused = scorpio_regularizer(net, None, cfg, sub)
    aligned, info_aligned = scorpio_regularizer(net, x, cfg, sub)
    assert info_fresh["R"] == pytest.approx(info_reused["R"], rel=1e-8)
    assert info_aligned["R"] == pytest.approx(info_reused["R"], rel=1e-12)
    assert info_fresh["mask_fraction"] == pytest.approx(sub.mask_fraction)
    # the curvature the regularizer sees is that of the public hvp
    hv = hvp(attacker_loss(net, sub.actions), x, sub.direction)
    along_v = float((sub.direction * hv).flatten(1).sum(1).mean())
    assert info_reused["curvature_along_v"] == pytest.approx(along_v, rel=1e-8)
    assert info_reused["curvature"] == pytest.approx(
        float((sub.mask * hv).pow(2).flatten(1).sum(1).mean()), rel=1e-8)


def test_regularizer_gradient_term_only():
    net = make_net("cnn", torch.float32)
    x = obs_batch(4, torch.float32)
    reg, info = scorpio_regularizer(net, x, ScorpioConfig(lambda_curv=0.0, reg_fraction=1.0,
                                                          ig_steps=2))
    assert info["curvature_term"] == 0 and reg.item() == pytest.approx(info["gradient_term"])
    reg.backward()
    assert net.encoder.conv[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_obs_raise(bad):
    net = make_net("cnn", torch.float32)
    x = obs_batch(4, torch.float32)
    x[1, 2, 3, 0] = bad
    with pytest.raises(ValueError, match="finite"):
        scorpio_regularizer(net, x, ScorpioConfig())
    with pytest.raises(ValueError, match="finite"):
        compute_exploitable_subspace(net, x, ScorpioConfig())


def test_regularizer_argument_errors():
    net = make_net("cnn", torch.float32)
    x = obs_batch(4, torch.float32)
    with pytest.raises(ValueError, match="obs is required"):
        scorpio_regularizer(net, None, ScorpioConfig())
    sub = compute_exploitable_subspace(net, x[:2], ScorpioConfig(ig_steps=2))
    with pytest.raises(ValueError, match="align"):
        scorpio_regularizer(net, x, ScorpioConfig(), sub)
    with pytest.raises(ValueError, match="actions"):
        compute_exploitable_subspace(net, x, ScorpioConfig(), actions=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        scorpio_regularizer(net, x[0], ScorpioConfig())


@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_regularizer_through_an_sgam_layer(arch):
    """fgmf = SCOR-PIO on a policy whose input goes through SGAM: twice differentiable."""
    from marl_fgmf.sgam import attach_sgam
    net = make_net(arch, torch.float64)
    sgam = attach_sgam(net, keep=0.5)
    x = obs_batch(4)
    v = torch.randn_like(x)
    actions = net(x).argmax(-1)
    loss_fn = attacker_loss(net, actions)
    with double_backward_safe():
        _, ref = torch.autograd.functional.hvp(loss_fn, x, v)
    assert rel_err(hvp(loss_fn, x, v), ref) < 1e-4
    reg, info = scorpio_regularizer(net, x, ScorpioConfig(reg_fraction=1.0, ig_steps=2))
    reg.backward()
    for module in (net.encoder, sgam.head):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


# ----------------------------------------------------------- rows of a training iteration

def test_row_keys_follow_content_and_salt():
    x = obs_batch(6, dtype=torch.float32)
    x[4] = x[1]  # a duplicate row
    keys = row_keys(x, salt=3)
    assert len(keys) == 6 and keys[4] == keys[1] and len(set(keys)) == 5
    assert row_keys(x[[1, 0]], salt=3) == [keys[1], keys[0]]       # any slicing, same key
    assert row_keys(x, salt=4)[0] != keys[0]                        # a new salt: a new draw
    y = x.clone()
    y[0, 0, 0, 0] += 1e-6                                           # one value changed
    assert row_keys(y, salt=3)[0] != keys[0] and row_keys(y, salt=3)[1:] == keys[1:]


def test_keyed_draw_is_a_fraction_at_least_one_at_most_the_cap():
    x = torch.rand(4000, 2, 2, 1, generator=torch.Generator().manual_seed(0))
    keys = row_keys(x, salt=0)
    cfg = ScorpioConfig(reg_fraction=0.1)
    drawn = select_keyed_rows(keys, cfg)
    sd = math.sqrt(4000 * 0.1 * 0.9)
    assert abs(len(drawn) - 400) < 4 * sd and drawn == sorted(drawn)
    assert select_keyed_rows(keys, ScorpioConfig(reg_fraction=1.0)) == list(range(4000))
    capped = select_keyed_rows(keys, ScorpioConfig(reg_fraction=0.1, max_reg_samples=7))
    assert len(capped) == 7 and set(capped) <= set(drawn)
    tiny = ScorpioConfig(reg_fraction=1e-9)                 # nothing falls below: the lowest key
    lowest = min(range(5), key=lambda i: int.from_bytes(keys[i], "little"))
    assert select_keyed_rows(keys[:5], tiny) == [lowest]
    # a minibatch draws the rows the whole batch draws among its rows (slicing-invariant)
    part = select_keyed_rows(keys[1000:2000], cfg)
    assert [i + 1000 for i in part] == [i for i in drawn if 1000 <= i < 2000]
    with pytest.raises(ValueError, match="at least one row"):
        select_keyed_rows([], cfg)


def test_iteration_penalizes_the_minibatch_rows_and_computes_each_subspace_once():
    net = make_net()
    cfg = ScorpioConfig(reg_fraction=0.25, lambda_curv=1.0, lambda_grad=1.0, reg_every=1)
    x = obs_batch(64)
    rows = IterationSubspaces(cfg, salt=11)
    drawn = select_keyed_rows(row_keys(x, 11), cfg)
    first, second = x[:32], x[32:]
    reg1, info1 = rows.penalty(net, first)
    d1 = [i for i in drawn if i < 32]
    assert info1["reg_samples"] == len(d1) == info1["new_subspace_rows"] == rows.computed_rows
    # R is scorpio_regularizer on exactly the drawn rows of that minibatch
    ref, _ = scorpio_regularizer(net, None, cfg, compute_exploitable_subspace(net, x[d1], cfg))
    assert torch.allclose(reg1, ref, rtol=1e-10)
    reg2, info2 = rows.penalty(net, second)
    assert info2["reg_samples"] == len([i for i in drawn if i >= 32])
    assert rows.computed_rows == len(drawn) == len(rows)
    # a later epoch, shuffled: the same rows, no new subspace, the same R at equal parameters
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(5))
    reg3, info3 = rows.penalty(net, first[perm])
    assert info3["new_subspace_rows"] == 0 and rows.computed_rows == len(drawn)
    assert torch.allclose(reg3, reg1, rtol=1e-10)
    # the subspace is the one computed at first sight, not recomputed at new parameters
    with torch.no_grad():
        net.pi.weight.mul_(2.0)
    rows.penalty(net, first)
    assert rows.computed_rows == len(drawn)
    # another iteration (salt) draws other rows
    assert select_keyed_rows(row_keys(x, 12), cfg) != drawn


def test_iteration_penalty_every_k_steps_is_k_times_r_on_the_pending_rows():
    net = make_net()
    cfg = ScorpioConfig(reg_fraction=0.25, lambda_curv=1.0, lambda_grad=1.0, reg_every=2)
    x = obs_batch(96)
    rows = IterationSubspaces(cfg, salt=3)
    drawn = select_keyed_rows(row_keys(x, 3), cfg)
    parts = [x[:32], x[32:64], x[64:]]
    # step 1: subspaces computed, no penalty (a zero without a graph, no "R" to log)
    reg1, info1 = rows.penalty(net, parts[0])
    d1 = [i for i in drawn if i < 32]
    assert float(reg1) == 0.0 and reg1.grad_fn is None and "R" not in info1
    assert info1["new_subspace_rows"] == len(d1) and rows.pending_rows == len(d1)
    # step 2: 2 x R on the rows of steps 1 and 2, at the current parameters
    with torch.no_grad():
        net.pi.weight.mul_(1.5)  # an SGD step in between
    reg2, info2 = rows.penalty(net, parts[1])
    d12 = [i for i in drawn if i < 64]
    # the reference: each row's subspace as computed at its first sight (steps 1 and 2)
    ref_sub = ExploitableSubspace.cat([rows._rows[k] for k in
                                       (row_keys(x[i:i + 1], 3)[0] for i in d12)])
    ref, _ = scorpio_regularizer(net, None, cfg, subspace=ref_sub)
    assert reg2.grad_fn is not None and torch.allclose(reg2, 2 * ref, rtol=1e-10)
    assert info2["reg_samples"] == len(d12) and info2["R"] == pytest.approx(float(reg2))
    assert torch.equal(ref_sub.obs, x[d12]) and rows.pending_rows == 0
    # step 3 pends again; what is left at the iteration's end is carried to the next
    # iteration and penalized at its first evaluating step (nothing is dropped)
    reg3, info3 = rows.penalty(net, parts[2])
    d3 = [i for i in drawn if i >= 64]
    assert "R" not in info3 and rows.pending_rows == len(d3)
    nxt = IterationSubspaces(cfg, salt=4, carry=rows.carry_over())
    y = obs_batch(32, seed=9)
    reg4, info4 = nxt.penalty(net, y)
    d4 = select_keyed_rows(row_keys(y, 4), cfg)
    assert info4["reg_samples"] == len(d3) + len(d4) and nxt.pending_rows == 0
    assert reg4.grad_fn is not None
    # digests given by the caller draw the same rows
    again = IterationSubspaces(cfg, salt=3)
    again.penalty(net, parts[0], digests=row_digests(parts[0]))
    assert again.pending_rows == len(d1)
    with pytest.raises(ValueError, match="digests has 1 entries"):
        again.penalty(net, parts[0], digests=row_digests(parts[0][:1]))


def test_row_keys_from_digests_equal_row_keys_from_rows():
    x = obs_batch(8)
    assert row_keys(row_digests(x), 5) == row_keys(x, 5) != row_keys(x, 6)
    assert row_keys(x[[3, 3]], 5)[0] == row_keys(x[[3, 3]], 5)[1] == row_keys(x, 5)[3]


def test_subspace_rows_and_cat():
    net = make_net()
    x = obs_batch(5)
    sub = compute_exploitable_subspace(net, x, ScorpioConfig())
    again = ExploitableSubspace.cat([sub.rows([3]), sub.rows([0, 1])])
    for field in ("obs", "actions", "mask", "direction"):
        assert torch.equal(getattr(again, field), getattr(sub, field)[[3, 0, 1]])
    with pytest.raises(ValueError, match="at least one"):
        ExploitableSubspace.cat([])
