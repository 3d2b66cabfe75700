"""Pursuit: PettingZoo's ``pursuit_v5`` with its local grid rendered as a small uint8 image.

| Creation            | ``envs.make_env("pursuit")`` (native 7 x 7; ``size=32`` upsamples)   |
|---------------------|---------------------------------------------------------------------|
| Base environment    | ``pettingzoo.sisl.pursuit_v5``                                       |
| Agents              | ``pursuer_0`` ... ``pursuer_{n_pursuers-1}`` (default 8)             |
| Action space        | ``Discrete(5)``: 0 left, 1 right, 2 down, 3 up, 4 stay, as seen in   |
|                     | the observation image (``ACTION_NAMES``; see *Actions* below)        |
| Observation space   | ``Box(0, 255, (size, size, 3 * frame_stack), uint8)``, ``size``      |
|                     | defaults to ``obs_range`` (7): one pixel per grid cell               |
| Speed (2-core CPU)  | about 173 env-steps/s (1380 agent-steps/s) with 8 pursuers on the    |
|                     | native 7x7 grid; PPO training with the defaults about 146 (84%)      |

Speeds: ``python scripts/bench_envs.py`` (random actions in one process, then training with the
defaults), one idle 2-core CPU, 2026-12-06; expect less on a shared machine.

Pursuers (controlled) hunt evaders (random walkers) on an ``x_size`` x ``y_size`` grid with
an obstacle in the middle. Each pursuer observes the ``obs_range`` x ``obs_range`` (default
7 x 7) cells centred on itself, as three float channels: walls and off-map cells (1), the
number of pursuers in the cell (the agent itself included, at the centre), the number of
evaders in the cell.

**Actions**: PettingZoo's ``DiscreteAgent`` moves a pursuer by ``[-1, 0]``, ``[1, 0]``,
``[0, 1]``, ``[0, -1]``, ``[0, 0]`` in grid (x, y) for actions 0..4, and its source comments
call 2 "up" and 3 "down" (y pointing up). In the observation (and in ``env.render()``) row is
y growing downwards, so action 2 moves the pursuer one row *down* the image and action 3 one
row up: :data:`ACTION_NAMES` = ``("left", "right", "down", "up", "stay")`` names what a
figure of the observation shows (verified against the raw positions in ``tests/test_envs.py``).
A move into a wall or off the grid leaves the pursuer in place.

**Rewards**: an evader surrounded on all sides (``surround=True``; else ``n_catch`` pursuers on
its cell) is removed and each pursuer involved gets 5; touching an evader gives 0.01; every
step adds -0.1. With ``shared_reward=True`` (default) every pursuer gets the team's mean
reward. The episode terminates when all evaders are caught and truncates after
``max_cycles`` steps (default 500).

**Preprocessing** (this is not a pixel environment, so the image is made here, documented and
exact):

1. *Scaling to uint8*, per channel: walls ``255 * v`` (0 or 255); pursuers and evaders
   ``85 * min(count, 3)`` (0, 85, 170, 255: one, two, three or more agents in the cell).
2. *Upsampling*, only when ``size`` is set above ``obs_range`` (the default is the native
   grid, one pixel per cell: upsampling adds no information, only network cost), to
   ``size`` x ``size`` by nearest neighbour: output pixel ``(r, c)`` shows cell
   ``(r * obs_range // size, c * obs_range // size)``, so every cell is a block of
   ``size // obs_range`` or one more pixels a side (4 or 5 at 32 x 32). Row = grid y,
   column = grid x, as PettingZoo lays the observation out.
3. Optional SuperSuit ``frame_stack_v1`` along the channel axis (``frame_stack``, 1 = off).

Steps 1 and 2 run in one parallel observation map (``envs._preprocess.ObservationMap``).

**Randomness**: ``reset(seed=...)`` seeds the initial positions and the evaders' random walk.

Version history: v0 (marl-fgmf 0.1), on ``pursuit_v5``, 32 x 32 by default; v1: the native
``obs_range`` grid by default (``size=32`` gives v0's observations).
"""
from __future__ import annotations

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from envs._preprocess import (PETTINGZOO_TRAINING, ObservationMap, check_bool, check_int,
                              check_render_mode, make_parallel, stack_frames)

NAME = "pursuit"
ACTION_NAMES = ("left", "right", "down", "up", "stay")
"""Names of the discrete actions 0..4 as moves in the observation image (module docstring:
PettingZoo's own comments call 2 "up" and 3 "down" in its y-up convention)."""
CHANNEL_SCALE = np.array([255.0, 85.0, 85.0], np.float32)  # walls, pursuers, evaders

