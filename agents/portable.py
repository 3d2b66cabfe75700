"""Portable policies: weights in safetensors plus a JSON spec, loaded without running code.

An RLlib checkpoint is a set of pickles (``cloudpickle``): unpickling one runs whatever code its
author put inside. A portable export holds only data, so an auditor can load a policy someone
else trained without trusting them:

    OUT/                        a directory (``marl-fgmf export --checkpoint RUN --out OUT``,
                                written by :mod:`agents.portable_write`)
        policy.json             the spec: plain JSON (below)
        policy.safetensors      every module's ``state_dict``, tensor names ``<module id>/<key>``

Loading (:func:`load_portable`) parses the JSON, rebuilds each network from an allowlist of
the toolkit's own architectures (``agents.make_policy_network``) and input filters (SGAM), and
reads the tensors with ``safetensors`` (no ``pickle``, no ``torch.load``, no import of a name
that the files choose). Every field is validated; a missing or unexpected tensor, a shape or
dtype mismatch, a weights file whose sha256 differs from the spec's, an unknown architecture or
a newer format version raise :class:`PortableError` with one line.

The spec (``format_version`` 1)::

    format            "marl-fgmf-policy"
    format_version    1 (a reader refuses a newer one)
    toolkit_version   the marl-fgmf version that wrote it
    weights           {"file": "policy.safetensors", "sha256": hex digest of that file}
    modules           {module id: module spec}
    agents            {agent id: module id}: which module acts for each agent of the env
    env               {"name": ..., "kwargs": {...}} the policy was trained on, or null
    action_names      [name of action 0, ...] when the env provides them (else absent)
    defense           {"name": ..., "settings": {...}} of the training run (informational)
    source            where it was exported from (informational)

A module spec: ``architecture`` (cnn | vit | hybrid), ``settings`` (the encoder's keyword
settings), ``n_actions``, ``dtype`` of the parameters, ``observation_space`` (``shape``
(H, W, C), ``low``, ``high`` (a number, or a nested list when not uniform; "inf"/"-inf" for
unbounded), ``dtype``), ``obs_scale`` (environment observation x obs_scale = policy input),
``layout`` ("NHWC") and ``input_filter`` (null, or ``{"type": "sgam", "settings": {...}}``).
The loaded module follows the policy protocol: float input in [0, 1], (B, H, W, C).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import safetensors.torch
import torch
from torch import nn

import marl_fgmf  # the version is read where it is used: an import of a missing
# package then fails on its first submodule, naming it (see agents.jobs.describe_error)
from agents.module_ids import choose_module_id
from agents.networks import ENCODERS, PolicyNetwork, make_policy_network
from marl_fgmf.sgam import SGAMConfig, attach_sgam

__all__ = ["DTYPES", "FORMAT", "FORMAT_VERSION", "PortableError", "SPEC_FILE", "WEIGHTS_FILE",
           "build_module", "check_module_spec", "fill_module", "is_portable", "load_portable",
           "load_portable_policies", "parse_spec", "portable_agent_map", "portable_env",
           "portable_module_ids", "read_spec"]

FORMAT = "marl-fgmf-policy"
FORMAT_VERSION = 1
SPEC_FILE = "policy.json"
WEIGHTS_FILE = "policy.safetensors"
LAYOUTS = ("NHWC",)
INPUT_FILTERS = ("sgam",)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
OBS_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")
_TOP_FIELDS = ("format", "format_version", "toolkit_version", "weights", "modules", "agents")
_MODULE_FIELDS = ("architecture", "settings", "n_actions", "dtype", "observation_space",
                  "obs_scale", "layout", "input_filter")


class PortableError(FileNotFoundError):
    """A missing, corrupt or inconsistent portable export (like ``CheckpointError``: the CLI
    reports it on one line and exits 2)."""


# --------------------------------------------------------------------------- locating
def _folder(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.parent if p.name in (SPEC_FILE, WEIGHTS_FILE) and p.is_file() else p


def is_portable(path: str | os.PathLike) -> bool:
    """True when ``path`` is a portable export: a directory holding ``policy.json`` or
    ``policy.safetensors`` (or one of those two files). Cheap, reads nothing: a partial export
    is still recognised, so that loading it says what is missing."""
    folder = _folder(path)
    return folder.is_dir() and ((folder / SPEC_FILE).is_file() or (folder / WEIGHTS_FILE).is_file())


# --------------------------------------------------------------------------- spec <-> JSON
def _bound_in(value: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    def number(v: Any) -> float:
        if isinstance(v, str) and v in ("inf", "-inf"):
            return float(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
        raise PortableError(f"{what} must hold numbers (or \"inf\"/\"-inf\"), got {v!r}")
    if isinstance(value, list):
        arr = np.vectorize(number, otypes=[np.float64])(np.asarray(value, dtype=object))
        if arr.shape != shape:
            raise PortableError(f"{what} has shape {arr.shape}, the observation shape is {shape}")
        return arr
    return np.asarray(number(value))  # a scalar broadcasts (never materialized: shape is data)


def _need(mapping: Mapping[str, Any], fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in mapping]
    _check(not missing, f"{where} lacks field(s) {', '.join(missing)}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PortableError(message)


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_module_spec(mid: str, m: Any, where: str) -> None:
    w = f"{where}: module {mid!r}"
    _check(isinstance(m, dict), f"{w} must be a JSON object, got {type(m).__name__}")
    _need(m, _MODULE_FIELDS, w)
    arch = m["architecture"]
    _check(arch in ENCODERS, f"{w} has unknown architecture {arch!r}; allowed: "
                             f"{', '.join(ENCODERS)}")
    _check(isinstance(m["settings"], dict), f"{w}: settings must be a JSON object")
    allowed = [p for p in inspect.signature(ENCODERS[arch].__init__).parameters
               if p not in ("self", "obs_shape")]
    bad = sorted(set(m["settings"]) - set(allowed))
    _check(not bad, f"{w} has unknown {arch} setting(s) {bad}; allowed: {', '.join(allowed)}")
    _check(_is_int(m["n_actions"], 1), f"{w}: n_actions must be an integer >= 1, "
                                       f"got {m['n_actions']!r}")
    _check(m["dtype"] in DTYPES, f"{w}: unknown dtype {m['dtype']!r}; allowed: "
                                 f"{', '.join(DTYPES)}")
    space = m["observation_space"]
    _check(isinstance(space, dict), f"{w}: observation_space must be a JSON object")
    _need(space, ("shape", "low", "high", "dtype"), f"{w} observation_space")
    shape = space["shape"]
    _check(isinstance(shape, list) and len(shape) == 3 and all(_is_int(s, 1) for s in shape),
           f"{w}: observation shape must be [H, W, C] positive integers, got {shape!r}")
    _check(space["dtype"] in OBS_DTYPES, f"{w}: unknown observation dtype {space['dtype']!r}; "
                                         f"allowed: {', '.join(OBS_DTYPES)}")
    low = _bound_in(space["low"], tuple(shape), f"{w} observation low")
    high = _bound_in(space["high"], tuple(shape), f"{w} observation high")
    _check(not np.any(low > high), f"{w}: observation low exceeds high")
    scale = m["obs_scale"]
    _check(isinstance(scale, (int, float)) and not isinstance(scale, bool)
           and math.isfinite(scale) and scale > 0,
           f"{w}: obs_scale must be a finite number > 0, got {scale!r}")
    _check(m["layout"] in LAYOUTS, f"{w}: unknown layout {m['layout']!r}; allowed: "
                                   f"{', '.join(LAYOUTS)}")
    filt = m["input_filter"]
    if filt is not None:
        _check(isinstance(filt, dict) and filt.get("type") in INPUT_FILTERS,
               f"{w}: input_filter must be null or {{\"type\": \"sgam\", \"settings\": "
               f"{{...}}}}, got {filt!r}")
        names = {"in_channels", *SGAMConfig.__dataclass_fields__}
        s = filt.get("settings")
        _check(isinstance(s, dict) and not set(s) - names,
               f"{w}: sgam settings must be a JSON object with keys from "
               f"{', '.join(sorted(names))}, got {s!r}")


def parse_spec(text: str, where: str) -> dict[str, Any]:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PortableError(f"corrupt spec {where}: {exc}") from None
    except RecursionError:
        raise PortableError(f"corrupt spec {where}: nested too deeply") from None
    _check(isinstance(spec, dict), f"corrupt spec {where}: expected a JSON object")
    _check(spec.get("format") == FORMAT, f"{where} is not a marl-fgmf policy spec (format "
                                         f"{spec.get('format')!r}, expected {FORMAT!r})")
    _need(spec, _TOP_FIELDS, where)
    version = spec["format_version"]
    _check(_is_int(version, 1), f"{where}: format_version must be an integer >= 1, "
                                f"got {version!r}")
    _check(version <= FORMAT_VERSION,
           f"{where} has format version {version}, written by a newer marl-fgmf "
           f"({spec.get('toolkit_version')}); this one ({marl_fgmf.__version__}) reads up to "
           f"{FORMAT_VERSION}: upgrade marl-fgmf")
    _check(isinstance(spec["toolkit_version"], str), f"{where}: toolkit_version must be a string")
    weights = spec["weights"]
    _check(isinstance(weights, dict), f"{where}: weights must be a JSON object")
    _need(weights, ("file", "sha256"), f"{where} weights")
    name = weights["file"]
    _check(isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name,
           f"{where}: weights file must be a plain file name, got {name!r}")
    _check(isinstance(weights["sha256"], str) and len(weights["sha256"]) == 64,
           f"{where}: weights sha256 must be a 64-digit hex digest")
    modules = spec["modules"]
    _check(isinstance(modules, dict) and bool(modules),
           f"{where}: modules must be a non-empty JSON object")
    for mid, m in modules.items():
        _check(bool(mid) and "/" not in mid, f"{where}: bad module id {mid!r} (non-empty, no '/')")
        check_module_spec(mid, m, where)
    agents = spec["agents"]
    _check(isinstance(agents, dict) and all(isinstance(v, str) for v in agents.values()),
           f"{where}: agents must map agent ids to module ids")
    unknown = sorted({v for v in agents.values() if v not in modules})
    _check(not unknown, f"{where}: agents map to unknown module(s) {unknown}; the spec holds "
                        f"{sorted(modules)}")
    env = spec.get("env")
    _check(env is None or (isinstance(env, dict) and isinstance(env.get("name"), str)
                           and isinstance(env.get("kwargs", {}), dict)),
           f"{where}: env must be null or {{\"name\": ..., \"kwargs\": {{...}}}}")
    names = spec.get("action_names")
    _check(names is None or (isinstance(names, list) and all(isinstance(a, str) for a in names)),
           f"{where}: action_names must be a list of strings")
    return spec


def read_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The validated spec of the export at ``path`` (the weights are not read).

    Raises:
        PortableError: no export there, or a spec that is not valid JSON of this format.
    """
    folder = _folder(path)
    spec_file = folder / SPEC_FILE
    if not folder.is_dir():
        raise PortableError(f"portable export not found: {path}")
    if not spec_file.is_file():
        raise PortableError(f"{folder} has no {SPEC_FILE}: not a complete portable export")
    try:
        text = spec_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PortableError(f"corrupt spec {spec_file}: not UTF-8 text") from None
    return parse_spec(text, str(spec_file))


