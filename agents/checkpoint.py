"""From an RLlib checkpoint back to plain torch: ``load_policy`` / ``load_policies``.

A run directory written by ``marl-fgmf train`` looks like::

    DIR/run.json                 settings of the run (env, arch, policies, defense)
    DIR/checkpoints/latest       name of the newest complete checkpoint (atomic pointer)
    DIR/checkpoints/iter_00012/  Algorithm.save_to_path output
        learner_group/learner/rl_module/<module_id>/

``load_policy`` accepts the run directory, a checkpoint directory, or a single RLModule
directory, and needs no Ray cluster (``RLModule.from_checkpoint``, ~0.1 s). Any RLlib
new-API-stack checkpoint loads, not only the toolkit's own:

* a marl-fgmf module (:class:`agents.rl_module.FGMFTorchRLModule`): its policy network, as is;
* any other ``TorchRLModule`` whose ``_forward`` returns action logits
  (``Columns.ACTION_DIST_INPUTS``) for a ``Discrete`` action space, RLlib's default catalog
  modules among them (``DefaultPPOTorchRLModule`` and the APPO/IMPALA/BC modules built on it:
  encoder + pi head): a :class:`marl_fgmf.adapter.PolicyAdapter` around the module's
  ``_forward`` (never ``forward_inference``, which runs under ``torch.no_grad``), with
  ``value(obs)`` from ``compute_values`` where the module has one. Its layout and scaling come
  from the module's observation space: a ``Box`` bounded by [0, 1] gets the protocol input
  as is; one bounded by [0, 255] (uint8 or float) gets ``255 * obs``, the raw pixel values
  it was trained on (unrounded, so that input gradients exist); a channels-first space
  ``(C, H, W)`` gets the input permuted. Other spaces are refused with one line.

Agents to modules (:func:`agent_policy_map`): a checkpoint with a single module, whatever its
id (``shared``, RLlib's ``default_policy``, ...), serves every agent; with several modules each
agent plays the module named after it; otherwise choose one module for all agents with
``policy_id`` (``--policy-id``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from agents.module_ids import choose_module_id
from agents.networks import PolicyNetwork
from agents.portable import (is_portable, load_portable, load_portable_policies,
                             portable_agent_map, portable_env, portable_module_ids)
from marl_fgmf.adapter import adapt_policy

RL_MODULE_SUBDIR = Path("learner_group") / "learner" / "rl_module"


class CheckpointError(FileNotFoundError):
    """A missing or unreadable checkpoint (the CLI reports it on one line, exit 2)."""


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None if it has none."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    ckpt = pointer.parent / pointer.read_text().strip()
    return ckpt if (ckpt / RL_MODULE_SUBDIR).is_dir() else None


def newest_complete_checkpoint(run_dir: str | Path) -> Path | None:
    """The ``checkpoints/iter_NNNNN`` folder with the highest iteration that holds
    ``learner_group/learner/rl_module`` (whatever ``latest`` says), or None if there is none."""
    best, best_iter = None, -1
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for ckpt in root.glob("iter_*"):
        try:
            iteration = int(ckpt.name[len("iter_"):])
        except ValueError:
            continue
        if iteration > best_iter and (ckpt / RL_MODULE_SUBDIR).is_dir():
            best, best_iter = ckpt, iteration
    return best


def resolve_module_root(path: str | Path) -> Path:
    """The ``rl_module`` directory (holding one folder per module id) behind ``path``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if is_portable(path):  # a marl-fgmf export (JSON + safetensors): its own root
        return path
    if (path / "checkpoints").is_dir():  # a run directory
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise CheckpointError(f"no complete checkpoint in run directory {path}")
        path = ckpt
    if (path / RL_MODULE_SUBDIR).is_dir():
        return path / RL_MODULE_SUBDIR
    if path.name == "rl_module" and path.is_dir():
        return path
    if (path.parent.name == "rl_module") and path.is_dir():
        return path.parent
    if is_module_dir(path):  # one RLModule saved on its own (module.save_to_path)
        return path
    raise CheckpointError(f"not an RLlib checkpoint (no {RL_MODULE_SUBDIR} inside): {path}")


