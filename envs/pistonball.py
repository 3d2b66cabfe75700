"""Pistonball: PettingZoo's ``pistonball_v6``, discrete actions, small square pixel observations.

| Creation            | ``envs.make_env("pistonball", n_pistons=5, size=32)``               |
|---------------------|---------------------------------------------------------------------|
| Base environment    | ``pettingzoo.butterfly.pistonball_v6`` (``continuous=False``)        |
| Agents              | ``piston_0`` ... ``piston_{n_pistons-1}`` (default 5)                |
| Action space        | ``Discrete(3)``: 0 down 4 px, 1 stay, 2 up 4 px (``ACTION_NAMES``)   |
| Observation space   | ``Box(0, 255, (size, size, C * frame_stack), uint8)``, C = 3 (RGB)   |
|                     | or 1 (``grayscale=True``)                                            |
| Speed (2-core CPU)  | about 110 env-steps/s (550 agent-steps/s) with 5 pistons at 32x32,   |
|                     | drawn; PPO training with the defaults about 69 (63%)                 |

Speeds: ``python scripts/bench_envs.py`` (random actions in one process, then training with the
defaults), one idle 2-core CPU, 2026-12-06; expect less on a shared machine.

A physics game (chipmunk): the pistons must cooperate to roll the ball to the left wall. Each
piston sees an RGB window of 457 x 120 pixels (tall and narrow) around itself and its two
neighbours, including the space above them where the ball may be.

**Rewards**: every piston gets the same reward each step: 100 x the fraction of the ball's
initial distance to the left wall covered in that step (negative when it moves right), plus
``time_penalty`` (default -0.1). The episode terminates when the ball reaches the left wall
and truncates after ``max_cycles`` steps (default 125).

**Preprocessing**: the 457 x 120 window area-resized to ``size`` x ``size`` (tinyscaler's area
filter; the aspect ratio is not kept, as in Atari's 84 x 84), optionally reduced to one luma
channel first (``grayscale``, SuperSuit's ``color_reduction_v0`` weights), optionally
stacked over time along the channel axis by SuperSuit's ``frame_stack_v1`` (``frame_stack``,
1 = off). Why the resize is not SuperSuit's ``resize_v1``: see ``envs/_preprocess.py``.

**Actions** (checked in PettingZoo's source: the piston moves by ``action - 1`` positions of 4
pixels, up on the screen for +1): :data:`ACTION_NAMES` = ``("down", "stay", "up")``.

**A PettingZoo quirk worked around**: pistonball draws its screen, which is also every
observation, only when a render mode is set; with ``render_mode=None`` every observation of
every step is the same frame (the empty arena, without the ball) and ``parallel_api_test``
still passes. The base env is therefore always built with ``render_mode="rgb_array"`` (an
off-screen surface, no window); our ``render_mode`` is what ``env.render_mode`` reports, and
``env.render()`` returns the arena only with ``"rgb_array"`` (``None`` otherwise).
:func:`envs.conformance.frames_change_test` and ``objects_visible_test`` check it.

**Randomness**: ``reset(seed=...)`` seeds the ball's drop position and spin
(``random_drop``, ``random_rotate``) and the pistons' initial heights.

Version history: v0 (marl-fgmf 0.1), on ``pistonball_v6``, whose observations were all one
frozen frame (the quirk above); v1: drawn observations.
"""
from __future__ import annotations

from pettingzoo import ParallelEnv

from envs._preprocess import (PETTINGZOO_TRAINING, check_bool, check_int, check_number,
                              check_render_mode, make_drawn_parallel, pixel_pipeline)

NAME = "pistonball"
ACTION_NAMES = ("down", "stay", "up")
"""Names of the discrete actions 0, 1, 2 (the piston moves 4 pixels down, stays, 4 pixels up)."""

TRAINING = PETTINGZOO_TRAINING
"""How ``marl-fgmf train`` trains on this env by default (:data:`envs._preprocess.
PETTINGZOO_TRAINING`)."""


def make_pistonball(n_pistons: int = 5, size: int = 32, frame_stack: int = 1,
                    grayscale: bool = False, max_cycles: int = 125, time_penalty: float = -0.1,
                    random_drop: bool = True, random_rotate: bool = True,
                    render_mode: str | None = None) -> ParallelEnv:
    """Build preprocessed pistonball (see the module docstring).

    Args:
        n_pistons: number of pistons, i.e. agents (>= 2).
        size: side of the square observation in pixels (>= 8).
        frame_stack: frames stacked along the channel axis (1 = no stacking).
        grayscale: one luma channel instead of RGB.
        max_cycles: steps before truncation.
        time_penalty: reward added to every piston each step.
        random_drop: drop the ball at a random x position.
        random_rotate: give the ball a random initial spin.
        render_mode: ``None`` or ``"rgb_array"`` (the full arena via ``env.render()``); the
            observations are drawn either way (module docstring).

    Returns:
        A PettingZoo ``ParallelEnv`` with uint8 (size, size, C) observations.

    Raises:
        ValueError: a setting out of range, naming it.

    Example:
        >>> env = make_pistonball(n_pistons=5, size=32)
        >>> obs, infos = env.reset(seed=0)
        >>> obs["piston_0"].shape
        (32, 32, 3)
    """
    n_pistons = check_int(NAME, "n_pistons", n_pistons, 2)
    size = check_int(NAME, "size", size, 8)
    frame_stack = check_int(NAME, "frame_stack", frame_stack, 1)
    grayscale = check_bool(NAME, "grayscale", grayscale)
    max_cycles = check_int(NAME, "max_cycles", max_cycles, 1)
    time_penalty = check_number(NAME, "time_penalty", time_penalty)
    random_drop = check_bool(NAME, "random_drop", random_drop)
    random_rotate = check_bool(NAME, "random_rotate", random_rotate)
    render_mode = check_render_mode(NAME, render_mode)

    # drawn in "rgb_array" whatever render_mode says: None would freeze every observation
    env = make_drawn_parallel(
        "butterfly/pistonball-v6", render_mode, n_pistons=n_pistons,
        continuous=False, max_cycles=max_cycles, time_penalty=time_penalty,
        random_drop=random_drop, random_rotate=random_rotate)
    return pixel_pipeline(env, size=size, frame_stack=frame_stack, grayscale=grayscale)