def portable_module_ids(path: str | os.PathLike) -> list[str]:
    """Module ids of an export (as ``agents.checkpoint.policy_ids`` for a checkpoint)."""
    return sorted(read_spec(path)["modules"])


def portable_env(path: str | os.PathLike) -> tuple[str, dict[str, Any]] | None:
    """``(env name, env kwargs)`` the exported policy was trained on, or None if unknown."""
    env = read_spec(path).get("env")
    return None if env is None else (env["name"], dict(env.get("kwargs") or {}))


def portable_agent_map(path: str | os.PathLike, agents: list[str]) -> dict[str, str]:
    """Which module acts for each of ``agents``: the export's own mapping; a single module
    serves every agent. Raises ``ValueError`` naming the agents the export has no module for."""
    spec = read_spec(path)
    ids = sorted(spec["modules"])
    if len(ids) == 1:
        return {a: ids[0] for a in agents}
    missing = [a for a in agents if a not in spec["agents"]]
    if missing:
        raise ValueError(f"export has no policy for agents {missing}; it maps "
                         f"{sorted(spec['agents'])}")
    return {a: spec["agents"][a] for a in agents}


# --------------------------------------------------------------------------- loading
def build_module(mid: str, m: dict[str, Any], where: str) -> PolicyNetwork:
    """The network a module spec describes, with fresh weights."""
    try:
        net = make_policy_network(m["architecture"], tuple(m["observation_space"]["shape"]),
                                  m["n_actions"], **m["settings"])
        if m["input_filter"] is not None:
            attach_sgam(net, **m["input_filter"]["settings"])
    except Exception as exc:  # any settings the encoder refuses, on one line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PortableError(f"{where}: cannot build module {mid!r} from its spec: {first}") from None
    return net.to(DTYPES[m["dtype"]])


