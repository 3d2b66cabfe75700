"""Checkpoints the toolkit did not write: RLlib's own PPO (default catalog encoder), any
``TorchRLModule``, any module id, through ``agents.load_policy`` and the CLI.

The PPO checkpoint is made here with RLlib's own ``PPOConfig`` (new API stack, default encoder,
one tiny iteration) on beacon (:func:`envs.rllib.register_rllib_env`), with the env-to-module
connector a user pipeline needs for it (RLlib's default conv net does not take uint8 frames):
frames cast to float 0-255, so the module's observation space is ``Box(0, 255, float32)`` and
the adapter must feed it ``255 * obs``. The oracle is the RLlib module itself, called with
gradients enabled on the frames it was trained on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule, RLModuleSpec
from ray.rllib.core.rl_module.torch import TorchRLModule

import agents.checkpoint as checkpoint_module
from agents import load_policy
from agents.checkpoint import (RL_MODULE_SUBDIR, CheckpointError, UntrustedCheckpointWarning,
                               agent_policy_map, load_agent_policies, policy_ids)
from conftest import save_untrained_run
from rllib_frames import FloatFrames
from envs import make_env
from envs.rllib import register_rllib_env
from marl_fgmf import cli
from marl_fgmf.adapter import PolicyAdapter

ENV_KWARGS = {"n_agents": 2, "max_steps": 10}
ENV_ARGS = ["--env", "beacon", "--env-kwargs", "n_agents=2,max_steps=10"]
MODULE_ID = "ppo_policy"  # neither "shared" nor an agent id: one module serves every agent
CONV = {"conv_filters": [[8, [3, 3], 2], [16, [3, 3], 2]], "head_fcnet_hiddens": [16]}


@pytest.fixture(scope="module")
def ppo_checkpoint(ray_session, tmp_path_factory):
    """An RLlib PPO checkpoint (one iteration, 64 agent-steps) and the frames of one episode."""
    env_name = register_rllib_env("beacon", **ENV_KWARGS)
    config = (PPOConfig()
              .environment(env=env_name)
              .multi_agent(policies={MODULE_ID},
                           policy_mapping_fn=lambda agent_id, episode, **kw: MODULE_ID,
                           count_steps_by="agent_steps")
              .env_runners(num_env_runners=0,
                           env_to_module_connector=lambda env, spaces=None, device=None:
                           FloatFrames())
              .training(train_batch_size_per_learner=64, minibatch_size=32, num_epochs=1)
              .rl_module(model_config=CONV))
    algo = config.build_algo()
    try:
        algo.train()
        ckpt = tmp_path_factory.mktemp("rllib") / "ppo"
        algo.save_to_path(str(ckpt))
    finally:
        algo.stop()
    env = make_env("beacon", **ENV_KWARGS)
    frames = []
    obs, _ = env.reset(seed=0)
    while env.agents and len(frames) < 12:
        frames += [obs[a] for a in env.agents]
        obs, *_ = env.step({a: int(np.random.default_rng(len(frames)).integers(5))
                            for a in env.agents})
    env.close()
    return ckpt, np.stack(frames)


def test_rllib_ppo_checkpoint_loads_with_the_modules_own_logits(ppo_checkpoint):
    ckpt, frames = ppo_checkpoint
    module = RLModule.from_checkpoint(ckpt / RL_MODULE_SUBDIR / MODULE_ID)
    assert isinstance(module, DefaultPPOTorchRLModule)
    assert module.observation_space.dtype == np.float32 and module.observation_space.high.max() == 255
    policy = load_policy(ckpt, device="cpu")
    assert isinstance(policy, PolicyAdapter) and policy.input_range == "float255"
    assert policy.obs_shape == frames.shape[1:] and policy.n_actions == 5
    assert not policy.training

    raw = torch.as_tensor(frames).float()  # what the module was trained on: 0-255 floats
    module.eval()
    with torch.enable_grad():
        ref = module._forward_train({Columns.OBS: raw})
    assert ref[Columns.ACTION_DIST_INPUTS].requires_grad  # the gradient path, not inference
    x = (raw / 255).requires_grad_(True)
    logits = policy(x)
    torch.testing.assert_close(logits, ref[Columns.ACTION_DIST_INPUTS], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(policy.value(x), module.compute_values({Columns.OBS: raw}),
                               rtol=1e-5, atol=1e-5)
    logits.log_softmax(1).gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the same module behind every path to it
    for path in (ckpt / "learner_group" / "learner" / "rl_module",
                 ckpt / RL_MODULE_SUBDIR / MODULE_ID):
        torch.testing.assert_close(load_policy(path, device="cpu")(x), logits)


def test_single_module_of_any_id_serves_every_agent(ppo_checkpoint):
    ckpt, _ = ppo_checkpoint
    agents = make_env("beacon", **ENV_KWARGS).possible_agents
    assert policy_ids(ckpt) == [MODULE_ID]
    assert agent_policy_map(ckpt, agents) == {a: MODULE_ID for a in agents}
    per_agent = load_agent_policies(ckpt, agents, device="cpu")
    assert per_agent[agents[0]] is per_agent[agents[1]]


def _cli(command: str, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "marl_fgmf.cli", command, *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_attack_explain_and_audit_cli_on_the_rllib_checkpoint(ppo_checkpoint, tmp_path):
    ckpt, _ = ppo_checkpoint
    out = tmp_path / "attack.json"
    proc = _cli("attack", "--checkpoint", str(ckpt), *ENV_ARGS, "--attack", "pgd", "--steps", "3",
                "--episodes", "1", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # a checkpoint from outside the user's runs: the pickle warning, once, on one line
    warned = [ln for ln in proc.stderr.splitlines() if "outside your marl-fgmf runs" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning: "), proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["policies"] == {"agent_0": MODULE_ID, "agent_1": MODULE_ID}
    assert result["results"][0]["success_rate"] > 0  # input gradients reached the attack

    proc = _cli("explain", "--checkpoint", str(ckpt), *ENV_ARGS, "--max-steps", "2",
                "--settings", "steps=4", "--quiet", "--out", str(tmp_path / "explain"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "explain" / "metrics.json").read_text())
    assert metrics["explained_steps"] >= 2
    assert list((tmp_path / "explain").glob("frame_*.png"))

    out = tmp_path / "audit.json"
    proc = _cli("audit", "--checkpoint", str(ckpt), *ENV_ARGS, "--n-obs", "4", "--episodes", "1",
                "--steps", "1,2", "--restarts", "1,2", "--n-queries", "10", "--quiet",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert len(report["policies"]) == 1 and "flagged" in report


def test_foreign_pickle_checkpoint_warns_once_and_own_runs_never(ppo_checkpoint, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(checkpoint_module, "_WARNED_PATHS", set())
    ckpt, _ = ppo_checkpoint
    with pytest.warns(UntrustedCheckpointWarning, match="unpickles its files.*marl-fgmf export"):
        load_policy(ckpt, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_policy(ckpt, device="cpu")  # once per checkpoint
        run = save_untrained_run(tmp_path / "run", ["shared"])
        load_policy(run, device="cpu")  # the user's own marl-fgmf run
        load_policy(run / "checkpoints" / "iter_00001", device="cpu")


def one_line_error(stderr: str, *needles: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("command, extra", [
    ("attack", ["--attack", "pgd", "--episodes", "1", "--out", "OUT/a.json"]),
    ("explain", ["--out", "OUT"]),
    ("audit", ["--out", "OUT/audit.json"]),
])
def test_missing_env_exits_2_with_one_line(ppo_checkpoint, tmp_path, capsys, command, extra):
    ckpt, _ = ppo_checkpoint
    out = tmp_path / "out"
    argv = [command, "--checkpoint", str(ckpt), *[a.replace("OUT", str(out)) for a in extra]]
    assert cli.main(argv) == 2
    one_line_error(capsys.readouterr().err, f"marl-fgmf {command}: error: --env is required",
                   "pass --env")
    assert not out.exists()  # nothing written


def test_missing_env_subprocess(ppo_checkpoint):
    """The same as a user meets it: exit status 2, one line on stderr."""
    proc = _cli("attack", "--checkpoint", str(ppo_checkpoint[0]), "--attack", "fgsm", timeout=60)
    assert proc.returncode == 2
    one_line_error(proc.stderr, "--env is required")


# ------------------------------------------------------------- modules built here, no training
class ChannelsFirstModule(TorchRLModule):
    """A custom TorchRLModule on (C, H, W) observations in [0, 1], without a value function."""

    def setup(self):
        c = self.observation_space.shape[0]
        self.conv = torch.nn.Conv2d(c, 4, 3)
        self.head = torch.nn.LazyLinear(int(self.action_space.n))

    def _forward(self, batch, **kwargs):
        return {Columns.ACTION_DIST_INPUTS: self.head(self.conv(batch[Columns.OBS]).flatten(1))}


def test_any_torch_rl_module_with_channels_first_unit_observations(tmp_path):
    space = gym.spaces.Box(0.0, 1.0, (3, 9, 9), np.float32)
    module = ChannelsFirstModule(observation_space=space, action_space=gym.spaces.Discrete(4))
    module._forward({Columns.OBS: torch.zeros(1, 3, 9, 9)})  # materialize the lazy layer
    module.save_to_path(str(tmp_path / "custom"))
    policy = load_policy(tmp_path / "custom", device="cpu")
    assert (policy.layout, policy.input_range, policy.obs_shape) == ("NCHW", "unit", (9, 9, 3))
    assert getattr(policy, "value", None) is None  # no ValueFunctionAPI: no critic claimed
    x = torch.rand(5, 9, 9, 3)
    want = module._forward({Columns.OBS: x.permute(0, 3, 1, 2)})[Columns.ACTION_DIST_INPUTS]
    torch.testing.assert_close(policy(x), want)


@pytest.mark.parametrize("low, high, dtype, input_range", [
    (0, 255, np.uint8, "uint8"), (0.0, 1.0, np.float32, "unit")])
def test_default_catalog_module_scaling_from_its_observation_space(tmp_path, low, high, dtype,
                                                                   input_range):
    space = gym.spaces.Box(low, high, (12, 12, 3), dtype)
    module = RLModuleSpec(module_class=DefaultPPOTorchRLModule, observation_space=space,
                          action_space=gym.spaces.Discrete(4), model_config=CONV).build()
    module.save_to_path(str(tmp_path / "m"))
    policy = load_policy(tmp_path / "m", device="cpu")
    assert policy.input_range == input_range
    x = torch.rand(3, 12, 12, 3)
    raw = x * 255 if high == 255 else x
    torch.testing.assert_close(policy(x), module._forward({Columns.OBS: raw})[Columns.ACTION_DIST_INPUTS])


@pytest.mark.parametrize("obs_space, action_space, needles", [
    (gym.spaces.Box(0, 255, (12, 12, 3), np.uint8), gym.spaces.Box(-1.0, 1.0, (2,)),
     ("acting in Box", "expected Discrete actions")),
    (gym.spaces.Box(-np.inf, np.inf, (12, 12, 3), np.float32), gym.spaces.Discrete(4),
     ("observes values in [-inf, inf]", "expected an image Box in [0, 1] or [0, 255]")),
    (gym.spaces.Box(0.0, 1.0, (36,), np.float32), gym.spaces.Discrete(4),
     ("expected an image Box of shape (H, W, C)",)),
])
def test_modules_the_adapter_cannot_serve(tmp_path, capsys, obs_space, action_space, needles):
    config = dict(CONV) if len(obs_space.shape) == 3 else {"fcnet_hiddens": [8]}
    module = RLModuleSpec(module_class=DefaultPPOTorchRLModule, observation_space=obs_space,
                          action_space=action_space, model_config=config).build()
    module.save_to_path(str(tmp_path / "m"))
    with pytest.raises(CheckpointError) as exc:
        load_policy(tmp_path / "m")
    assert "\n" not in str(exc.value)
    for n in ("DefaultPPOTorchRLModule", *needles):
        assert n in str(exc.value), (n, str(exc.value))
    out = tmp_path / "attack.json"
    argv = ["attack", "--checkpoint", str(tmp_path / "m"), "--env", "beacon", "--attack", "pgd",
            "--episodes", "1", "--out", str(out)]
    assert cli.main(argv) == 2
    one_line_error(capsys.readouterr().err, "marl-fgmf attack: error:", needles[-1])
    assert not out.exists()
