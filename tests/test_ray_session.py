"""agents.ray_session: address and runtime-env checks before anything is written, root causes
of Ray failures on one line, and remote calls that name the node they ran on."""
from __future__ import annotations

import json
import operator

import pytest

from agents.local_cluster import free_port
from agents.ray_session import (Job, check_address, describe_error, get_result,
                                load_runtime_env, remote_call, run_jobs, ship)
from marl_fgmf.cli import main


# ---------------------------------------------------------------------- runtime env files
def test_runtime_env_file_paths_made_absolute_and_checked(tmp_path):
    (tmp_path / "pkg").mkdir()
    f = tmp_path / "env.yaml"
    f.write_text("py_modules: [pkg]\nenv_vars: {OMP_NUM_THREADS: '1'}\npip: [tqdm]\n")
    env = load_runtime_env(f)
    assert env["py_modules"] == [str((tmp_path / "pkg").resolve())]
    assert env["env_vars"] == {"OMP_NUM_THREADS": "1"} and env["pip"] == ["tqdm"]
    assert load_runtime_env(None) is None


@pytest.mark.parametrize("name, text, message", [
    ("env.yaml", "pip: [tqdm\n", "cannot parse it"),
    ("env.json", "{\"pip\": ", "cannot parse it"),
    ("env.yaml", "- pip\n", "expected a mapping"),
    ("env.yaml", "pipp: [tqdm]\n", "unknown key(s) pipp; allowed: working_dir"),
    ("env.yaml", "env_vars: {N: 1}\n", "env_vars must map names to strings"),
    ("env.yaml", "working_dir: nowhere\n", "working_dir path not found"),
    ("env.yaml", "py_modules: pkg\n", "py_modules must be a list"),
])
def test_bad_runtime_env_files_one_line(tmp_path, name, text, message):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(ValueError) as info:
        load_runtime_env(f)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(f) in str(info.value)


def test_missing_runtime_env_file(tmp_path):
    with pytest.raises(ValueError, match="--runtime-env file not found"):
        load_runtime_env(tmp_path / "none.yaml")


# ---------------------------------------------------------------------- addresses
def test_address_forms(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert check_address(None) is None and check_address("") is None
    assert check_address("auto") == "auto"
    for bad in ("nohost", "host:port", "host:99999", ":6379"):
        with pytest.raises(ValueError, match="expected host:port"):
            check_address(bad)
    with pytest.raises(ValueError, match="unknown scheme"):
        check_address("http://127.0.0.1:6379")


def test_unreachable_address_and_ray_address_variable(monkeypatch):
    port = free_port()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match=f"cannot reach a Ray cluster at 127.0.0.1:{port}"):
        check_address(f"127.0.0.1:{port}", timeout_s=1)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ValueError, match="cannot reach"):
        check_address(None, timeout_s=1)


def test_ray_client_address_needs_the_cluster_extra(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "grpc" else real(name, *a))
    with pytest.raises(ValueError, match=r"marl-fgmf\[cluster\]"):
        check_address("ray://127.0.0.1:10001")


# ---------------------------------------------------------------------- the CLI: nothing written
def test_cli_bad_runtime_env_and_ray_client_exit_2_nothing_written(tmp_path, capsys,
                                                                  monkeypatch):
    bad = tmp_path / "env.yaml"
    bad.write_text("pip: [tqdm]\nimage: x\n")
    out = tmp_path / "run"
    assert main(["train", "--env", "beacon", "--out", str(out), "--runtime-env", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key(s) image" in err[0], err
    assert not out.exists()

    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "grpc" else real(name, *a))
    assert main(["train", "--env", "beacon", "--out", str(out), "--address",
                 "ray://127.0.0.1:10001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ray[client]" in err[0] and "host:6379" in err[0], err
    assert not out.exists()


# ---------------------------------------------------------------------- remote calls
# the task body imports its function by module and name on the worker, so these come from the
# standard library (the tests folder is not importable there)
def test_remote_call_names_its_node_and_errors_stay_one_line(ray_session):
    ref = remote_call(operator.add, [1], ship([2, 3]))
    result = get_result(ref)
    node = ray_session.get_runtime_context().get_node_id()
    assert result["status"] == "ok" and result["value"] == [1, 2, 3], result
    assert result["node"]["node_id"] == node and result["wall_s"] >= 0
    bad = get_result(remote_call(operator.truediv, 1, 0))
    assert bad["status"] == "error" and bad["error"] == "ZeroDivisionError: division by zero"
    assert bad["node"]["node_id"] == node

    results: list = []
    errors = run_jobs([Job(operator.add, "a", ("b",), title="ok"),
                       Job(operator.truediv, 1, (0,), title="broken")],
                      on_result=lambda job, r: results.append((job.title, r["value"])))
    assert results == [("ok", "ab")]
    assert errors == [f"broken failed on node {node[:8]} "
                      f"({bad['node']['ip']}): ZeroDivisionError: division by zero"]


def test_describe_error_gives_the_workers_cause_without_colour(ray_session):
    def fails():
        raise ValueError("bad \x1b[31mvalue\x1b[0m\nsecond line")

    with pytest.raises(Exception) as info:
        ray_session.get(ray_session.remote(fails).remote())
    line = describe_error(info.value)
    assert line == "ValueError: bad value", line
    assert "\x1b" not in line and "\n" not in line
    assert json.dumps(line)  # plain text