TRAINING = PETTINGZOO_TRAINING
"""How ``marl-fgmf train`` trains on this env by default (:data:`envs._preprocess.
PETTINGZOO_TRAINING`)."""


def grid_to_image(grid: np.ndarray, size: int) -> np.ndarray:
    """(R, R, 3) float pursuit observation -> (size, size, 3) uint8 image (module docstring)."""
    pixels = np.clip(np.rint(np.abs(grid) * CHANNEL_SCALE), 0, 255).astype(np.uint8)
    rows = np.arange(size) * grid.shape[0] // size  # source cell of each output row
    cols = np.arange(size) * grid.shape[1] // size
    return np.ascontiguousarray(pixels[rows][:, cols])


def make_pursuit(size: int | None = None, frame_stack: int = 1, n_pursuers: int = 8,
                 n_evaders: int = 30, max_cycles: int = 500, x_size: int = 16, y_size: int = 16,
                 obs_range: int = 7, n_catch: int = 2, shared_reward: bool = True,
                 freeze_evaders: bool = False, surround: bool = True,
                 render_mode: str | None = None) -> ParallelEnv:
    """Build preprocessed pursuit (see the module docstring).

    Args:
        size: side of the square observation in pixels (>= ``obs_range``); ``None``
            (default) is ``obs_range``, the native grid with one pixel per cell.
        frame_stack: frames stacked along the channel axis (1 = no stacking).
        n_pursuers: number of pursuers, i.e. agents (>= 1).
        n_evaders: number of evaders (>= 1).
        max_cycles: steps before truncation.
        x_size: grid width in cells (>= 5).
        y_size: grid height in cells (>= 5).
        obs_range: side of each pursuer's view in cells (odd, >= 3).
        n_catch: pursuers needed on an evader's cell to catch it when ``surround=False``.
        shared_reward: give every pursuer the team's mean reward.
        freeze_evaders: evaders stand still.
        surround: catch by surrounding (True) or by ``n_catch`` pursuers on the cell.
        render_mode: ``None`` or ``"rgb_array"`` (the whole grid via ``env.render()``).

    Returns:
        A PettingZoo ``ParallelEnv`` with uint8 (size, size, 3) observations.

    Raises:
        ValueError: a setting out of range, naming it.

    Example:
        >>> env = make_pursuit()
        >>> obs, infos = env.reset(seed=0)
        >>> obs["pursuer_0"].shape, obs["pursuer_0"].dtype
        ((7, 7, 3), dtype('uint8'))
        >>> make_pursuit(size=28).observation_space("pursuer_0").shape
        (28, 28, 3)
    """
    obs_range = check_int(NAME, "obs_range", obs_range, 3)
    if obs_range % 2 == 0:
        raise ValueError(f"env {NAME!r}: obs_range must be odd, got {obs_range}")
    size = obs_range if size is None else check_int(NAME, "size", size, obs_range)
    frame_stack = check_int(NAME, "frame_stack", frame_stack, 1)
    n_pursuers = check_int(NAME, "n_pursuers", n_pursuers, 1)
    n_evaders = check_int(NAME, "n_evaders", n_evaders, 1)
    max_cycles = check_int(NAME, "max_cycles", max_cycles, 1)
    x_size = check_int(NAME, "x_size", x_size, 5)
    y_size = check_int(NAME, "y_size", y_size, 5)
    n_catch = check_int(NAME, "n_catch", n_catch, 1)
    shared_reward = check_bool(NAME, "shared_reward", shared_reward)
    freeze_evaders = check_bool(NAME, "freeze_evaders", freeze_evaders)
    surround = check_bool(NAME, "surround", surround)
    render_mode = check_render_mode(NAME, render_mode)

    env = make_parallel(
        "sisl/pursuit-v5", n_pursuers=n_pursuers,
        n_evaders=n_evaders, max_cycles=max_cycles, x_size=x_size, y_size=y_size,
        obs_range=obs_range, n_catch=n_catch, shared_reward=shared_reward,
        freeze_evaders=freeze_evaders, surround=surround, render_mode=render_mode)
    env = ObservationMap(env, lambda obs: grid_to_image(obs, size),
                         spaces.Box(0, 255, (size, size, 3), np.uint8))
    return stack_frames(env, frame_stack)
