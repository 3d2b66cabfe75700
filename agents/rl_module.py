"""The RLlib RLModule (new API stack) around a :class:`agents.networks.PolicyNetwork`.

The module owns one policy network; its ``model_config`` dict carries everything needed to
rebuild it (``arch``, ``net`` keyword settings, optional ``sgam`` settings), so a checkpoint
restores with :meth:`RLModule.from_checkpoint` alone. Observations arrive as the environment
emits them (uint8, (B, H, W, C)) and are scaled to [0, 1] once, here: the wrapped network is
exactly the policy-protocol module that attacks and explainers use.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from agents.networks import PolicyNetwork, make_policy_network
from marl_fgmf.sgam import attach_sgam


def build_network(obs_shape, n_actions: int, model_config: dict[str, Any]) -> PolicyNetwork:
    """Build the policy network described by an RLModule ``model_config``."""
    net = make_policy_network(model_config.get("arch", "cnn"), obs_shape, n_actions,
                              **dict(model_config.get("net", {})))
    sgam_settings = model_config.get("sgam")
    if sgam_settings:
        attach_sgam(net, **dict(sgam_settings))
    return net


class FGMFTorchRLModule(TorchRLModule, ValueFunctionAPI):
    """Actor-critic RLModule whose ``net`` follows the policy protocol.

    ``model_config`` keys: ``arch`` (cnn | vit | hybrid), ``net`` (encoder settings),
    ``sgam`` (SGAM settings or None).
    """

    def setup(self):
        high = np.asarray(self.observation_space.high, dtype=np.float64)
        self.obs_scale = 1.0 / float(high.max()) if np.isfinite(high).all() and high.max() > 1 else 1.0
        self.net = build_network(self.observation_space.shape, int(self.action_space.n),
                                 dict(self.model_config or {}))

    def scale_obs(self, obs: torch.Tensor) -> torch.Tensor:
        """Environment observation -> float in [0, 1] (the policy protocol)."""
        return obs.float() * self.obs_scale

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTION_DIST_INPUTS: self.net(self.scale_obs(batch[Columns.OBS]))}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        emb = self.net.embed(self.scale_obs(batch[Columns.OBS]))
        return {Columns.ACTION_DIST_INPUTS: self.net.pi(emb), Columns.EMBEDDINGS: emb}

    def compute_values(self, batch: dict[str, Any], embeddings: Any | None = None) -> torch.Tensor:
        if embeddings is None:
            embeddings = self.net.embed(self.scale_obs(batch[Columns.OBS]))
        return self.net.vf(embeddings).squeeze(-1)
