"""Writing a portable export (``marl-fgmf export``): the format is described, read and
validated in :mod:`agents.portable`; this module builds a spec from a policy network and writes
the export directory atomically, after checking that it round-trips.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import safetensors.torch
import torch
from torch import nn

import marl_fgmf  # the version is read where it is used: an import of a missing
# package then fails on its first submodule, naming it (see agents.jobs.describe_error)
from agents.networks import ENCODERS, PolicyNetwork
from agents.portable import (DTYPES, FORMAT, FORMAT_VERSION, SPEC_FILE, WEIGHTS_FILE,
                             PortableError, build_module, check_module_spec, fill_module,
                             is_portable, parse_spec)
from marl_fgmf.sgam import SGAM

__all__ = ["check_export_target", "module_spec", "write_portable"]


def _number_out(value: float) -> float | str:
    value = float(value)
    if math.isfinite(value):
        return int(value) if value.is_integer() else value
    return "inf" if value > 0 else "-inf" if value < 0 else "nan"


def _bound_out(array: np.ndarray) -> Any:
    flat = np.asarray(array, dtype=np.float64)
    if flat.size and np.all(flat == flat.flat[0]):
        return _number_out(flat.flat[0])
    return np.vectorize(_number_out, otypes=[object])(flat).tolist()


def module_spec(net: PolicyNetwork, settings: Mapping[str, Any], observation_space: Any,
                obs_scale: float) -> dict[str, Any]:
    """The spec of one module: ``net`` (a :class:`PolicyNetwork`), the encoder ``settings`` it
    was built with (``model_config["net"]``), the environment's observation space (a gymnasium
    ``Box``) and the scale from environment observations to [0, 1].

    Raises:
        PortableError: a network the format cannot describe (not a PolicyNetwork, an input
            filter other than SGAM, settings that are not plain JSON).
    """
    if not isinstance(net, PolicyNetwork) or net.arch not in ENCODERS:
        raise PortableError(f"can only export marl-fgmf policy networks ({', '.join(ENCODERS)}),"
                            f" got a {type(net).__name__}")
    settings = dict(settings or {})
    try:
        if json.loads(json.dumps(settings, allow_nan=False)) != _jsonish(settings):
            raise ValueError
    except (TypeError, ValueError):
        raise PortableError(f"the encoder settings {settings!r} are not plain JSON") from None
    filt = net.input_filter
    if isinstance(filt, SGAM):
        input_filter: dict[str, Any] | None = {"type": "sgam", "settings": dict(filt.config)}
    elif isinstance(filt, nn.Identity):
        input_filter = None
    else:
        raise PortableError(f"can only export the SGAM input filter, the policy has a "
                            f"{type(filt).__name__}")
    shape = tuple(int(s) for s in observation_space.shape)
    dtype = next(iter(net.parameters())).dtype
    return {
        "architecture": net.arch,
        "settings": _jsonish(settings),
        "n_actions": int(net.n_actions),
        "dtype": str(dtype).replace("torch.", ""),
        "observation_space": {"shape": list(shape),
                              "low": _bound_out(observation_space.low),
                              "high": _bound_out(observation_space.high),
                              "dtype": str(np.dtype(observation_space.dtype))},
        "obs_scale": float(obs_scale),
        "layout": "NHWC",
        "input_filter": input_filter,
    }


def _jsonish(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonish(v) for v in value]
    return {str(k): _jsonish(v) for k, v in value.items()} if isinstance(value, dict) else value


def check_export_target(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check ``out`` before anything is written: it must not exist, be an empty directory, or
    (with ``overwrite``) hold an earlier export; never a file or another folder's contents.
    Returns the absolute path; raises ``ValueError`` (one line) otherwise."""
    p = Path(os.path.abspath(os.path.expanduser(str(out))))
    if p.is_file():
        raise ValueError(f"--out {out} is a file; an export is a directory ({SPEC_FILE} + "
                         f"{WEIGHTS_FILE}): choose a new path")
    if p.is_dir():
        if is_portable(p):
            if not overwrite:
                raise ValueError(f"--out {out} holds an earlier export; pass --overwrite to "
                                 f"replace it, or choose a new path")
            other = sorted(c.name for c in p.iterdir() if c.name not in (SPEC_FILE, WEIGHTS_FILE))
            if other:
                raise ValueError(f"--out {out} holds an export and other files ({', '.join(other[:3])});"
                                 f" it is not replaced: choose a new path")
        elif any(p.iterdir()):
            raise ValueError(f"--out {out} is a non-empty directory that is not an export; "
                             f"choose a new path")
    return p


