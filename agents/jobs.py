"""Work on a Ray cluster: remote calls that carry their weights, one-line errors, many jobs.

* :func:`remote_call` runs a module-level function of this package as a Ray task on whatever
  node Ray picks. **Weights travel, paths do not**: the driver loads every policy once,
  pickles it (:func:`ship`) and puts it in Ray's object store; the task receives the bytes
  and unpickles them on the worker, so a worker never opens a path of the driver. The task
  wrapper is pickled *by value*, so even a node that lacks this package (or one of its
  dependencies) answers with a record that names the node and the root cause
  (``ModuleNotFoundError: No module named 'marl_fgmf'``) instead of an opaque
  ``RayTaskError``.
* :func:`run_jobs` runs many :class:`Job` s, excluding a node that keeps failing with the same
  cause (:func:`short_node` names it).
* :func:`describe_error` turns any exception a Ray call raised into one line without colour
  codes: the worker's exception type and message.

Connecting to the cluster is :mod:`agents.ray_session`'s (which re-exports these names).
"""
from __future__ import annotations

import pickle
import re
from typing import Any, Callable

from agents.threads import apply_thread_budget

__all__ = ["Job", "SHIPPED", "describe_error", "get_result", "remote_call", "run_jobs",
           "set_threads", "ship", "short_node"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def set_threads(num_cpus: float) -> int:
    """Torch intra-op (and OpenMP) threads = the CPUs Ray gave this task, never more than the
    machine has; returns the count (:func:`agents.threads.apply_thread_budget`)."""
    return apply_thread_budget(num_cpus)


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
    import ray  # lazy: Ray (0.4 s) stays out of CLI start-up
    return ray.put((SHIPPED, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)))


def _make_node_call() -> Callable[..., dict[str, Any]]:
    """The task body, defined inside a function so that Ray (cloudpickle) ships it by value:
    it runs on a node that lacks this package and reports that as an ordinary error record."""

    def node_call(module: str, name: str, num_cpus: float, spec: Any, *blobs: Any
                  ) -> dict[str, Any]:
        # lazy: this body is pickled by value and runs on a node that may lack this package:
        # it imports what it uses itself (no module globals captured), failures become records
        import importlib  # lazy: on the worker (see above)
        import os as _os  # lazy: on the worker
        import pickle as _pickle  # lazy: on the worker
        import socket as _socket  # lazy: on the worker
        import time as _time  # lazy: on the worker
        t0 = _time.perf_counter()
        node: dict[str, Any] = {"host": _socket.gethostname(), "pid": _os.getpid(),
                                "node_id": None, "ip": None}
        try:
            import ray as _ray  # lazy: on the worker
            node["node_id"] = _ray.get_runtime_context().get_node_id()
            node["ip"] = _ray.util.get_node_ip_address()
        except Exception:
            pass
        try:
            session = importlib.import_module("agents.jobs")
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
    import ray  # lazy: Ray (0.4 s) stays out of CLI start-up
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
    import ray  # lazy: Ray (0.4 s) stays out of CLI start-up
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
             on_done: Callable[[Job, dict[str, Any]], None] | None = None,
             node_id: str | None = None) -> list[str]:
    """Run ``jobs`` as Ray tasks (:func:`remote_call`), at most ``limit`` in flight, in order.

    Ray places the tasks. A node whose last ``max_node_failures`` tasks all failed with the
    same cause is **excluded** while another node is healthy: it gets no more work (the
    remaining tasks are pinned to the healthy nodes with Ray's node-affinity strategy), its
    failed tasks are submitted again once, elsewhere, and ``log`` names the node and the
    cause. ``node_id`` pins every task to that node instead (jobs that write the driver's
    files: the benchmark's trainings). ``on_result(job, result)`` gets every successful
    result (``result["node"]`` says where it ran); ``on_done`` every finished task,
    successful or not (progress bars).

    Returns:
        The failures left, one line each: ``<title> failed on node <id> (<ip>): Type: message``.
    """
    import ray  # lazy: Ray (0.4 s) stays out of CLI start-up
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # lazy: Ray

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
        if node_id is not None:
            nodes = {node_id: 1.0}
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