def is_module_dir(path: str | Path) -> bool:
    """True for the folder of ONE RLModule (``RLModule.save_to_path``): its own
    ``class_and_ctor_args.pkl`` and no module folders inside (a MultiRLModule's ``rl_module``
    folder has one per module id)."""
    path = Path(path)
    marker = "class_and_ctor_args.pkl"
    return (path / marker).is_file() and not any(
        (d / marker).is_file() for d in path.iterdir() if d.is_dir())


def policy_ids(checkpoint_dir: str | Path) -> list[str]:
    """Module ids stored in a checkpoint (``shared``, one per agent, or whatever ids RLlib's
    config named; a single RLModule folder's id is its folder name; an export's own ids)."""
    if is_portable(checkpoint_dir):
        return portable_module_ids(checkpoint_dir)
    root = resolve_module_root(checkpoint_dir)
    if root.name != "rl_module" and is_module_dir(root):
        return [root.name]
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


@contextlib.contextmanager
def _quiet_rllib() -> Iterator[None]:
    """Hold back RLlib's deprecation warnings while a module loads (levels restored)."""
    loggers = [logging.getLogger(n) for n in ("ray.rllib", "ray._common.deprecation")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_rl_module(checkpoint_dir: str | Path, module_id: str | None = None,
                   what: str = "policy", arg: str = "policy_id"):
    """The RLlib ``RLModule`` ``module_id`` of a checkpoint (no Ray cluster needed).

    ``module_id`` may be omitted when the checkpoint holds exactly one module.

    Raises:
        CheckpointError: missing, partial or corrupt checkpoint (the message names the path).
        ValueError: unknown or ambiguous ``module_id`` (the message lists the valid ones).
    """
    # lazy: RLlib (seconds) stays out of CLI start-up and of attacks/explainers' imports
    from ray.rllib.core.rl_module.rl_module import RLModule
    root = resolve_module_root(checkpoint_dir)
    ids = policy_ids(root)
    if not ids:
        raise CheckpointError(f"checkpoint holds no modules: {root}")
    module_id = choose_module_id(ids, module_id, what=what, arg=arg)
    module_dir = root if root.name == module_id and is_module_dir(root) else root / module_id
    warn_if_foreign_pickle(root, shown=checkpoint_dir)
    try:
        with _quiet_rllib():
            return RLModule.from_checkpoint(module_dir.resolve())
    except Exception as exc:  # corrupt or partial files
        raise CheckpointError(f"cannot load checkpoint {module_dir}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


class UntrustedCheckpointWarning(UserWarning):
    """An RLlib checkpoint (pickles) opened from outside the user's own marl-fgmf runs."""


_WARNED_PATHS: set[Path] = set()


def is_marl_fgmf_run(path: str | Path) -> bool:
    """Whether ``path`` lies in a run directory ``marl-fgmf train`` wrote (``run.json`` beside
    ``checkpoints/``, in ``path`` or a folder above it)."""
    path = Path(path).resolve()
    return any((d / "run.json").is_file() and (d / "checkpoints").is_dir()
               for d in (path, *path.parents))


def warn_if_foreign_pickle(path: str | Path, shown: str | Path | None = None) -> bool:
    """Warn once per checkpoint (``path``, its module folder) when a pickle-based RLlib
    checkpoint that is not part of a marl-fgmf run is opened: unpickling it runs whatever code
    its author put there. ``shown``: the path the user gave, for the message. Returns whether
    it warned (README, "Loading models safely")."""
    key = Path(path).resolve()
    path = path if shown is None else shown
    if key in _WARNED_PATHS or is_marl_fgmf_run(key):
        return False
    _WARNED_PATHS.add(key)
    warnings.warn(f"{path} is an RLlib checkpoint from outside your marl-fgmf runs: loading it "
                  f"unpickles its files, which runs any code their author put in them; open "
                  f"checkpoints only from people you trust, or ask for a 'marl-fgmf export' "
                  f"(JSON + safetensors, no code)", UntrustedCheckpointWarning, stacklevel=3)
    return True


class RLModuleLogits(nn.Module):
    """An RLlib ``TorchRLModule`` as ``forward(obs) -> logits``, on observations in the module's
    own layout and units: ``_forward({obs})[action_dist_inputs]``, with gradients (never
    ``forward_inference``, which runs under ``torch.no_grad``)."""

    def __init__(self, rl_module: nn.Module):
        super().__init__()
        # lazy: RLlib (seconds) stays out of CLI start-up; only RLlib checkpoints need it
        from ray.rllib.core.columns import Columns
        self.rl_module = rl_module
        self.obs_key, self.logits_key = Columns.OBS, Columns.ACTION_DIST_INPUTS

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.rl_module._forward({self.obs_key: obs})
        if not isinstance(out, dict) or self.logits_key not in out:
            keys = sorted(map(str, out)) if isinstance(out, dict) else type(out).__name__
            raise ValueError(f"{type(self.rl_module).__name__}._forward returned {keys}, not "
                             f"{self.logits_key!r} (the action logits)")
        return out[self.logits_key]


class RLModuleActorCritic(RLModuleLogits):
    """:class:`RLModuleLogits` with ``value(obs)`` from the module's ``compute_values``."""

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.rl_module.compute_values({self.obs_key: obs})


class FilteredModulePolicy(nn.Module):
    """The policy of an RLModule with an input filter of its own (SGAM put in front of any
    module by :class:`agents.sgam_module.SGAMInputMixin`): ``forward(obs) =
    inner(input_filter(obs))`` with the module's own filtering switched off inside, so that
    the filter is ``policy.input_filter`` like a marl-fgmf network's (BPDA swaps it, the
    audit and tournaments see it, SGAM distillation bypasses it) and runs once.

    Args:
        rl_module: the module (``input_filter`` and ``without_input_filter()``).
        inner: its :class:`marl_fgmf.adapter.PolicyAdapter` (protocol input -> logits).
    """

    def __init__(self, rl_module: nn.Module, inner: nn.Module):
        super().__init__()
        self.input_filter = rl_module.input_filter  # the module's own SGAM (same parameters)
        self.inner = inner
        self.obs_shape = inner.obs_shape
        self.n_actions = inner.n_actions
        self._unfiltered = rl_module.without_input_filter

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = self.input_filter(obs)
        with self._unfiltered():
            return self.inner(x)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        x = self.input_filter(obs)
        with self._unfiltered():
            return self.inner.value(x)


def has_own_input_filter(module: nn.Module) -> bool:
    """Whether an RLModule filters its own observations (:class:`SGAMInputMixin`)."""
    return (isinstance(getattr(module, "input_filter", None), nn.Module)
            and callable(getattr(module, "without_input_filter", None)))


def observation_declaration(space, module: str = "module") -> tuple[str, str, tuple[int, int, int]]:
    """``(layout, input_range, obs_shape)`` of an RLlib module from its observation space:
    channels last unless the space is ``(C, H, W)``; ``unit`` for a Box in [0, 1], ``uint8`` /
    ``float255`` for one in [0, 255]; ``obs_shape`` is the protocol's ``(H, W, C)``.

    Raises:
        CheckpointError: a space that is not a bounded image ``Box`` (one line: what it is and
            what is expected).
    """
    shape = tuple(int(s) for s in (getattr(space, "shape", None) or ()))
    low, high = getattr(space, "low", None), getattr(space, "high", None)
    if len(shape) != 3 or low is None or high is None:
        raise CheckpointError(f"{module} observes {space}; expected an image Box of shape "
                              f"(H, W, C) (or (C, H, W))")
    channels = (1, 2, 3, 4)
    layout = "NCHW" if shape[0] in channels and shape[2] not in channels else "NHWC"
    obs_shape = (shape[1], shape[2], shape[0]) if layout == "NCHW" else shape
    lo, hi = float(np.min(low)), float(np.max(high))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo != 0.0 or hi not in (1.0, 255.0):
        raise CheckpointError(f"{module} observes values in [{lo:g}, {hi:g}]; expected an image "
                              f"Box in [0, 1] or [0, 255] (the scaling is read from it); wrap "
                              f"the module yourself with marl_fgmf.adapter.adapt_policy("
                              f"input_range=...)")
    if hi == 1.0:
        input_range = "unit"
    else:
        input_range = "uint8" if np.dtype(space.dtype) == np.uint8 else "float255"
    return layout, input_range, obs_shape  # type: ignore[return-value]


def rl_module_policy(module: nn.Module, where: str = "checkpoint") -> nn.Module:
    """The policy-protocol module of a loaded RLlib ``RLModule`` (see the module docstring):
    a marl-fgmf module's network, or a :class:`PolicyAdapter` around any other
    ``TorchRLModule``'s ``_forward`` (inside a :class:`FilteredModulePolicy` when the module
    has SGAM in front, :class:`agents.sgam_module.SGAMInputMixin`).

    Raises:
        CheckpointError: a module the adapter cannot serve (not torch, recurrent, not
            Discrete actions, not an image observation space), on one line.
    """
    net = getattr(module, "net", None)
    if isinstance(net, PolicyNetwork):
        return net
    kind = type(module).__name__
    if not isinstance(module, nn.Module) or not callable(getattr(module, "_forward", None)):
        raise CheckpointError(f"{where} holds a {kind}; expected a torch RLModule "
                              f"(TorchRLModule, framework='torch')")
    is_stateful = getattr(module, "is_stateful", None)
    if callable(is_stateful) and is_stateful():
        raise CheckpointError(f"{where} holds a recurrent {kind} (state in/out); expected a "
                              f"feed-forward module (the policy protocol has no state)")
    n = getattr(getattr(module, "action_space", None), "n", None)
    if n is None:
        raise CheckpointError(f"{where} holds a {kind} acting in {module.action_space}; "
                              f"expected Discrete actions (its logits are the policy's output)")
    layout, input_range, obs_shape = observation_declaration(module.observation_space,
                                                             f"{where}'s {kind}")
    wrapper = (RLModuleActorCritic if callable(getattr(module, "compute_values", None))
               else RLModuleLogits)(module)
    policy = adapt_policy(wrapper, layout=layout, input_range=input_range, obs_shape=obs_shape,
                          n_actions=int(n))
    return FilteredModulePolicy(module, policy) if has_own_input_filter(module) else policy


def load_policy(checkpoint_dir: str | Path, policy_id: str | None = None,
                device: str | torch.device | None = None) -> nn.Module:
    """Load a trained policy as a torch module on the policy protocol.

    Args:
        checkpoint_dir: a run directory, an algorithm checkpoint (any RLlib new-API-stack
            checkpoint), its ``rl_module`` folder, one RLModule's folder (also one saved on
            its own with ``module.save_to_path``), or a ``marl-fgmf export`` directory (read
            without unpickling anything: :mod:`agents.portable`).
        policy_id: the module id (``shared``, an agent id, RLlib's ``default_policy``, ...);
            may be omitted when the checkpoint holds exactly one.
        device: where to put the module (default: CUDA if available, else CPU).
    Returns:
        In eval mode, ``policy(obs) -> logits`` with ``obs`` float in [0, 1], (B, H, W, C):
        a :class:`agents.networks.PolicyNetwork` for a marl-fgmf checkpoint, else a
        :class:`marl_fgmf.adapter.PolicyAdapter` around the RLlib module's ``_forward`` (with
        ``policy.value(obs)`` when the module computes values).
    Raises:
        CheckpointError: missing/corrupt checkpoint, or a module the adapter cannot serve
            (message names the path and what was found).
        ValueError: unknown ``policy_id`` (message lists the valid ones).
    """
    if is_portable(checkpoint_dir):  # data only: JSON + safetensors, nothing is unpickled
        return load_portable(checkpoint_dir, policy_id, device)
    module = load_rl_module(checkpoint_dir, policy_id)
    policy = rl_module_policy(module, f"checkpoint {checkpoint_dir}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return policy.eval().to(device)


def load_policies(checkpoint_dir: str | Path, device: str | torch.device | None = None
                  ) -> dict[str, nn.Module]:
    """Every policy of a checkpoint (or an export: its weights file read once), by module id."""
    if is_portable(checkpoint_dir):
        return load_portable_policies(checkpoint_dir, device)
    return {pid: load_policy(checkpoint_dir, pid, device) for pid in policy_ids(checkpoint_dir)}


def check_policy_fits_env(policy: nn.Module, env, agent: str, module: str = "policy") -> None:
    """Raise ``ValueError`` (one line) when ``policy`` was built for another observation shape
    or number of actions than ``agent`` has in ``env`` (wrong ``--env`` or ``--env-kwargs``),
    instead of a shape error deep inside torch."""
    space = env.action_space(agent)
    n = getattr(space, "n", None)
    if n is None:
        raise ValueError(f"the action space of {agent!r} is {space}; this needs Discrete "
                         f"actions")
    obs_shape = tuple(env.observation_space(agent).shape or ())
    want_obs = getattr(policy, "obs_shape", None)
    if want_obs is not None and tuple(want_obs) != obs_shape:
        raise ValueError(f"policy {module!r} takes observations of shape {tuple(want_obs)} but "
                         f"{agent!r} sees {obs_shape}: wrong --env or --env-kwargs?")
    want_n = getattr(policy, "n_actions", None)
    if want_n is not None and int(want_n) != int(n):
        raise ValueError(f"policy {module!r} outputs {int(want_n)} action logits but the action "
                         f"space of {agent!r} is Discrete({int(n)}): they must match")


def run_env(checkpoint: str | Path, env: str | None = None,
            env_kwargs: dict | None = None) -> tuple[str, dict]:
    """The env a checkpoint is evaluated on: ``env`` (default: the one its run's ``run.json``
    names) and ``env_kwargs`` (default: the run's settings when the env is the run's own, else
    none). Raises ``ValueError`` when neither names an env: there is no default env."""
    run = read_run_config(checkpoint)
    name = env or run.get("env")
    if not name:
        raise ValueError(f"--env is required: {checkpoint} names no env (no run.json of a "
                         f"marl-fgmf run, e.g. a checkpoint RLlib wrote); pass --env NAME")
    if env_kwargs is not None:
        return name, dict(env_kwargs)
    return name, dict(run.get("env_kwargs") or {}) if name == run.get("env") else {}


def read_run_config(path: str | Path) -> dict:
    """``run.json`` of the run that produced ``path`` (a run dir or one of its checkpoints),
    or ``{}`` when there is none; for an export, the env its spec names."""
    path = Path(path)
    if is_portable(path):
        env = portable_env(path)
        return {} if env is None else {"env": env[0], "env_kwargs": env[1]}
    for candidate in (path, *path.parents):
        f = candidate / "run.json"
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except json.JSONDecodeError:
                raise CheckpointError(f"corrupt run settings file: {f}") from None
    return {}


def agent_policy_map(checkpoint_dir: str | Path, agents: list[str]) -> dict[str, str]:
    """Which module id acts for each agent: a checkpoint's single module (whatever its id)
    for all, else the module named after each agent.

    Raises:
        ValueError: several modules and an agent without one of its own (one line naming
            them; choose a module for every agent with ``policy_id`` / ``--policy-id``).
    """
    if is_portable(checkpoint_dir):
        return portable_agent_map(checkpoint_dir, agents)
    ids = policy_ids(checkpoint_dir)
    if len(ids) == 1:
        return {a: ids[0] for a in agents}
    missing = [a for a in agents if a not in ids]
    if missing:
        raise ValueError(f"checkpoint has no module for agents {missing}; it holds {ids} (a "
                         f"single module serves every agent, several must be named after the "
                         f"agents): choose one for every agent with --policy-id")
    return {a: a for a in agents}


def load_agent_policies(checkpoint_dir: str | Path, agents: list[str],
                        policy_id: str | None = None, device: str | torch.device | None = None,
                        single_if_shared: bool = False) -> dict[str, nn.Module] | nn.Module:
    """``{agent: module}`` for the agents of an environment: every agent gets ``policy_id``'s
    module when given, else the checkpoint's own mapping (``shared``, or one per agent).
    Agents that share a module share the same object (so callers can batch them). With
    ``single_if_shared``, one module used by every agent is returned as that module (both
    forms are what :func:`attacks.evaluate` accepts)."""
    if policy_id is not None:
        module = load_policy(checkpoint_dir, policy_id, device)
        return module if single_if_shared else {a: module for a in agents}
    modules = load_policies(checkpoint_dir, device)
    if single_if_shared and len(modules) == 1:
        return next(iter(modules.values()))
    mapping = agent_policy_map(checkpoint_dir, agents)
    return {a: modules[mapping[a]] for a in agents}