def _self_check(mid: str, net: PolicyNetwork, spec: dict[str, Any],
                tensors: dict[str, torch.Tensor]) -> None:
    """Rebuild the module from its spec and weights as a reader would and compare its logits
    with the original's on random observations: an export that would not round-trip is never
    written."""
    rebuilt = build_module(mid, spec, "export")
    fill_module(rebuilt, mid, tensors, "export")
    rebuilt.eval()
    gen = torch.Generator().manual_seed(0)
    obs = torch.rand((4, *spec["observation_space"]["shape"]), generator=gen)
    training = net.training
    net.eval()
    try:
        with torch.no_grad():
            ref = net(obs.to(device=next(net.parameters()).device,
                             dtype=DTYPES[spec["dtype"]])).cpu()
            got = rebuilt(obs.to(DTYPES[spec["dtype"]]))
    finally:
        net.train(training)
    if not torch.allclose(ref, got, rtol=1e-5, atol=1e-6):
        raise PortableError(f"module {mid!r} does not round-trip through its spec (largest logit"
                            f" difference {float((ref - got).abs().max()):.3g}); not exported")


def write_portable(out: str | os.PathLike, modules: Mapping[str, tuple[PolicyNetwork, dict]],
                   agents: Mapping[str, str], env: Mapping[str, Any] | None = None,
                   action_names: list[str] | None = None, defense: Mapping[str, Any] | None = None,
                   source: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write a portable export: ``modules`` maps module ids to ``(net, module_spec(...))``,
    ``agents`` agent ids to module ids. Each module is first rebuilt from what would be
    written and checked to give the same logits. The directory appears complete or not at
    all (written beside ``out``, then renamed; an earlier export is replaced only with
    ``overwrite``). Returns the export's path."""
    target = check_export_target(out, overwrite)
    if not modules:
        raise ValueError("nothing to export: no modules")
    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, dict[str, Any]] = {}
    for mid, (net, spec) in modules.items():
        if not mid or "/" in mid:
            raise ValueError(f"module id {mid!r} cannot be exported (non-empty, no '/')")
        check_module_spec(mid, spec, "export")
        own = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
        _self_check(mid, net, spec, own)
        tensors.update({f"{mid}/{k}": v for k, v in own.items()})
        specs[mid] = spec
    unknown = sorted({m for m in agents.values() if m not in specs})
    if unknown:
        raise ValueError(f"agents map to module(s) {unknown} that are not exported")
    if action_names is not None and any(len(action_names) != s["n_actions"] for s in specs.values()):
        action_names = None  # names for another action space would mislabel every figure
    data = safetensors.torch.save(tensors, metadata={"format": FORMAT,
                                                     "format_version": str(FORMAT_VERSION)})
    spec = {"format": FORMAT, "format_version": FORMAT_VERSION, "toolkit_version": marl_fgmf.__version__,
            "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(data).hexdigest()},
            "modules": specs, "agents": dict(agents),
            "env": None if env is None else {"name": env["name"],
                                             "kwargs": dict(env.get("kwargs") or {})}}
    if action_names is not None:
        spec["action_names"] = list(action_names)
    spec["defense"] = None if defense is None else dict(defense)
    spec["source"] = dict(source or {})
    text = json.dumps(spec, indent=2, allow_nan=False) + "\n"
    parse_spec(text, "export")  # what is written is what a reader accepts
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        for name, payload in ((WEIGHTS_FILE, data), (SPEC_FILE, text.encode("utf-8"))):
            with open(tmp / name, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
        if target.is_dir() and any(target.iterdir()):  # an earlier export (checked above)
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)  # onto nothing or an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

