"""``marl-fgmf explain`` end to end on a tiny trained checkpoint: figures, GIF, metrics, errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from agents.train import TrainConfig, train
from marl_fgmf.cli import main
from marl_fgmf.commands import UsageError
from marl_fgmf.workflows.explain import METHOD_NAMES, explain_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = dict(train_batch_size=200, minibatch_size=100, num_epochs=1, num_envs_per_env_runner=2,
            iterations=1)
IN_PROCESS = {"setting", "env", "shape"}  # the others run as a user runs them (subprocess)
FAST = ["--max-steps", "5", "--every", "2", "--settings", "steps=4", "--quiet"]  # steps 0, 2, 4


@pytest.fixture(scope="module")
def tiny_run(ray_session, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("explain") / "run"
    train(TrainConfig(**TINY), out, progress=False)
    return out


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marl_fgmf.cli", "explain", *args],
                          capture_output=True, text=True, timeout=timeout)


def _gif_frames(path: Path) -> int:
    with Image.open(path) as im:
        return im.n_frames


def test_cli_writes_figures_gif_and_metrics(tiny_run, tmp_path):
    out = tmp_path / "out"
    proc = _cli("--checkpoint", str(tiny_run), "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "3 explained steps" in proc.stdout, proc.stdout
    figures = sorted(p.name for p in out.glob("frame_*.png"))
    assert figures == ["frame_0000.png", "frame_0002.png", "frame_0004.png"]  # first, middle, last
    for name in figures:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    assert _gif_frames(out / "episode_00.gif") == 3  # one GIF frame per explained step
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # atomic writes only

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "pgca" and metrics["env"] == "beacon"  # env from run.json
    assert metrics["explained_steps"] == 3 and metrics["relevance"] is True
    expected = {"ghr", "pointing_game", "deletion_auc", "insertion_auc", "agreement",
                "action_prob"}
    assert set(metrics["agents"]) == {"agent_0", "agent_1"}
    for row in [*metrics["agents"].values(), metrics["all_agents"]]:
        assert set(row) == expected
        for stat in row.values():
            assert set(stat) == {"mean", "ci95", "n"}
            assert stat["mean"] is not None and stat["n"] >= 3
    assert metrics["agents"]["agent_0"]["ghr"]["n"] == 3
    assert 0.0 <= metrics["all_agents"]["ghr"]["mean"] <= 1.0
    assert metrics["higher_is_better"]["deletion_auc"] is False
    assert metrics["episodes"][0]["steps"] == 5


def test_explain_run_other_method_every_step(tiny_run, tmp_path):
    """The function ``marl-fgmf demo`` calls; a single method has no agreement score."""
    result = explain_run(tiny_run, tmp_path / "ig", method="ig", max_steps=3, episodes=2,
                         settings={"steps": 4}, progress=False)
    assert result["explained_steps"] == 6
    assert "agreement" not in result["all_agents"]
    assert result["all_agents"]["deletion_auc"]["n"] == 12  # 2 agents x 3 steps x 2 episodes
    assert [_gif_frames(tmp_path / "ig" / f"episode_{e:02d}.gif") for e in (0, 1)] == [3, 3]
    assert len(result["figures"]) == 3  # figures of the first episode only
    assert json.loads((tmp_path / "ig" / "metrics.json").read_text())["method"] == "ig"


def test_explain_run_rejects_bad_input_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="checkpoint not found: .*nowhere"):
        explain_run(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(UsageError, match="every must be >= 1"):
        explain_run(tmp_path, tmp_path / "out", every=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing", "method", "policy_id", "setting", "env", "shape"])
def test_cli_bad_input_one_line_exit_2(tiny_run, tmp_path, capsys, case):
    out = tmp_path / "out"
    args = {"missing": (["--checkpoint", str(tmp_path / "nowhere")],
                        f"checkpoint not found: {tmp_path / 'nowhere'}"),
            "method": (["--checkpoint", str(tiny_run), "--method", "lime"],
                       f"unknown method 'lime'; allowed: {', '.join(METHOD_NAMES)}"),
            "policy_id": (["--checkpoint", str(tiny_run), "--policy-id", "nobody"],
                          "unknown policy id 'nobody'; allowed: shared"),
            "setting": (["--checkpoint", str(tiny_run), "--settings", "window=3"],
                        "method 'pgca' has no setting 'window'; its settings: steps, "),
            "env": (["--checkpoint", str(tiny_run), "--env", "nope"],
                    "unknown env 'nope'; allowed: beacon, "),
            "shape": (["--checkpoint", str(tiny_run), "--env-kwargs", "grid=9"],
                      "takes observations of shape (21, 21, 3) but 'agent_0' sees (27, 27, 3): "
                      "wrong --env or --env-kwargs?")}[case]
    argv = [*args[0], "--out", str(out), "--quiet"]
    if case in IN_PROCESS:  # torch is imported already: the same CLI entry point, seconds faster
        code = main(["explain", *argv])
        stderr = capsys.readouterr().err
    else:
        proc = _cli(*argv)
        code, stderr = proc.returncode, proc.stderr
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("marl-fgmf explain: error: ") and args[1] in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert not out.exists(), "rejected input must not create the output directory"


def test_explain_caps_episodes_by_default_and_0_means_the_whole_episode(monkeypatch):
    """A default ``marl-fgmf explain`` explains 50 steps per episode (a pong episode is 900
    steps: hours of PGCA); ``--max-steps 0`` lifts the cap. explain_run is replaced to see
    what the command passes on (the workflow itself is tested above)."""
    from marl_fgmf.cli import build_parser
    from marl_fgmf.commands import explain as explain_cmd
    seen = []
    monkeypatch.setattr(explain_cmd, "explain_run", lambda *a, **kw: seen.append(kw) or {})
    monkeypatch.setattr(explain_cmd, "format_summary", lambda result: "")
    for extra, want in (([], explain_cmd.DEFAULT_MAX_STEPS), (["--max-steps", "0"], None),
                        (["--max-steps", "7"], 7)):
        args = build_parser("explain").parse_args(
            ["explain", "--checkpoint", "ckpt", "--out", "out", *extra])
        assert explain_cmd.run(args) == 0
        assert seen[-1]["max_steps"] == want
    assert explain_cmd.DEFAULT_MAX_STEPS == 50


def test_model_free_baselines_through_the_command(tmp_path):
    """``--method random`` / ``brightness`` (the registered baselines) run through the same
    command and metrics as the real explainers, on an untrained run saved without Ray."""
    from conftest import save_untrained_run
    from marl_fgmf.explainers import METHODS

    assert set(METHOD_NAMES) == set(METHODS) and {"random", "brightness"} <= set(METHOD_NAMES)
    run = save_untrained_run(tmp_path / "run", ["shared"])
    code = main(["explain", "--checkpoint", str(run), "--method", "random", "--max-steps", "1",
                 "--out", str(tmp_path / "random"), "--quiet"])
    assert code == 0
    result = explain_run(run, tmp_path / "brightness", method="brightness", max_steps=2,
                         figures=False, gif=False, progress=False)
    for method, metrics in (("random", json.loads((tmp_path / "random" / "metrics.json")
                                                  .read_text())), ("brightness", result)):
        assert metrics["method"] == method and metrics["explained_steps"] >= 1
        assert 0.0 <= metrics["all_agents"]["ghr"]["mean"] <= 1.0
    with pytest.raises(ValueError, match="method 'brightness' has no setting 'steps'"):
        explain_run(run, tmp_path / "bad", method="brightness", settings={"steps": 4})
