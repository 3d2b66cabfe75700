"""Tests of attacks.evaluate: rollouts of a PettingZoo env with every agent's observation attacked."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from agents import make_policy_network
from attacks import FGSM, PGD, RandomNoise, evaluate
from envs import make_env


pytestmark = pytest.mark.usefixtures("one_thread")

N_AGENTS, MAX_STEPS, EPISODES = 2, 8, 2


def small_policy(n_actions: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = make_policy_network("cnn", (21, 21, 3), n_actions, channels=(4, 8, 8), hidden=16)
    nn.init.orthogonal_(net.pi.weight, gain=1.0)
    return net.eval()


def small_env():
    return make_env("beacon", n_agents=N_AGENTS, max_steps=MAX_STEPS)


class CountingPGD(PGD):
    """PGD that records the batch size of every call (shared by its ``with_policy`` copies)."""

    def __init__(self, *args, calls: list, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = calls

    def __call__(self, obs, actions=None):
        self.calls.append(obs.shape[0])
        return super().__call__(obs, actions)


def test_evaluate_untrained_policy_under_tiny_pgd():
    policy = small_policy()
    calls: list[int] = []
    attack = CountingPGD(policy, eps=4 / 255, steps=2, seed=0, calls=calls)
    result = evaluate(policy, small_env(), attack, episodes=EPISODES, seed=3, progress=False)
    steps = EPISODES * MAX_STEPS * N_AGENTS
    # one batched call per env step, all agents at once
    assert calls == [N_AGENTS] * (EPISODES * MAX_STEPS)
    assert result["agent_steps"] == steps and result["clean"]["agent_steps"] == steps
    assert 0.0 <= result["success_rate"] <= 1.0
    assert 0.0 < result["mean_linf"] <= 4 / 255 + 1e-6
    assert result["mean_l2"] >= result["mean_linf"]
    assert result["attack"]["attack"] == "pgd" and result["attack"]["eps"] == pytest.approx(4 / 255)
    assert set(result["agent_return"]) == {"agent_0", "agent_1"}
    team = result["team_return"]
    assert team["n"] == EPISODES and team["low"] <= team["mean"] <= team["high"]
    per_episode = result["team_returns"]
    assert len(per_episode) == EPISODES
    assert sum(result["agent_return"][a]["mean"] for a in ("agent_0", "agent_1")) == pytest.approx(team["mean"])
    clean = result["clean"]
    assert clean["success_rate"] == 0.0 and clean["mean_linf"] == 0.0
    assert attack.seed == 0, "evaluate must not reseed the caller's attack"


def test_evaluate_is_reproducible_and_clean_matches_attack_none():
    policy = small_policy(seed=1)
    attack = RandomNoise(policy, eps=8 / 255)
    a = evaluate(policy, small_env(), attack, episodes=EPISODES, seed=5, progress=False)
    b = evaluate(policy, small_env(), attack, episodes=EPISODES, seed=5, progress=False)
    for key in ("team_returns", "success_rate", "mean_linf", "mean_l2"):
        assert a[key] == b[key]
    clean = evaluate(policy, small_env(), None, episodes=EPISODES, seed=5, progress=False)
    assert clean["team_returns"] == a["clean"]["team_returns"]
    assert clean["attack"] is None and clean["success_rate"] == 0.0


def test_evaluate_per_agent_policies_and_factories():
    p0, p1 = small_policy(seed=2), small_policy(seed=3)
    calls: list[int] = []
    result = evaluate({"agent_0": p0, "agent_1": p1}, small_env(),
                      lambda p: CountingPGD(p, eps=2 / 255, steps=1, calls=calls),
                      episodes=1, seed=0, progress=False, compare_clean=False)
    assert calls == [1, 1] * MAX_STEPS      # distinct policies: one call per policy per step
    assert "clean" not in result and result["agent_steps"] == MAX_STEPS * N_AGENTS
    # a callable agent id -> policy works the same; a shared module is batched
    result = evaluate(lambda agent: p0, small_env(), FGSM(p1, eps=2 / 255), episodes=1, seed=0,
                      progress=False)
    assert result["mean_linf"] <= 2 / 255 + 1e-6


def test_evaluate_bad_input():
    env = small_env()
    with pytest.raises(ValueError, match=r"logits of shape \(2, 4\) but the action space of 'agent_0' is Discrete\(5\)"):
        evaluate(small_policy(n_actions=4), env, None, episodes=1, progress=False)
    with pytest.raises(ValueError, match="episodes must be an integer >= 1, got 0"):
        evaluate(small_policy(), env, None, episodes=0, progress=False)
    with pytest.raises(ValueError, match="attack must be None, an Attack or a factory"):
        evaluate(small_policy(), env, "pgd", episodes=1, progress=False)
    with pytest.raises(ValueError, match="no policy for agent 'agent_1'"):
        evaluate({"agent_0": small_policy()}, env, None, episodes=1, progress=False)


def test_returns_are_summarized_with_student_t_and_one_episode_has_no_interval():
    import json

    from marl_fgmf.io import to_jsonable

    policy = small_policy(seed=4)
    result = evaluate(policy, small_env(), None, episodes=3, seed=1, progress=False)
    returns = result["team_returns"]
    mean = sum(returns) / 3
    sd = math.sqrt(sum((r - mean) ** 2 for r in returns) / 2)
    team = result["team_return"]
    assert team["n"] == 3 and team["mean"] == pytest.approx(mean)
    assert team["ci95"] == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-6)
    assert team["low"] == pytest.approx(mean - team["ci95"])
    # one episode: no spread to estimate, so no interval (NaN, written to JSON as null), never 0
    one = evaluate(policy, small_env(), RandomNoise(policy, eps=2 / 255), episodes=1, seed=1,
                   progress=False)
    assert one["team_return"]["mean"] == one["team_returns"][0] and one["team_return"]["n"] == 1
    assert math.isnan(one["team_return"]["ci95"]) and math.isnan(one["clean"]["team_return"]["ci95"])
    written = json.loads(json.dumps(to_jsonable(one), allow_nan=False))
    assert written["team_return"]["ci95"] is None
    assert written["team_return"]["mean"] == pytest.approx(one["team_returns"][0])


def test_max_steps_caps_each_episode_and_keeps_its_first_steps():
    policy = small_policy(seed=4)
    calls: list[int] = []
    attack = CountingPGD(policy, eps=4 / 255, steps=1, seed=0, calls=calls)
    capped = evaluate(policy, small_env(), attack, episodes=EPISODES, seed=1, progress=False,
                      max_steps=3)
    assert calls == [N_AGENTS] * (EPISODES * 3), "one attacked step per capped env step"
    assert capped["agent_steps"] == EPISODES * 3 * N_AGENTS == capped["clean"]["agent_steps"]
    assert capped["max_steps"] == 3
    # the capped returns are the first 3 steps of the full episodes (a one-step-reward env
    # would differ otherwise): play the same 3 steps by hand
    env = small_env()
    for ep in range(EPISODES):
        obs, _ = env.reset(seed=1 + ep)
        total = 0.0
        for _ in range(3):
            with torch.no_grad():
                acts = {a: int(policy(torch.as_tensor(obs[a][None], dtype=torch.float32) / 255)
                               .argmax()) for a in env.agents}
            obs, rewards, *_ = env.step(acts)
            total += sum(float(r) for r in rewards.values())
        assert capped["clean"]["team_returns"][ep] == pytest.approx(total)
    full = evaluate(policy, small_env(), None, episodes=1, seed=1, progress=False)
    assert full["agent_steps"] == MAX_STEPS * N_AGENTS and full["max_steps"] is None
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_steps must be None or an integer >= 1"):
            evaluate(policy, small_env(), None, episodes=1, progress=False, max_steps=bad)
