"""Tests of AutoAttack's members and preset (attacks/apgdt.py, fab.py, autoattack.py): budgets,
FAB-T's minimal perturbation against a closed form, agreement with torchattacks, refusals,
the registry and a tournament config that names the preset."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from agents import make_policy_network
from attacks import (APGD, APGDT, ATTACKS, FAB, PGD, AutoAttack, Ensemble, NCHWPolicy, Square,
                     list_attacks, make_attack, project_hyperplane_box)
from marl_fgmf.tournament import TournamentConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_policy(n_actions: int = 6, obs_shape=(9, 9, 3), seed: int = 0) -> nn.Module:
    """A tiny CNN with a gain-1 policy head (PPO's 0.01 makes every action equiprobable)."""
    torch.manual_seed(seed)
    net = make_policy_network("cnn", obs_shape, n_actions, channels=(4, 8, 8), hidden=16)
    nn.init.orthogonal_(net.pi.weight, gain=1.0)
    return net.eval()


def random_obs(batch: int, shape=(9, 9, 3), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *shape), generator=g)
    x[:, 0, 0] = 0.0          # pixels on the [0, 1] boundary
    x[:, -1, -1] = 1.0
    return x


class Linear(nn.Module):
    """Logits ``W x + b`` of the flattened observation: the decision boundary between two
    actions is a hyperplane, so the minimal perturbation has a closed form."""

    def __init__(self, shape, n_actions: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(int(torch.tensor(shape).prod()), n_actions)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.lin(obs.flatten(1))


def assert_in_ball(adv, obs, eps, norm):
    assert adv.shape == obs.shape and adv.dtype == obs.dtype and adv.device == obs.device
    assert torch.isfinite(adv).all() and adv.min() >= 0.0 and adv.max() <= 1.0
    delta = (adv - obs).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert size.max().item() <= eps * (1 + 1e-5) + 1e-6, (size.max().item(), eps)


# ---------------------------------------------------------------------- budgets and shapes
BUILD = {
    "apgdt": lambda p, eps, norm: APGDT(p, eps, steps=5, n_target_classes=3, norm=norm, seed=0),
    "fab": lambda p, eps, norm: FAB(p, eps, steps=5, n_target_classes=3, restarts=2, norm=norm,
                                    seed=0),
    "autoattack": lambda p, eps, norm: AutoAttack(p, eps, steps=5, n_queries=20,
                                                  n_target_classes=3, seed=0),
}


@pytest.mark.parametrize("name,norm,eps", [
    ("apgdt", "linf", 0.15), ("apgdt", "l2", 1.0), ("fab", "linf", 0.15), ("fab", "l2", 1.0),
    ("fab", "linf", 8 / 255), ("autoattack", "linf", 0.15)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_stay_in_the_ball_and_unit_range(name, norm, eps, dtype):
    policy = tiny_policy()
    obs = random_obs(10).to(dtype)
    attack = BUILD[name](policy, eps, norm)
    adv = attack(obs)
    assert_in_ball(adv, obs, eps, norm)
    assert attack.last_success.shape == (10,)
    if norm == "linf" and eps > 0.1:  # FAB's minimal Linf perturbations here are 0.08..0.18
        assert attack.last_success.any(), "a budget this large flips some samples"
    with torch.no_grad():
        flipped = policy(adv.float()).argmax(1) != policy(obs.float()).argmax(1)
    assert torch.equal(flipped, attack.last_success), "last_success must describe the output"
    # the caller's reference actions are honoured
    actions = torch.arange(10) % 6
    adv = attack(obs, actions)
    assert_in_ball(adv, obs, eps, norm)


def test_fab_returns_clean_beyond_the_budget_and_seeds_reproduce():
    policy = tiny_policy()
    obs = random_obs(8, seed=1)
    fab = FAB(policy, eps=1e-4, steps=5, n_target_classes=2, seed=0)
    adv = fab(obs)
    found = torch.isfinite(fab.last_norms)
    assert found.any() and (fab.last_norms[found] > 1e-4).all()
    assert torch.equal(adv, obs), "a minimal perturbation beyond eps must come back clean"
    assert not fab.last_success.any()
    a, b = (AutoAttack(policy, 8 / 255, steps=3, n_queries=10, seed=3) for _ in range(2))
    assert torch.equal(a(obs), b(obs))
    assert [m.seed for m in a.attacks] == [3, 4, 5, 6]


# ---------------------------------------------------------------------- FAB-T is minimal
def test_hyperplane_box_projection_is_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 50, generator=g, dtype=torch.float64)
    x = torch.rand(32, 50, generator=g, dtype=torch.float64) * 0.6 + 0.2   # interior points
    c = torch.randn(32, generator=g, dtype=torch.float64) * 0.5
    for norm, dual in (("linf", w.abs().sum(1)), ("l2", w.norm(dim=1))):
        d = project_hyperplane_box(w, c, x, norm)
        assert torch.allclose((w * d).sum(1), c, atol=1e-10)
        size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        assert torch.allclose(size, c.abs() / dual, rtol=1e-9)   # the box is not active
    # a binding box: a corner point cannot move past it, and the hyperplane is still reached
    x = torch.ones(1, 4, dtype=torch.float64)
    d = project_hyperplane_box(torch.tensor([[1.0, 1.0, -1.0, 2.0]], dtype=torch.float64),
                               torch.tensor([-1.0], dtype=torch.float64), x, "linf")
    assert torch.allclose(d, torch.tensor([[-0.25, -0.25, 0.0, -0.25]], dtype=torch.float64))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_the_closed_form_minimal_perturbation_and_beats_pgd(norm):
    shape = (5, 5, 3)
    policy = Linear(shape, n_actions=2, seed=1).eval()
    obs = 0.3 + 0.4 * torch.rand((32, *shape), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = policy(obs)
    y = logits.argmax(1)
    w = policy.lin.weight.detach()
    diff = w[1 - y] - w[y]                                             # (B, d): z_t - z_y
    gap = (logits.gather(1, (1 - y)[:, None]) - logits.gather(1, y[:, None]))[:, 0]
    dual = diff.abs().sum(1) if norm == "linf" else diff.norm(dim=1)
    closed_form = gap.abs() / dual
    # the minimal delta moves each coordinate by d* (Linf) or |gap| |diff_j| / ||diff||^2 (L2):
    # below 0.3 the box [0, 1] never binds around these interior points
    moves = closed_form if norm == "linf" else (
        gap.abs()[:, None] * diff.abs() / diff.norm(dim=1, keepdim=True) ** 2).amax(1)
    assert moves.max() < 0.3
    eps = float(closed_form.max()) * 1.5
    fab = FAB(policy, eps=eps, steps=30, norm=norm, seed=0)
    adv = fab(obs)
    assert fab.last_success.all()
    found = fab.last_norms
    assert (found >= closed_form * (1 - 1e-4)).all(), "FAB beat the exact minimum: impossible"
    assert (found <= closed_form * 1.01 + 1e-6).all(), (found / closed_form).max()
    delta = (adv - obs).flatten(1)
    assert torch.allclose(delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1), found)
    pgd = PGD(policy, eps=eps, steps=20, norm=norm, seed=0)
    adv_pgd = pgd(obs)
    d_pgd = (adv_pgd - obs).flatten(1)
    pgd_size = d_pgd.abs().amax(1) if norm == "linf" else d_pgd.norm(dim=1)
    ok = pgd.last_success
    assert ok.sum() >= 16 and (found[ok] < pgd_size[ok]).all()


# ---------------------------------------------------------------------- strength and oracles
@pytest.fixture(scope="module")
def beacon(clone_beacon_policy):
    """A behaviour-cloned beacon policy (5 actions) and 64 held-out frames."""
    return clone_beacon_policy(seed=0, sgd_steps=400, n_train=2400, n_held_out=64)


def test_apgdt_at_least_as_strong_as_apgd_ce_on_a_trained_policy(beacon):
    policy, obs = beacon
    eps = 2 / 255
    ce = APGD(policy, eps=eps, steps=10, seed=0)
    ce(obs)
    apgdt = APGDT(policy, eps=eps, steps=10, seed=0)
    apgdt(obs)
    rate_ce, rate_t = ce.last_success.float().mean(), apgdt.last_success.float().mean()
    assert rate_t >= rate_ce and rate_t > 0.1, (rate_t, rate_ce)


@pytest.mark.parametrize("which", ["apgdt", "fab"])
def test_success_agrees_with_torchattacks(beacon, which):
    torchattacks = pytest.importorskip("torchattacks")
    policy, obs = beacon
    eps = 2 / 255
    with torch.no_grad():
        y = policy(obs).argmax(1)
    if which == "apgdt":
        ours = APGDT(policy, eps=eps, steps=10, seed=0)
        theirs = torchattacks.APGDT(NCHWPolicy(policy), eps=eps, steps=10, n_classes=5, seed=0)
    else:
        ours = FAB(policy, eps=eps, steps=10, seed=0)
        theirs = torchattacks.FAB(NCHWPolicy(policy), eps=eps, steps=10, n_classes=5,
                                  multi_targeted=True, seed=0)
    ours(obs)
    adv = theirs(obs.permute(0, 3, 1, 2).contiguous(), y).permute(0, 2, 3, 1)
    with torch.no_grad():
        theirs_success = policy(adv).argmax(1) != y
    rate, ref = ours.last_success.float().mean().item(), theirs_success.float().mean().item()
    assert ref > 0.1 and abs(rate - ref) <= 3 / 64, (rate, ref)   # within 3 of 64 samples


# ---------------------------------------------------------------------- refusals and registry
@pytest.mark.parametrize("n_actions", [2, 3])
def test_apgdt_refuses_fewer_than_four_actions_and_names_the_fix(n_actions):
    obs = random_obs(3)
    with pytest.raises(ValueError, match=rf"'dlr_targeted' \(APGD-T\) needs >= 4 actions .* "
                                         rf"this policy has {n_actions}: use APGD with "
                                         rf"objective='ce' or 'margin'"):
        APGDT(tiny_policy(n_actions), steps=2)(obs)
    with pytest.raises(ValueError, match="AutoAttack's APGD-T member needs >= 4 actions.*"
                                         "make_attack\\('ensemble'"):
        AutoAttack(tiny_policy(n_actions), steps=2, n_queries=5)(obs)
    # FAB-T works with two actions; APGD-T with four
    FAB(tiny_policy(2), steps=2)(obs)
    APGDT(tiny_policy(4), steps=2, seed=0)(obs)


def test_bad_settings():
    policy = tiny_policy()
    for kwargs, message in [(dict(eta=0.5), "eta must be a number >= 1"),
                            (dict(beta=0.0), "beta must be in"),
                            (dict(alpha_max=1.5), "alpha_max must be in"),
                            (dict(n_target_classes=0), "n_target_classes must be")]:
        with pytest.raises(ValueError, match=message):
            FAB(policy, **kwargs)
    with pytest.raises(ValueError, match="unknown AutoAttack version 'plus'; allowed: standard"):
        AutoAttack(policy, version="plus")
    with pytest.raises(ValueError, match="unknown norm 'l2' for AutoAttack"):
        AutoAttack(policy, norm="l2")


def test_make_attack_builds_the_preset_in_autoattack_order():
    policy = tiny_policy()
    assert {"apgdt", "fab", "autoattack"} <= set(list_attacks())
    assert ATTACKS["autoattack"] is AutoAttack
    attack = make_attack("autoattack", policy, eps="4/255", seed=7, steps=12, n_queries=40)
    assert isinstance(attack, Ensemble) and attack.skip_successful
    apgd, apgdt, fab, square = attack.attacks
    assert type(apgd) is APGD and apgd.objective == "ce" and apgd.steps == 12
    assert type(apgdt) is APGDT and apgdt.steps == 12 and apgdt.n_target_classes == 9
    assert type(fab) is FAB and fab.steps == 12 and fab.n_target_classes == 9
    assert type(square) is Square and square.n_queries == 40 and square.objective == "margin"
    assert all(m.eps == pytest.approx(4 / 255) for m in attack.attacks)
    assert attack.settings()["attack"] == "autoattack" and attack.settings()["n_queries"] == 40
    assert make_attack("APGD-T", policy, steps=3).name == "apgdt"
    assert make_attack("fab-t", policy, steps=3).name == "fab"
    with pytest.raises(ValueError, match="unknown setting.*objective"):
        make_attack("autoattack", policy, objective="ce")
    with pytest.raises(ValueError, match="steps of attack 'autoattack' must be a whole number"):
        make_attack("autoattack", policy, steps=2.5)
    moved = attack.with_policy(tiny_policy(seed=1))
    assert isinstance(moved, AutoAttack) and moved.attacks[3].n_queries == 40
    assert [m.seed for m in moved.attacks] == [7, 8, 9, 10]


def test_tournament_config_with_the_preset_passes_its_check():
    def config(settings: dict) -> TournamentConfig:
        return TournamentConfig.from_dict({
            "name": "aa", "defenders": [{"name": "d", "train": {"defense": "none"}}],
            "attackers": [{"name": "aa", "attack": "autoattack", "settings": settings}],
            "eps": ["8/255"], "episodes": 1, "seeds": [0]})

    config({"steps": 10, "n_queries": 100}).check()          # raises ConfigError if invalid
    errors = config({"steps": 10, "n_querys": 100}).validate()
    assert any("attacker aa: unknown setting(s) n_querys" in e for e in errors), errors
