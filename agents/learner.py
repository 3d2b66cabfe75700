"""The FGMF PPO Learner: RLlib's PPO loss plus the FGMF terms, nothing else.

A thin subclass of ``PPOTorchLearner`` (RLlib new API stack): ``compute_loss_for_module``
calls ``super()`` and adds, per module, the terms switched on by ``learner_config_dict``
(see :mod:`agents.defenses`); the maths lives in ``marl_fgmf`` (no RLlib there):

* SCOR-PIO 2.0: :class:`marl_fgmf.scorpio.IterationSubspaces`. Each SGD step penalizes about
  ``reg_fraction`` of the rows of its own minibatch (a content-based draw, fresh each
  iteration); each drawn row's exploitable subspace (IG mask and direction) is computed once
  per iteration and reused on the later epochs (NOTES-rllib.md pitfall 8: this is what keeps
  the cost a constant factor). The per-iteration object is dropped after the update.
* SGAM: :func:`marl_fgmf.sgam.sgam_distillation_loss` trains the one-pass saliency head
  toward the policy's Grad-CAM++ map.
* adv (baseline): :func:`marl_fgmf.adv_training.sa_kl_regularizer`.

The loss returned is ``PPO + R`` with ``R`` = the sum of the terms, in the graph. Every term
is logged each update, one ``log_dict`` per module under ``fgmf_*`` keys, so it shows in the
result dict, ``metrics.csv`` and TensorBoard. Observations get a fresh leaf tensor
(``fwd_out`` has no graph to them, pitfall 5); artificial PPO timesteps are dropped with
``Columns.LOSS_MASK`` (pitfall 6).
"""
from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import Learner
from ray.rllib.utils.annotations import override

from marl_fgmf.adv_training import AdvTrainingConfig, sa_kl_regularizer
from marl_fgmf.scorpio import IterationSubspaces, ScorpioConfig
from marl_fgmf.sgam import sgam_distillation_loss


class FGMFPPOTorchLearner(PPOTorchLearner):
    """PPO + SCOR-PIO 2.0 + SGAM distillation + (optionally) SA-PPO KL smoothness."""

    @override(PPOTorchLearner)
    def build(self) -> None:
        super().build()
        cfg = dict(self.config.learner_config_dict or {})
        self._scorpio_cfg = ScorpioConfig(**cfg["scorpio"]) if cfg.get("scorpio") else None
        self._adv_cfg = AdvTrainingConfig(**cfg["adv"]) if cfg.get("adv") else None
        self._sgam_weight = 0.0
        if cfg.get("sgam"):
            self._sgam_weight = float(cfg["sgam"].get("distill_weight", 1.0))
            self._sgam_fraction = float(cfg["sgam"].get("distill_fraction", 0.0625))
        # module id -> IterationSubspaces of the current iteration (cleared after each update)
        self._fgmf_cache: dict[str, IterationSubspaces] = {}
        # the draw of SCOR-PIO's rows: from ScorpioConfig.seed, else torch's RNG (seeded by RLlib)
        seed = self._scorpio_cfg.seed if self._scorpio_cfg is not None else None
        self._salt_rng = torch.Generator().manual_seed(seed) if seed is not None else None

    @property
    def _any_term(self) -> bool:
        return self._scorpio_cfg is not None or self._adv_cfg is not None or self._sgam_weight > 0

    @override(Learner)
    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        self._fgmf_cache.clear()  # next iteration: a fresh draw of rows and new subspaces

    def _iteration_rows(self, module_id: str) -> IterationSubspaces:
        rows = self._fgmf_cache.get(module_id)
        if rows is None:
            salt = int(torch.randint(0, 2 ** 62, (1,), generator=self._salt_rng))
            rows = self._fgmf_cache[module_id] = IterationSubspaces(self._scorpio_cfg, salt)
        return rows

    @override(PPOTorchLearner)
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
        logs: dict[str, float] = {}
        if self._scorpio_cfg is not None:
            reg, info = self._iteration_rows(module_id).penalty(policy, obs)
            extra = extra + reg
            logs.update({f"fgmf_scorpio_{k}": v for k, v in info.items()})
        if self._sgam_weight > 0:
            # Grad-CAM++ costs a forward+backward: distill on a random sub-batch.
            n = max(1, int(round(obs.shape[0] * self._sgam_fraction)))
            rows = obs[torch.randperm(obs.shape[0], device=obs.device)[:n]]
            distill, info = sgam_distillation_loss(policy.input_filter, policy, rows,
                                                   return_info=True)
            extra = extra + self._sgam_weight * distill
            logs.update({f"fgmf_sgam_{k}": v for k, v in info.items()})
        if self._adv_cfg is not None:
            reg, info = sa_kl_regularizer(policy, obs, self._adv_cfg)
            extra = extra + reg
            logs.update({f"fgmf_{k}": v for k, v in info.items()})
        logs["fgmf_extra_loss"] = float(extra.detach())
        self.metrics.log_dict({k: float(v) for k, v in logs.items()}, key=module_id, window=1)
        return loss + extra
