"""A real multi-node Ray cluster without a shared filesystem (issue: weights travel, paths do
not), started by the tests themselves: ``ray start`` processes on one machine, the worker
node in a private mount namespace where the test's folder (runs, checkpoints, outputs) is an
empty tmpfs. Every driver is the real CLI in a subprocess, as a user runs it.

Marked ``cluster`` (CI runs it: plain ``python -m pytest`` runs every marker). Skipped with a
reason only where this machine cannot start a node in a private mount namespace (needs root
and ``unshare``)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import marl_fgmf
from agents.local_cluster import LocalCluster, can_hide_paths, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow,
              pytest.mark.skipif(not can_hide_paths(), reason="needs root and unshare -m to "
                                 "start a node that cannot see the driver's files")]

TINY = ["--train-batch-size", "200", "--minibatch-size", "100", "--num-epochs", "1",
        "--num-envs-per-env-runner", "2", "--quiet"]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marl_fgmf.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def local_env() -> dict[str, str]:
    """A driver that starts its own local Ray (never the test cluster)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rt"), "OMP_NUM_THREADS": "1"}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def error_lines(stderr: str) -> list[str]:
    """stderr without the lines Ray's C++ core prints on its own (timestamped ``[...]``)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("[")]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The driver's folder; the cluster's second node cannot see it."""
    return tmp_path_factory.mktemp("driver_files")


@pytest.fixture(scope="module")
def cluster(shared):
    with LocalCluster(nodes=2, cpus=1, hide=[shared], client_server=True) as c:
        c.env_for_driver = {**os.environ, **c.driver_env, "OMP_NUM_THREADS": "1"}
        yield c


@pytest.fixture(scope="module")
def trained(cluster, shared) -> Path:
    """A beacon run trained ON the cluster with two env runners (one CPU per node, so one
    runner per node), one iteration, then resumed to two."""
    run = shared / "ppo"
    first = cli("train", "--env", "beacon", "--iterations", "1", "--num-env-runners", "2",
                "--out", str(run), "--address", cluster.address, *TINY,
                env=cluster.env_for_driver)
    assert first.returncode == 0, error_lines(first.stderr)[-5:]
    assert "Ray cluster at" in first.stdout and ": 2 nodes, 2 CPUs" in first.stdout, first.stdout
    second = cli("train", "--env", "beacon", "--iterations", "2", "--num-env-runners", "2",
                 "--out", str(run), "--address", cluster.address, "--resume", *TINY,
                 env=cluster.env_for_driver)
    assert second.returncode == 0, error_lines(second.stderr)[-5:]
    return run


def test_train_with_env_runners_on_both_nodes_and_resume(trained):
    rows = json.loads((trained / "metrics.json").read_text())
    assert [r["iteration"] for r in rows] == [1, 2], "resume must continue, not restart"
    assert rows[1]["env_steps"] > rows[0]["env_steps"] > 0
    assert (trained / "checkpoints" / "iter_00002").is_dir()


@pytest.fixture(scope="module")
def adversary(cluster, trained, shared) -> Path:
    """A PA-AD adversary trained on the cluster with two env runners: the victim's checkpoint
    is invisible to the second node, so its env runner needs the victim's weights shipped."""
    out = shared / "paad"
    run = cli("train-adversary", "--victim", str(trained), "--mode", "pa-ad", "--eps", "8/255",
              "--iterations", "1", "--num-env-runners", "2", "--eval-episodes", "0",
              "--train-batch-size", "200", "--minibatch-size", "100", "--num-epochs", "1",
              "--num-envs-per-env-runner", "2", "--out", str(out), "--address",
              cluster.address, "--quiet", env=cluster.env_for_driver)
    assert run.returncode == 0, error_lines(run.stderr)[-5:]
    return out


def test_train_adversary_on_both_nodes_without_the_victims_files(adversary):
    rows = json.loads((adversary / "metrics.json").read_text())
    assert len(rows) == 1 and rows[0]["env_steps"] > 0


