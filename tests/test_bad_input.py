"""Bad input and faults on the commands that read runs (attack, explain, audit, tournament,
demo) and on the attack settings API: each case asserts the exit code, ONE line naming the bad
value, no traceback, and, where nothing may change, the run directory's content hash.

Training runs (resume, locks, metrics, settings checked before anything is written) are in
tests/test_run_safety.py; cluster addresses and runtime-env files in tests/test_ray_session.py
and tests/test_cluster.py; tournament reruns in tests/test_tournament.py."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import save_untrained_run, tree_hash
from marl_fgmf.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return save_untrained_run(tmp_path_factory.mktemp("bad_input") / "run", ["shared"])


def call(capsys, *argv: str) -> tuple[int, list[str], str]:
    """``marl-fgmf ARGV`` in this process: (exit code, stderr lines, stdout)."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, [ln for ln in captured.err.splitlines() if ln.strip()], captured.out


def one_line(lines: list[str], *needles: str) -> None:
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------- never into a run
@pytest.mark.parametrize("argv", [
    ["attack", "--checkpoint", "{run}", "--attack", "fgsm", "--episodes", "1",
     "--out", "{run}/run.json"],
    ["attack", "--checkpoint", "{run}", "--attack", "fgsm", "--episodes", "1",
     "--out", "{run}/results.json"],
    ["attack", "--checkpoint", "{run}", "--attack", "fgsm", "--episodes", "1",
     "--out", "{run}/checkpoints/x.json"],
    ["explain", "--checkpoint", "{run}", "--out", "{run}"],
    ["explain", "--checkpoint", "{run}", "--out", "{run}/explain"],
    ["audit", "--checkpoint", "{run}", "--out", "{run}/audit.json"],
    ["demo", "--out", "{run}", "--budget", "tiny"],
    ["train", "--out", "{run}/checkpoints/again"],
])
def test_outputs_into_a_run_are_refused(run, capsys, argv):
    before = tree_hash(run)
    code, err, _ = call(capsys, *(a.format(run=run) for a in argv))
    assert code == 2
    one_line(err, "is inside the training run", str(run))
    assert tree_hash(run) == before


def test_tournament_out_into_a_run_is_refused(run, tmp_path, capsys):
    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps({"defenders": [{"name": "a", "checkpoint": str(run)}],
                               "attackers": ["fgsm"], "eps": ["8/255"], "audit": False}))
    before = tree_hash(run)
    code, err, _ = call(capsys, "tournament", "--config", str(cfg), "--out", str(run / "t"))
    assert code == 2
    one_line(err, "is inside the training run")
    assert tree_hash(run) == before


# ---------------------------------------------------------------------- output paths
def test_out_paths_that_cannot_be_written(run, tmp_path, capsys):
    folder = tmp_path / "a_dir"
    folder.mkdir()
    code, err, _ = call(capsys, "attack", "--checkpoint", str(run), "--attack", "fgsm",
                        "--out", str(folder))
    assert code == 2
    one_line(err, "must be a file path", str(folder))
    afile = tmp_path / "a_file"
    afile.write_text("mine")
    code, err, _ = call(capsys, "attack", "--checkpoint", str(run), "--attack", "fgsm",
                        "--out", str(afile / "r.json"))
    assert code == 2
    one_line(err, "is a file, not a folder")
    code, err, _ = call(capsys, "explain", "--checkpoint", str(run), "--out", str(afile))
    assert code == 2
    one_line(err, "exists and is not a directory")
    code, err, _ = call(capsys, "demo", "--out", str(afile))
    assert code == 2
    one_line(err, "exists and is not a directory")
    assert afile.read_text() == "mine"


@pytest.fixture
def mounted(tmp_path):
    """Mount a tmpfs at a folder (root only): ``mounted(options) -> path``; unmounted after."""
    mounts: list[Path] = []

    def mount(options: str) -> Path:
        target = tmp_path / f"mnt{len(mounts)}"
        target.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                              capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode()[:80]}")
        mounts.append(target)
        return target

    yield mount
    for target in mounts:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_read_only_folder_refused_before_any_work(run, mounted, capsys):
    ro = mounted("ro,size=64k")
    code, err, _ = call(capsys, "attack", "--checkpoint", str(run), "--attack", "fgsm",
                        "--out", str(ro / "r.json"))
    assert code == 2
    one_line(err, "is not writable")
    code, err, _ = call(capsys, "explain", "--checkpoint", str(run), "--out", str(ro / "e"))
    assert code == 2
    one_line(err, "is not writable")


def test_disk_full_is_one_line_exit_1_and_leaves_no_partial_file(run, mounted, capsys):
    """ENOSPC while the results are written: a runtime failure (exit 1), one line, and the
    atomic writer leaves neither a partial JSON nor its temporary file."""
    full = mounted("size=8k")
    (full / "filler").write_bytes(b"x" * 8192)  # the disk is full
    out = full / "r.json"
    code, err, _ = call(capsys, "attack", "--checkpoint", str(run), "--attack", "fgsm",
                        "--episodes", "2", "--out", str(out), "--quiet")
    assert code == 1, err
    one_line(err, "No space left on device", "free some space")
    assert [p.name for p in full.iterdir()] == ["filler"]


