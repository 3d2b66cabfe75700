"""``marl-fgmf demo --budget tiny`` end to end, as a user runs it, and its rerun reusing work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest


def _demo(out, env, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marl_fgmf.cli", "demo", "--out", str(out),
                           "--budget", "tiny", "--quiet"], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.slow
def test_demo_tiny_end_to_end_and_rerun_reuses(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rt"), "OMP_NUM_THREADS": "1"}
    proc = _demo(out, env)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    # progress all along, the five steps in order
    steps = [line for line in proc.stdout.splitlines() if line.startswith("[demo ")]
    for i in range(1, 6):
        assert any(line.startswith(f"[demo {i}/5") for line in steps), proc.stdout
    assert "rank" in proc.stdout and "robust@8/255" in proc.stdout, "leaderboard not printed"

    report = (out / "report.md").read_text()
    for section in ("## 1. Training", "## 2. Tournament and leaderboard",
                    "## 3. Gradient-masking audit", "## 4. Explanation"):
        assert section in report
    state = json.loads((out / "demo_state.json").read_text())
    defended = "fgmf"  # no fallback: the defended team is FGMF or the demo fails
    assert set(state["runs"]) == {"none", "fgmf"}
    matches = (out / "tournament" / "matches.jsonl").read_text().splitlines()
    # 2 defenders x (4 attackers x 2 eps + clean), and BPDA + EOT x 2 eps through FGMF's SGAM
    # input filter, which the tournament adds because the config lists no adaptive attacker
    assert len(matches) == 2 * (4 * 2 + 1) + 2 * 2
    records = [json.loads(line) for line in matches]
    added = sorted((r["defender"], r["attacker"]) for r in records if r["added"])
    assert added == [(defended, "bpda")] * 2 + [(defended, "eot")] * 2
    assert all(len(r["team_returns"]) == r["episodes"] for r in records)
    board = json.loads((out / "tournament" / "leaderboard.json").read_text())
    assert board["complete"] and {r["defender"] for r in board["defenders"]} == {"none", defended}
    assert board["eps"] == ["4/255", "8/255"]
    assert board["attackers"] == ["fgsm", "pgd", "square", "random"]
    assert board["added_attackers"] == ["bpda", "eot"]
    rows = {r["defender"]: r for r in board["defenders"]}
    assert rows[defended]["added"] == ["bpda", "eot"] and rows["none"]["added"] == []
    for row in board["defenders"]:  # the robust return is the worst cell, and ranks follow it
        cells = row["cells"]["8/255"]
        assert row["robust"]["8/255"]["mean"] == min(c["mean"] for c in cells.values())
    robust = [r["robust"]["8/255"]["mean"] for r in board["defenders"]]
    assert robust == sorted(robust, reverse=True)
    for name in ("audit_none.json", f"audit_{defended}.json", "heatmap_eps8_255.png",
                 "robust_vs_eps.png", "report.md"):
        assert (out / "tournament" / name).is_file(), name
    explain = state["explain"]
    assert explain["status"] == "ok" and explain["files"], explain
    assert any(f.endswith(".gif") for f in explain["files"]), explain["files"]

    # a rerun reuses the trained teams and every finished match
    again = _demo(out, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "none: reused" in again.stdout and f"{defended}: reused" in again.stdout
    assert "resuming: 22 of 22 matches already finished" in again.stdout
    assert (out / "tournament" / "matches.jsonl").read_text().splitlines() == matches
