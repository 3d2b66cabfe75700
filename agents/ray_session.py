"""The Ray session: connecting to a cluster, shipping code and weights, naming failures.

One place for everything the toolkit does with Ray itself (RLlib's own use of Ray stays in
:mod:`agents.train`):

* :func:`check_address` and :func:`load_runtime_env` validate ``--address`` and
  ``--runtime-env FILE`` before anything is written (an unreachable address, a ``ray://``
  address without Ray Client support, a runtime-env file that does not parse or names unknown
  keys: one-line ``ValueError``).
* :func:`ensure_ray` starts a local Ray or joins a cluster (with the runtime env) and says
  which: address, nodes, CPUs and GPUs (:func:`cluster_summary`).
* The work on the cluster lives in :mod:`agents.jobs` and is re-exported here:
  :func:`remote_call` / :func:`ship` / :func:`get_result` (a Ray task that receives its
  weights through the object store, never a path of the driver, and answers with a record
  naming its node and root cause), :func:`run_jobs` / :class:`Job` / :func:`short_node`
  (many tasks, a failing node excluded) and :func:`describe_error` (any Ray exception on one
  line).

On a cluster every node needs this package and its dependencies importable: a shared install,
``--runtime-env`` (Ray ships ``py_modules``/``working_dir``/``pip`` to each node), or a
container image that has it (see the README, "On a cluster").
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from agents.jobs import (SHIPPED, Job, describe_error, get_result,  # noqa: F401  (re-exported)
                         remote_call, run_jobs, set_threads, ship, short_node)

__all__ = [
    "Job", "RUNTIME_ENV_KEYS", "check_address", "cluster_summary", "describe_error",
    "ensure_ray", "format_cluster", "get_result", "load_runtime_env", "node_info",
    "remote_call", "run_jobs", "set_threads", "ship", "short_node",
]

RUNTIME_ENV_KEYS = ("working_dir", "py_modules", "pip", "uv", "conda", "env_vars", "excludes",
                    "image_uri", "config")
"""The ``runtime_env`` fields accepted in ``--runtime-env FILE`` (Ray's own names)."""

_CLIENT_EXTRA = "pip install 'marl-fgmf[cluster]' (Ray Client: ray[client])"


# --------------------------------------------------------------------------- validation
def check_address(address: str | None, timeout_s: float = 3.0) -> str | None:
    """Validate a Ray address before anything is written; returns it (stripped) or None.

    * ``None`` / empty: a local Ray (unless ``RAY_ADDRESS`` is set, which Ray honours and
      which is then checked the same way).
    * ``auto``: the cluster started on this machine by ``ray start``.
    * ``host:port``: the head node's GCS address; the port must accept a TCP connection.
    * ``ray://host:port``: Ray Client; needs ``ray[client]`` (the ``cluster`` extra) and a
      reachable client server.

    Raises:
        ValueError: one line naming the address and the fix.
    """
    if address is None or not str(address).strip():
        env = os.environ.get("RAY_ADDRESS", "").strip()
        if not env:
            return None
        address = env
    address = str(address).strip()
    if address in ("auto", "local"):
        return address
    target = address
    if address.startswith("ray://"):
        if importlib.util.find_spec("grpc") is None:
            raise ValueError(f"--address {address}: ray:// addresses need Ray Client, which is "
                             f"not installed; {_CLIENT_EXTRA}, or pass the head node's GCS "
                             f"address host:6379 instead")
        target = address[len("ray://"):]
    elif "://" in address:
        raise ValueError(f"--address {address}: unknown scheme; allowed: host:port (the head "
                         f"node's GCS address), ray://host:port (Ray Client), auto")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--address {address}: expected host:port such as 10.0.0.1:6379 "
                         f"(or ray://host:10001, auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"cannot reach a Ray cluster at {address} ({reason}); start one with "
                         f"`ray start --head --port={port}` or check the address") from None
    return address


