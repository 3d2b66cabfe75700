"""The cost scripts run: gpu_check skips on a CPU machine with one line and exit 0, and its
per-defence check passes on the CPU learner; profile_learner times every part."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_gpu_check_skips_on_cpu_with_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: skipped, no CUDA device here")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_gpu_check_iteration_and_profile_on_the_cpu_learner(ray_session):
    import gpu_check
    import profile_learner

    check = gpu_check.one_iteration("fgmf", 3, num_gpus=0.0)
    assert check["ok"], check
    assert check["learner_device"] == "cpu" and check["terms"]["scorpio"] > 0
    assert check["terms"]["sgam"] is not None
    config = profile_learner.profile_config("cnn", 2, ["none", "fgmf"], repeats=1,
                                            train_batch=128, minibatch=64, num_epochs=1)
    rows = {r["defense"]: r for r in config["rows"]}
    assert rows["none"]["ratio"] == 1.0 and rows["fgmf"]["sgd_steps"] == 2
    fgmf = rows["fgmf"]["per_step_ms"]
    assert set(fgmf) == set(profile_learner.PARTS)
    for part in ("backward", "optimizer", "scorpio subspace", "scorpio R", "sgam distill"):
        assert fgmf[part] > 0, part
    assert rows["none"]["per_step_ms"]["scorpio R"] == 0 and fgmf["adv"] == 0
    # the parts add up to the update's wall time
    assert abs(sum(fgmf.values()) * 2 / 1e3 - rows["fgmf"]["update_s"]) < 1e-6
