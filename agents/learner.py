"""The FGMF PPO Learner: RLlib's PPO loss plus the FGMF terms, nothing else.

A thin subclass of ``PPOTorchLearner`` (RLlib new API stack): ``compute_loss_for_module``
calls ``super()`` and adds, per module, the terms switched on by ``learner_config_dict``
(see :mod:`agents.defenses`); the maths lives in ``marl_fgmf`` (no RLlib there):

* SCOR-PIO 2.0: :class:`marl_fgmf.scorpio.IterationSubspaces`. Each SGD step draws about
  ``reg_fraction`` of the rows of its own minibatch (a content-based draw, fresh each
  iteration); each drawn row's exploitable subspace (IG mask and direction) is computed once
  per iteration and reused on the later epochs (NOTES-rllib.md pitfall 8: this is what keeps
  the cost a constant factor). Every ``reg_every``-th step penalizes the rows of the last
  ``reg_every`` minibatches at once (fewer double-backward calls, same rows and weight; the
  ``fgmf_scorpio_*`` logs are those of the last evaluating step). The per-iteration object is
  dropped after the update; rows it drew but had not yet penalized are carried to the next
  iteration's first evaluating step (never dropped, even with fewer SGD steps than
  ``reg_every`` per iteration).
* SCOR-PIO behind SGAM (``fgmf``): the penalty is the encoder's, at ``z = SGAM(x)`` of each
  drawn row (``IterationSubspaces.penalty(transform=SGAM.filter)`` with SGAM bypassed): the
  space a BPDA attacker steps in, without the saliency head in the double backward.
* SGAM: :func:`marl_fgmf.sgam.sgam_distillation_loss` trains the one-pass saliency head
  toward the policy's Grad-CAM++ map, on about ``distill_fraction`` of each minibatch drawn by
  key (the same rows every epoch), each row's target computed once per iteration. The head
  learns from that loss only: in every SGD step the mask is computed without a graph
  (``SGAM.saliency_detached``), so the policy loss does not reach it.
* adv (baseline): :func:`marl_fgmf.adv_training.sa_kl_regularizer`.

**Any RLlib module**, not only the toolkit's: at build time each module is turned into its
policy-protocol view (:func:`fgmf_view`: a marl-fgmf module's network, or
``agents.load_policy``'s adapter around any ``TorchRLModule``'s ``_forward``, with the
observation scaling and layout read from its observation space) and checked for what the
switched-on terms need; a module that cannot serve fails the build with one line naming the
module and what is missing (SGAM: an input filter, :class:`agents.sgam_module.SGAMInputMixin`,
and a spatial feature map for Grad-CAM++). SCOR-PIO on a network whose activations are all
piecewise linear (ReLU: zero input curvature, NOTES-rllib.md pitfall 7) warns once.

The learner sets torch's threads to its budget when it is built (:mod:`agents.threads`), and
``fgmf_timings = {}`` makes it time each component (``scripts/profile_learner.py``).

The learner connector (GAE's value pass) runs without an autograd graph. The loss returned
is ``PPO + R`` with ``R`` = the sum of the terms, in the graph. Every term is logged each
update, one ``log_dict`` per module under ``fgmf_*`` keys, so it shows in the
result dict, ``metrics.csv`` and TensorBoard. Observations get a fresh leaf tensor
(``fwd_out`` has no graph to them, pitfall 5); artificial PPO timesteps are dropped with
``Columns.LOSS_MASK`` (pitfall 6).
"""
from __future__ import annotations

import contextlib
import functools
import time
import warnings
from typing import Any, Callable, Iterator

import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import Learner
from ray.rllib.utils.annotations import override

from agents.checkpoint import CheckpointError, FilteredModulePolicy, rl_module_policy
from agents.networks import PolicyNetwork
from agents.threads import apply_thread_budget
from marl_fgmf.adapter import to_protocol
from marl_fgmf.adv_training import AdvTrainingConfig, sa_kl_regularizer
from marl_fgmf.attribution import find_cam_layer
from marl_fgmf.scorpio import (IterationSubspaces, ScorpioConfig, row_digests, row_keys,
                               select_keyed_rows)
from marl_fgmf.sgam import SGAM, distillation_target, sgam_distillation_loss

