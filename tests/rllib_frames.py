"""Env-to-module connectors a user pipeline puts in front of RLlib's default conv net, which
does not take uint8 frames: the frames as float32, either 0-255 (SuperSuit's ``dtype_v0``) or
divided into [0, 1] (``normalize_obs_v0``). The module's observation space says which, and the
toolkit reads its scaling from there."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
from ray.rllib.connectors.env_to_module.observation_preprocessor import \
    SingleAgentObservationPreprocessor


class FloatFrames(SingleAgentObservationPreprocessor):
    """uint8 frames -> float32 in ``[0, HIGH]`` (``HIGH`` 255: the values as they are)."""

    HIGH = 255.0

    def recompute_output_observation_space(self, input_observation_space, input_action_space):
        def cast(space):
            return gym.spaces.Box(0.0, self.HIGH, space.shape, np.float32)
        if isinstance(input_observation_space, gym.spaces.Dict):
            return gym.spaces.Dict({k: cast(v) for k, v in input_observation_space.spaces.items()})
        return cast(input_observation_space)

    def preprocess(self, observation, episode):
        return np.asarray(observation, dtype=np.float32) * (self.HIGH / 255.0)


class UnitFrames(FloatFrames):
    """uint8 frames -> float32 in [0, 1]."""

    HIGH = 1.0
