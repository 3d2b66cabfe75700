"""RLlib training end to end on beacon (tiny budgets), checkpoints, load_policy, CLI errors."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agents import load_policy
from agents.checkpoint import CheckpointError, latest_checkpoint, policy_ids
from agents.train import TrainConfig, train

TINY = dict(train_batch_size=200, minibatch_size=100, num_epochs=1, num_envs_per_env_runner=2)


def _tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def _rllib_logits(ckpt: Path, module_id: str, obs_uint8: torch.Tensor) -> torch.Tensor:
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.rl_module.rl_module import RLModule
    module = RLModule.from_checkpoint(ckpt / "learner_group" / "learner" / "rl_module" / module_id)
    with torch.no_grad():
        return module.forward_inference({Columns.OBS: obs_uint8})[Columns.ACTION_DIST_INPUTS]


def _beacon_obs(seed: int = 3) -> torch.Tensor:
    from envs import make_env
    env = make_env("beacon")
    obs, _ = env.reset(seed=seed)
    return torch.as_tensor(np.stack([obs[a] for a in env.agents]))


@pytest.fixture(scope="module")
def trained_run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ppo"
    result = train(_tiny(iterations=2), out, progress=False)
    return out, result


def test_one_iteration_run_writes_everything(trained_run):
    out, result = trained_run
    assert result["last"]["iteration"] == 2
    assert result["last"]["env_steps"] > 0
    for name in ("run.json", "metrics.csv", "metrics.json", "checkpoints/latest"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir()), "no TensorBoard event file"
    records = json.loads((out / "metrics.json").read_text())
    assert [r["iteration"] for r in records] == [1, 2]
    assert np.isfinite(records[-1]["agent_return_mean"])
    assert latest_checkpoint(out).name == "iter_00002"


def test_load_policy_logits_equal_rllib_module(trained_run):
    out, _ = trained_run
    obs = _beacon_obs()
    policy = load_policy(out, device="cpu")
    ours = policy(obs.float() / 255.0)
    ref = _rllib_logits(latest_checkpoint(out), "shared", obs)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert policy.value(obs.float() / 255.0).shape == (obs.shape[0],)
    # also from the checkpoint folder and the module folder directly
    ckpt = latest_checkpoint(out)
    torch.testing.assert_close(load_policy(ckpt, "shared", device="cpu")(obs.float() / 255), ref,
                               rtol=1e-5, atol=1e-6)


def test_resume_continues_from_last_checkpoint(trained_run, tmp_path):
    import shutil
    out, _ = trained_run
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    result = train(_tiny(iterations=3), copy, resume=True, progress=False)
    records = json.loads((copy / "metrics.json").read_text())
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert result["last"]["env_steps"] > records[1]["env_steps"]
    assert latest_checkpoint(copy).name == "iter_00003"


def test_existing_run_is_not_overwritten(trained_run):
    out, _ = trained_run
    before = (out / "run.json").read_text()
    with pytest.raises(ValueError, match="already holds a run"):
        train(_tiny(iterations=1), out, progress=False)
    assert (out / "run.json").read_text() == before


def test_per_agent_policies(ray_session, tmp_path):
    out = tmp_path / "per-agent"
    train(_tiny(iterations=1, policies="per-agent"), out, progress=False)
    assert policy_ids(out) == ["agent_0", "agent_1"]
    with pytest.raises(ValueError, match="choose policy_id from: agent_0, agent_1"):
        load_policy(out)
    with pytest.raises(ValueError, match="unknown policy id 'nobody'; allowed: agent_0, agent_1"):
        load_policy(out, "nobody")
    obs = _beacon_obs()
    ref = _rllib_logits(latest_checkpoint(out), "agent_1", obs)
    torch.testing.assert_close(load_policy(out, "agent_1", device="cpu")(obs.float() / 255), ref,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["vit", "hybrid"])
def test_other_archs_train_one_iteration(ray_session, tmp_path, arch):
    out = tmp_path / arch
    train(_tiny(iterations=1, arch=arch), out, progress=False)
    obs = _beacon_obs()
    torch.testing.assert_close(load_policy(out, device="cpu")(obs.float() / 255),
                               _rllib_logits(latest_checkpoint(out), "shared", obs),
                               rtol=1e-5, atol=1e-6)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_policy(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    (bad / "learner_group" / "learner" / "rl_module" / "shared").mkdir(parents=True)
    (bad / "learner_group" / "learner" / "rl_module" / "shared" / "module_state.pt").write_text("junk")
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_policy(bad)


# ------------------------------------------------------------------ CLI, as a user runs it
def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marl_fgmf.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args, expected", [
    (["--env", "nope"], "unknown env 'nope'; allowed: "),
    (["--arch", "resnet"], "unknown arch 'resnet'; allowed: cnn, vit, hybrid"),
    (["--policies", "some"], "unknown policies mode 'some'; allowed: shared, per-agent"),
    (["--defense", "magic"], "unknown defense 'magic'; allowed: none, adv, scorpio, sgam, fgmf"),
    (["--iterations", "0"], "expected a positive integer"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path, args, expected):
    proc = _cli("train", "--out", str(tmp_path / "x"), *args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists(), "a rejected run must not create its directory"


def test_cli_existing_run_untouched(trained_run):
    out, _ = trained_run
    snapshot = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    proc = _cli("train", "--out", str(out), "--iterations", "1")
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == snapshot


@pytest.mark.slow
def test_ctrl_c_leaves_last_checkpoint_loadable(tmp_path):
    """SIGINT mid-training: exit 130, the last complete checkpoint loads, --resume continues."""
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "marl_fgmf.cli", "train", "--out", str(out), "--iterations",
           "200", "--train-batch-size", "200", "--minibatch-size", "100", "--num-epochs", "1",
           "--num-envs-per-env-runner", "2", "--quiet"]
    # Ctrl-C as a terminal delivers it: SIGINT at its default disposition in the child, even
    # when something in this test process (a library) left SIGINT ignored, which a child
    # inherits (Python then never raises KeyboardInterrupt and the run ends with exit 0)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and latest_checkpoint(out) is None:
        time.sleep(0.5)
    assert latest_checkpoint(out) is not None, "no checkpoint appeared"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out_text, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out_text[-1000:], err[-2000:])
    assert "Traceback" not in err
    ckpt = latest_checkpoint(out)
    policy = load_policy(out, device="cpu")
    assert policy(torch.rand(2, 21, 21, 3)).shape == (2, 5)
    done = int(ckpt.name.split("_")[-1])
    records = json.loads((out / "metrics.json").read_text())
    assert records[-1]["iteration"] == done
    assert not list((out / "checkpoints").glob(".tmp_*")), "a partial checkpoint was left"
    proc = _cli("train", "--out", str(out), "--resume", "--iterations", str(done + 1), "--quiet",
                timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert latest_checkpoint(out).name == f"iter_{done + 1:05d}"


@pytest.mark.parametrize("defense", ["adv", "scorpio", "sgam", "fgmf", "fgmf+adv"])
def test_each_defense_trains_and_loads_back(ray_session, tmp_path, defense):
    """One RLlib iteration per --defense; the FGMF terms are logged; logits identical after
    load_policy (SGAM rebuilt from the checkpoint's model config)."""
    out = tmp_path / defense.replace("+", "_")
    result = train(_tiny(iterations=1, defense=defense), out, progress=False)
    row = result["last"]
    logged = {k.split("/", 1)[1] for k in row if k.startswith("shared/fgmf_")}
    if "scorpio" in defense or defense.startswith("fgmf"):
        assert {"fgmf_scorpio_R", "fgmf_scorpio_curvature_term", "fgmf_scorpio_gradient_term",
                "fgmf_scorpio_mask_fraction"} <= logged, logged
        assert 0 < row["shared/fgmf_scorpio_mask_fraction"] < 1
    if "sgam" in defense or defense.startswith("fgmf"):
        assert {"fgmf_sgam_distill_loss", "fgmf_sgam_keep_ratio"} <= logged, logged
    if "adv" in defense:
        assert "fgmf_adv_kl" in logged, logged
    obs = _beacon_obs()
    policy = load_policy(out, device="cpu")
    has_sgam = defense in ("sgam", "fgmf", "fgmf+adv")
    assert (type(policy.input_filter).__name__ == "SGAM") == has_sgam
    torch.testing.assert_close(policy(obs.float() / 255),
                               _rllib_logits(latest_checkpoint(out), "shared", obs),
                               rtol=1e-5, atol=1e-6)
    if has_sgam:
        mask = policy.input_filter.last_mask
        assert mask is not None and mask.shape == (obs.shape[0], 21, 21)
        assert float(mask.min()) >= 0 and float(mask.max()) <= 1


@pytest.mark.parametrize("settings, expected", [
    ({"scorpio": {"rho": 1.5}}, "rho"),
    ({"scorpio": {"lambda_curv": -1}}, "lambda_curv"),
    ({"scorpio": {"ig_steps": 0}}, "ig_steps"),
    ({"sgam": {"keep": 0}}, "keep"),
    ({"scorpio": {"bogus": 1}}, "unknown scorpio setting"),
])
def test_defense_settings_fail_at_config_time(settings, expected):
    with pytest.raises(ValueError, match=expected):
        _tiny(defense="fgmf", defense_settings=settings).validate()


def test_interrupt_mid_checkpoint_leaves_no_partial_folder(tmp_path):
    """Ctrl-C inside save_to_path (the race the SIGINT test hits only sometimes): no temp
    folder stays, `latest` is untouched; a stale temp folder from a hard kill is cleared."""
    from agents.run_files import save_checkpoint

    class Interrupted:
        def save_to_path(self, path):
            Path(path).mkdir(parents=True)
            (Path(path) / "half_written").write_text("x")
            raise KeyboardInterrupt

    class Saves:
        def save_to_path(self, path):
            Path(path, "learner_group").mkdir(parents=True)

    save_checkpoint(Saves(), tmp_path, 1, keep=2)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(Interrupted(), tmp_path, 2, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter_00001", "latest"]
    assert (root / "latest").read_text() == "iter_00001"
    (root / ".tmp_iter_00007").mkdir()  # as a SIGKILL mid-save would leave it
    save_checkpoint(Saves(), tmp_path, 3, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["iter_00001", "iter_00003", "latest"]


# ------------------------------------------------------------- env-dependent defaults (issue 9)
@pytest.mark.parametrize("env, kwargs, batch, runners, per_runner, channels", [
    ("beacon", {}, 2000, 0, 8, None),                       # fast env: sample in the driver
    ("pistonball", {}, 2000, 2, 1, [16, 32, 32]),           # 2 x 5 agents x 125 = 1250 -> 2000
    ("cooperative_pong", {}, 4000, 2, 1, [16, 32, 32]),     # 2 x 2 x 900 = 3600 -> 4000
    ("pursuit", {}, 8000, 2, 1, [16, 32, 32]),              # 2 x 8 x 500
    ("pursuit", {"max_cycles": 50}, 2000, 2, 1, [16, 32, 32]),
])
def test_resolved_defaults_follow_the_env(env, kwargs, batch, runners, per_runner, channels):
    cfg = TrainConfig(env=env, env_kwargs=kwargs).resolved()
    assert (cfg.train_batch_size, cfg.num_env_runners, cfg.num_envs_per_env_runner) == \
        (batch, runners, per_runner)
    # both pong paddles see the same screen: one policy each
    assert cfg.policies == ("per-agent" if env == "cooperative_pong" else "shared")
    assert cfg.net.get("channels") == channels
    # the guarantee: a full-length episode fits in every env copy's share of the batch
    from envs import episode_limit, make_env
    n_agents = len(make_env(env, **kwargs).possible_agents)
    share = cfg.train_batch_size / (max(1, runners) * per_runner * n_agents)
    assert share >= episode_limit(env, **kwargs)


def test_resolved_keeps_what_the_user_set():
    cfg = TrainConfig(env="pistonball", train_batch_size=500, num_env_runners=0,
                      num_envs_per_env_runner=3, net={"channels": [8, 8, 8]}).resolved()
    assert (cfg.train_batch_size, cfg.num_env_runners, cfg.num_envs_per_env_runner) == (500, 0, 3)
    assert cfg.net == {"channels": [8, 8, 8]}
    assert TrainConfig(env="cooperative_pong", policies="shared").resolved().policies == "shared"
    # fewer runners: the batch still holds an episode per env copy (1 x 3 x 5 x 125 = 1875)
    assert TrainConfig(env="pistonball", num_env_runners=0, num_envs_per_env_runner=3
                       ).resolved().train_batch_size == 2000
    assert TrainConfig(env="pistonball", arch="vit").resolved().net == {}  # cnn only
    assert TrainConfig(env="pursuit", env_kwargs={"max_cycles": 10 ** 6}
                       ).resolved().train_batch_size == 16000  # capped


def test_bad_declared_training_defaults_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "declared_env.py").write_text(
        "from envs.beacon import BeaconEnv\nTRAINING = {'num_env_runners': -1}\n"
        "def make_env(**kw):\n    return BeaconEnv(**kw)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from envs import training_defaults
    with pytest.raises(ValueError, match=r"TRAINING must be a dict of .* got \{'num_env_runners': -1\}"):
        training_defaults("declared_env:make_env")


@pytest.mark.slow
def test_real_env_defaults_end_episodes_in_every_iteration(ray_session, tmp_path):
    """Two env runners by default on a PettingZoo env; each iteration ends episodes (no NaN)."""
    cfg = TrainConfig(env="pursuit", env_kwargs={"max_cycles": 20}, iterations=2,
                      minibatch_size=500, num_epochs=1)
    result = train(cfg, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["num_env_runners"] == 2 and saved["train_batch_size"] == 2000
    assert saved["net"] == {"channels": [16, 32, 32]}
    for row in result["records"]:
        assert row["num_episodes"] >= 2 and np.isfinite(row["agent_return_mean"]), row
