"""Cooperative pong: PettingZoo's ``cooperative_pong_v6`` with small square pixel observations.

| Creation            | ``envs.make_env("cooperative_pong", size=32)``                       |
|---------------------|---------------------------------------------------------------------|
| Base environment    | ``pettingzoo.butterfly.cooperative_pong_v6``                         |
| Agents              | ``paddle_0`` (left), ``paddle_1`` (right, cake-shaped by default)    |
| Action space        | ``Discrete(3)``: 0 stay, 1 up, 2 down (``ACTION_NAMES``)             |
| Observation space   | ``Box(0, 255, (size, size, C * frame_stack), uint8)``, C = 3 (RGB)   |
|                     | or 1 (``grayscale=True``); both agents see the same whole screen     |
| Speed (2-core CPU)  | about 116 env-steps/s (232 agent-steps/s) at 32x32; PPO training     |
|                     | with the defaults about 104 (90%)                                    |

Speeds: ``python scripts/bench_envs.py`` (random actions in one process, then training with the
defaults), one idle 2-core CPU, 2026-12-06; expect less on a shared machine.

Two paddles keep a ball in play for as long as they can. The screen (280 x 480, white
objects on black) is every agent's observation.

**Rewards**: both paddles get ``100 / max_cycles`` per step while the ball is in play and -10
(and termination) when it leaves the screen on the left or right. Episodes truncate after
``max_cycles`` steps (default 900).

**Preprocessing**: the 280 x 480 screen area-resized to ``size`` x ``size`` (tinyscaler's area
filter, so the 10-pixel ball survives as a grey pixel at 32 x 32 instead of vanishing between
bilinear samples; aspect ratio not kept), optionally reduced to one luma channel first
(``grayscale``, SuperSuit's ``color_reduction_v0`` weights; the game is black and white, so
nothing is lost), optionally stacked over time along the channel axis by SuperSuit's
``frame_stack_v1`` (``frame_stack``, 1 = off; a single frame does not show the ball's
direction, so stack 2 or more to learn from it). Why the resize is not SuperSuit's
``resize_v1``: see ``envs/_preprocess.py``.

**Actions** (checked in PettingZoo's ``paddle.py``/``cake_paddle.py``: 1 moves the paddle by
``-speed`` pixels in y, i.e. up on the screen and in the observation, 2 by ``+speed``):
:data:`ACTION_NAMES` = ``("stay", "up", "down")``; a move that would leave the screen is
not made.

**A PettingZoo quirk worked around**: with ``render_mode=None`` the v6 environment never draws
its screen, so every observation is black. The base env is therefore always built with
``render_mode="rgb_array"`` (which only draws into an off-screen surface); our
``render_mode`` is what ``env.render_mode`` reports, and ``env.render()`` returns the screen
only with ``"rgb_array"`` (``None`` otherwise, as PettingZoo documents).

**Randomness**: ``reset(seed=...)`` seeds the ball's initial direction (and its bounce
perturbations when ``bounce_randomness=True``).

Version history: v0 (marl-fgmf 0.1), on ``cooperative_pong_v6``.
"""
from __future__ import annotations

from pettingzoo import ParallelEnv

from envs._preprocess import (PETTINGZOO_TRAINING, check_bool, check_int,
                              check_render_mode, make_drawn_parallel, pixel_pipeline)

NAME = "cooperative_pong"
ACTION_NAMES = ("stay", "up", "down")
"""Names of the discrete actions 0, 1, 2 of both paddles."""

TRAINING = {**PETTINGZOO_TRAINING, "policies": "per-agent"}
"""How ``marl-fgmf train`` trains on this env by default (:data:`envs._preprocess.
PETTINGZOO_TRAINING`); both paddles see the same screen, so one shared policy would move them
alike: each paddle gets its own policy (``per-agent``)."""


def make_cooperative_pong(size: int = 32, frame_stack: int = 1, grayscale: bool = False,
                          max_cycles: int = 900, ball_speed: int = 9,
                          left_paddle_speed: int = 12, right_paddle_speed: int = 12,
                          cake_paddle: bool = True, bounce_randomness: bool = False,
                          render_mode: str | None = None) -> ParallelEnv:
    """Build preprocessed cooperative pong (see the module docstring).

    Args:
        size: side of the square observation in pixels (>= 8).
        frame_stack: frames stacked along the channel axis (1 = no stacking).
        grayscale: one luma channel instead of RGB.
        max_cycles: steps before truncation.
        ball_speed: ball speed in pixels per step (too fast and it passes through paddles).
        left_paddle_speed: left paddle speed in pixels per step.
        right_paddle_speed: right paddle speed in pixels per step.
        cake_paddle: make the right paddle a four-tier "wedding cake".
        bounce_randomness: add a small random angle at each paddle bounce.
        render_mode: ``None`` or ``"rgb_array"`` (the full screen via ``env.render()``).

    Returns:
        A PettingZoo ``ParallelEnv`` with uint8 (size, size, C) observations.

    Raises:
        ValueError: a setting out of range, naming it.

    Example:
        >>> env = make_cooperative_pong(size=32, frame_stack=2)
        >>> obs, infos = env.reset(seed=0)
        >>> obs["paddle_0"].shape
        (32, 32, 6)
    """
    size = check_int(NAME, "size", size, 8)
    frame_stack = check_int(NAME, "frame_stack", frame_stack, 1)
    grayscale = check_bool(NAME, "grayscale", grayscale)
    max_cycles = check_int(NAME, "max_cycles", max_cycles, 1)
    ball_speed = check_int(NAME, "ball_speed", ball_speed, 1)
    left_paddle_speed = check_int(NAME, "left_paddle_speed", left_paddle_speed, 1)
    right_paddle_speed = check_int(NAME, "right_paddle_speed", right_paddle_speed, 1)
    cake_paddle = check_bool(NAME, "cake_paddle", cake_paddle)
    bounce_randomness = check_bool(NAME, "bounce_randomness", bounce_randomness)
    render_mode = check_render_mode(NAME, render_mode)

    # drawn in "rgb_array" whatever render_mode says: None would leave every observation black
    env = make_drawn_parallel(
        "butterfly/cooperative_pong-v6", render_mode,
        max_cycles=max_cycles, ball_speed=ball_speed, left_paddle_speed=left_paddle_speed,
        right_paddle_speed=right_paddle_speed, cake_paddle=cake_paddle,
        bounce_randomness=bounce_randomness)
    return pixel_pipeline(env, size=size, frame_stack=frame_stack, grayscale=grayscale)
