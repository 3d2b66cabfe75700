"""Training runs are never destroyed, and every setting is checked before anything is written.

Resume from a missing or dangling ``checkpoints/latest``, damaged metrics files
(``metrics.jsonl`` is the append-only source, ``metrics.json``/``.csv`` are rebuilt), the run
lock, ``--out`` into a folder of user files, SIGKILL mid-run, bad settings (flags, env
settings, a hand-edited ``run.json``) and an iteration in which no episode ended. Each failure
case asserts the exit code or exception, ONE line naming the bad value, no traceback, and where
nothing may change the run directory's content hash.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from agents.checkpoint import latest_checkpoint
from agents.train import (TrainConfig, flatten_result, append_metrics, read_metrics,
                          resume_checkpoint, train, write_metric_views)
from conftest import tree_hash
from marl_fgmf.cli import main
from marl_fgmf.io import DirLock

TINY = dict(env="beacon", train_batch_size=200, minibatch_size=100, num_epochs=1,
            num_envs_per_env_runner=2)
TINY_ARGS = ["--train-batch-size", "200", "--minibatch-size", "100", "--num-epochs", "1",
             "--num-envs-per-env-runner", "2", "--quiet"]


def call(capsys, *argv: str) -> tuple[int, list[str]]:
    """``marl-fgmf ARGV`` in this process: (exit code, non-empty stderr lines)."""
    capsys.readouterr()
    code = main(list(argv))
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def one_line(lines: list[str], *needles: str) -> None:
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def logged_iterations(out: Path) -> dict[str, list[int]]:
    """The iterations in each metrics file of a run, in file order."""
    rows, damaged = read_metrics(out / "metrics.jsonl")
    assert not damaged, damaged
    with open(out / "metrics.csv", newline="") as fh:
        from_csv = [int(r["iteration"]) for r in csv.DictReader(fh)]
    return {"jsonl": [int(json.loads(ln)["iteration"])
                      for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()],
            "json": [r["iteration"] for r in json.loads((out / "metrics.json").read_text())],
            "csv": from_csv}


def assert_each_once(out: Path, n: int) -> None:
    expected = list(range(1, n + 1))
    assert logged_iterations(out) == {"jsonl": expected, "json": expected, "csv": expected}


def warnings_in(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("warning:")]


@pytest.fixture(scope="module")
def base_run(ray_session, tmp_path_factory):
    """Three iterations, every checkpoint kept (iter_00001..3); (run dir, its metrics rows)."""
    out = tmp_path_factory.mktemp("safety") / "run"
    train(TrainConfig(**TINY, iterations=3, keep_checkpoints=3), out, progress=False)
    rows, damaged = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2, 3] and not damaged
    assert sorted(p.name for p in (out / "checkpoints").glob("iter_*")) == [
        "iter_00001", "iter_00002", "iter_00003"]
    return out, rows


def copy_run(base_run, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base_run[0], out)
    return out


# ------------------------------------------------------------------ resume from what is there
@pytest.mark.parametrize("damage, resumed_from", [
    ("dangling", "iter_00002"),  # latest names iter_00003, which is gone
    ("missing", "iter_00003"),   # no latest file at all
])
def test_resume_without_a_usable_latest_uses_newest_complete_checkpoint(
        base_run, tmp_path, capsys, damage, resumed_from):
    out = copy_run(base_run, tmp_path)
    if damage == "dangling":
        shutil.rmtree(out / "checkpoints" / "iter_00003")
    else:
        (out / "checkpoints" / "latest").unlink()
    capsys.readouterr()
    result = train(TrainConfig(**TINY, iterations=4), out, resume=True, progress=False)
    warnings = warnings_in(capsys.readouterr().err)
    assert len(warnings) == 1, warnings
    assert "latest" in warnings[0] and resumed_from in warnings[0], warnings[0]
    assert result["last"]["iteration"] == 4
    assert latest_checkpoint(out).name == "iter_00004"
    assert_each_once(out, 4)
    kept = int(resumed_from[-1])
    assert read_metrics(out / "metrics.jsonl")[0][:kept] == base_run[1][:kept]


def test_resume_refused_when_no_complete_checkpoint_is_left(base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    for ckpt in (out / "checkpoints").glob("iter_*"):
        shutil.rmtree(ckpt)
    before = tree_hash(out)
    with pytest.raises(ValueError, match="no complete checkpoint") as info:
        train(TrainConfig(**TINY, iterations=4), out, resume=True, progress=False)
    assert "\n" not in str(info.value) and str(out) in str(info.value)
    assert "lose" in str(info.value)
    assert tree_hash(out) == before


def test_resume_of_a_run_that_saved_nothing_starts_at_iteration_1(base_run, tmp_path):
    out = tmp_path / "fresh"
    out.mkdir()
    shutil.copy(base_run[0] / "run.json", out / "run.json")  # killed before its first save
    assert resume_checkpoint(out) == (None, 0)
    train(TrainConfig(**TINY, iterations=1), out, resume=True, progress=False)
    assert_each_once(out, 1)


# ------------------------------------------------------------------ metrics files
@pytest.mark.parametrize("case", ["truncated-json", "old-run-from-csv", "old-run-from-json"])
def test_damaged_or_old_metrics_lose_no_row_on_resume(base_run, tmp_path, capsys, case):
    out = copy_run(base_run, tmp_path)
    text = (out / "metrics.json").read_text()
    if case == "truncated-json":  # the view is cut; metrics.jsonl has everything
        (out / "metrics.json").write_text(text[:len(text) // 2])
        (out / "metrics.csv").unlink()
    elif case == "old-run-from-csv":  # no metrics.jsonl (older version) and a cut metrics.json
        (out / "metrics.jsonl").unlink()
        (out / "metrics.json").write_text(text[:len(text) // 2])
    else:
        (out / "metrics.jsonl").unlink()
        (out / "metrics.csv").write_text("garbage\x00\n")
    capsys.readouterr()
    train(TrainConfig(**TINY, iterations=4), out, resume=True, progress=False)
    err = capsys.readouterr().err
    assert_each_once(out, 4)
    rows = read_metrics(out / "metrics.jsonl")[0]
    for got, want in zip(rows[:3], base_run[1]):
        assert got["env_steps"] == want["env_steps"]
        assert got["agent_return_mean"] == pytest.approx(want["agent_return_mean"], nan_ok=True)
    if case.startswith("old-run"):
        notes = [ln for ln in err.splitlines() if "metrics.jsonl" in ln]
        assert len(notes) == 1, err
        assert f"created it from metrics.{case.rsplit('-', 1)[-1]}" in notes[0], notes[0]


def test_damaged_jsonl_lines_are_reported_and_set_aside(base_run, tmp_path, capsys):
    out = copy_run(base_run, tmp_path)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    garbled = '{"iteration": 2, "env_steps": 4\x00\x00 garbage\n'
    torn = lines[2][:30]  # a write cut short: no newline
    (out / "metrics.jsonl").write_text(lines[0] + garbled + torn)
    capsys.readouterr()
    train(TrainConfig(**TINY, iterations=4), out, resume=True, progress=False)
    warnings = warnings_in(capsys.readouterr().err)
    assert len(warnings) == 1, warnings
    assert "metrics.jsonl lines 2, 3" in warnings[0] and "metrics.corrupt.txt" in warnings[0]
    kept = (out / "metrics.corrupt.txt").read_text()
    assert garbled.strip() in kept and torn in kept
    assert_each_once(out, 4)
    # rows 2 and 3 came back whole (from the checkpoints' copies): nothing was cut
    assert read_metrics(out / "metrics.jsonl")[0][:3] == base_run[1]


def test_iteration_without_a_finished_episode_gives_a_row(tmp_path):
    nan = float("nan")
    result = {"training_iteration": 7,
              "env_runners": {"num_episodes": nan, "episode_return_mean": nan,
                              "episode_len_mean": nan, "num_env_steps_sampled_lifetime": nan,
                              "num_agent_steps_sampled_lifetime": {"agent_0": 800, "agent_1": 800}},
              "learners": {"shared": {"policy_loss": 0.25, "fgmf_scorpio_R": nan},
                           "__all_modules__": {"total_loss": 1.0}}}
    row = flatten_result(result, n_agents=2)
    assert row["iteration"] == 7 and row["num_episodes"] == 0 and row["env_steps"] == 0
    assert row["agent_steps"] == 1600
    assert math.isnan(row["episode_return_mean"]) and math.isnan(row["agent_return_mean"])
    assert row["shared/policy_loss"] == 0.25
    append_metrics(tmp_path, [row])  # and it goes through the metrics files
    write_metric_views(tmp_path, [row])
    rows, damaged = read_metrics(tmp_path / "metrics.jsonl")
    assert not damaged and rows[0]["num_episodes"] == 0
    assert math.isnan(rows[0]["episode_return_mean"])
    assert logged_iterations(tmp_path) == {"jsonl": [7], "json": [7], "csv": [7]}


# ------------------------------------------------------------------ never into someone's files
def test_out_folder_of_user_files_is_refused(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.csv").write_text("my,own\n1,2\n")
    (out / "notes.txt").write_text("keep me")
    before = tree_hash(out)
    code, err = call(capsys, "train", "--out", str(out), "--iterations", "1", *TINY_ARGS)
    assert code == 2
    one_line(err, str(out), "not empty and holds no run")
    assert tree_hash(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "notes.txt"]


def test_concurrent_resume_is_refused(base_run, tmp_path, capsys):
    out = copy_run(base_run, tmp_path)
    with DirLock(out, ".run.lock", "another process is training"):  # as a running trainer holds it
        before = tree_hash(out)
        with pytest.raises(ValueError, match="another process is training") as info:
            train(TrainConfig(**TINY, iterations=5), out, resume=True, progress=False)
        assert "\n" not in str(info.value) and str(out) in str(info.value)
        code, err = call(capsys, "train", "--out", str(out), "--resume", "--iterations", "5",
                         *TINY_ARGS)
        assert code == 2
        one_line(err, "another process is training", str(out))
        assert tree_hash(out) == before


# ------------------------------------------------------------------ a hard kill
def _kill_ray_processes_under(folder: str) -> None:
    """SIGKILL processes (the killed run's Ray daemons) whose command line names ``folder``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if folder.encode() in cmdline:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


def test_sigkill_mid_run_then_resume_logs_each_iteration_once(ray_session, tmp_path, capsys):
    out = tmp_path / "killed"
    ray_tmp = tempfile.mkdtemp(prefix="rt")
    cmd = [sys.executable, "-m", "marl_fgmf.cli", "train", "--out", str(out), "--iterations",
           "200", *TINY_ARGS]
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen(cmd, env={**os.environ, "RAY_TMPDIR": ray_tmp}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            ckpt = latest_checkpoint(out)
            if ckpt is not None and ckpt.name >= "iter_00002":
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "train.log").read_text()[-2000:]
        time.sleep(1.3)  # into the next iteration (or its checkpoint)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        log.close()
        _kill_ray_processes_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    _, done = resume_checkpoint(out)
    assert done >= 2
    code, err = call(capsys, "train", "--out", str(out), "--resume", "--iterations",
                     str(done + 1), *TINY_ARGS)
    assert code == 0, err
    assert latest_checkpoint(out).name == f"iter_{done + 1:05d}"
    assert_each_once(out, done + 1)


# ------------------------------------------------------------------ settings, checked first
@pytest.mark.parametrize("argv, needles", [
    (["--env-kwargs", "grid=0"], ["env 'beacon'", "grid", "got 0"]),
    (["--env-kwargs", "bogus=1"], ["env 'beacon'", "'bogus'"]),
    (["--env-kwargs", "n_agents=abc"], ["env 'beacon'", "n_agents", "'abc'"]),
    (["--env-kwargs", "grid=7.9"], ["env 'beacon'", "grid", "7.9"]),
    (["--env-kwargs", "grid=100000"], ["env 'beacon'", "grid=100000", "MiB"]),
    (["--seed", "-5"], ["seed", "-5"]),
    (["--entropy-coeff", "nan"], ["entropy_coeff", "nan"]),
    (["--lr", "2"], ["lr", "(0, 1)", "2"]),
    pytest.param(["--num-gpus-per-learner", "1"], ["num_gpus_per_learner", "no GPU", "use 0"],
                 marks=pytest.mark.skipif(
                     __import__("torch").cuda.is_available(), reason="a GPU is visible")),
])
def test_bad_settings_refused_before_anything_is_written(tmp_path, capsys, argv, needles):
    out = tmp_path / "run"
    code, err = call(capsys, "train", "--out", str(out), "--iterations", "1", *TINY_ARGS, *argv)
    assert code == 2
    one_line(err, *needles)
    assert not out.exists(), "a refused run must not create its folder"


def test_corrected_retry_after_refused_settings_trains(ray_session, tmp_path, capsys):
    out = tmp_path / "run"
    for bad, needle in (({"grid": 0}, "grid"), ({"grid": 7.9}, "7.9"), ({"bogus": 1}, "bogus"),
                        ({"grid": 100000}, "100000")):
        with pytest.raises(ValueError, match="env 'beacon'") as info:
            train(TrainConfig(**TINY, iterations=1, env_kwargs=bad), out, progress=False)
        assert needle in str(info.value) and "\n" not in str(info.value)
        assert not out.exists()
    code, err = call(capsys, "train", "--out", str(out), "--iterations", "1",
                     "--env-kwargs", "grid=5", *TINY_ARGS)
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["env_kwargs"] == {"grid": 5}
    assert_each_once(out, 1)


@pytest.mark.parametrize("edit, needles", [
    ({"lr": 5}, ["'lr'", "got 5"]),
    ({"env_kwargs": {"grid": 0}}, ["'env_kwargs'", "grid", "got 0"]),
    ({"seed": -1}, ["'seed'", "-1"]),
    ({"num_epochs": 1.5}, ["'num_epochs'", "1.5"]),
    ({"entropy_coeff": "lots"}, ["'entropy_coeff'", "'lots'"]),
    ("cut", ["not JSON"]),
])
def test_resume_with_a_bad_run_json_names_it(base_run, tmp_path, capsys, edit, needles):
    out = copy_run(base_run, tmp_path)
    run_file = out / "run.json"
    if edit == "cut":
        text = run_file.read_text()
        run_file.write_text(text[:len(text) // 2])
    else:
        run_file.write_text(json.dumps({**json.loads(run_file.read_text()), **edit}, indent=2))
    before = tree_hash(out)
    code, err = call(capsys, "train", "--out", str(out), "--resume", "--iterations", "4",
                     *TINY_ARGS)
    assert code == 2
    one_line(err, str(run_file), "edit", "new run", *needles)
    assert tree_hash(out) == before
