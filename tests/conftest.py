"""Shared fixtures: one Ray session per test run (ray.init costs seconds), in a temp dir."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

from agents import make_policy_network
from envs import make_env
from envs.beacon import scripted_actions

# Respect OMP_NUM_THREADS (a loaded machine); otherwise use up to two intra-op threads.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small tensors (two threads on a busy 2-core machine
    spin-wait and run an order of magnitude slower); the previous setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)



@pytest.fixture(scope="module")
def policy():
    """An (11, 11, 3) float64 CNN in eval mode whose policy head is wider than PPO's init, so
    that the actions are not all equiprobable (the attribution, explainer and PGCA tests)."""
    torch.manual_seed(0)
    net = make_policy_network("cnn", (11, 11, 3), 5, channels=(4, 8, 8), hidden=16).double()
    nn.init.normal_(net.pi.weight, std=0.5)
    return net.eval()

def _clone_beacon_policy(seed: int = 0, sgd_steps: int = 600, n_train: int | None = None,
                         n_held_out: int = 64):
    """A small beacon CNN behaviour-cloned from the scripted optimal policy (a few seconds on
    one core; asserts > 85% held-out action accuracy), and ``n_held_out`` held-out frames.

    Frames come from 60 episodes (seeds ``1000 * seed + i``) of mostly optimal, partly random
    moves so that states are diverse; the first ``n_train`` frames (default: all but 128) train.
    """
    env = make_env("beacon", n_agents=2, max_steps=25)
    rng = np.random.default_rng(seed)
    frames, labels = [], []
    for episode in range(60):
        obs, _ = env.reset(seed=1000 * seed + episode)
        while env.agents:
            best = scripted_actions(env)
            for agent in env.agents:
                frames.append(obs[agent])
                labels.append(best[agent])
            obs, *_ = env.step({a: best[a] if rng.random() < 0.7 else int(rng.integers(5))
                                for a in env.agents})
    x = torch.from_numpy(np.stack(frames)).float() / 255
    y = torch.tensor(labels)
    torch.manual_seed(seed)
    net = make_policy_network("cnn", (21, 21, 3), 5, channels=(8, 16, 16), hidden=32)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    n_train = len(x) - 128 if n_train is None else n_train
    for _ in range(sgd_steps):
        idx = torch.randint(0, n_train, (64,), generator=gen)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x[n_train:]).argmax(1) == y[n_train:]).float().mean().item()
    assert accuracy > 0.85, f"behaviour cloning failed (seed {seed}): accuracy {accuracy:.2f}"
    return net, x[n_train:n_train + n_held_out]


@pytest.fixture(scope="session")
def clone_beacon_policy():
    """Factory: ``clone_beacon_policy(seed, sgd_steps, n_train, n_held_out) -> (net, frames)``."""
    return _clone_beacon_policy


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for the whole session under its own temporary directory."""
    import ray

    tmp = tempfile.mkdtemp(prefix="marlfgmf-ray-")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=tmp, configure_logging=False)
    yield ray
    ray.shutdown()


def save_untrained_run(root, module_ids: list[str], n_actions: int = 5,
                       env_kwargs: dict | None = None):
    """An untrained beacon policy saved in the exact layout ``marl-fgmf train`` writes (run.json,
    checkpoints/latest, learner_group/learner/rl_module/<module id>): a run directory for CLI
    tests that needs neither Ray nor training."""
    import json
    from pathlib import Path

    from gymnasium import spaces

    from agents.rl_module import FGMFTorchRLModule
    from agents.train import TrainConfig
    from envs import make_env

    root = Path(root)
    env_kwargs = dict(env_kwargs or {"n_agents": 2, "max_steps": 4})
    env = make_env("beacon", **env_kwargs)
    agent = env.possible_agents[0]
    ckpt = root / "checkpoints" / "iter_00001"
    for i, module_id in enumerate(module_ids):
        torch.manual_seed(i)
        module = FGMFTorchRLModule(
            observation_space=env.observation_space(agent), action_space=spaces.Discrete(n_actions),
            model_config={"arch": "cnn", "net": {"channels": [4, 8, 8], "hidden": 16},
                          "sgam": None})
        module.save_to_path(str(ckpt / "learner_group" / "learner" / "rl_module" / module_id))
    (root / "checkpoints" / "latest").write_text("iter_00001")
    cfg = TrainConfig(env_kwargs=env_kwargs, net={"channels": [4, 8, 8], "hidden": 16},
                      policies="shared" if module_ids == ["shared"] else "per-agent")
    (root / "run.json").write_text(json.dumps(cfg.to_json()))
    return root


def tree_hash(folder) -> str:
    """sha256 over every file's relative path and bytes under ``folder``: equal before and
    after a refused command means it changed nothing there."""
    import hashlib
    from pathlib import Path
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()
