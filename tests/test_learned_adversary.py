"""Learned adversary agents: the AdversaryEnv game, its budget and rewards, RLlib training of
the adversaries (tiny budget), load_adversary as an attack for attacks.evaluate, the CLI."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from agents import make_policy_network
from agents.adversary_env import TEAM_AGENT, AdversaryEnv
from attacks.learned import LearnedAdversary, perturbation_from_action, split_team, stack_team
from envs import make_env

EPS = 8 / 255
TINY = dict(train_batch_size=200, minibatch_size=100, num_epochs=1, num_envs_per_env_runner=1)


@pytest.fixture(scope="module")
def victim_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return make_policy_network("cnn", (21, 21, 3), 5, hidden=32, channels=(8, 8, 8)).eval()


def _victim_run(root: Path) -> Path:
    """An untrained victim saved as a `marl-fgmf train` run directory (no RLlib training)."""
    from agents.rl_module import FGMFTorchRLModule
    from agents.train import TrainConfig

    env = make_env("beacon")
    agent = env.possible_agents[0]
    torch.manual_seed(1)
    module = FGMFTorchRLModule(observation_space=env.observation_space(agent),
                               action_space=env.action_space(agent),
                               model_config={"arch": "cnn", "net": {"hidden": 32}, "sgam": None})
    ckpt = root / "checkpoints" / "iter_00001"
    module.save_to_path(str(ckpt / "learner_group" / "learner" / "rl_module" / "shared"))
    (root / "checkpoints" / "latest").write_text("iter_00001")
    (root / "run.json").write_text(json.dumps(TrainConfig(net={"hidden": 32}).to_json()))
    return root


@pytest.mark.parametrize("mode", ["perturb", "pa-ad"])
@pytest.mark.parametrize("team", [False, True])
def test_parallel_api(victim_net, mode, team):
    from pettingzoo.test import parallel_api_test

    env = AdversaryEnv(make_env("beacon", max_steps=8), victim_net, eps=EPS, mode=mode,
                       team=team)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a PettingZoo API warning fails the test
        parallel_api_test(env, num_cycles=20)
    expected = [TEAM_AGENT] if team else ["adv_agent_0", "adv_agent_1"]
    assert env.possible_agents == expected
    assert env.observation_space(expected[0]).shape == (21, 21, 6 if team else 3)


@pytest.mark.parametrize("mode", ["perturb", "pa-ad"])
@pytest.mark.parametrize("team", [False, True])
def test_perturbations_within_budget_and_range(victim_net, mode, team):
    env = AdversaryEnv(make_env("beacon", max_steps=10), victim_net, eps=EPS, mode=mode,
                       team=team, upsample="bilinear" if team else "nearest")
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    steps = 0
    while env.agents:
        clean = {v: env._clean[v].astype(np.float32) / 255.0 for v in env.attacked}
        actions = {}
        for a in env.agents:
            space = env.action_space(a)
            if mode == "perturb":  # unbounded Gaussian-like actions, extremes included
                actions[a] = (rng.standard_normal(space.shape) * 10).astype(np.float32)
            else:
                actions[a] = space.sample()
        _, _, _, _, infos = env.step(actions)
        steps += 1
        for v, seen in env.last_victim_obs.items():
            delta = seen - clean[v]
            assert np.abs(delta).max() <= EPS + 1e-6, f"{v}: |delta| {np.abs(delta).max()} > eps"
            assert seen.min() >= 0.0 and seen.max() <= 1.0, f"{v}: left [0, 1]"
        if mode == "perturb":
            assert max(np.abs(env.last_victim_obs[v] - clean[v]).max() for v in clean) > EPS / 2
    assert steps == 10


def test_learned_adversary_output_within_budget(victim_net):
    torch.manual_seed(2)
    adv_net = make_policy_network("cnn", (21, 21, 3), 7 * 7 * 3, hidden=16, channels=(4, 4, 4))
    with torch.no_grad():  # large means: tanh saturates, the perturbation reaches the boundary
        adv_net.pi.bias.copy_(20 * torch.randn(7 * 7 * 3).sign())
    obs = 0.2 + 0.6 * torch.rand(4, 21, 21, 3)  # rows 2, 3: interior, no clipping
    obs[0] = 0.0
    obs[1] = 1.0
    for mode, net in (("perturb", adv_net),
                      ("pa-ad", make_policy_network("cnn", (21, 21, 3), 5, hidden=16))):
        attack = LearnedAdversary(victim_net, net, eps=EPS, mode=mode)
        adv = attack(obs)
        assert (adv - obs).abs().max() <= EPS + 1e-6, mode
        assert adv.min() >= 0 and adv.max() <= 1, mode
        assert (adv - obs)[2:].abs().max() > 0.5 * EPS, mode
        if mode == "perturb":
            torch.testing.assert_close((adv - obs)[2:].abs().amin(), torch.tensor(EPS),
                                       atol=1e-5, rtol=0)


def test_team_stacking_roundtrip_and_upsampling():
    x = torch.rand(6, 21, 21, 3)
    team = stack_team(x, 2)
    assert team.shape == (3, 21, 21, 6)
    torch.testing.assert_close(team[1, ..., 3:], x[3])
    torch.testing.assert_close(split_team(team, 2), x)
    a = torch.randn(2, 7 * 7 * 3) * 5
    delta = perturbation_from_action(a, (21, 21, 3), (7, 7), EPS, "nearest")
    assert delta.shape == (2, 21, 21, 3) and delta.abs().max() <= EPS
    # nearest upsampling: each 3x3 cell carries its grid value
    torch.testing.assert_close(delta[:, 3:6, 6:9, :],
                               (EPS * torch.tanh(a.view(2, 7, 7, 3)))[:, 1:2, 2:3, :].expand(2, 3, 3, 3))


@pytest.mark.parametrize("team", [False, True])
def test_rewards_are_minus_the_victims(victim_net, team):
    env = AdversaryEnv(make_env("beacon", max_steps=25), victim_net, eps=EPS, team=team)
    ref = make_env("beacon", max_steps=25)  # the same game, replayed with the victims' actions
    env.reset(seed=7)
    ref.reset(seed=7)
    rng = np.random.default_rng(1)
    total_victim, total_adv = 0.0, 0.0
    while env.agents:
        actions = {a: rng.standard_normal(env.action_space(a).shape).astype(np.float32)
                   for a in env.agents}
        _, rew, _, _, infos = env.step(actions)
        if team:
            victim_actions = infos[TEAM_AGENT]["victim_action"]
        else:
            victim_actions = {i["victim"]: i["victim_action"] for i in infos.values()}
        _, ref_rew, _, _, _ = ref.step(victim_actions)
        if team:
            assert rew[TEAM_AGENT] == pytest.approx(-np.mean(list(ref_rew.values())))
        else:
            for v, r in ref_rew.items():
                assert rew[f"adv_{v}"] == pytest.approx(-r)
        total_victim += sum(ref_rew.values())
        total_adv += sum(rew.values())
    assert not ref.agents, "both games must end together"
    assert total_victim != 0.0


def test_bad_settings_are_one_line_errors(victim_net):
    with pytest.raises(ValueError, match="mode"):
        AdversaryEnv(make_env("beacon"), victim_net, mode="fgsm")
    with pytest.raises(ValueError, match="eps"):
        AdversaryEnv(make_env("beacon"), victim_net, eps=0)
    with pytest.raises(ValueError, match="grid"):
        AdversaryEnv(make_env("beacon"), victim_net, grid=22)
    with pytest.raises(ValueError, match="no victim policy"):
        AdversaryEnv(make_env("beacon"), {"agent_0": victim_net})
    env = AdversaryEnv(make_env("beacon"), victim_net)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="147"):
        env.step({"adv_agent_0": np.zeros(3, np.float32)})


@pytest.fixture(scope="module")
def adversary_run(ray_session, tmp_path_factory):
    from agents.adversary import train_adversary

    root = tmp_path_factory.mktemp("adv")
    victim = _victim_run(root / "victim")
    out = root / "adv"
    result = train_adversary(victim, out, eps="8/255", mode="perturb", iterations=1,
                             progress=False, net={"hidden": 16, "channels": [4, 8, 8]}, **TINY)
    return victim, out, result


def test_one_rllib_iteration_and_load_back_as_attack(adversary_run):
    from agents import load_policy
    from agents.adversary import load_adversary
    from attacks.evaluate import evaluate

    victim, out, result = adversary_run
    last = result["last"]
    assert last["iteration"] == 1 and last["env_steps"] > 0
    assert np.isfinite(last["victim_return_mean"])
    for name in ("run.json", "metrics.csv", "metrics.json", "checkpoints/latest"):
        assert (out / name).is_file(), name
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "adversary" and run["env"] == "beacon" and run["mode"] == "perturb"
    assert Path(run["victim_modules"]).is_dir()

    attack = load_adversary(out)
    assert attack.eps == pytest.approx(EPS) and attack.mode == "perturb"
    obs = torch.rand(2, 21, 21, 3)
    adv = attack(obs)
    assert (adv - obs).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    policy = load_policy(victim, device="cpu")
    result = evaluate(policy, make_env("beacon", max_steps=10), attack, episodes=1, seed=0,
                      progress=False)
    assert 0 < result["mean_linf"] <= EPS + 1e-6
    assert np.isfinite(result["team_return"]["mean"]) and "clean" in result


def test_cli_errors_exit_2(adversary_run, tmp_path, capsys):
    from marl_fgmf.cli import main

    victim, out, _ = adversary_run
    cases = [
        (["--victim", str(tmp_path / "nope"), "--out", str(tmp_path / "a")], "not found"),
        (["--victim", str(victim), "--eps", "2", "--out", str(tmp_path / "b")], "eps"),
        (["--victim", str(victim), "--mode", "fgsm", "--out", str(tmp_path / "c")], "mode"),
        (["--victim", str(victim), "--out", str(out)], "already holds a run"),
    ]
    for argv, message in cases:
        try:
            code = main(["train-adversary", *argv])
        except SystemExit as exc:  # argparse errors exit from the parser
            code = exc.code
        assert code == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_resume_continues_the_adversary_run(adversary_run, tmp_path):
    import shutil

    from agents.adversary import train_adversary

    _, out, _ = adversary_run
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    result = train_adversary(None, copy, iterations=2, resume=True, progress=False)
    assert [r["iteration"] for r in result["records"]] == [1, 2]
    assert (copy / "checkpoints" / "latest").read_text() == "iter_00002"
    assert result["config"]["mode"] == "perturb"


def test_pa_ad_team_trains_and_attacks(adversary_run, tmp_path):
    """The MultiDiscrete (team PA-AD) head through RLlib, replayed as an attack."""
    from agents import load_policy
    from agents.adversary import load_adversary, train_adversary
    from attacks.evaluate import evaluate

    victim, _, _ = adversary_run
    out = tmp_path / "paad"
    train_adversary(victim, out, mode="pa-ad", team=True, iterations=1, pa_ad_steps=1,
                    progress=False, net={"hidden": 16, "channels": [4, 8, 8]},
                    **{**TINY, "train_batch_size": 100, "minibatch_size": 50})
    attack = load_adversary(out)
    assert attack.mode == "pa-ad" and attack.team_size == 2 and attack.pa_ad_steps == 1
    policy = load_policy(victim, device="cpu")
    obs = torch.rand(4, 21, 21, 3)
    adv = attack.with_policy(policy)(obs)
    assert (adv - obs).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with pytest.raises(ValueError, match="whole teams"):
        attack.with_policy(policy)(obs[:3])
    res = evaluate(policy, make_env("beacon", max_steps=5), attack, episodes=1, progress=False)
    assert res["agent_steps"] == 10 and res["mean_linf"] <= EPS + 1e-6


def test_realize_target_raises_the_target_probability(victim_net):
    import torch.nn.functional as F

    from attacks.learned import realize_target

    torch.manual_seed(4)
    obs = torch.rand(8, 21, 21, 3)
    with torch.no_grad():
        logp = F.log_softmax(victim_net(obs), dim=1)
    target = logp.argmin(dim=1)  # the least likely action
    adv = realize_target(victim_net, obs, target, EPS, steps=3)
    assert (adv - obs).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        after = F.log_softmax(victim_net(adv), dim=1).gather(1, target[:, None])[:, 0]
    assert (after > logp.gather(1, target[:, None])[:, 0]).all()
