"""Shared fixtures: one Ray session per test run (ray.init costs seconds), in a temp dir."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Respect OMP_NUM_THREADS (a loaded machine); otherwise use up to two intra-op threads.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small tensors (two threads on a busy 2-core machine
    spin-wait and run an order of magnitude slower); the previous setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for the whole session under its own temporary directory."""
    import ray

    tmp = tempfile.mkdtemp(prefix="marlfgmf-ray-")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=tmp, configure_logging=False)
    yield ray
    ray.shutdown()