PIECEWISE_LINEAR = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.PReLU,
                    torch.nn.RReLU, torch.nn.Hardtanh)
"""Activations whose second derivative is zero almost everywhere."""
SMOOTH = (torch.nn.SiLU, torch.nn.GELU, torch.nn.ELU, torch.nn.CELU, torch.nn.SELU,
          torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Softplus, torch.nn.Mish)
"""Activations with a non-zero second derivative (input curvature for SCOR-PIO)."""


class FGMFModuleError(ValueError):
    """A module the FGMF learner cannot serve (one line: the module and what is missing)."""


def fgmf_view(module: torch.nn.Module, module_id: str, components: tuple[str, ...] = ()
              ) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """``(policy, to_unit)``: the policy-protocol module of an RLModule and the map from the
    batch's observations to the protocol's float (B, H, W, C) in [0, 1].

    A marl-fgmf module gives its network and ``scale_obs``; any other ``TorchRLModule`` the
    policy ``agents.load_policy`` would serve (same parameters, gradients through ``_forward``)
    and the inverse of the layout and scaling read from its observation space. Checks what
    ``components`` (``scorpio``, ``sgam``, ``adv``) need.

    Raises:
        FGMFModuleError: the module cannot be served, or lacks SGAM or a feature map when
            ``sgam`` is asked (one line).
    """
    net = getattr(module, "net", None)
    if isinstance(net, PolicyNetwork):
        policy, to_unit = net, module.scale_obs
    else:
        try:
            policy = rl_module_policy(module, f"module {module_id!r}")
        except CheckpointError as exc:
            raise FGMFModuleError(f"FGMF learner: {exc}") from None
        adapter = policy.inner if isinstance(policy, FilteredModulePolicy) else policy
        to_unit = functools.partial(to_protocol, layout=adapter.layout,
                                    input_range=adapter.input_range)
    kind = type(module).__name__
    if "sgam" in components:
        if not isinstance(getattr(policy, "input_filter", None), SGAM):
            raise FGMFModuleError(
                f"FGMF learner: defense component 'sgam' needs SGAM in front of module "
                f"{module_id!r} ({kind}); build it with model_config['sgam'] (a marl-fgmf "
                f"module) or put agents.sgam_module.SGAMInputMixin first in its class's bases "
                f"(agents.sgam_module.SGAMDefaultPPOTorchRLModule for RLlib's default module)")
        try:
            find_cam_layer(policy)
        except ValueError:
            raise FGMFModuleError(
                f"FGMF learner: defense component 'sgam' distills Grad-CAM++ maps, but module "
                f"{module_id!r} ({kind}) has no spatial (B, K, h, w) feature map its logits "
                f"depend on (a convolutional encoder has one)") from None
    if "scorpio" in components:
        warn_if_no_curvature(policy, module_id, kind)
    return policy, to_unit


_WARNED: set[tuple[str, str]] = set()


def warn_if_no_curvature(policy: torch.nn.Module, module_id: str, kind: str) -> bool:
    """Warn once per module id and class when every activation of ``policy`` is piecewise
    linear (ReLU and friends, as RLlib's default encoders use): the input Hessian is then zero
    except through the softmax, so SCOR-PIO's curvature term is ~0 and only its gradient term
    acts. Returns whether it warned. Activations called as functions are not seen."""
    modules = [m for m in policy.modules() if not isinstance(m, SGAM)]
    linear = any(isinstance(m, PIECEWISE_LINEAR) for m in modules)
    smooth = any(isinstance(m, SMOOTH) for m in modules)
    if not linear or smooth or (module_id, kind) in _WARNED:
        return False
    _WARNED.add((module_id, kind))
    warnings.warn(f"SCOR-PIO on module {module_id!r} ({kind}): its activations are piecewise "
                  f"linear (ReLU), whose input curvature is zero except through the softmax, "
                  f"so the curvature term will be ~0; use smooth activations (RLlib: "
                  f"model_config conv_activation='silu', head_fcnet_activation='silu'; "
                  f"marl-fgmf networks: activation='silu', the default)", RuntimeWarning,
                  stacklevel=2)
    return True