def tournament_config(path: Path, run: Path, adversary: Path | None = None) -> Path:
    learned = [] if adversary is None else [{"name": "paad", "adversary": str(adversary)}]
    conf = {"name": "cluster", "defenders": [{"name": "ppo", "checkpoint": str(run)}],
            "attackers": ["fgsm", "random", {"name": "pgd3", "attack": "pgd",
                                             "settings": {"steps": 3}}, *learned],
            "eps": ["4/255", "8/255"], "episodes": 1, "seeds": [0, 1],
            "audit": {"n_obs": 8, "episodes": 1, "steps": [1, 2], "restarts": [1, 2],
                      "n_queries": 10}}
    path.write_text(json.dumps(conf))
    return path


DRIVER = """
import json, shutil, sys
from marl_fgmf.tournament import TournamentConfig, run_tournament
cfg_path, out, address, hidden = sys.argv[1:5]
cfg = TournamentConfig.from_file(cfg_path)
def log(msg):
    print(msg, flush=True)
    if msg.startswith("loaded ") and "object store" in msg:
        # the driver has loaded the defenders: from now on no checkpoint path exists anywhere
        for d in cfg.defenders:
            shutil.move(str(d.checkpoint), hidden)
            print(f"moved {d.checkpoint} away", flush=True)
run_tournament(cfg, out, address=address, progress=False, log=log)
"""


def test_tournament_on_two_nodes_equals_local_and_needs_no_checkpoint_files(
        cluster, trained, adversary, shared, tmp_path):
    cfg = tournament_config(shared / "t.json", trained, adversary)
    local = cli("tournament", "--config", str(cfg), "--out", str(shared / "local"), "--quiet",
                env=local_env())
    assert local.returncode == 0, error_lines(local.stderr)[-5:]

    away = tmp_path / "away"
    away.mkdir()
    out = shared / "on-cluster"
    run = subprocess.run([sys.executable, "-c", DRIVER, str(cfg), str(out), cluster.address,
                          str(away)], capture_output=True, text=True, timeout=600,
                         env=cluster.env_for_driver)
    assert run.returncode == 0, error_lines(run.stderr)[-5:]
    assert "moved" in run.stdout and not trained.exists(), "the checkpoint must be gone"
    assert "Ray cluster at" in run.stdout and "2 nodes" in run.stdout

    records = {r["key"]: r for r in jsonl(out / "matches.jsonl")}
    reference = {r["key"]: r for r in jsonl(shared / "local" / "matches.jsonl")}
    assert set(records) == set(reference) and len(records) == 2 + 4 * 2 * 2
    nodes = {r["node_id"] for r in records.values()}
    assert len(nodes) == 2 and None not in nodes, "matches must run on both nodes"
    for key, rec in records.items():
        assert rec["team_returns"] == reference[key]["team_returns"], key
        assert rec["success_rate"] == pytest.approx(reference[key]["success_rate"]), key
    audit = json.loads((out / "audit_ppo.json").read_text())
    assert audit["status"] == "ok" and audit["node_id"] in nodes
    report = (out / "report.md").read_text()
    assert "## Ray nodes" in report and all(n in report for n in nodes)
    board = json.loads((out / "leaderboard.json").read_text())
    assert {n["node_id"] for n in board["nodes"]} == nodes
    shutil.move(str(away / trained.name), str(trained))  # back, for the tests after this one


def test_ray_client_address(cluster, trained, tmp_path):
    """``--address ray://`` (the 'cluster' extra, installed with the test extra): the same
    tournament through Ray Client, on both nodes."""
    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps({"defenders": [{"name": "ppo", "checkpoint": str(trained)}],
                               "attackers": ["fgsm", "random"], "eps": ["8/255"],
                               "episodes": 1, "seeds": [0, 1], "audit": False}))
    out = tmp_path / "out"
    run = cli("tournament", "--config", str(cfg), "--out", str(out), "--address",
              cluster.client_address, "--quiet", env=cluster.env_for_driver)
    assert run.returncode == 0, error_lines(run.stderr)[-5:]
    assert f"Ray cluster at {cluster.client_address}" in run.stdout and "2 nodes" in run.stdout
    records = jsonl(out / "matches.jsonl")
    assert len(records) == 2 + 2 * 2 and all(r["node_id"] for r in records)