# ---------------------------------------------------------------------- devices
@pytest.mark.parametrize("device, message", [
    ("banana", "unknown --device 'banana'; allowed: cpu, cuda, cuda:N"),
    ("cuda:99", "no such GPU visible"),
    ("gpu", "unknown --device 'gpu'"),
])
def test_bad_devices(run, capsys, device, message):
    code, err, _ = call(capsys, "attack", "--checkpoint", str(run), "--attack", "fgsm",
                        "--device", device)
    assert code == 2
    one_line(err, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(run, capsys):
    code, err, _ = call(capsys, "attack", "--checkpoint", str(run), "--attack", "fgsm",
                        "--device", "cuda")
    assert code == 2
    one_line(err, "--device cuda: no such GPU visible to torch (0 found); use --device cpu")


# ---------------------------------------------------------------------- settings
@pytest.mark.parametrize("attack, settings, message", [
    ("pgd", "random_start=maybe", "setting random_start of attack 'pgd' must be "
                                  "true/false/1/0/yes/no, got 'maybe'"),
    ("pgd", "restarts=1.5", "setting restarts of attack 'pgd' must be a whole number, got 1.5"),
    ("pgd", "alpha=nan", "alpha must be in (0, 1], got 'nan'"),
    ("square", "n_queries=abc", "setting n_queries of attack 'square' must be a whole number"),
    ("pgd", "stepz=3", "unknown setting(s) stepz for attack 'pgd'"),
])
def test_bad_attack_settings_refused_before_any_episode(run, capsys, attack, settings, message):
    code, err, _ = call(capsys, "attack", "--checkpoint", str(run), "--attack", attack,
                        "--settings", settings, "--episodes", "1")
    assert code == 2
    one_line(err, message)


def test_boolean_settings_parse_strictly(run, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _, _ = call(capsys, "attack", "--checkpoint", str(run), "--attack", "pgd",
                      "--settings", "random_start=False", "--episodes", "1", "--quiet",
                      "--out", str(out))
    assert code == 0
    result = json.loads(out.read_text())
    assert result["settings"]["pgd"]["random_start"] is False


def _policy() -> nn.Module:
    class P(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            return self.lin(obs.mean(dim=(1, 2)))

    return P()


@pytest.mark.parametrize("value, expected", [
    (True, True), ("yes", True), ("TRUE", True), (1, True), ("0", False), ("no", False),
])
def test_make_attack_boolean_forms(value, expected):
    from attacks import make_attack
    assert make_attack("pgd", _policy(), random_start=value).random_start is expected


@pytest.mark.parametrize("settings, message", [
    ({"random_start": "maybe"}, "must be true/false/1/0/yes/no"),
    ({"random_start": 2}, "must be true/false/1/0/yes/no"),
    ({"steps": 2.5}, "must be a whole number, got 2.5"),
    ({"steps": True}, "must be a whole number, got True"),
    ({"alpha": float("inf")}, "alpha must be in (0, 1], got inf"),
    ({"p_init": float("nan")}, "setting p_init of attack 'square' must be a finite number"),
    ({"p_init": True}, "setting p_init of attack 'square' must be a finite number, got True"),
])
def test_make_attack_refuses_mistyped_settings(settings, message):
    from attacks import make_attack
    name = "square" if "p_init" in settings else "pgd"
    with pytest.raises(ValueError) as info:
        make_attack(name, _policy(), **settings)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_tiny_eps_is_labelled_as_itself_not_zero(run, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _, stdout = call(capsys, "attack", "--checkpoint", str(run), "--attack", "random",
                           "--eps", "1e-30", "--episodes", "1", "--quiet", "--out", str(out))
    assert code == 0
    assert "1e-30" in stdout and "0/255" not in stdout
    assert json.loads(out.read_text())["results"][0]["eps_label"] == "1e-30"


# ---------------------------------------------------------------------- checkpoint vs env
@pytest.mark.parametrize("command", ["attack", "explain", "audit"])
def test_checkpoint_env_shape_mismatch_is_one_line(run, tmp_path, capsys, command):
    extra = {"attack": ["--attack", "fgsm"], "explain": ["--out", str(tmp_path / "e")],
             "audit": []}[command]
    code, err, _ = call(capsys, command, "--checkpoint", str(run), "--env-kwargs",
                        "grid=15", *extra)
    assert code == 2
    one_line(err, "takes observations of shape", "wrong --env or --env-kwargs")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("command", ["explain", "audit", "attack"])
def test_a_checkpoint_without_run_json_needs_env(run, tmp_path, capsys, command):
    """No silent beacon: a checkpoint that names no env needs --env."""
    bare = tmp_path / "bare"
    bare.mkdir()
    os.symlink(run / "checkpoints", bare / "checkpoints")
    extra = {"attack": ["--attack", "fgsm"], "explain": ["--out", str(tmp_path / "e")],
             "audit": []}[command]
    code, err, _ = call(capsys, command, "--checkpoint", str(bare), *extra)
    assert code == 2
    one_line(err, "--env is required")


def test_debug_shows_the_traceback(run, capsys, monkeypatch):
    monkeypatch.delenv("MARL_FGMF_DEBUG", raising=False)
    code, err, _ = call(capsys, "attack", "--checkpoint", str(run), "--attack", "pgd",
                        "--settings", "random_start=maybe")
    assert code == 2 and len(err) == 1
    code = main(["attack", "--debug", "--checkpoint", str(run), "--attack", "pgd",
                 "--settings", "random_start=maybe"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and "random_start" in err
    assert "MARL_FGMF_DEBUG" not in os.environ, "--debug must not leak into later calls"
    code, err, _ = call(capsys, "attack", "--checkpoint", str(run), "--attack", "pgd",
                        "--settings", "random_start=maybe")
    assert code == 2 and len(err) == 1
