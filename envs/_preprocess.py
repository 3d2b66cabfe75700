"""Shared preprocessing and argument checks for the PettingZoo pixel environments.

Private to ``envs``: each environment module builds its raw PettingZoo ``ParallelEnv`` and
passes it through :func:`pixel_pipeline` (or its own :class:`ObservationMap` plus
:func:`stack_frames`).

* Resize (and optional grayscale) by :class:`ObservationMap` with tinyscaler's *area* filter.
  SuperSuit's ``resize_v1`` offers only bilinear and nearest, which at 10-15x downscaling read
  one or two source pixels per output pixel and can drop small objects (the 10-pixel pong ball)
  between frames; area averaging keeps every object visible, anti-aliased. And SuperSuit's
  ``observation_lambda_v0``/``color_reduction_v0`` are AEC wrappers, which on these
  ``aec_to_parallel`` envs preprocess every observation twice (see :class:`ObservationMap`):
  the parallel map here makes pistonball and pong about twice as fast.
* Frame stacking by SuperSuit's ``frame_stack_v1`` (parallel-native) along the channel axis.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pettingzoo
import supersuit as ss
import tinyscaler
from gymnasium import spaces
from pettingzoo import ParallelEnv
from pettingzoo.utils.wrappers import BaseParallelWrapper

RENDER_MODES = (None, "rgb_array")


PETTINGZOO_TRAINING = {"num_env_runners": 2, "num_envs_per_env_runner": 1,
                       "cnn_channels": (16, 32, 32)}
"""How ``marl-fgmf train`` trains the PettingZoo envs by default (their ``TRAINING``,
:func:`envs.training_defaults`): a step of these envs is slow next to the learner's update, so
two env runners step one env each in parallel (both cores of a small machine), and the train
batch holds a full-length episode per runner, so every iteration ends episodes
(:meth:`agents.train.TrainConfig.resolved`); the ``cnn`` arch gets 16-32-32 filters (a third of
the default's update time at 32 x 32, which kept training at about half the env's raw speed)."""


def check_int(env_name: str, key: str, value: Any, minimum: int) -> int:
    """Return ``value`` as an int, or raise ``ValueError`` naming the env and the setting."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"env {env_name!r}: {key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_bool(env_name: str, key: str, value: Any) -> bool:
    """Return ``value`` as a bool, or raise ``ValueError`` naming the env and the setting."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"env {env_name!r}: {key} must be True or False, got {value!r}")
    return bool(value)


def check_number(env_name: str, key: str, value: Any) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` naming the env and the setting."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"env {env_name!r}: {key} must be a number, got {value!r}")
    return float(value)


def check_render_mode(env_name: str, render_mode: Any) -> str | None:
    """Only headless modes: ``None`` or ``"rgb_array"``."""
    if render_mode not in RENDER_MODES:
        raise ValueError(f"env {env_name!r}: render_mode must be None or 'rgb_array', "
                         f"got {render_mode!r}")
    return render_mode


GRAYSCALE_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # as SuperSuit color_reduction


def make_parallel(env_id: str, **kwargs: Any) -> ParallelEnv:
    """The raw PettingZoo ``ParallelEnv`` ``env_id`` (e.g. ``"butterfly/pistonball-v6"``) from
    PettingZoo's registry (importing the versioned modules is deprecated since 1.27)."""
    return pettingzoo.make("parallel", env_id, **kwargs)


class DeclaredRenderMode(BaseParallelWrapper):
    """Shows the user's ``render_mode`` on a base env that was built with ``"rgb_array"``.

    PettingZoo's butterfly envs (pistonball, cooperative_pong) draw their screen, which is
    also every observation, only when a render mode is set: with ``render_mode=None`` every
    observation is the same frame. :func:`make_drawn_parallel` therefore always builds them
    with ``"rgb_array"`` (an off-screen surface, no window) and wraps them here, so that
    ``env.render_mode`` is the user's setting and ``env.render()`` returns ``None`` (as
    PettingZoo documents for ``render_mode=None``) unless the user asked for ``"rgb_array"``.
    """

    def __init__(self, env: ParallelEnv, render_mode: str | None):
        super().__init__(env)
        self.render_mode = render_mode

    def render(self) -> np.ndarray | None:
        """The full screen as an (H, W, 3) uint8 array, or ``None`` when ``render_mode`` is
        ``None``."""
        if self.render_mode is None:
            return None
        return self.env.render()


def make_drawn_parallel(env_id: str, render_mode: str | None, **kwargs: Any) -> ParallelEnv:
    """:func:`make_parallel` for an env that draws its observations only with a render mode
    set: built with ``render_mode="rgb_array"``, shown with the user's ``render_mode`` (see
    :class:`DeclaredRenderMode`)."""
    return DeclaredRenderMode(make_parallel(env_id, render_mode="rgb_array", **kwargs),
                              render_mode)


def area_resize(image: np.ndarray, size: int, grayscale: bool = False) -> np.ndarray:
    """(H, W, 3) or (H, W, 1) uint8 -> (size, size, C) uint8 by area averaging (tinyscaler).

    ``grayscale`` first reduces RGB to one luma channel (ITU-R 601 weights, the same as
    SuperSuit's ``color_reduction_v0(mode="full")``). tinyscaler is fastest on float32 with
    four channels, so the image is padded to four and cropped back.
    """
    height, width = image.shape[:2]
    buffer = np.zeros((height, width, 4), np.float32)
    if grayscale:
        buffer[..., 0] = image @ GRAYSCALE_WEIGHTS
        channels = 1
    else:
        channels = image.shape[2]
        buffer[..., :channels] = image
    out = tinyscaler.scale(buffer, (size, size), mode="area")[..., :channels]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class ObservationMap(BaseParallelWrapper):
    """Applies ``fn(obs) -> obs`` to every observation of a ``ParallelEnv`` and declares
    ``space`` as every agent's observation space.

    A parallel-native replacement for SuperSuit's ``observation_lambda_v0``: that one is an AEC
    wrapper, so on a parallel env it runs inside ``aec_to_parallel``, whose ``step`` also
    observes (and here would resize) every agent once more through ``last()`` and discards the
    result, doubling the preprocessing cost.
    """

    def __init__(self, env: ParallelEnv, fn: Callable[[np.ndarray], np.ndarray],
                 space: spaces.Box):
        super().__init__(env)
        self._fn = fn
        self._space = space

    @property
    def observation_spaces(self) -> dict[Any, spaces.Box]:
        """Every possible agent's (mapped) observation space."""
        return {agent: self._space for agent in self.env.possible_agents}

    def observation_space(self, agent: Any) -> spaces.Box:
        return self._space

    def reset(self, seed: int | None = None, options: dict | None = None):
        observations, infos = self.env.reset(seed=seed, options=options)
        return {agent: self._fn(obs) for agent, obs in observations.items()}, infos

    def step(self, actions: dict[Any, Any]):
        observations, rewards, terminations, truncations, infos = self.env.step(actions)
        observations = {agent: self._fn(obs) for agent, obs in observations.items()}
        return observations, rewards, terminations, truncations, infos


def resize_square(env: ParallelEnv, size: int, grayscale: bool = False) -> ParallelEnv:
    """Every (H, W, 3) uint8 observation area-resized to (size, size, 3), or (size, size, 1)
    when ``grayscale``."""
    space = spaces.Box(0, 255, (size, size, 1 if grayscale else 3), np.uint8)
    return ObservationMap(env, lambda obs: area_resize(obs, size, grayscale), space)


def stack_frames(env: ParallelEnv, frame_stack: int) -> ParallelEnv:
    """SuperSuit ``frame_stack_v1`` along the channel axis (identity when ``frame_stack == 1``)."""
    if frame_stack == 1:
        return env
    stacked = ss.frame_stack_v1(env, stack_size=frame_stack)
    # the wrapper would forward this attribute to the unstacked env: pin the stacked spaces
    stacked.observation_spaces = {agent: stacked.observation_space(agent)
                                  for agent in stacked.possible_agents}
    return stacked


def pixel_pipeline(env: ParallelEnv, *, size: int, frame_stack: int,
                   grayscale: bool) -> ParallelEnv:
    """RGB uint8 frames -> [luma] + area resize -> [SuperSuit frame stack].

    The result has ``Box(0, 255, (size, size, C * frame_stack), uint8)`` observations with
    ``C = 1`` when ``grayscale`` else 3.
    """
    return stack_frames(resize_square(env, size, grayscale), frame_stack)