def load_runtime_env(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Read and validate a Ray ``runtime_env`` file (YAML or JSON); None for no file.

    Allowed keys: :data:`RUNTIME_ENV_KEYS`. Local paths in ``working_dir`` and ``py_modules``
    are made absolute (relative to the file's folder) and must exist.

    Raises:
        ValueError: unreadable or unparsable file, unknown keys, wrong types (one line).
    """
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--runtime-env file not found: {path}")
    try:
        text = path.read_text()
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as exc:  # OSError, UnicodeDecodeError, yaml.YAMLError, JSONDecodeError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"--runtime-env {path}: cannot parse it: {first}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--runtime-env {path}: expected a mapping of runtime_env fields, got "
                         f"{type(data).__name__}")
    unknown = sorted(set(data) - set(RUNTIME_ENV_KEYS))
    if unknown:
        raise ValueError(f"--runtime-env {path}: unknown key(s) {', '.join(map(str, unknown))}; "
                         f"allowed: {', '.join(RUNTIME_ENV_KEYS)}")
    out = dict(data)

    def local(value: Any, key: str) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"--runtime-env {path}: {key} entries must be strings (paths or "
                             f"URIs), got {value!r}")
        if "://" in value:
            return value
        p = Path(os.path.expanduser(value))
        p = p if p.is_absolute() else path.parent / p
        if not p.exists():
            raise ValueError(f"--runtime-env {path}: {key} path not found: {p}")
        return str(p.resolve())

    if "working_dir" in out:
        out["working_dir"] = local(out["working_dir"], "working_dir")
    if "py_modules" in out:
        if not isinstance(out["py_modules"], list):
            raise ValueError(f"--runtime-env {path}: py_modules must be a list")
        out["py_modules"] = [local(v, "py_modules") for v in out["py_modules"]]
    if "env_vars" in out:
        ev = out["env_vars"]
        if not isinstance(ev, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in ev.items()):
            raise ValueError(f"--runtime-env {path}: env_vars must map names to strings "
                             f"(quote numbers), got {ev!r}")
    for key in ("pip", "uv"):
        if key in out and not isinstance(out[key], (list, str, dict)):
            raise ValueError(f"--runtime-env {path}: {key} must be a list of requirements, a "
                             f"requirements file or a mapping")
    if "excludes" in out and not (isinstance(out["excludes"], list)
                                  and all(isinstance(v, str) for v in out["excludes"])):
        raise ValueError(f"--runtime-env {path}: excludes must be a list of patterns")
    return out


# --------------------------------------------------------------------------- the session
def ensure_ray(address: str | None = None, num_cpus: int | None = None,
               runtime_env: dict[str, Any] | None = None,
               log: Callable[[str], None] | None = None) -> bool:
    """Start a local Ray or join the cluster at ``address``, unless Ray already runs here.

    When Ray is already initialised in this process it is used as it is, but a different
    ``address`` or a ``runtime_env`` it was not started with is an error (never a silent
    local run). ``log`` receives one line naming the cluster: address, nodes, CPUs, GPUs.

    Returns:
        True if this call started (or connected) Ray, so the caller shuts it down.
    Raises:
        ValueError: an unreachable address, or a conflicting running session.
    """
    import ray  # lazy: Ray (0.4 s) stays out of CLI start-up
    if ray.is_initialized():
        if address and address not in ("auto", "local") and not address.startswith("ray://"):
            current = _current_address()
            if current and _norm_address(current) != _norm_address(address):
                raise ValueError(f"Ray is already running in this process (at {current}); "
                                 f"cannot also connect to {address}")
        if runtime_env:
            raise ValueError("Ray is already running in this process; a --runtime-env can "
                             "only be applied when this command starts Ray")
        return False
    address = check_address(address)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "configure_logging": False}
    if address:
        kwargs["address"] = address
    elif num_cpus:
        kwargs["num_cpus"] = num_cpus
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray Client starts a server per connection on the head; its start-up fails now and then
    # ("Initialization failure from server"): a ray:// connection gets three tries
    tries = 3 if address and address.startswith("ray://") else 1
    for attempt in range(1, tries + 1):
        try:
            ray.init(**kwargs)
            break
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            if attempt < tries and isinstance(exc, ConnectionAbortedError):
                with contextlib.suppress(Exception):
                    ray.shutdown()
                time.sleep(2.0 * attempt)
                continue
            raise ValueError(f"cannot connect to Ray at {address or 'local'}: "
                             f"{describe_error(exc)}") from None
    if log is not None:
        log(format_cluster(cluster_summary(), address))
    return True


def _current_address() -> str | None:
    try:
        import ray  # lazy: Ray (0.4 s) stays out of CLI start-up
        return ray.get_runtime_context().gcs_address
    except Exception:
        return None


def _norm_address(address: str) -> str:
    """The port of an address: the head's IP may be reported as the node's own address
    (127.0.0.1 becomes the machine's IP), so only ports are compared."""
    return address.split("://", 1)[-1].rpartition(":")[2]


def cluster_summary() -> dict[str, Any]:
    """The joined cluster: ``{"address", "nodes": [{node_id, ip, cpus, gpus}], "cpus",
    "gpus"}`` (alive nodes only)."""
    import ray  # lazy: Ray (0.4 s) stays out of CLI start-up
    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        nodes.append({"node_id": n["NodeID"], "ip": n.get("NodeManagerAddress"),
                      "hostname": n.get("NodeManagerHostname"),
                      "cpus": float(res.get("CPU", 0.0)), "gpus": float(res.get("GPU", 0.0))})
    return {"address": _current_address(), "nodes": nodes,
            "cpus": sum(n["cpus"] for n in nodes), "gpus": sum(n["gpus"] for n in nodes)}


def format_cluster(summary: dict[str, Any], requested: str | None = None) -> str:
    """``Ray cluster at 10.0.0.1:6379: 2 nodes, 4 CPUs, 0 GPUs`` (or ``local Ray: ...``)."""
    n = len(summary["nodes"])
    gcs = summary["address"]
    if requested and requested.startswith("ray://"):
        what = f"Ray cluster at {requested} (GCS {gcs})"
    elif requested:
        what = f"Ray cluster at {gcs or requested}"
    else:
        what = f"local Ray ({gcs})"
    return (f"{what}: {n} node{'s' if n != 1 else ''}, {summary['cpus']:g} CPUs, "
            f"{summary['gpus']:g} GPUs")


def node_info() -> dict[str, Any]:
    """Where this code runs: Ray node id (None outside Ray), host name, IP and pid."""
    node_id = None
    try:
        import ray  # lazy: Ray (0.4 s) stays out of CLI start-up
        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        ip = None
    return {"node_id": node_id, "host": socket.gethostname(), "ip": ip, "pid": os.getpid()}