class FGMFPPOTorchLearner(PPOTorchLearner):
    """PPO + SCOR-PIO 2.0 + SGAM distillation + (optionally) SA-PPO KL smoothness."""

    @override(PPOTorchLearner)
    def build(self) -> None:
        # the thread budget (agents.threads): the driver's CPUs for a local learner, the
        # learner actor's num_cpus_per_learner for a remote one
        self.num_threads = apply_thread_budget()
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
        # module id -> rows drawn in the last iteration but not yet penalized (reg_every)
        self._scorpio_carry: dict[str, tuple[list, int]] = {}
        # module id -> (salt, row key -> Grad-CAM++ target) of the current iteration
        self._distill_cache: dict[str, tuple[int, dict[bytes, torch.Tensor]]] = {}
        # module id -> (policy-protocol view, obs -> [0, 1] NHWC), checked now, not at the
        # first update
        self._components = tuple(name for name, on in (
            ("scorpio", self._scorpio_cfg is not None), ("sgam", self._sgam_weight > 0),
            ("adv", self._adv_cfg is not None)) if on)
        self._views: dict[str, tuple[torch.nn.Module, Callable]] = {}
        if self._components:
            for mid in self.module.keys():
                self._view(mid)
        # the draw of SCOR-PIO's rows: from ScorpioConfig.seed, else torch's RNG (seeded by RLlib)
        seed = self._scorpio_cfg.seed if self._scorpio_cfg is not None else None
        self._salt_rng = torch.Generator().manual_seed(seed) if seed is not None else None
        self.fgmf_timings: dict[str, float] | None = None
        """Set to ``{}`` to accumulate seconds per FGMF component (``scripts/profile_learner.py``);
        None (the default) times nothing."""

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the block's wall time to ``fgmf_timings[name]`` when profiling (the device is
        synchronized on both ends, so GPU work is counted where it is queued); else nothing."""
        if self.fgmf_timings is None:
            yield
            return
        on_gpu = torch.device(self._device).type == "cuda"
        sync = torch.cuda.synchronize if on_gpu else (lambda: None)
        sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.fgmf_timings[name] = self.fgmf_timings.get(name, 0.0) + time.perf_counter() - t0

    @override(PPOTorchLearner)
    def _update(self, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        # One SGD step. SGAM's saliency head learns from its distillation loss only: the
        # policy loss (and SCOR-PIO, adv) see the filter with its mask detached
        # (SGAM.saliency_detached), which also keeps the head out of the step's backward.
        with contextlib.ExitStack() as stack:
            for module_id in self.module.keys():
                for layer in self.module[module_id].unwrapped().modules():
                    if isinstance(layer, SGAM):
                        stack.enter_context(layer.saliency_detached())
            return super()._update(batch)

    @override(Learner)
    def _make_batch_if_necessary(self, training_data):
        # The learner connector (GAE's value pass over the whole train batch) produces data,
        # not a loss: without an autograd graph it skips the graph's bookkeeping and memory
        # (through SGAM's head too).
        with torch.no_grad():
            return super()._make_batch_if_necessary(training_data)

    @override(PPOTorchLearner)
    def compute_gradients(self, loss_per_module, **kwargs):
        with self.timed("backward"):
            return super().compute_gradients(loss_per_module, **kwargs)

    @override(PPOTorchLearner)
    def apply_gradients(self, gradients_dict) -> None:
        with self.timed("optimizer"):
            super().apply_gradients(gradients_dict)

    def _view(self, module_id: str) -> tuple[torch.nn.Module, Callable]:
        """The module's (policy, to_unit) (:func:`fgmf_view`), built once per module (a module
        added after the build gets its view, and its checks, at its first update)."""
        view = self._views.get(module_id)
        if view is None:
            view = self._views[module_id] = fgmf_view(self.module[module_id].unwrapped(),
                                                      module_id, self._components)
        return view

    @property
    def _any_term(self) -> bool:
        return self._scorpio_cfg is not None or self._adv_cfg is not None or self._sgam_weight > 0

    @override(Learner)
    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        # next iteration: a fresh draw of rows and new subspaces; rows drawn but not yet
        # penalized (ScorpioConfig.reg_every) are carried over, never dropped
        self._scorpio_carry = {mid: rows.carry_over() for mid, rows in self._fgmf_cache.items()}
        self._fgmf_cache.clear()
        self._distill_cache.clear()  # and new distillation rows and targets

    def _iteration_rows(self, module_id: str) -> IterationSubspaces:
        rows = self._fgmf_cache.get(module_id)
        if rows is None:
            salt = int(torch.randint(0, 2 ** 62, (1,), generator=self._salt_rng))
            rows = self._fgmf_cache[module_id] = IterationSubspaces(
                self._scorpio_cfg, salt, timed=self.timed,
                carry=self._scorpio_carry.pop(module_id, None))
        return rows

    def _distill_rows(self, module_id: str, policy: torch.nn.Module, obs: torch.Tensor,
                      digests: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of this minibatch the SGAM head is distilled on and their Grad-CAM++
        targets: a keyed draw of about ``distill_fraction`` of the rows (the same rows in every
        epoch, as SCOR-PIO draws), each row's target computed once per iteration (its first
        minibatch) and reused on the later epochs."""
        cache = self._distill_cache.get(module_id)
        if cache is None:
            salt = int(torch.randint(0, 2 ** 62, (1,), generator=self._salt_rng))
            cache = self._distill_cache[module_id] = (salt, {})
        salt, targets = cache
        keys = row_keys(digests, salt)
        drawn = select_keyed_rows(keys, self._sgam_fraction)
        new = {keys[i]: i for i in drawn if keys[i] not in targets}
        if new:
            fresh = distillation_target(policy.input_filter, policy, obs[list(new.values())])
            targets.update(zip(new, fresh))
        return obs[drawn], torch.stack([targets[keys[i]] for i in drawn])

    @override(PPOTorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        loss = super().compute_loss_for_module(module_id=module_id, config=config, batch=batch,
                                               fwd_out=fwd_out)
        if not self._any_term:
            return loss
        policy, to_unit = self._view(module_id)
        obs = to_unit(batch[Columns.OBS]).detach()
        if Columns.LOSS_MASK in batch:
            obs = obs[batch[Columns.LOSS_MASK].bool()]
        if obs.shape[0] == 0:
            return loss
        extra = torch.zeros((), device=loss.device)
        logs: dict[str, float] = {}
        # the minibatch's rows hashed once, for every keyed draw of this step
        digests = (row_digests(obs) if self._scorpio_cfg is not None or self._sgam_weight > 0
                   else None)
        if self._scorpio_cfg is not None:
            # Behind SGAM: the curvature of the encoder at what it sees, z = SGAM(x) (computed
            # once per drawn row), the space BPDA attacks in; the saliency head stays out of
            # the double-backward graph (a constant-factor cost, issue 14).
            sgam = policy.input_filter if isinstance(getattr(policy, "input_filter", None),
                                                     SGAM) else None
            with self.timed("scorpio_penalty"), (
                    sgam.bypassed() if sgam is not None else contextlib.nullcontext()):
                reg, info = self._iteration_rows(module_id).penalty(
                    policy, obs, transform=sgam.filter if sgam is not None else None,
                    digests=digests)
            extra = extra + reg
            if "R" in info:  # an evaluating step (ScorpioConfig.reg_every)
                logs.update({f"fgmf_scorpio_{k}": v for k, v in info.items()})
        if self._sgam_weight > 0:
            # Grad-CAM++ costs a forward+backward: distill on a keyed sub-batch, each row's
            # target computed once per iteration.
            with self.timed("sgam_distill"):
                rows, target = self._distill_rows(module_id, policy, obs, digests)
                distill, info = sgam_distillation_loss(policy.input_filter, policy, rows,
                                                       return_info=True, target=target)
            extra = extra + self._sgam_weight * distill
            logs.update({f"fgmf_sgam_{k}": v for k, v in info.items()})
        if self._adv_cfg is not None:
            with self.timed("adv"):
                reg, info = sa_kl_regularizer(policy, obs, self._adv_cfg)
            extra = extra + reg
            logs.update({f"fgmf_{k}": v for k, v in info.items()})
        with self.timed("logging"):
            logs["fgmf_extra_loss"] = float(extra.detach())
            self.metrics.log_dict({k: float(v) for k, v in logs.items()}, key=module_id,
                                  window=1)
        return loss + extra