def test_node_without_the_package_is_named_excluded_and_its_work_replayed(trained, tmp_path):
    """A node that cannot import marl_fgmf (its folder hidden there): its tasks fail with the
    root cause on one line, it gets no more work after 3 failures in a row, the tournament
    completes on the other node."""
    package = Path(marl_fgmf.__file__).resolve().parent
    cfg = tournament_config(tmp_path / "t.json", trained)
    data = json.loads(cfg.read_text())
    data["audit"] = False
    data["seeds"] = [0, 1, 2]
    cfg.write_text(json.dumps(data))
    with LocalCluster(nodes=2, cpus=1, hide=[package]) as broken:
        env = {**os.environ, **broken.driver_env, "OMP_NUM_THREADS": "1"}
        out = tmp_path / "out"
        run = cli("tournament", "--config", str(cfg), "--out", str(out), "--address",
                  broken.address, "--quiet", env=env)
        # the recipe for nodes without the package: ship it with --runtime-env
        runtime_env = tmp_path / "runtime_env.yaml"
        runtime_env.write_text(f"py_modules: ['{package}']\n")
        shipped = cli("tournament", "--config", str(cfg), "--out", str(tmp_path / "shipped"),
                      "--address", broken.address, "--runtime-env", str(runtime_env),
                      "--quiet", env=env)
        # training with an env runner on that node stops with the cause (not exit 0 with a
        # runner "taken out of service")
        train = cli("train", "--env", "beacon", "--iterations", "1", "--num-env-runners", "2",
                    "--out", str(tmp_path / "run"), "--address", broken.address, *TINY,
                    env=env)
    assert train.returncode == 1, train.stderr[-2000:]
    failed = [ln for ln in error_lines(train.stderr) if ln.startswith("marl-fgmf train: failed:")]
    assert len(failed) == 1 and "No module named 'marl_fgmf" in failed[0], train.stderr[-2000:]
    assert "Traceback" not in train.stderr
    lines = run.stdout.splitlines()
    excluded = [ln for ln in lines if "excluded after" in ln]
    assert run.returncode == 0, error_lines(run.stderr)[-5:]
    assert len(excluded) == 1, lines
    assert "ModuleNotFoundError: No module named 'marl_fgmf" in excluded[0]
    assert "\x1b[" not in run.stdout + run.stderr, "no colour codes"
    records = jsonl(out / "matches.jsonl")
    assert len(records) == 3 + 3 * 2 * 3
    assert len({r["node_id"] for r in records}) == 1, "only the healthy node plays"

    assert shipped.returncode == 0, error_lines(shipped.stderr)[-5:]
    assert "excluded" not in shipped.stdout
    records = jsonl(tmp_path / "shipped" / "matches.jsonl")
    assert len({r["node_id"] for r in records}) == 2, "with the code shipped both nodes play"


# ---------------------------------------------------------------------- bad input, no cluster
@pytest.mark.parametrize("command", ["train", "tournament", "attack", "audit",
                                     "train-adversary"])
def test_unreachable_address_one_line_exit_2_nothing_written(command, trained, tmp_path):
    port = free_port()
    out = tmp_path / "out"
    cfg = tournament_config(tmp_path / "t.json", trained)
    args = {"train": ["train", "--env", "beacon", "--out", str(out)],
            "tournament": ["tournament", "--config", str(cfg), "--out", str(out)],
            "attack": ["attack", "--checkpoint", str(trained), "--attack", "fgsm",
                       "--out", str(out / "a.json")],
            "audit": ["audit", "--checkpoint", str(trained), "--out", str(out / "a.json")],
            "train-adversary": ["train-adversary", "--victim", str(trained), "--out", str(out)],
            }[command]
    run = cli(*args, "--address", f"127.0.0.1:{port}", env=local_env(), timeout=120)
    assert run.returncode == 2, run.stderr
    lines = error_lines(run.stderr)
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "ray start" in lines[0], lines
    assert "Traceback" not in run.stderr
    assert not out.exists(), "nothing may be written"
