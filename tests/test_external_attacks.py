"""Tests of attacks.external: torchattacks attacks and plain functions as toolkit attacks, in
attacks.evaluate and in tournaments (config checks and a match played without Ray)."""
from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from torch import nn

from agents import make_policy_network
from attacks import ExternalAttack, build_external, evaluate, external_code_id, unbound_model
from envs import make_env
from marl_fgmf.tournament import TournamentConfig, play_match

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 8 / 255


@pytest.fixture(scope="module")
def ta():
    """torchattacks (the ``bench`` extra: ``pip install "torchattacks>=3.5,<3.6" --no-deps``)."""
    return pytest.importorskip("torchattacks")


def small_policy(shape=(9, 9, 3), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = make_policy_network("cnn", shape, 5)
    nn.init.normal_(net.pi.weight, std=0.5)  # actions not all equiprobable
    return net.eval()


class LinearPolicy(nn.Module):
    """A beacon policy whose logits move with every pixel (an untrained CNN's barely do)."""

    obs_shape = (21, 21, 3)

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.pi = nn.Linear(21 * 21 * 3, 5)
        nn.init.normal_(self.pi.weight, std=0.1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.pi(obs.flatten(1))


def beacon_policy() -> nn.Module:
    return LinearPolicy().eval()


class NCHW(nn.Module):
    """The test's own torchattacks classifier around a policy (the oracle's side)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.policy(images.permute(0, 2, 3, 1))


def direct_pgd(ta, policy, obs, labels, **kw):
    attack = ta.PGD(NCHW(policy).eval(), **kw)
    images = obs.permute(0, 3, 1, 2).contiguous()  # NCHW images, as torchattacks users have
    return lambda: attack(images, labels).permute(0, 2, 3, 1)


# --------------------------------------------------------------------------- torchattacks
def test_adapter_around_torchattacks_pgd_equals_torchattacks_itself(ta):
    policy = small_policy()
    obs = torch.rand(6, 9, 9, 3, generator=torch.Generator().manual_seed(1))
    labels = policy(obs).argmax(dim=1)
    kw = dict(eps=EPS, alpha=2 / 255, steps=5, random_start=True)
    direct = direct_pgd(ta, policy, obs, labels, **kw)
    adapter = ExternalAttack(ta.PGD(unbound_model(), **kw), policy)
    # seed=None: torch's global RNG, as torchattacks draws it
    torch.manual_seed(7)
    ours = adapter(obs)
    torch.manual_seed(7)
    theirs = direct()
    assert torch.equal(ours, theirs), "the adapter must give exactly torchattacks' output"
    assert 0 < float((ours - obs).abs().max()) <= EPS + 1e-6
    assert adapter.last_success.dtype == torch.bool and adapter.last_success.shape == (6,)
    # seed=s: a private stream that starts as torch.manual_seed(s) and continues across calls,
    # the caller's RNG untouched
    seeded = ExternalAttack(ta.PGD(unbound_model(), **kw), policy, seed=5)
    state = torch.get_rng_state()
    first, second = seeded(obs), seeded(obs)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(5)
    assert torch.equal(first, direct()) and torch.equal(second, direct())
    assert torch.equal(seeded.set_seed(5)(obs), first), "set_seed rewinds the stream"


def test_users_torchattacks_object_is_never_mutated(ta):
    policy, model = small_policy(), small_policy(seed=3)
    model.train()
    user = ta.PGD(NCHW(model), eps=EPS, alpha=2 / 255, steps=2)
    before = {k: copy.copy(v) if isinstance(v, (dict, list)) else v for k, v in vars(user).items()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = ExternalAttack(user)
    adapter.with_policy(policy)(torch.rand(2, 9, 9, 3))
    evaluate(beacon_policy(), make_env("beacon", n_agents=2, max_steps=2), user, episodes=1,
             progress=False, compare_clean=False)
    assert vars(user).keys() == before.keys()
    for key, value in before.items():
        assert vars(user)[key] is value or vars(user)[key] == value, key
    assert user.model.policy is model and model.training, "its model is neither replaced nor switched"
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    user.steps = 50  # a later change of the user's object does not leak into the adapter
    assert adapter.settings()["params"]["steps"] == 2


def test_torchattacks_budget_is_read_declared_and_cross_checked(ta):
    policy = small_policy()
    pgd = ExternalAttack(ta.PGD(unbound_model(), eps=EPS), policy)
    assert (pgd.eps, pgd.norm) == (pytest.approx(EPS), "linf")
    s = pgd.settings()
    assert s["attack"] == "external" and s["external"].endswith("PGD")
    assert s["kind"] == "torchattacks" and s["budget_checked"] and s["version"] == ta.__version__
    assert s["params"]["steps"] == 10 and s["params"]["alpha"] == pytest.approx(2 / 255)
    l2 = ExternalAttack(ta.PGDL2(unbound_model(), eps=0.5), policy)
    assert l2.norm == "l2"
    out = l2(torch.rand(3, 9, 9, 3))
    assert out.shape == (3, 9, 9, 3)
    with pytest.raises(ValueError, match=r"declared eps=0.0156863 but the torchattacks object has eps=0.0313725"):
        ExternalAttack(ta.PGD(unbound_model(), eps=EPS), eps=4 / 255)
    with pytest.raises(ValueError, match="declared norm='l2' but the torchattacks object uses 'linf'"):
        ExternalAttack(ta.PGD(unbound_model(), eps=EPS), norm="l2")
    cw = ExternalAttack(ta.CW(unbound_model(), steps=1), policy)  # no eps: no ball to check
    assert cw.eps is None and cw.settings()["budget_checked"] is False
    targeted = ta.PGD(unbound_model(), eps=EPS)
    targeted.set_mode_targeted_by_label(quiet=True)
    with pytest.raises(ValueError, match=r"targeted\(label\) mode would read the clean actions"):
        ExternalAttack(targeted)
    with pytest.raises(ValueError, match="not bound to a policy"):
        ExternalAttack(ta.PGD(unbound_model(), eps=EPS))(torch.rand(1, 9, 9, 3))


def test_torchattacks_output_outside_its_budget_is_refused(ta):
    class Overshoot(ta.PGD):  # a torchattacks attack that ignores its own eps
        def forward(self, images, labels):
            return (images + 2 * self.eps).clamp(0, 1)

    with pytest.raises(ValueError, match=r"outside the linf ball: max \|adv - obs\| = 0.0627451 > eps"):
        ExternalAttack(Overshoot(unbound_model(), eps=EPS), small_policy())(
            torch.full((2, 9, 9, 3), 0.5))


def test_gradient_guard_refuses_a_policy_without_input_gradients(ta):
    class NoGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_policy()

        def forward(self, obs):
            with torch.no_grad():
                return self.net(obs)

    with pytest.raises(ValueError, match="ExternalAttack.PGD.*no grad_fn"):
        ExternalAttack(ta.PGD(unbound_model(), eps=EPS), NoGrad())(torch.rand(2, 9, 9, 3))
    square = ExternalAttack(ta.Square(unbound_model(), eps=EPS, n_queries=2), NoGrad())
    assert not square.uses_gradients  # gradient-free: no guard, and it runs
    assert square(torch.rand(2, 9, 9, 3)).shape == (2, 9, 9, 3)


# --------------------------------------------------------------------------- callables
def fixed_sign(obs: torch.Tensor) -> torch.Tensor:
    """A fixed +-eps checkerboard on every observation (policy-blind)."""
    h, w = obs.shape[1:3]
    board = (torch.arange(h).view(-1, 1) + torch.arange(w)) % 2 * 2 - 1  # (H, W) of +-1
    return (obs + 0.25 * board.view(1, h, w, 1).to(obs)).clamp(0, 1)


def gradient_sign(obs: torch.Tensor, policy: nn.Module) -> torch.Tensor:
    """FGSM written by a user: two positional parameters, so the policy is passed."""
    x = obs.clone().requires_grad_(True)
    logits = policy(x)
    loss = nn.functional.cross_entropy(logits, logits.argmax(dim=1))
    (grad,) = torch.autograd.grad(loss, x)
    return (obs + 0.25 * grad.sign()).clamp(0, 1)


@pytest.mark.parametrize("fn", [fixed_sign, gradient_sign])
def test_callable_attack_in_evaluate_changes_actions_and_is_named(fn):
    policy = beacon_policy()
    env = make_env("beacon", n_agents=2, max_steps=6)
    result = evaluate(policy, env, ExternalAttack(fn, eps=0.25), episodes=1, seed=0,
                      progress=False)
    assert result["success_rate"] > 0, "a 0.25 perturbation must change some greedy actions"
    assert 0 < result["mean_linf"] <= 0.25 + 1e-6
    s = result["attack"]
    assert s["attack"] == "external" and s["external"].endswith(fn.__name__)
    assert s["kind"] == "callable" and s["pass_policy"] == (fn is gradient_sign)
    assert s["eps"] == 0.25 and s["norm"] == "linf" and s["budget_checked"]
    assert result["clean"]["agent_steps"] == result["agent_steps"] == 12


BAD_OUTPUTS = [
    (lambda obs: obs[:, :-1], r"returned shape \(2, 8, 9, 3\), expected \(2, 9, 9, 3\)"),
    (lambda obs: obs.permute(0, 3, 1, 2), r"returned shape \(2, 3, 9, 9\), expected"),
    (lambda obs: obs.double(), "returned dtype torch.float64, expected torch.float32"),
    (lambda obs: obs.numpy(), "returned a ndarray, expected a torch.Tensor"),
    (lambda obs: obs.index_fill(1, torch.tensor([0]), float("nan")), r"returned 54 NaN/inf value\(s\)"),
    (lambda obs: obs + 0.6, r"returned values in \[1.1, 1.1\], outside \[0, 1\]"),
    (lambda obs: obs * 0 + 0.5 + 4 / 255, r"outside the linf ball: max \|adv - obs\| = 0.0156863 > eps = 0.00784314"),
]


@pytest.mark.parametrize("fn, message", BAD_OUTPUTS)
def test_bad_outputs_raise_one_line(fn, message):
    attack = ExternalAttack(fn, small_policy(), eps=2 / 255)
    obs = torch.full((2, 9, 9, 3), 0.5)
    with pytest.raises(ValueError, match=message) as info:
        attack(obs)
    assert "\n" not in str(info.value) and str(info.value).startswith("ExternalAttack(")


def test_l2_budget_and_tolerance():
    obs = torch.full((2, 9, 9, 3), 0.5)
    d = obs[0].numel()
    within = ExternalAttack(lambda o: o + 0.1 / d ** 0.5, small_policy(), eps=0.1, norm="l2")
    assert torch.allclose(within(obs), obs + 0.1 / d ** 0.5)  # norm == eps: accepted
    outside = ExternalAttack(lambda o: o + 0.11 / d ** 0.5, small_policy(), eps=0.1, norm="l2")
    with pytest.raises(ValueError, match=r"outside the l2 ball: \|\|adv - obs\|\|_2 = 0.11 > eps = 0.1"):
        outside(obs)


def test_callable_signature_decides_the_call_and_bad_constructions_are_one_line():
    policy = small_policy()
    seen = []
    ExternalAttack(lambda obs, pol: seen.append(pol) or obs, policy)(torch.rand(1, 9, 9, 3))
    assert seen == [policy]
    ExternalAttack(lambda obs, scale=2.0: obs, policy)(torch.rand(1, 9, 9, 3))  # obs only
    with pytest.raises(ValueError, match=r"cannot tell from its signature.*pass pass_policy"):
        ExternalAttack(lambda *args: args[0], policy)
    assert ExternalAttack(lambda *args: args[0], policy, pass_policy=False)(
        torch.zeros(1, 9, 9, 3)).shape == (1, 9, 9, 3)
    with pytest.raises(ValueError, match="norm='l2' needs eps"):
        ExternalAttack(fixed_sign, norm="l2")
    with pytest.raises(ValueError, match="is an attacks.Attack: use it directly"):
        from attacks import FGSM
        ExternalAttack(FGSM(policy))
    with pytest.raises(ValueError, match="callable obs -> adversarial obs, got int"):
        ExternalAttack(3)


def test_evaluate_dispatch_names_the_accepted_kinds(ta):
    policy = beacon_policy()
    env = make_env("beacon", n_agents=2, max_steps=2)
    run = dict(episodes=1, progress=False, compare_clean=False)
    # a torchattacks object is wrapped automatically; a factory may return one too
    auto = evaluate(policy, env, ta.FGSM(unbound_model(), eps=EPS), **run)
    assert auto["attack"]["kind"] == "torchattacks" and auto["attack"]["external"].endswith("FGSM")
    assert auto["mean_linf"] <= EPS + 1e-6
    factory = evaluate(policy, env, lambda p: ta.FGSM(NCHW(p), eps=EPS), **run)
    assert factory["mean_linf"] == pytest.approx(auto["mean_linf"])
    # a bare function obs -> adv is a callable: taken as a factory, refused with the fix
    with pytest.raises(ValueError, match=r"must be wrapped: ExternalAttack\(fn"):
        evaluate(policy, env, fixed_sign, **run)
    with pytest.raises(ValueError, match=r"must be wrapped: ExternalAttack\(fn"):
        evaluate(policy, env, lambda obs: obs, **run)
    with pytest.raises(ValueError, match=r"a torchattacks Attack, or ExternalAttack\(fn\).*got str"):
        evaluate(policy, env, "pgd", **run)


# --------------------------------------------------------------------------- tournaments
USER_MODULE = """
import torch

def make_shift(eps, sign=1.0):
    return lambda obs: (obs + sign * eps).clamp(0, 1)

def make_overshoot(eps):
    return lambda obs: (obs + 2 * eps).clamp(0, 1)

NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "user_ext_attacks_mod"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def attacker_errors(attackers: list, tmp_path) -> list[str]:
    cfg = TournamentConfig.from_dict({
        "eps": ["4/255"], "episodes": 1,
        "defenders": [{"name": "d", "checkpoint": str(tmp_path / "missing")}],
        "attackers": attackers})
    return [e for e in cfg.validate() if "attacker" in e]


def test_tournament_config_checks_external_attackers(ta, user_module, tmp_path):
    good = [{"name": "ta-pgd", "external": "torchattacks:PGD", "settings": {"steps": 3}},
            {"name": "shift", "external": f"{user_module}:make_shift", "settings": {"sign": -1.0},
             "norm": "linf"}]
    assert attacker_errors(good, tmp_path) == []
    bad = {
        "nomod": ({"name": "a", "external": "no_such_module_xyz:f"}, "module 'no_such_module_xyz' does not import"),
        "noattr": ({"name": "a", "external": f"{user_module}:missing"}, "has no attribute 'missing'"),
        "path": ({"name": "a", "external": "not a path"}, "is not an import path 'package.module:attr'"),
        "notcall": ({"name": "a", "external": f"{user_module}:NOT_CALLABLE"}, "is a int; expected a torchattacks Attack class"),
        "setting": ({"name": "a", "external": "torchattacks:PGD", "settings": {"stepz": 3}}, "failed: TypeError"),
        "eps": ({"name": "a", "external": "torchattacks:PGD", "settings": {"eps": 0.1}}, "are set by the tournament"),
        "norm": ({"name": "a", "external": "torchattacks:PGD", "norm": "l2"}, "declared norm='l2' but the torchattacks object uses 'linf'"),
        "badnorm": ({"name": "a", "external": f"{user_module}:make_shift", "norm": "l1"}, "norm must be 'linf' or 'l2'"),
        "analytic-norm": ({"name": "a", "attack": "pgd", "norm": "l2"}, "norm applies to external attackers only"),
        "both": ({"name": "a", "attack": "pgd", "external": "torchattacks:PGD"}, "give one of attack, adversary or external"),
        "noname": ({"external": "torchattacks:PGD"}, "an external attacker needs a name"),
        "toolkit": ({"name": "a", "external": "attacks:PGD"}, "is a toolkit attack: name it with attack:"),
    }
    for case, (spec, message) in bad.items():
        errors = attacker_errors([spec], tmp_path)
        assert any(message in e for e in errors), (case, errors)
        assert all("\n" not in e for e in errors)


def test_tournament_match_with_an_external_attacker(ta, user_module):
    policy = beacon_policy()
    base = {"key": "k", "defender": "d", "attacker": "a", "eps": 4 / 255, "seed": 1,
            "episodes": 1, "env": "beacon", "env_kwargs": {"n_agents": 2, "max_steps": 3},
            "checkpoint": "-", "kind": "external", "attack": None, "norm": None}
    record = play_match({**base, "external": "torchattacks:PGD", "settings": {"steps": 2}}, policy)
    assert record["kind"] == "external" and record["external"] == "torchattacks:PGD"
    assert record["attack_settings"]["external"].endswith("PGD")
    assert record["attack_settings"]["params"]["steps"] == 2
    assert record["eps_actual"] == pytest.approx(4 / 255) and record["mean_linf"] <= 4 / 255 + 1e-6
    again = play_match({**base, "external": "torchattacks:PGD", "settings": {"steps": 2}}, policy)
    assert again["team_returns"] == record["team_returns"] and again["mean_l2"] == record["mean_l2"]
    with pytest.raises(ValueError, match="outside the linf ball"):
        play_match({**base, "external": f"{user_module}:make_overshoot", "settings": {}}, policy)
    assert external_code_id("torchattacks:PGD").startswith(f"torchattacks {ta.__version__} sha256:")
    built = build_external(f"{user_module}:make_shift", "2/255", {"sign": -1.0})
    assert built.settings()["params"] == {"sign": -1.0, "eps": pytest.approx(2 / 255)}


def test_match_fingerprint_holds_the_external_path_settings_and_code(user_module, tmp_path):
    import importlib
    import sys

    from marl_fgmf.tournament.config import Match
    from marl_fgmf.tournament.specs import Shipped, match_spec

    def fingerprint(settings: dict) -> dict:
        cfg = TournamentConfig.from_dict({
            "eps": ["4/255"], "episodes": 1, "env": "beacon",
            "defenders": [{"name": "d", "checkpoint": str(tmp_path / "d")}],
            "attackers": [{"name": "x", "external": f"{user_module}:make_shift",
                           "settings": settings}]})
        shipped = Shipped({}, {}, {"d": ("beacon", {})}, defender_hash={"d": "0" * 64})
        return match_spec(cfg, Match("d", "x", 4 / 255, 0), tmp_path, shipped)

    spec = fingerprint({"sign": 1.0})
    assert spec["kind"] == "external" and spec["external"] == f"{user_module}:make_shift"
    assert fingerprint({"sign": 1.0})["fingerprint"] == spec["fingerprint"]
    assert fingerprint({"sign": -1.0})["fingerprint"] != spec["fingerprint"]
    path = tmp_path / f"{user_module}.py"  # the user edits the attack's module
    path.write_text(path.read_text() + "\n# tuned\n")
    importlib.reload(sys.modules[user_module])
    assert fingerprint({"sign": 1.0})["fingerprint"] != spec["fingerprint"]


def test_external_attack_in_an_ensemble_needs_a_budget():
    from attacks import PGD, Ensemble

    policy = small_policy()
    obs = torch.rand(4, 9, 9, 3, generator=torch.Generator().manual_seed(0))
    member = ExternalAttack(fixed_sign, policy, eps=0.25)
    ens = Ensemble([PGD(policy, eps=4 / 255, steps=2, seed=0), member])
    adv = ens(obs)
    assert adv.shape == obs.shape and float((adv - obs).abs().max()) <= 0.25 + 1e-6
    assert ens.with_policy(small_policy(seed=1)).attacks[1].policy is not policy
    with pytest.raises(ValueError, match="every Ensemble member needs a budget"):
        Ensemble([PGD(policy), ExternalAttack(fixed_sign, policy)])