def _load_weights(folder: Path, spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    file = folder / spec["weights"]["file"]
    if not file.is_file():
        raise PortableError(f"{folder} has no weights file {spec['weights']['file']}: not a "
                            f"complete portable export")
    data = file.read_bytes()  # hashed and parsed from the same bytes
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec["weights"]["sha256"].lower():
        raise PortableError(f"weights {file} do not match the spec (sha256 {digest[:12]}..., "
                            f"spec {spec['weights']['sha256'][:12]}...): changed, or from "
                            f"another export")
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PortableError(f"corrupt weights file {file}: {first}") from None


def fill_module(net: PolicyNetwork, mid: str, tensors: dict[str, torch.Tensor], where: str,
                check_only: bool = False) -> None:
    """Copy ``tensors`` into ``net`` strictly: every key present, none extra, same shapes and
    dtypes (with ``check_only``, only check: ``net`` may live on the meta device)."""
    own = net.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        parts = ([f"missing {len(missing)} tensor(s) ({', '.join(missing[:3])})"] if missing
                 else []) + ([f"unexpected {len(unexpected)} tensor(s) "
                              f"({', '.join(unexpected[:3])})"] if unexpected else [])
        raise PortableError(f"{where}: module {mid!r} weights do not fit its spec: "
                            f"{'; '.join(parts)}")
    for key, value in own.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(value.shape):
            raise PortableError(f"{where}: module {mid!r} tensor {key} has shape "
                                f"{tuple(got.shape)}, its spec needs {tuple(value.shape)}")
        if got.dtype != value.dtype:
            raise PortableError(f"{where}: module {mid!r} tensor {key} has dtype "
                                f"{str(got.dtype).replace('torch.', '')}, its spec says "
                                f"{str(value.dtype).replace('torch.', '')}")
    if not check_only:
        net.load_state_dict(tensors, strict=True)


def load_portable_policies(path: str | os.PathLike, device: str | torch.device | None = None
                           ) -> dict[str, nn.Module]:
    """Every module of a portable export, by module id, as policy-protocol networks in eval
    mode (``policy(obs) -> logits``, obs float in [0, 1], (B, H, W, C)). Unpickles nothing.

    Raises:
        PortableError: a missing file, a corrupt or inconsistent spec, weights that do not fit.
    """
    folder = _folder(path)
    spec = read_spec(folder)
    where = str(folder)
    tensors = _load_weights(folder, spec)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        mid, sep, name = key.partition("/")
        if not sep or mid not in spec["modules"]:
            raise PortableError(f"{where}: weights hold tensor {key!r} of no module in the spec "
                                f"({', '.join(sorted(spec['modules']))})")
        by_module.setdefault(mid, {})[name] = value
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for mid, m in spec["modules"].items():
        with torch.device("meta"):  # shapes first, without memory: a spec cannot make it
            skeleton = build_module(mid, m, where)  # allocate more than its weights file holds
        fill_module(skeleton, mid, by_module.get(mid, {}), where, check_only=True)
        net = build_module(mid, m, where)
        fill_module(net, mid, by_module.get(mid, {}), where)
        out[mid] = net.eval().to(device)
    return out


def load_portable(path: str | os.PathLike, policy_id: str | None = None,
                  device: str | torch.device | None = None) -> nn.Module:
    """One module of a portable export, as ``agents.load_policy`` returns one of a checkpoint:
    a :class:`agents.networks.PolicyNetwork` in eval mode on ``device`` (default CUDA if
    available, else CPU). ``policy_id`` may be omitted when the export holds one module.
    Reads JSON and safetensors only: no ``pickle``, no ``torch.load``.

    Raises:
        PortableError: missing/corrupt/inconsistent export (one line naming the file).
        ValueError: unknown or ambiguous ``policy_id`` (lists the valid ones).
    """
    policy_id = choose_module_id(portable_module_ids(path), policy_id, holder="export")
    return load_portable_policies(path, device)[policy_id]

