"""marl_fgmf.benchmark.faithfulness: frames from greedy rollouts, per-observation faithfulness
scores of every method, the deletion-steps rule, determinism, and the input-gradient guard."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from agents import make_policy_network
from envs import make_env
from marl_fgmf.benchmark.faithfulness import (METHOD_NAMES, METHOD_SETTINGS, FrameGroup, FrameSet,
                                              collect_frames, default_deletion_steps,
                                              faithfulness_scores, summarize_faithfulness)
from marl_fgmf.protocol import InputGradientError
from marl_fgmf.sanity import randomization_check


def _net(seed: int = 0) -> nn.Module:
    """A small beacon CNN whose policy head is wide enough that pi(a*) varies with the input."""
    torch.manual_seed(seed)
    net = make_policy_network("cnn", (21, 21, 3), 5, channels=(4, 8, 8), hidden=16)
    nn.init.normal_(net.pi.weight, std=0.5)
    return net.eval()


@pytest.fixture(scope="module")
def policy(one_thread):
    return _net()


@pytest.fixture(scope="module")
def frames(policy):
    return collect_frames(policy, make_env("beacon"), n_obs=32, seed=5)


def _small(frames: FrameSet, n: int, relevance: bool = True) -> FrameSet:
    group = frames.groups["default_policy"]
    return FrameSet({"default_policy": FrameGroup(
        group.policy, group.obs[:n], group.relevance[:n] if relevance else None)})


def test_collect_frames_match_a_replay_of_the_episodes(policy):
    env = make_env("beacon", max_steps=5)  # steps 0, 2, 4 kept: 6 observations per episode
    got = collect_frames(policy, env, n_obs=10, seed=3, frame_stride=2)
    assert got.n_obs == 10 and got.has_relevance and list(got.groups) == ["default_policy"]
    assert got.info["episodes"] == 2 and got.info["episode_seeds"] == [3, 4]
    group = got.groups["default_policy"]
    assert group.obs.dtype == torch.float32 and group.obs.shape == (10, 21, 21, 3)
    assert 0.0 <= float(group.obs.min()) and float(group.obs.max()) <= 1.0
    assert float(group.obs.max()) > 0.5, "obs should be frames / 255, not all near zero"

    replay = make_env("beacon", max_steps=5)  # the same episodes, step by step
    want_obs, want_rel = [], []
    for episode in range(2):
        obs, infos = replay.reset(seed=3 + episode)
        t = 0
        while replay.agents:
            x = {a: torch.from_numpy(obs[a]).float()[None] / 255 for a in replay.agents}
            if t % 2 == 0:
                for a in replay.agents:
                    want_obs.append(x[a][0])
                    want_rel.append(torch.from_numpy(infos[a]["relevance"]))
            with torch.no_grad():
                acts = {a: int(policy(x[a]).argmax(-1)) for a in replay.agents}
            obs, _, _, _, infos = replay.step(acts)
            t += 1
    assert torch.equal(group.obs, torch.stack(want_obs)[:10])
    assert group.relevance.dtype == torch.bool
    assert torch.equal(group.relevance, torch.stack(want_rel)[:10])
    assert (group.relevance.flatten(1).sum(1) == 18).all()  # agent + beacon: two 3x3 cells

    # one module per agent: each group holds that agent's observations
    two = collect_frames({"agent_0": policy, "agent_1": _net(1)}, make_env("beacon", max_steps=5),
                         n_obs=6, seed=3)
    assert {k: g.obs.shape[0] for k, g in two.groups.items()} == {"agent_0": 3, "agent_1": 3}
    with pytest.raises(ValueError, match="agent_policy"):
        collect_frames({"a": policy, "b": policy}, make_env("beacon"), n_obs=2, seed=0)


def test_deletion_steps_first_step_removes_at_most_the_smallest_mask(frames, policy):
    h, w, _ = frames.obs_shape
    smallest = min(int(g.relevance.flatten(1).sum(1).min()) for g in frames.groups.values())
    k = default_deletion_steps(frames)
    assert k == max(20, math.ceil(h * w / smallest)) == 25
    assert round(h * w / k) <= smallest
    # a small mask forces finer steps
    group = frames.groups["default_policy"]
    rel = group.relevance[:4].clone()
    rel[0] = False
    rel[0, :2, :2] = True  # |R| = 4
    tiny = FrameSet({"p": FrameGroup(policy, group.obs[:4], rel)})
    k_tiny = default_deletion_steps(tiny)
    assert k_tiny == math.ceil(h * w / 4) and round(h * w / k_tiny) <= 4
    # without relevance: 2 % of the pixels per step
    assert default_deletion_steps(_small(frames, 4, relevance=False)) == 50
    res = faithfulness_scores(_small(frames, 2), ["brightness"], sanity=False)
    assert res["deletion_steps"] == 25
    res = faithfulness_scores(_small(frames, 2), ["brightness"], sanity=False, deletion_steps=7)
    assert res["deletion_steps"] == 7 and res["deletion_steps_rule"] == "given"


def test_same_inputs_same_numbers_and_the_seed_is_used(frames):
    small = _small(frames, 6)
    methods = ["rise", "smoothgrad", "random"]
    a = faithfulness_scores(small, methods, seed=1, chunk=4)
    b = faithfulness_scores(small, methods, seed=1, chunk=4)
    for m in methods:
        a["methods"][m].pop("seconds"), b["methods"][m].pop("seconds")
    assert a == b
    json.dumps(a, allow_nan=False)  # plain JSON
    assert a["settings"]["rise"] == METHOD_SETTINGS["rise"] and a["tie_orders"] == 4
    c = faithfulness_scores(small, ["random"], seed=2, chunk=4, sanity=False)
    assert c["methods"]["random"]["ghr"] != a["methods"]["random"]["ghr"]
    for m in methods:
        row = a["methods"][m]
        assert len(row["ghr"]) == len(row["deletion_auc"]) == len(row["asr_m"]) == 6
        assert row["sanity_spearman_all"] is not None
    assert a["methods"]["random"]["sanity_spearman_fg"] == pytest.approx(1.0)  # model-free


def test_brightness_ghr_beats_the_all_pixel_chance(frames):
    res = faithfulness_scores(frames, ["brightness"], sanity=False)
    rel = frames.groups["default_policy"].relevance
    chance = float((rel.flatten(1).sum(1) / rel[0].numel()).mean())  # |R| / HW = 0.041
    summary = summarize_faithfulness(res)["brightness"]
    assert summary["ghr"]["n"] == 32
    assert summary["ghr"]["mean"] > 3 * chance, (summary["ghr"], chance)
    for key in ("deletion_auc", "insertion_auc", "asr_m"):
        assert 0.0 <= summary[key]["mean"] <= 1.0


def test_sanity_values_are_the_checks_final_spearman(frames, policy):
    small = _small(frames, 4)
    row = faithfulness_scores(small, ["ig"])["methods"]["ig"]
    obs = small.groups["default_policy"].obs
    for pixels, key in (("all", "sanity_spearman_all"), ("foreground", "sanity_spearman_fg")):
        ref = randomization_check("ig", policy, obs, settings=METHOD_SETTINGS["ig"],
                                  pixels=pixels).final_spearman()
        assert row[key] == pytest.approx(ref, abs=1e-9), pixels


class _NoGradPolicy(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.cam_layer = net.cam_layer  # so that Grad-CAM++ finds its layer: only the guard refuses

    def forward(self, x):
        with torch.no_grad():
            return self.net(x)


class _RoundedPolicy(_NoGradPolicy):
    def forward(self, x):
        return self.net(torch.round(x))  # gradient exactly zero


@pytest.mark.parametrize("wrapper,cause", [(_NoGradPolicy, "no_grad"), (_RoundedPolicy, "zero")])
def test_policy_without_input_gradients_is_refused(frames, wrapper, cause):
    group = frames.groups["default_policy"]
    bad = FrameSet({"p": FrameGroup(wrapper(_net()).eval(), group.obs[:4], group.relevance[:4])})
    for method in ("ig", "smoothgrad", "gradcampp", "pgca", "occlusion"):
        with pytest.raises(InputGradientError, match="input gradients") as err:
            faithfulness_scores(bad, [method], sanity=False)
        assert err.value.cause == cause


def test_without_relevance_ghr_is_none_and_the_rest_works(frames):
    small = _small(frames, 5, relevance=False)
    assert not small.has_relevance
    res = faithfulness_scores(small, ["occlusion", "brightness"], sanity=False)
    assert res["has_relevance"] is False and res["deletion_steps"] == 50
    for m in ("occlusion", "brightness"):
        row = res["methods"][m]
        assert row["ghr"] is None
        for key in ("deletion_auc", "insertion_auc", "asr_m"):
            assert len(row[key]) == 5 and all(0.0 <= v <= 1.0 for v in row[key])
    summary = summarize_faithfulness(res)
    assert summary["occlusion"]["ghr"] is None and summary["occlusion"]["asr_m"]["n"] == 5
    json.dumps(res, allow_nan=False)


def test_bad_arguments_are_refused(frames):
    small = _small(frames, 2)
    for kwargs, match in ((dict(methods=["nope"]), "methods"),
                          (dict(methods=["ig", "ig"]), "methods"),
                          (dict(methods=["ig"], tie_orders=0), "tie_orders"),
                          (dict(methods=["ig"], eps=0), "eps"),
                          (dict(methods=["ig"], deletion_steps=10_000), "deletion_steps")):
        with pytest.raises(ValueError, match=match):
            faithfulness_scores(small, **kwargs)
    assert set(METHOD_NAMES) >= {"ig", "occlusion", "gradcampp", "rise", "pgca", "random",
                                 "brightness"}
    with pytest.raises(ValueError, match="relevance"):
        FrameGroup(small.groups["default_policy"].policy, small.groups["default_policy"].obs,
                   np.zeros((2, 21, 21), bool))
