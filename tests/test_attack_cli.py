"""``marl-fgmf attack`` end to end (subprocess) on tiny checkpoints: the JSON it writes, the
table it prints, per-agent policies, and one-line errors (exit 2, no traceback) for bad input.

The checkpoints are untrained RLModules saved in the exact layout ``marl-fgmf train`` writes
(run.json, checkpoints/latest, learner_group/learner/rl_module/<module id>), which needs neither
Ray nor training, so the file runs in well under a minute.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from envs import make_env

ENV_KWARGS = {"n_agents": 2, "max_steps": 4}
TOP_KEYS = {"command", "checkpoint", "env", "env_kwargs", "policies", "attacks", "adversary",
            "settings", "episodes", "seed", "clean", "results", "wall_time_s"}
RUN_KEYS = {"team_return", "agent_return", "team_returns", "success_rate", "mean_linf",
            "mean_l2", "agent_steps", "time_s"}
RESULT_KEYS = RUN_KEYS | {"name", "eps", "eps_label", "attack"}
CI_KEYS = {"mean", "ci95", "low", "high", "n"}


def _save_run(root: Path, module_ids: list[str], n_actions: int = 5) -> Path:
    """An untrained policy saved as a `marl-fgmf train` run directory (tests/conftest.py)."""
    from conftest import save_untrained_run
    return save_untrained_run(root, module_ids, n_actions, ENV_KWARGS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("attack_cli")
    return {"shared": _save_run(root / "shared", ["shared"]),
            "per_agent": _save_run(root / "per_agent", ["agent_0", "agent_1"]),
            "four_actions": _save_run(root / "four", ["shared"], n_actions=4)}


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marl_fgmf.cli", "attack", *args],
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("marl-fgmf attack: error:"), errors
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def test_cli_writes_json_with_the_expected_keys(runs, tmp_path):
    out = tmp_path / "sub" / "pgd.json"
    proc = _cli("--checkpoint", str(runs["shared"]), "--attack", "pgd", "--eps", "2/255,8/255",
                "--steps", "2", "--episodes", "2", "--seed", "3", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert TOP_KEYS <= set(data), set(data) ^ TOP_KEYS
    assert data["env"] == "beacon" and data["env_kwargs"] == ENV_KWARGS  # from run.json
    assert data["policies"] == {"agent_0": "shared", "agent_1": "shared"}
    assert data["attacks"] == ["pgd"] and data["settings"] == {"pgd": {"steps": 2}}
    assert data["episodes"] == 2 and data["seed"] == 3
    assert RUN_KEYS <= set(data["clean"])
    assert [r["eps_label"] for r in data["results"]] == ["2/255", "8/255"]
    for r, eps in zip(data["results"], (2 / 255, 8 / 255)):
        assert RESULT_KEYS <= set(r), set(r) ^ RESULT_KEYS
        assert r["eps"] == pytest.approx(eps)
        assert r["name"] == "pgd" and r["attack"]["attack"] == "pgd"
        assert r["attack"]["steps"] == 2
        assert CI_KEYS <= set(r["team_return"])
        assert set(r["agent_return"]) == {"agent_0", "agent_1"}
        assert len(r["team_returns"]) == 2
        assert r["agent_steps"] == 2 * 2 * ENV_KWARGS["max_steps"]
        assert 0.0 <= r["success_rate"] <= 1.0
        assert 0.0 < r["mean_linf"] <= eps + 1e-6
    # the table: one row per budget, clean and attacked team return side by side
    assert "| eps " in proc.stdout and "team return clean" in proc.stdout
    assert "| pgd    | 2/255 " in proc.stdout and "| pgd    | 8/255 " in proc.stdout
    assert "per-agent return" in proc.stdout and "agent_1" in proc.stdout
    assert not list(out.parent.glob(".*tmp*")), "temporary file left behind"


def test_cli_per_agent_policies_and_several_attacks(runs, tmp_path):
    out = tmp_path / "several.json"
    proc = _cli("--checkpoint", str(runs["per_agent"]), "--attack", "random,square,pgd",
                "--eps", "4/255", "--steps", "2", "--settings", "n_queries=3", "--episodes", "1",
                "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["policies"] == {"agent_0": "agent_0", "agent_1": "agent_1"}
    # each setting goes to the attacks that take it
    assert data["settings"] == {"random": {}, "square": {"n_queries": 3}, "pgd": {"steps": 2}}
    assert [r["name"] for r in data["results"]] == ["random", "square", "pgd"]
    assert data["results"][1]["attack"]["n_queries"] == 3
    assert data["results"][2]["attack"]["steps"] == 2
    assert all(r["mean_linf"] <= 4 / 255 + 1e-6 for r in data["results"])


def test_cli_max_steps_cuts_episodes_and_square_gets_the_cli_query_budget(runs, tmp_path):
    from marl_fgmf.commands.attack import SQUARE_QUERIES
    out = tmp_path / "capped.json"
    proc = _cli("--checkpoint", str(runs["shared"]), "--attack", "square,fgsm", "--eps", "4/255",
                "--max-steps", "2", "--episodes", "2", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["max_steps"] == 2 < ENV_KWARGS["max_steps"]
    assert data["clean"]["agent_steps"] == 2 * 2 * 2, "2 episodes x 2 steps x 2 agents"
    assert all(r["agent_steps"] == 8 for r in data["results"])
    assert data["settings"]["square"] == {"n_queries": SQUARE_QUERIES}
    assert data["results"][0]["attack"]["n_queries"] == SQUARE_QUERIES
    assert f"n_queries defaults to {SQUARE_QUERIES}" in " ".join(_cli("--help").stdout.split())


@pytest.mark.parametrize("args, fragments", [
    (["--attack", "pgd", "--max-steps", "0"], ["--max-steps", "positive integer"]),
    (["--attack", "pgd", "--eps", "0"], ["--eps", "(0, 1]"]),
    (["--attack", "pgd", "--eps", "2/255,1.5"], ["--eps", "(0, 1]", "1.5"]),
    (["--attack", "pgd", "--eps=-4/255"], ["(0, 1]", "-4/255"]),
    (["--attack", "pgd", "--steps", "0"], ["--steps", "positive integer"]),
    (["--attack", "pgdx"], ["unknown attack 'pgdx'", "allowed: random, fgsm, pgd"]),
    (["--attack", "pgd", "--objective", "hinge"], ["unknown objective 'hinge'", "allowed: ce"]),
    (["--attack", "fgsm", "--settings", "restarts=2"], ["unknown setting(s) restarts"]),
    (["--attack", "random,fgsm", "--steps", "2"], ["steps apply to none of the attacks"]),
    (["--attack", "square", "--norm", "l2"], ["unknown norm 'l2'", "allowed: linf"]),
    (["--attack", "fgsm", "--policy-id", "nope"], ["unknown policy id 'nope'", "allowed: shared"]),
    (["--attack", "learned"], ["--adversary"]),
    (["--attack", "pgd", "--adversary", "x"], ["--adversary is only used with --attack learned"]),
])
def test_cli_bad_arguments_one_line_exit_2(runs, args, fragments):
    _one_line_error(_cli("--checkpoint", str(runs["shared"]), *args, "--quiet"), *fragments)


def test_cli_missing_checkpoint_one_line_exit_2(tmp_path):
    _one_line_error(_cli("--checkpoint", str(tmp_path / "nope"), "--attack", "pgd"),
                    "checkpoint not found", "nope")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)  # a run dir without a checkpoint
    _one_line_error(_cli("--checkpoint", str(tmp_path / "empty"), "--attack", "pgd"),
                    "no complete checkpoint")


def test_cli_learned_adversary_from_a_run_that_is_not_one(runs):
    _one_line_error(_cli("--checkpoint", str(runs["shared"]), "--attack", "learned",
                         "--adversary", str(runs["per_agent"]), "--quiet"),
                    "not an adversary run")


def test_cli_policy_that_does_not_fit_the_env_one_line_exit_2(runs):
    _one_line_error(_cli("--checkpoint", str(runs["four_actions"]), "--attack", "fgsm",
                         "--episodes", "1", "--quiet"),
                    "4 action logits", "Discrete(5)")
    _one_line_error(_cli("--checkpoint", str(runs["shared"]), "--attack", "fgsm",
                         "--env-kwargs", "grid=9", "--episodes", "1", "--quiet"),
                    "(21, 21, 3)", "(27, 27, 3)")
