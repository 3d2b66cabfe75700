"""A real multi-node Ray cluster on one machine, for tests, benchmarks and trying the cluster
path without a second machine.

Every node is a separate ``ray start`` process tree (a raylet with its own object store),
exactly as on a cluster; the head listens on ``127.0.0.1:PORT``. A node started with
``hide=[paths]`` runs in a private mount namespace (``unshare -m``, Linux, root) with an empty
tmpfs mounted over each path: it cannot see what the driver keeps there (checkpoints, run
directories), which is how a cluster without a shared filesystem behaves::

    with LocalCluster(nodes=2, hide=[run_dir]) as cluster:
        subprocess.run(["marl-fgmf", "tournament", ..., "--address", cluster.address])

Only the processes of this cluster are stopped on exit (found by its own temp dir); other
Ray sessions on the machine are left alone.
"""
from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

__all__ = ["LocalCluster", "can_hide_paths", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def can_hide_paths() -> bool:
    """Whether this machine can start a node in a private mount namespace (root + unshare)."""
    if shutil.which("unshare") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


class LocalCluster:
    """``nodes`` raylets with ``cpus`` CPUs each; ``hide`` paths are invisible to every node
    but the head (``hide_on`` picks the node indices, default all but the head). ``token``:
    the cluster's auth token (default: a new random one); a driver process caches the token
    it first used, so give successive clusters of one driver the same token."""

    def __init__(self, nodes: int = 2, cpus: int = 1, hide: Sequence[str | os.PathLike] = (),
                 hide_on: Sequence[int] | None = None, env: dict[str, str] | None = None,
                 startup_timeout_s: float = 60.0, token: str | None = None,
                 client_server: bool = False):
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        self.nodes = nodes
        self.cpus = cpus
        self.hide = [str(Path(p).resolve()) for p in hide]
        self.hide_on = set(range(1, nodes) if hide_on is None else hide_on)
        self.timeout = startup_timeout_s
        self.port = free_port()
        # short: Ray's socket paths must stay under 108 characters
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        self.address = f"127.0.0.1:{self.port}"
        # with ray[client] installed every head starts a client server (on 10001 unless told
        # otherwise): give each cluster its own port so that clusters can run side by side
        if client_server and importlib.util.find_spec("grpc") is None:
            raise RuntimeError("client_server=True needs Ray Client: pip install 'ray[client]'")
        self._wait_client = client_server
        self.client_port = free_port() if importlib.util.find_spec("grpc") else None
        self.client_address = (f"ray://127.0.0.1:{self.client_port}" if client_server
                               else None)
        """``ray://`` address of the head's Ray Client server (``client_server=True``)."""
        # Ray's token authentication, with this cluster's own token: every node and every
        # driver must present it (``driver_env``), as on a real cluster
        token_value, token = token, Path(self.temp_dir) / "auth_token"
        token.write_text(token_value or secrets.token_hex(32))
        token.chmod(0o600)
        self.driver_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                           "RAY_USAGE_STATS_ENABLED": "0"}
        """Environment variables a driver needs to join this cluster (``{**os.environ,
        **cluster.driver_env}``)."""
        self.env = {**os.environ, **self.driver_env, **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self._ray = str(Path(sys.executable).with_name("ray"))
        if not Path(self._ray).exists():
            self._ray = shutil.which("ray") or "ray"

    def _start(self, index: int) -> None:
        common = [f"--num-cpus={self.cpus}", "--num-gpus=0", "--disable-usage-stats"]
        if index == 0:
            cmd = [self._ray, "start", "--head", f"--port={self.port}",
                   "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
                   "--include-dashboard=false", *common]
            if self.client_port is not None:
                cmd.append(f"--ray-client-server-port={self.client_port}")
        else:
            cmd = [self._ray, "start", f"--address={self.address}",
                   "--node-ip-address=127.0.0.1", *common]
        if index in self.hide_on and self.hide:
            mounts = " && ".join(f"mount -t tmpfs tmpfs '{p}'" for p in self.hide)
            cmd = ["unshare", "-m", "sh", "-c", f"{mounts} && exec " +
                   " ".join(f"'{c}'" for c in cmd)]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                              timeout=self.timeout)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"ray start (node {index}) failed: {' | '.join(tail)}")

    def start(self) -> "LocalCluster":
        try:
            for i in range(self.nodes):
                self._start(i)
            if self._wait_client:  # the client server starts after `ray start`
                deadline = time.time() + self.timeout
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", self.client_port), 1).close()
                        break
                    except OSError:
                        if time.time() > deadline:
                            raise RuntimeError("the Ray Client server did not start") from None
                        time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop this cluster's processes (SIGTERM, then SIGKILL) and remove its temp dir."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self._pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.time() + 5
            while time.time() < deadline and self._pids():
                time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _pids(self) -> list[int]:
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
            except OSError:
                continue
            if self.temp_dir in cmdline or f"127.0.0.1:{self.port}" in cmdline or (
                    self.client_port is not None and f"{self.client_port}" in cmdline
                    and "ray_client_server" in cmdline):
                out.append(int(entry.name))
        return out

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
