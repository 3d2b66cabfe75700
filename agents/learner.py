"""The FGMF PPO Learner: RLlib's PPO loss plus the FGMF terms, nothing else.

A thin subclass of ``PPOTorchLearner`` (RLlib new API stack): ``compute_loss_for_module``
calls ``super()`` and adds, per module, the terms switched on by ``learner_config_dict``
(see :mod:`agents.defenses`); the maths lives in ``marl_fgmf`` (no RLlib there):

* SCOR-PIO 2.0: :func:`marl_fgmf.scorpio.scorpio_regularizer` on a regularized sub-batch.
  The exploitable subspace (IG mask and direction) is computed ONCE per training iteration,
  on the sub-batch drawn from the iteration's first minibatch, and reused for every SGD step
  of the iteration (NOTES-rllib.md pitfall 8: this is what keeps the cost a constant factor).
* SGAM: :func:`marl_fgmf.sgam.sgam_distillation_loss` trains the one-pass saliency head
  toward the policy's Grad-CAM++ map.
* adv (baseline): :func:`marl_fgmf.adv_training.sa_kl_regularizer`.

Every term is logged each update through ``self.metrics`` under ``fgmf_*`` keys, so it shows
in the result dict, ``metrics.csv`` and TensorBoard. Observations get a fresh leaf tensor
(``fwd_out`` has no graph to them, pitfall 5); artificial PPO timesteps are dropped with
``Columns.LOSS_MASK`` (pitfall 6).
"""
from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns


class FGMFPPOTorchLearner(PPOTorchLearner):
    """PPO + SCOR-PIO 2.0 + SGAM distillation + (optionally) SA-PPO KL smoothness."""

    def build(self) -> None:
        super().build()
        cfg = dict(self.config.learner_config_dict or {})
        self._scorpio_cfg = None
        self._adv_cfg = None
        self._sgam_weight = 0.0
        if cfg.get("scorpio"):
            from marl_fgmf.scorpio import ScorpioConfig
            self._scorpio_cfg = ScorpioConfig(**cfg["scorpio"])
        if cfg.get("adv"):
            from marl_fgmf.adv_training import AdvTrainingConfig
            self._adv_cfg = AdvTrainingConfig(**cfg["adv"])
        if cfg.get("sgam"):
            self._sgam_weight = float(cfg["sgam"].get("distill_weight", 1.0))
            self._sgam_fraction = float(cfg["sgam"].get("distill_fraction", 0.0625))
        self._fgmf_cache: dict[str, Any] = {}  # module id -> ExploitableSubspace

    @property
    def _any_term(self) -> bool:
        return self._scorpio_cfg is not None or self._adv_cfg is not None or self._sgam_weight > 0

    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        self._fgmf_cache.clear()  # next iteration: recompute the exploitable subspace

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        loss = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch,
                                               fwd_out=fwd_out)
        if not self._any_term:
            return loss
        module = self.module[module_id].unwrapped()
        policy = module.net
        obs = module.scale_obs(batch[Columns.OBS]).detach()
        if Columns.LOSS_MASK in batch:
            obs = obs[batch[Columns.LOSS_MASK].bool()]
        if obs.shape[0] == 0:
            return loss
        extra = torch.zeros((), device=loss.device)
        if self._scorpio_cfg is not None:
            from marl_fgmf.scorpio import (compute_exploitable_subspace, scorpio_regularizer,
                                           select_sub_batch)
            subspace = self._fgmf_cache.get(module_id)
            if subspace is None:
                idx = select_sub_batch(obs.shape[0], self._scorpio_cfg, device=obs.device)
                subspace = compute_exploitable_subspace(policy, obs[idx], self._scorpio_cfg)
                self._fgmf_cache[module_id] = subspace
            reg, info = scorpio_regularizer(policy, None, self._scorpio_cfg, subspace=subspace)
            extra = extra + reg
            self._log(module_id, info, prefix="fgmf_scorpio_")
        if self._sgam_weight > 0:
            from marl_fgmf.sgam import sgam_distillation_loss
            # Grad-CAM++ costs a forward+backward: distill on a random sub-batch.
            n = max(1, int(round(obs.shape[0] * self._sgam_fraction)))
            rows = obs[torch.randperm(obs.shape[0], device=obs.device)[:n]]
            distill, info = sgam_distillation_loss(policy.input_filter, policy, rows,
                                                   return_info=True)
            extra = extra + self._sgam_weight * distill
            self._log(module_id, info, prefix="fgmf_sgam_")
        if self._adv_cfg is not None:
            from marl_fgmf.adv_training import sa_kl_regularizer
            reg, info = sa_kl_regularizer(policy, obs, self._adv_cfg)
            extra = extra + reg
            self._log(module_id, info, prefix="fgmf_")
        self._log(module_id, {"extra_loss": float(extra.detach())}, prefix="fgmf_")
        return loss + extra

    def _log(self, module_id: str, info: dict[str, float], prefix: str) -> None:
        for key, value in info.items():
            self.metrics.log_value((module_id, f"{prefix}{key}"), float(value), window=1)

