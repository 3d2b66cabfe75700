"""The Ray session: connecting to a cluster, shipping code and weights, naming failures.

One place for everything the toolkit does with Ray itself (RLlib's own use of Ray stays in
:mod:`agents.train`):

* :func:`check_address` and :func:`load_runtime_env` validate ``--address`` and
  ``--runtime-env FILE`` before anything is written (an unreachable address, a ``ray://``
  address without Ray Client support, a runtime-env file that does not parse or names unknown
  keys: one-line ``ValueError``).
* :func:`ensure_ray` starts a local Ray or joins a cluster (with the runtime env) and says
  which: address, nodes, CPUs and GPUs (:func:`cluster_summary`).
* :func:`remote_call` runs a module-level function of this package as a Ray task on whatever
  node Ray picks. **Weights travel, paths do not**: the driver loads every policy once,
  pickles it (:func:`ship`) and puts it in Ray's object store; the task receives the bytes
  and unpickles them on the worker, so a worker never opens a path of the driver. The task
  wrapper is pickled *by value*, so even a node that lacks this package (or one of its
  dependencies) answers with a record that names the node and the root cause
  (``ModuleNotFoundError: No module named 'marl_fgmf'``) instead of an opaque
  ``RayTaskError``.
* :func:`describe_error` turns any exception a Ray call raised into one line without colour
  codes: the worker's exception type and message.

On a cluster every node needs this package and its dependencies importable: a shared install,
``--runtime-env`` (Ray ships ``py_modules``/``working_dir``/``pip`` to each node), or a
container image that has it (see the README, "On a cluster").
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "Job", "RUNTIME_ENV_KEYS", "check_address", "cluster_summary", "describe_error",
    "ensure_ray", "format_cluster", "get_result", "load_runtime_env", "node_info",
    "remote_call", "run_jobs", "set_threads", "ship", "short_node",
]

RUNTIME_ENV_KEYS = ("working_dir", "py_modules", "pip", "uv", "conda", "env_vars", "excludes",
                    "image_uri", "config")
"""The ``runtime_env`` fields accepted in ``--runtime-env FILE`` (Ray's own names)."""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
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
        import importlib.util
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
            import yaml
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
    import ray
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
        import ray
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
    import ray
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
        import ray
        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        ip = None
    return {"node_id": node_id, "host": socket.gethostname(), "ip": ip, "pid": os.getpid()}


def set_threads(num_cpus: float) -> int:
    """Torch intra-op (and OpenMP) threads = the CPUs Ray gave this task, never more than the
    machine has; returns the count."""
    import torch
    n = max(1, min(int(num_cpus), os.cpu_count() or 1))
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n


def describe_error(exc: BaseException) -> str:
    """One line for an exception raised by a Ray call: the root cause's type and message,
    without Ray's colour codes or traceback (``RayTaskError`` -> its ``cause``)."""
    cause = exc
    for _ in range(5):
        inner = getattr(cause, "cause", None)
        if not isinstance(inner, BaseException) or inner is cause:
            break
        cause = inner
    text = _ANSI.sub("", str(cause)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if cause is exc and lines and lines[0].startswith("ray::"):
        # a RayTaskError without a usable cause: its last line is "Type: message"
        lines = lines[-1:]
    elif len(lines) > 1 and lines[0].endswith(":"):
        # "Initialization failure from server:" + a server-side traceback: keep the headline
        # and the traceback's last line (the server's exception)
        lines = [f"{lines[0]} {lines[-1]}"]
    message = lines[0] if lines else ""
    name = type(cause).__name__
    return f"{name}: {message}" if message and not message.startswith(name) else (message or name)


# --------------------------------------------------------------------------- remote calls
SHIPPED = "marl-fgmf/shipped"
"""Tag of the ``(tag, pickled bytes)`` pairs :func:`ship` puts in the object store."""


def ship(obj: Any) -> Any:
    """Put ``obj`` (a policy, a dict of policies, an attack) into Ray's object store as
    ``(SHIPPED, pickled bytes)``; pass the returned reference to :func:`remote_call`.
    Unpickled on the worker inside the task, so a node that cannot import its classes reports
    that as the task's error."""
    import ray
    return ray.put((SHIPPED, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)))


def _make_node_call() -> Callable[..., dict[str, Any]]:
    """The task body, defined inside a function so that Ray (cloudpickle) ships it by value:
    it runs on a node that lacks this package and reports that as an ordinary error record."""

    def node_call(module: str, name: str, num_cpus: float, spec: Any, *blobs: Any
                  ) -> dict[str, Any]:
        import importlib
        import os as _os
        import pickle as _pickle
        import socket as _socket
        import time as _time
        t0 = _time.perf_counter()
        node: dict[str, Any] = {"host": _socket.gethostname(), "pid": _os.getpid(),
                                "node_id": None, "ip": None}
        try:
            import ray as _ray
            node["node_id"] = _ray.get_runtime_context().get_node_id()
            node["ip"] = _ray.util.get_node_ip_address()
        except Exception:
            pass
        try:
            session = importlib.import_module("agents.ray_session")
            session.set_threads(num_cpus)
            fn = getattr(importlib.import_module(module), name)
            objects = [_pickle.loads(b[1]) if isinstance(b, tuple) and len(b) == 2
                       and b[0] == session.SHIPPED else b for b in blobs]
            value = fn(spec, *objects)
            return {"status": "ok", "value": value, "node": node,
                    "wall_s": _time.perf_counter() - t0}
        except Exception as exc:
            text = str(exc).strip()
            first = text.splitlines()[0] if text else ""
            return {"status": "error", "error": f"{type(exc).__name__}: {first}".rstrip(": "),
                    "node": node, "wall_s": _time.perf_counter() - t0}

    return node_call


_NODE_CALL = None


def remote_call(fn: Callable[..., Any], spec: Any, *shipped: Any, num_cpus: float = 1.0,
                scheduling_strategy: Any = None, max_retries: int = 1) -> Any:
    """Submit ``fn(spec, *objects)`` as a Ray task; returns its ``ObjectRef``.

    ``fn`` is a module-level function of this package (imported on the worker by name);
    ``spec`` is plain data; ``shipped`` are references from :func:`ship` (unpickled in the
    task) or plain values (passed as they are). The task's result is ``{"status": "ok", "value", "node", "wall_s"}`` or
    ``{"status": "error", "error": "Type: message", "node", "wall_s"}``, where ``node`` holds
    the Ray node id, host, IP and pid that ran it. ``torch`` uses ``num_cpus`` threads there.
    """
    global _NODE_CALL
    import ray
    if _NODE_CALL is None:
        _NODE_CALL = ray.remote(_make_node_call())
    opts: dict[str, Any] = {"num_cpus": num_cpus, "max_retries": max_retries}
    if scheduling_strategy is not None:
        opts["scheduling_strategy"] = scheduling_strategy
    return _NODE_CALL.options(**opts).remote(fn.__module__, fn.__name__, num_cpus, spec,
                                             *shipped)


def get_result(ref: Any) -> dict[str, Any]:
    """``ray.get`` of a :func:`remote_call` reference; a system failure (worker crash, node
    lost, cancelled) becomes an error record with the root cause on one line."""
    import ray
    try:
        return ray.get(ref)
    except Exception as exc:
        node = {"node_id": None, "host": None, "ip": getattr(exc, "ip", None),
                "pid": getattr(exc, "pid", None)}
        return {"status": "error", "error": describe_error(exc), "node": node, "wall_s": 0.0}


# --------------------------------------------------------------------------- many jobs
class Job:
    """One unit of work for :func:`run_jobs`: ``fn(spec, *shipped)`` on some node."""

    __slots__ = ("fn", "spec", "shipped", "title", "tag", "attempts")

    def __init__(self, fn: Callable[..., Any], spec: Any, shipped: tuple = (), title: str = "",
                 tag: Any = None):
        self.fn, self.spec, self.shipped, self.title, self.tag = fn, spec, tuple(shipped), title, tag
        self.attempts = 0


def short_node(node: dict[str, Any] | None) -> str:
    """``node 3f2a1b9c (10.0.0.2)``: the first 8 hex digits of the Ray node id and its IP."""
    node = node or {}
    nid = node.get("node_id")
    where = node.get("ip") or node.get("host")
    if not nid:
        return f"an unknown node ({where})" if where else "an unknown node"
    return f"node {nid[:8]}" + (f" ({where})" if where else "")


def run_jobs(jobs: list[Job], *, num_cpus: float = 1.0, limit: int | None = None,
             on_result: Callable[[Job, dict[str, Any]], None],
             log: Callable[[str], None] | None = None, max_node_failures: int = 3,
             on_done: Callable[[Job, dict[str, Any]], None] | None = None) -> list[str]:
    """Run ``jobs`` as Ray tasks (:func:`remote_call`), at most ``limit`` in flight, in order.

    Ray places the tasks. A node whose last ``max_node_failures`` tasks all failed with the
    same cause is **excluded** while another node is healthy: it gets no more work (the
    remaining tasks are pinned to the healthy nodes with Ray's node-affinity strategy), its
    failed tasks are submitted again once, elsewhere, and ``log`` names the node and the
    cause. ``on_result(job, result)`` gets every successful result (``result["node"]`` says
    where it ran); ``on_done`` every finished task, successful or not (progress bars).

    Returns:
        The failures left, one line each: ``<title> failed on node <id> (<ip>): Type: message``.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    log = log or (lambda msg: None)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    limit = limit or max(1, int(cpus // num_cpus))
    queue = list(jobs)
    in_flight: dict[Any, tuple[Job, str | None]] = {}
    streak: dict[str, tuple[str, int]] = {}  # node id -> (cause, failures in a row)
    held: dict[str, list[tuple[Job, dict[str, Any]]]] = {}  # failures not yet reported
    excluded: dict[str, str] = {}

    def healthy_nodes() -> dict[str, float]:
        return {n["NodeID"]: float(n.get("Resources", {}).get("CPU", 0.0))
                for n in ray.nodes() if n.get("Alive") and n["NodeID"] not in excluded
                and float(n.get("Resources", {}).get("CPU", 0.0)) >= num_cpus}

    def submit(job: Job, nodes: dict[str, float] | None) -> None:
        """``nodes``: the healthy nodes while some are excluded (None: Ray places the task)."""
        strategy, pinned = None, None
        if nodes:  # pinned to the least loaded healthy node
            load = {nid: 0 for nid in nodes}
            for _, where in in_flight.values():
                if where in load:
                    load[where] += 1
            pinned = min(nodes, key=lambda nid: (load[nid] / max(nodes[nid], 1e-9), nid))
            strategy = NodeAffinitySchedulingStrategy(node_id=pinned, soft=False)
        job.attempts += 1
        ref = remote_call(job.fn, job.spec, *job.shipped, num_cpus=num_cpus,
                          scheduling_strategy=strategy)
        in_flight[ref] = (job, pinned)

    try:
        while queue or in_flight:
            nodes = healthy_nodes() if excluded else None  # one GCS query per round
            capacity = limit if nodes is None else max(
                1, min(limit, int(sum(nodes.values()) // num_cpus)))
            while queue and len(in_flight) < capacity:
                submit(queue.pop(0), nodes)
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                job, _ = in_flight.pop(ref)
                result = get_result(ref)
                if on_done is not None:
                    on_done(job, result)
                nid = (result.get("node") or {}).get("node_id") or "unknown"
                if result.get("status") == "ok":
                    streak.pop(nid, None)
                    on_result(job, result)
                    continue
                cause = str(result.get("error"))
                last, count = streak.get(nid, (None, 0))
                streak[nid] = (cause, count + 1 if last == cause else 1)
                held.setdefault(nid, []).append((job, result))
                if (nid != "unknown" and nid not in excluded
                        and streak[nid][1] >= max_node_failures
                        and len(healthy_nodes()) > 1):
                    excluded[nid] = cause
                    again = [j for j, _ in held[nid] if j.attempts < 2]
                    held[nid] = [(j, r) for j, r in held[nid] if j.attempts >= 2]
                    log(f"{short_node(result.get('node'))} excluded after {streak[nid][1]} "
                        f"failed tasks in a row ({cause}); {len(again)} task(s) go to the "
                        f"other nodes")
                    queue[:0] = again
    finally:
        for ref in in_flight:  # Ctrl-C, a crash: do not leave work running on the cluster
            try:
                ray.cancel(ref, force=True)
            except Exception:
                pass
    return [f"{job.title} failed on {short_node(r.get('node'))}: {r.get('error')}"
            for failures in held.values() for job, r in failures]
