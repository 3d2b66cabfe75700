"""Environment registry tests: PettingZoo conformance and determinism for every env in
``list_envs()``, beacon's ground-truth relevance, the preprocessing contract (uint8, square,
declared space), clean errors, and the RLlib wrapper and registration."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from gymnasium import spaces

with warnings.catch_warnings():  # pettingzoo.test imports classic envs through the old API
    warnings.simplefilter("ignore", DeprecationWarning)
    from pettingzoo.test import parallel_api_test

from pettingzoo.utils import BaseParallelWrapper

import envs
from envs import list_envs, make_env
from envs.conformance import VISIBLE_OBJECTS, frames_change_test, objects_visible_test
from envs.beacon import BEACON_COLOUR, SELF_COLOUR, BeaconEnv, scripted_return

ENV_NAMES = list_envs()
REAL_ENVS = [name for name in ENV_NAMES if name != "beacon"]
API_CYCLES = {"beacon": 200}  # the pixel envs run 30 cycles (a few tenths of a second each)


def _rollout(env, seed: int, steps: int = 15, action_seed: int = 123):
    """Reset with ``seed``, then step a fixed (seeded) random action sequence; return the
    trajectory as lists of observation and reward dicts and the done flags."""
    action_rng = np.random.default_rng(action_seed)
    obs, _ = env.reset(seed=seed)
    observations, rewards, dones = [obs], [], []
    for _ in range(steps):
        if not env.agents:
            break
        actions = {agent: int(action_rng.integers(env.action_space(agent).n))
                   for agent in env.agents}
        obs, rew, term, trunc, _ = env.step(actions)
        observations.append(obs)
        rewards.append({agent: float(r) for agent, r in rew.items()})
        dones.append((dict(term), dict(trunc)))
    return observations, rewards, dones


def _same_observations(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


# ------------------------------------------------------------------ every env in the registry
def test_registry_names_the_four_envs():
    assert set(ENV_NAMES) >= {"beacon", "pistonball", "pursuit", "cooperative_pong"}


@pytest.mark.parametrize("name", ENV_NAMES)
def test_parallel_api(name):
    parallel_api_test(make_env(name), num_cycles=API_CYCLES.get(name, 30))


@pytest.mark.parametrize("name", ENV_NAMES)
def test_observations_are_uint8_images_in_the_declared_space(name):
    env = make_env(name)
    obs, _ = env.reset(seed=0)
    for step in range(5):
        for agent, o in obs.items():
            space = env.observation_space(agent)
            assert isinstance(space, spaces.Box) and space.dtype == np.uint8, space
            assert len(space.shape) == 3 and space.shape[0] == space.shape[1], space.shape
            assert o.dtype == np.uint8 and o.shape == space.shape, (o.dtype, o.shape)
            assert space.contains(o), f"{name}: {agent}'s observation at step {step} not in {space}"
            assert isinstance(env.action_space(agent), spaces.Discrete)
            if hasattr(env, "observation_spaces"):
                assert env.observation_spaces[agent] == space
        obs, *_ = env.step({agent: env.action_space(agent).sample() for agent in env.agents})


@pytest.mark.parametrize("name", ENV_NAMES)
def test_same_seed_same_trajectory(name):
    env = make_env(name)
    first = _rollout(env, seed=7)
    again = _rollout(env, seed=7)  # same instance, re-seeded (RLlib reuses instances)
    other = _rollout(make_env(name), seed=7)  # a fresh instance
    for run in (again, other):
        assert _same_observations(first[0], run[0]), f"{name}: observations differ for one seed"
        assert first[1] == run[1], f"{name}: rewards differ for one seed"
        assert first[2] == run[2], f"{name}: terminations/truncations differ for one seed"


@pytest.mark.parametrize("name", ENV_NAMES)
def test_different_seeds_differ(name):
    # every env here is stochastic: beacon (positions, distractors), pistonball (ball drop,
    # piston heights), pursuit (positions, evader walk), pong (ball direction)
    env = make_env(name)
    assert not _same_observations(_rollout(env, seed=1)[0], _rollout(env, seed=2)[0]), \
        f"{name}: seeds 1 and 2 gave the same observations"


@pytest.mark.parametrize("name", ENV_NAMES)
def test_unknown_setting_is_a_clean_value_error(name):
    with pytest.raises(ValueError, match=rf"'{name}'.*'no_such_setting'"):
        make_env(name, no_such_setting=1)


def test_unknown_env_name_lists_the_valid_names():
    with pytest.raises(ValueError) as excinfo:
        make_env("no_such_env")
    message = str(excinfo.value)
    assert "no_such_env" in message
    for name in ENV_NAMES:
        assert name in message, f"{name!r} missing from {message!r}"


def test_import_envs_stays_light():
    code = ("import sys, envs; heavy = [m for m in ('supersuit', 'ray', 'torch', "
            "'pettingzoo.butterfly', 'pettingzoo.sisl', 'pygame') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------- the SuperSuit-preprocessed envs
@pytest.mark.parametrize("name", REAL_ENVS)
def test_size_and_frame_stack(name):
    plain_obs, _ = make_env(name, size=24).reset(seed=3)
    stacked = make_env(name, size=24, frame_stack=2)
    stacked_obs, _ = stacked.reset(seed=3)
    agent = stacked.possible_agents[0]
    assert stacked.observation_space(agent).shape == (24, 24, 6)
    assert stacked.observation_spaces[agent].shape == (24, 24, 6)
    # the newest frame is last along the channel axis; after reset the older one is blank
    np.testing.assert_array_equal(stacked_obs[agent][..., 3:], plain_obs[agent])
    np.testing.assert_array_equal(stacked_obs[agent][..., :3], 0)


@pytest.mark.parametrize("name", ["pistonball", "cooperative_pong"])
def test_grayscale_has_one_channel_per_frame(name):
    env = make_env(name, grayscale=True, frame_stack=3, size=16)
    obs, _ = env.reset(seed=0)
    agent = env.possible_agents[0]
    assert env.observation_space(agent).shape == (16, 16, 3)
    assert obs[agent].shape == (16, 16, 3) and obs[agent].dtype == np.uint8


@pytest.mark.parametrize("name, setting, value", [
    ("pistonball", "size", 0), ("pistonball", "n_pistons", 1), ("pistonball", "frame_stack", 0),
    ("pistonball", "grayscale", "yes"), ("cooperative_pong", "size", 2.5),
    ("cooperative_pong", "render_mode", "human"), ("pursuit", "size", 5),
    ("pursuit", "obs_range", 4), ("pursuit", "n_pursuers", 0),
])
def test_bad_settings_name_the_env_and_setting(name, setting, value):
    with pytest.raises(ValueError, match=rf"'{name}'.*{setting}"):
        make_env(name, **{setting: value})


def test_pistonball_has_discrete_actions_and_n_pistons_agents():
    env = make_env("pistonball", n_pistons=4)
    assert env.possible_agents == [f"piston_{i}" for i in range(4)]
    assert env.action_space("piston_0") == spaces.Discrete(3)


def test_cooperative_pong_observations_are_not_black():
    # PettingZoo's v6 env never draws its screen with render_mode=None (see the module)
    env = make_env("cooperative_pong")
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step({agent: 0 for agent in env.agents})
    for agent in env.possible_agents:
        assert obs[agent].max() == 255, "the paddles should be drawn in white"


def test_pursuit_grid_to_image_scaling_and_layout():
    from envs.pursuit import grid_to_image

    grid = np.zeros((7, 7, 3), np.float32)
    grid[0, 0, 0] = 1.0  # wall
    grid[3, 3, 1] = 1.0  # the agent itself
    grid[6, 5, 2] = 2.0  # two evaders
    grid[6, 6, 2] = 9.0  # many evaders: saturates
    image = grid_to_image(grid, 28)  # 28 = 4 * 7: every cell a 4 x 4 block
    assert image.dtype == np.uint8 and image.shape == (28, 28, 3)
    np.testing.assert_array_equal(image[0:4, 0:4], [[[255, 0, 0]] * 4] * 4)
    np.testing.assert_array_equal(image[12:16, 12:16, 1], 85)
    np.testing.assert_array_equal(image[24:28, 20:24, 2], 170)
    np.testing.assert_array_equal(image[24:28, 24:28, 2], 255)
    assert int((image > 0).any(-1).sum()) == 4 * 16
    assert grid_to_image(grid, 32).shape == (32, 32, 3)  # uneven blocks: 4 or 5 pixels


def test_pursuit_agent_sees_itself_at_the_centre():
    env = make_env("pursuit", size=28)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        for agent, o in obs.items():
            assert (o[12:16, 12:16, 1] >= 85).all(), f"{agent} not at its own view's centre"
        obs, *_ = env.step({agent: env.action_space(agent).sample() for agent in env.agents})


# ------------------------------------------------------------------------------------- beacon
@pytest.mark.parametrize("cell", [1, 3])
def test_beacon_relevance_marks_exactly_the_agent_and_its_beacon(cell):
    env = make_env("beacon", n_agents=3, grid=6, cell=cell, n_distractors=3, max_steps=40)
    obs, infos = env.reset(seed=11)
    rng = np.random.default_rng(0)
    checked = 0
    for step in range(25):
        for i, agent in enumerate(env.possible_agents):
            relevance = infos[agent]["relevance"]
            assert relevance.dtype == bool and relevance.shape == obs[agent].shape[:2]
            from_colours = ((obs[agent] == SELF_COLOUR).all(-1)
                            | (obs[agent] == BEACON_COLOUR).all(-1))
            np.testing.assert_array_equal(
                relevance, from_colours,
                err_msg=f"step {step}, {agent}: mask differs from the rendered self/beacon pixels")
            if not np.array_equal(env.pos[i], env.beacon[i]):
                assert relevance.sum() == 2 * cell * cell
                checked += 1
        obs, _, _, _, infos = env.step({a: int(rng.integers(5)) for a in env.agents})
    assert checked >= 50


def test_beacon_scripted_policy_beats_random():
    scripted = scripted_return(episodes=10, seed=0)
    env = BeaconEnv()
    rng = np.random.default_rng(0)
    returns = []
    for episode in range(10):
        env.reset(seed=episode)
        total = 0.0
        while env.agents:
            _, rew, *_ = env.step({a: int(rng.integers(5)) for a in env.agents})
            total += sum(rew.values()) / env.n_agents
        returns.append(total)
    random_return = float(np.mean(returns))
    assert scripted > 5 * max(random_return, 0.0) + 5.0, (scripted, random_return)


def test_beacon_shared_reward_is_identical_across_agents():
    env = make_env("beacon", n_agents=3, shared_reward=True)
    env.reset(seed=0)
    rng = np.random.default_rng(1)
    nonzero = 0
    while env.agents:
        _, rew, *_ = env.step({a: int(rng.integers(5)) for a in env.agents})
        assert len(set(rew.values())) == 1, rew
        nonzero += any(rew.values())
    assert nonzero > 0


@pytest.mark.parametrize("setting, value", [
    ("n_agents", 0), ("grid", 2), ("cell", 0), ("n_distractors", -1), ("max_steps", 0),
    ("render_mode", "human"),
])
def test_beacon_bad_constructor_args(setting, value):
    with pytest.raises(ValueError, match=rf"{setting}.*{value}"):
        make_env("beacon", **{setting: value})


# -------------------------------------------------------------------------------------- RLlib
@pytest.mark.parametrize("name", ENV_NAMES)
def test_rllib_parallel_pettingzoo_env_wraps_it(name):
    from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv

    env = ParallelPettingZooEnv(make_env(name))
    obs, infos = env.reset(seed=0)
    assert set(obs) == set(env.par_env.possible_agents)
    obs, rew, term, trunc, infos = env.step(
        {agent: env.action_space[agent].sample() for agent in obs})
    assert "__all__" in term and "__all__" in trunc
    for agent, o in obs.items():
        assert env.observation_space[agent].contains(o)
    env.close()


def test_register_rllib_env_names_and_creators():
    from ray.tune.registry import ENV_CREATOR, _global_registry

    from envs.rllib import register_rllib_env, rllib_env_name

    name = register_rllib_env("beacon", n_agents=3, grid=5)
    assert name == register_rllib_env("beacon", grid=5, n_agents=3)  # order-free, repeatable
    assert name == rllib_env_name("beacon", n_agents=3, grid=5)
    assert name != rllib_env_name("beacon", n_agents=2, grid=5)
    assert register_rllib_env("beacon") == "fgmf-beacon"
    assert name.replace("-", "").replace("_", "").isalnum()  # safe in file names

    creator = _global_registry.get(ENV_CREATOR, name)
    env = creator({})
    obs, _ = env.reset(seed=0)
    assert len(obs) == 3 and next(iter(obs.values())).shape == (15, 15, 3)
    env = creator({"n_agents": 2})  # env_config overrides the registered settings
    assert len(env.reset(seed=0)[0]) == 2

    with pytest.raises(ValueError, match="unknown env"):
        register_rllib_env("no_such_env")
    with pytest.raises(ValueError, match="no_such_setting"):
        register_rllib_env("beacon", no_such_setting=1)


def test_registry_is_extensible():
    envs.register_env("beacon_tiny", lambda grid=3: BeaconEnv(grid=grid, n_agents=1))
    try:
        assert "beacon_tiny" in list_envs()
        assert make_env("beacon_tiny").reset(seed=0)[0]["agent_0"].shape == (9, 9, 3)
        with pytest.raises(ValueError, match="'beacon_tiny'.*'cell'"):
            make_env("beacon_tiny", cell=2)
    finally:
        envs._REGISTRY.pop("beacon_tiny")


# ------------------------------------------------------------ conformance (envs.conformance)
class _FrozenFrames(BaseParallelWrapper):
    """Every step returns the reset observations again (what a non-drawing env looks like)."""

    def reset(self, seed=None, options=None):
        obs, infos = self.env.reset(seed=seed, options=options)
        self.first = obs
        return obs, infos

    def step(self, actions):
        obs, *rest = self.env.step(actions)
        return ({agent: self.first[agent] for agent in obs}, *rest)


@pytest.mark.parametrize("name", ENV_NAMES)
def test_frames_change_within_an_episode(name):
    largest = frames_change_test(make_env(name), steps=30, seed=0)
    assert set(largest) == set(make_env(name).possible_agents)


@pytest.mark.parametrize("name", ENV_NAMES)
def test_the_objects_that_matter_are_visible(name):
    assert name in VISIBLE_OBJECTS, f"{name}: no visibility check"
    assert objects_visible_test(name, steps=40, seed=1) > 0


@pytest.mark.parametrize("name", ["pistonball", "cooperative_pong"])
def test_objects_visible_stacked_grayscale_and_other_sizes(name):
    assert objects_visible_test(name, steps=20, seed=2, frame_stack=2, grayscale=True,
                                size=16) > 0
    assert objects_visible_test(name, steps=20, seed=3, size=64) > 0


@pytest.mark.parametrize("name", ENV_NAMES)
def test_the_checks_fail_on_frozen_frames(name):
    with pytest.raises(AssertionError, match="never changed"):
        frames_change_test(_FrozenFrames(make_env(name)), steps=20)
    with pytest.raises(AssertionError, match=name):
        objects_visible_test(name, steps=20, env=_FrozenFrames(make_env(name)))


def test_the_checks_fail_on_pettingzoo_pistonball_without_a_render_mode():
    import pettingzoo

    raw = pettingzoo.make("parallel", "butterfly/pistonball-v6", continuous=False, n_pistons=5)
    with pytest.raises(AssertionError, match="never changed"):
        frames_change_test(raw, steps=20)
    with pytest.raises(AssertionError, match="ball .* is not drawn"):
        objects_visible_test("pistonball", steps=5, env=raw)


@pytest.mark.parametrize("name", ["pistonball", "cooperative_pong"])
def test_render_mode_still_means_what_it_says(name):
    env = make_env(name)  # drawn internally in rgb_array, but render() follows the user's None
    env.reset(seed=0)
    assert env.render_mode is None and env.render() is None
    env = make_env(name, render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert env.render_mode == "rgb_array" and frame.ndim == 3 and frame.dtype == np.uint8


# --------------------------------------------------------------------------- action names
@pytest.mark.parametrize("name", ENV_NAMES)
def test_every_env_names_its_actions(name):
    names = envs.action_names(name)
    env = make_env(name)
    assert len(names) == env.action_space(env.possible_agents[0]).n == len(set(names))
    assert all(isinstance(n, str) and n for n in names)


def test_pistonball_action_names_follow_the_piston():
    env = make_env("pistonball", n_pistons=3, random_drop=False)
    names = envs.action_names("pistonball")
    env.reset(seed=0)
    piston = env.unwrapped.pistonList[1]
    env.step({agent: names.index("up") for agent in env.agents})
    y0 = piston.position[1]
    env.step({agent: names.index("up") for agent in env.agents})
    assert piston.position[1] < y0  # pygame y grows downwards: up is smaller y
    y1 = piston.position[1]
    env.step({agent: names.index("stay") for agent in env.agents})
    assert piston.position[1] == y1
    env.step({agent: names.index("down") for agent in env.agents})
    assert piston.position[1] > y1


def test_cooperative_pong_action_names_follow_the_paddle():
    env = make_env("cooperative_pong")
    names = envs.action_names("cooperative_pong")
    env.reset(seed=0)
    paddle = env.unwrapped.env.p0.rects[0]
    y0 = paddle.y
    env.step({agent: names.index("up") for agent in env.agents})
    assert paddle.y < y0
    y1 = paddle.y
    env.step({agent: names.index("down") for agent in env.agents})
    assert paddle.y > y1


def test_pursuit_action_names_are_moves_in_the_image():
    # the global state is laid out as the observations are: row = grid y, column = grid x
    env = make_env("pursuit", n_pursuers=1, n_evaders=1, x_size=9, y_size=9)
    names = envs.action_names("pursuit")
    env.reset(seed=0)
    layer = env.unwrapped.env.pursuer_layer
    moved = {}
    for name in ("right", "left", "down", "up", "stay"):
        before = np.argwhere(env.state()[..., 1] > 0)[0]
        env.step({"pursuer_0": names.index(name)})
        after = np.argwhere(env.state()[..., 1] > 0)[0]
        assert tuple(after[::-1]) == tuple(layer.get_position(0))  # (row, col) = (y, x)
        moved[name] = tuple(after - before)
    expected = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0), "stay": (0, 0)}
    for name, step in moved.items():  # a blocked move stays: only check unblocked ones
        assert step in (expected[name], (0, 0)), (name, step)
    assert sum(step != (0, 0) for step in moved.values()) >= 3, moved


def test_beacon_action_names_are_moves_in_the_image():
    env = make_env("beacon", n_agents=1, grid=7)
    names = envs.action_names("beacon")
    env.reset(seed=0)
    env.pos[0] = (3, 3)
    for name, step in {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1),
                       "stay": (0, 0)}.items():
        before = env.pos[0].copy()
        env.step({"agent_0": names.index(name)})
        assert tuple(env.pos[0] - before) == step, name


# ------------------------------------------------------------------ native observation sizes
def test_pursuit_default_is_the_native_grid_and_every_arch_runs_on_it():
    import torch

    from agents.networks import make_policy_network

    env = make_env("pursuit")
    obs, _ = env.reset(seed=0)
    shape = env.observation_space("pursuer_0").shape
    assert shape == (7, 7, 3) and obs["pursuer_0"].shape == shape
    batch = torch.as_tensor(np.stack(list(obs.values()))[:4], dtype=torch.float32) / 255
    batch.requires_grad_(True)
    for arch in ("cnn", "vit", "hybrid"):
        logits = make_policy_network(arch, shape, env.action_space("pursuer_0").n)(batch)
        assert logits.shape == (4, 5) and torch.isfinite(logits).all()
        logits.sum().backward()
        assert batch.grad is not None and batch.grad.abs().sum() > 0
        batch.grad = None
    assert make_env("pursuit", size=32).observation_space("pursuer_0").shape == (32, 32, 3)


# ------------------------------------------------- a user's own env: "package.module:factory"
USER_ENV = '''
import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

ACTION_NAMES = ("dim", "bright")


class Lamp(ParallelEnv):
    """Two agents; each one's action sets the brightness of its own 4 x 4 image."""

    metadata = {"name": "lamp_v0"}

    def __init__(self, steps=5):
        self.steps = steps
        self.possible_agents = ["a", "b"]
        self.agents = []
        self._obs_space = spaces.Box(0, 255, (4, 4, 3), np.uint8)
        self._act_space = spaces.Discrete(2)

    def observation_space(self, agent):
        return self._obs_space

    def action_space(self, agent):
        return self._act_space

    def reset(self, seed=None, options=None):
        self.agents, self.t = list(self.possible_agents), 0
        return {a: np.zeros((4, 4, 3), np.uint8) for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions):
        self.t += 1
        obs = {a: np.full((4, 4, 3), 200 * int(actions[a]), np.uint8) for a in self.agents}
        done = self.t >= self.steps
        agents = list(self.agents)
        if done:
            self.agents = []
        return (obs, {a: float(actions[a]) for a in agents}, {a: False for a in agents},
                {a: done for a in agents}, {a: {} for a in agents})


def make_env(steps: int = 5):
    return Lamp(steps)


def make_vector_env():
    env = Lamp()
    env.observation_space = lambda agent: spaces.Box(0, 1, (3,), np.float32)
    return env


def make_aec_env():
    from pettingzoo.utils.conversions import parallel_to_aec
    return parallel_to_aec(Lamp())


def make_nothing():
    return 42


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_env(tmp_path, monkeypatch):
    package = tmp_path / "lamp_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "lamp.py").write_text(USER_ENV)
    (package / "broken.py").write_text("raise RuntimeError('broken on import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "lamp_pkg.lamp"
    for module in [m for m in sys.modules if m.startswith("lamp_pkg")]:
        del sys.modules[module]


def test_a_user_env_factory_works_like_an_env_name(user_env):
    name = f"{user_env}:make_env"
    assert envs.check_env_name(name) == name
    env = make_env(name, steps=3)
    parallel_api_test(env, num_cycles=10)
    frames_change_test(make_env(name), steps=10)
    assert envs.action_names(name) == ("dim", "bright")
    assert envs.env_settings(name) == {"steps": 5}
    with pytest.raises(ValueError, match=rf"'{name}'.*'no_such_setting'.*steps"):
        make_env(name, no_such_setting=1)
    with pytest.raises(ValueError, match=rf"'{name}': setting steps must be an integer"):
        make_env(name, steps=2.5)


@pytest.mark.parametrize("attr, message", [
    ("make_vector_env", r"observation space Box\(0\.0, 1\.0, \(3,\).*expected an image Box"),
    ("make_aec_env", r"returned an AECEnv.*expected a pettingzoo ParallelEnv.*aec_to_parallel"),
    ("make_nothing", r"returned int, expected a pettingzoo ParallelEnv"),
    ("NOT_CALLABLE", r"'NOT_CALLABLE' is a int, not callable; expected an import path"),
    ("no_such_factory", r"has no attribute 'no_such_factory'; expected an import path"),
])
def test_a_bad_user_env_factory_is_one_clear_value_error(user_env, attr, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        make_env(f"{user_env}:{attr}")
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("path, message", [
    ("no_such_pkg.module:make_env", r"module 'no_such_pkg.module' does not import "
                                    r"\(ModuleNotFoundError.*PYTHONPATH"),
    ("lamp_pkg.broken:make_env", r"does not import \(RuntimeError: broken on import\)"),
    ("lamp_pkg.lamp:", r"not a valid import path"),
    ("lamp pkg:make", r"not a valid import path"),
    ("no_such_env", r"unknown env 'no_such_env'; allowed: .*beacon.*or an import path"),
])
def test_a_user_env_path_that_does_not_resolve_is_one_clear_value_error(user_env, path, message):
    with pytest.raises(ValueError, match=message):
        make_env(path)
    with pytest.raises(ValueError, match=message):
        envs.check_env_name(path)


def test_register_rllib_env_takes_a_user_env_factory(user_env):
    from ray.tune.registry import ENV_CREATOR, _global_registry

    from envs.rllib import register_rllib_env

    name = f"{user_env}:make_env"
    registry_name = register_rllib_env(name, steps=4)
    assert registry_name.startswith("fgmf-lamp_pkg_lamp_make_env-")
    assert registry_name.replace("-", "").replace("_", "").isalnum()  # safe in file names
    assert registry_name != register_rllib_env(name, steps=5)
    env = _global_registry.get(ENV_CREATOR, registry_name)({})
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"a", "b"} and obs["a"].shape == (4, 4, 3)
    with pytest.raises(ValueError, match="does not import"):
        register_rllib_env("no_such_pkg.module:make_env")


# ---------------------------------------------------------------------- marl-fgmf envs (CLI)
def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "marl_fgmf.cli", "envs", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_envs_command_lists_every_env_with_settings_shape_and_actions():
    result = _cli()
    assert result.returncode == 0, result.stderr
    for name in ENV_NAMES:
        assert f"\n{name}: " in "\n" + result.stdout, name
    assert "n_pistons=5" in result.stdout and "(32, 32, 3) uint8" in result.stdout
    assert "(7, 7, 3) uint8" in result.stdout  # pursuit's native grid
    assert "0 down, 1 stay, 2 up" in result.stdout
    assert "0 left, 1 right, 2 down, 3 up, 4 stay" in result.stdout
    help_text = _cli("--help").stdout
    assert "--env NAME" in help_text and "--check" in help_text and "default" in help_text


def test_envs_command_shows_and_checks_a_user_env_from_the_current_directory(tmp_path):
    (tmp_path / "lamp_here.py").write_text(USER_ENV)
    result = _cli("--env", "lamp_here:make_env", "--env-kwargs", "steps=7", "--check",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "steps=5" in result.stdout and "with:        steps=7" in result.stdout
    assert "0 dim, 1 bright" in result.stdout and "(4, 4, 3) uint8" in result.stdout
    assert "check:       passed (frames change)" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--env", "no_such_pkg.module:make_env"], "does not import"),
    (["--env", "no_such_env"], "unknown env 'no_such_env'"),
    (["--env", "beacon", "--env-kwargs", "grid=2.5"], "setting grid must be an integer"),
])
def test_envs_command_bad_input_is_one_line_exit_2(args, message):
    result = _cli(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_train_and_attack_a_user_env_through_the_cli(tmp_path):
    """``--env module:factory`` end to end: a user's env defined here trains with RLlib and is
    attacked from the run it wrote (its env and settings come from run.json)."""
    (tmp_path / "lamp_cli.py").write_text(USER_ENV)
    run = tmp_path / "run"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "marl_fgmf.cli", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    train = cli("train", "--env", "lamp_cli:make_env", "--env-kwargs", "steps=4",
                "--iterations", "2", "--train-batch-size", "64", "--minibatch-size", "32",
                "--num-epochs", "1", "--net", "hidden=16", "--quiet", "--out", str(run))
    assert train.returncode == 0, train.stderr[-2000:]
    saved = json.loads((run / "run.json").read_text())
    assert saved["env"] == "lamp_cli:make_env" and saved["env_kwargs"] == {"steps": 4}
    assert saved["num_env_runners"] == 0 and saved["num_envs_per_env_runner"] == 8
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and all(r["num_episodes"] > 0 for r in rows)
    out = tmp_path / "attack.json"
    attack = cli("attack", "--checkpoint", str(run), "--attack", "pgd", "--eps", "8/255",
                 "--steps", "2", "--episodes", "2", "--quiet", "--out", str(out))
    assert attack.returncode == 0, attack.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["env"] == "lamp_cli:make_env" and data["env_kwargs"] == {"steps": 4}
    result = data["results"][0]
    assert result["agent_steps"] == 2 * 2 * 4 and 0 <= result["success_rate"] <= 1
