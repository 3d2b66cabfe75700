"""``marl-fgmf export`` and :mod:`agents.portable`: a policy as safetensors + JSON that loads
without unpickling anything.

A tiny SGAM-defended run is trained with RLlib (one iteration) and exported through the CLI;
the export's logits and a seeded PGD attack equal those of ``load_policy`` on the RLlib
checkpoint; loading works with every unpickler disabled (in process) and under an audit hook
that refuses any pickle (in a subprocess, where the same hook is shown to stop the RLlib
checkpoint); bad exports and bad ``--out`` paths give one-line errors and write nothing.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import attacks
from agents import load_policy
from agents.portable import (PortableError, is_portable, load_portable, load_portable_policies,
                             portable_agent_map, portable_env, portable_module_ids, read_spec)
from agents.train import TrainConfig, train
from conftest import save_untrained_run, tree_hash
from marl_fgmf.cli import main
from marl_fgmf.sgam import SGAM

TINY = dict(train_batch_size=200, minibatch_size=100, num_epochs=1, num_envs_per_env_runner=2,
            iterations=1, net={"channels": [4, 8, 8], "hidden": 16},
            env_kwargs={"n_agents": 2, "max_steps": 20})


def _obs(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 21, 21, 3), generator=torch.Generator().manual_seed(seed))


def _export(checkpoint: Path, out: Path, *extra: str) -> int:
    return main(["export", "--checkpoint", str(checkpoint), "--out", str(out), *extra])


def _one_line_error(capsys, rc: int, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("marl-fgmf export: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def sgam_run(ray_session, tmp_path_factory) -> Path:
    """One RLlib iteration of a shared SGAM-defended CNN on beacon (trained head and encoder)."""
    out = tmp_path_factory.mktemp("export") / "sgam_run"
    train(TrainConfig(**TINY, defense="sgam"), out, progress=False)
    return out


@pytest.fixture(scope="module")
def sgam_export(sgam_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "sgam"
    assert _export(sgam_run, out) == 0
    return out


@pytest.fixture(scope="module")
def per_agent(tmp_path_factory) -> tuple[Path, Path]:
    """An untrained per-agent run (two modules, no Ray) and its export."""
    root = tmp_path_factory.mktemp("per_agent")
    run = save_untrained_run(root / "run", ["agent_0", "agent_1"])
    assert _export(run, root / "export") == 0
    return run, root / "export"


def _copy(export: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(export, dst)
    return dst


def _rewrite(folder: Path, edit_spec=None, edit_tensors=None, update_sha: bool = True) -> None:
    """Change an export's spec and/or tensors (keeping the sha256 consistent unless told)."""
    spec = json.loads((folder / "policy.json").read_text())
    if edit_tensors is not None:
        tensors = safetensors.torch.load((folder / "policy.safetensors").read_bytes())
        edit_tensors(tensors)
        data = safetensors.torch.save(tensors)
        (folder / "policy.safetensors").write_bytes(data)
        if update_sha:
            spec["weights"]["sha256"] = hashlib.sha256(data).hexdigest()
    if edit_spec is not None:
        edit_spec(spec)
    (folder / "policy.json").write_text(json.dumps(spec))


# --------------------------------------------------------------------------- round trip
def test_sgam_export_has_the_documented_spec(sgam_export):
    spec = read_spec(sgam_export)
    assert spec["format"] == "marl-fgmf-policy" and spec["format_version"] == 1
    assert sorted(p.name for p in sgam_export.iterdir()) == ["policy.json", "policy.safetensors"]
    module = spec["modules"]["shared"]
    assert module["architecture"] == "cnn" and module["settings"] == TINY["net"]
    assert module["observation_space"] == {"shape": [21, 21, 3], "low": 0, "high": 255,
                                           "dtype": "uint8"}
    assert module["obs_scale"] == pytest.approx(1 / 255) and module["layout"] == "NHWC"
    assert module["input_filter"]["type"] == "sgam"
    assert module["input_filter"]["settings"]["in_channels"] == 3
    assert spec["agents"] == {"agent_0": "shared", "agent_1": "shared"}
    assert spec["env"] == {"name": "beacon", "kwargs": TINY["env_kwargs"]}
    assert spec["defense"]["name"] == "sgam"
    assert len(spec["action_names"]) == module["n_actions"] == 5
    assert is_portable(sgam_export) and is_portable(sgam_export / "policy.json")
    assert portable_env(sgam_export) == ("beacon", TINY["env_kwargs"])


def test_sgam_policy_round_trips_logits_mask_and_attack(sgam_run, sgam_export):
    """Equal logits, SGAM masks and seeded PGD adversarial observations."""
    ref, got = load_policy(sgam_run, device="cpu"), load_portable(sgam_export, device="cpu")
    assert isinstance(got.input_filter, SGAM) and got.input_filter.config == ref.input_filter.config
    assert not got.training and not is_portable(sgam_run)
    obs = _obs()
    with torch.no_grad():
        torch.testing.assert_close(got(obs), ref(obs), rtol=0, atol=1e-6)
        torch.testing.assert_close(got.value(obs), ref.value(obs), rtol=0, atol=1e-6)
    torch.testing.assert_close(got.input_filter.last_mask, ref.input_filter.last_mask,
                               rtol=0, atol=1e-6)
    adv = [attacks.make_attack("pgd", p, eps=8 / 255, steps=5, seed=3)(obs) for p in (ref, got)]
    torch.testing.assert_close(adv[1], adv[0], rtol=0, atol=1e-6)
    assert float((adv[0] - obs).abs().max()) > 0  # the attack did something


def test_loading_never_calls_an_unpickler(sgam_run, sgam_export, monkeypatch):
    """Every unpickling entry point raises during the load, and the load still works."""
    import cloudpickle

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during a portable load")

    ref = load_policy(sgam_run, device="cpu")
    for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                        (torch, "load"), (cloudpickle, "load"), (cloudpickle, "loads")):
        monkeypatch.setattr(owner, name, refuse)
    got = load_portable(sgam_export, device="cpu")
    with pytest.raises(AssertionError, match="unpickling"):  # the patch is live
        torch.load(sgam_export / "policy.safetensors")
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(got(_obs()), ref(_obs()), rtol=0, atol=1e-6)


def test_no_pickle_runs_under_an_audit_hook(sgam_run, sgam_export):
    """In a fresh interpreter an audit hook refuses every pickle global lookup (any pickle that
    restores an object): the export loads, the RLlib checkpoint does not."""
    script = f"""
import sys
from agents import load_policy
from agents.portable import load_portable

def hook(event, args):
    if event == "pickle.find_class":
        raise RuntimeError("pickle used: " + repr(args))

sys.addaudithook(hook)
policy = load_portable({str(sgam_export)!r}, device="cpu")
print("portable loaded", type(policy).__name__)
policy = load_policy({str(sgam_export)!r}, device="cpu")
print("load_policy loaded the export", type(policy).__name__)
try:
    load_policy({str(sgam_run)!r}, device="cpu")
    print("checkpoint loaded")
except Exception as exc:
    print("checkpoint refused:", exc)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "portable loaded PolicyNetwork" in proc.stdout, proc.stdout
    assert "load_policy loaded the export PolicyNetwork" in proc.stdout, proc.stdout
    assert "checkpoint refused:" in proc.stdout and "pickle used" in proc.stdout, proc.stdout


def test_per_agent_modules_and_mapping(per_agent):
    run, export = per_agent
    assert portable_module_ids(export) == ["agent_0", "agent_1"]
    assert portable_agent_map(export, ["agent_0", "agent_1"]) == {"agent_0": "agent_0",
                                                                  "agent_1": "agent_1"}
    with pytest.raises(ValueError, match="no policy for agents"):
        portable_agent_map(export, ["agent_0", "agent_7"])
    with pytest.raises(ValueError, match="choose policy_id from: agent_0, agent_1"):
        load_portable(export)
    with pytest.raises(ValueError, match="unknown policy id 'shared'"):
        load_portable(export, "shared")
    policies = load_portable_policies(export, device="cpu")
    obs = _obs(4)
    with torch.no_grad():
        for mid in ("agent_0", "agent_1"):
            torch.testing.assert_close(policies[mid](obs), load_policy(run, mid, "cpu")(obs),
                                       rtol=0, atol=0)
        assert not torch.equal(policies["agent_0"](obs), policies["agent_1"](obs))


def test_overwrite_replaces_an_earlier_export_only_when_asked(per_agent, sgam_run, tmp_path,
                                                              capsys):
    _, export = per_agent
    out = _copy(export, tmp_path)
    before = tree_hash(out)
    _one_line_error(capsys, _export(sgam_run, out), "holds an earlier export", "--overwrite")
    assert tree_hash(out) == before
    assert _export(sgam_run, out, "--overwrite") == 0
    assert portable_module_ids(out) == ["shared"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy"]  # no temporaries left


# --------------------------------------------------------------------------- bad --out / input
@pytest.mark.parametrize("case", ["file", "non_empty", "inside_run", "missing_checkpoint",
                                  "export_as_checkpoint", "wrong_env"])
def test_bad_export_arguments_fail_on_one_line_and_write_nothing(case, per_agent, tmp_path,
                                                                 capsys):
    run, export = per_agent
    out, checkpoint, extra = tmp_path / "out", run, []
    if case == "file":
        out.write_text("keep me")
        fragment = "exists and is not a directory"
    elif case == "non_empty":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
        fragment = "non-empty directory that is not an export"
    elif case == "inside_run":
        out = run / "exported"
        fragment = "inside the training run"
    elif case == "missing_checkpoint":
        checkpoint = tmp_path / "nope"
        fragment = "checkpoint not found"
    elif case == "export_as_checkpoint":
        checkpoint = export
        fragment = "already a portable export"
    else:
        extra = ["--env-kwargs", "grid=15"]
        fragment = "takes observations of shape (21, 21, 3) but 'agent_0' sees (45, 45, 3)"
    watched = tmp_path if case != "inside_run" else run
    before = tree_hash(watched)
    _one_line_error(capsys, _export(checkpoint, out, *extra), fragment)
    assert tree_hash(watched) == before


def test_cli_error_is_one_line_in_a_subprocess(per_agent, tmp_path):
    run, export = per_agent
    proc = subprocess.run([sys.executable, "-m", "marl_fgmf.cli", "export", "--checkpoint",
                           str(run), "--out", str(export)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("marl-fgmf export: error: --out")


def _del_tensor(tensors):
    del tensors["agent_0/pi.bias"]


def _add_tensor(tensors):
    tensors["agent_0/extra"] = torch.zeros(2)


def _reshape_tensor(tensors):
    tensors["agent_0/pi.weight"] = tensors["agent_0/pi.weight"][:, :-1].contiguous()


def _double_tensor(tensors):
    tensors["agent_0/pi.bias"] = tensors["agent_0/pi.bias"].double()


def _orphan_tensor(tensors):
    tensors["ghost/pi.bias"] = torch.zeros(5)


def _set(path, value):
    def edit(spec):
        node = spec
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return edit


@pytest.mark.parametrize("spec_edit, tensor_edit, update_sha, fragment", [
    (None, _del_tensor, True, "missing 1 tensor(s) (pi.bias)"),
    (None, _add_tensor, True, "unexpected 1 tensor(s) (extra)"),
    (None, _reshape_tensor, True, "tensor pi.weight has shape (5, 15), its spec needs (5, 16)"),
    (None, _double_tensor, True, "tensor pi.bias has dtype float64, its spec says float32"),
    (None, _orphan_tensor, True, "tensor 'ghost/pi.bias' of no module"),
    (None, _reshape_tensor, False, "do not match the spec (sha256"),
    (_set(["modules", "agent_0", "architecture"], "resnet"), None, True,
     "unknown architecture 'resnet'; allowed: cnn, vit, hybrid"),
    (_set(["modules", "agent_0", "settings", "hidden"], 32), None, True,
     "tensor encoder.head.1.weight has shape (16, 288), its spec needs (32, 288)"),
    (_set(["modules", "agent_0", "settings", "depth"], 2), None, True,
     "unknown cnn setting(s) ['depth']"),
    (_set(["modules", "agent_0", "observation_space", "shape"], [100000, 100000, 3]), None, True,
     "tensor encoder.head.1.weight has shape (16, 288), its spec needs (16, 5000000000)"),
    (_set(["modules", "agent_0", "settings", "activation"], "sigmoid"), None, True,
     "cannot build module 'agent_0' from its spec: unknown activation 'sigmoid'"),
    (_set(["modules", "agent_0", "n_actions"], KeyError), None, True, "lacks field(s) n_actions"),
    (_set(["modules", "agent_0", "layout"], "NCHW"), None, True, "unknown layout 'NCHW'"),
    (_set(["modules", "agent_0", "input_filter"], {"type": "lambda"}), None, True,
     "input_filter must be null or"),
    (_set(["format_version"], 2), None, True, "format version 2, written by a newer marl-fgmf"),
    (_set(["format"], "pickle"), None, True, "not a marl-fgmf policy spec"),
    (_set(["weights", "file"], "../run/policy.safetensors"), None, True,
     "weights file must be a plain file name"),
    (_set(["agents", "agent_1"], "ghost"), None, True, "agents map to unknown module(s) ['ghost']"),
])
def test_bad_exports_fail_on_one_line(per_agent, tmp_path, spec_edit, tensor_edit, update_sha,
                                      fragment):
    folder = _copy(per_agent[1], tmp_path)
    _rewrite(folder, spec_edit, tensor_edit, update_sha)
    with pytest.raises(PortableError) as err:
        load_portable(folder, "agent_0", device="cpu")
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("damage, fragment", [
    ("corrupt_json", "corrupt spec"),
    ("deep_json", "nested too deeply"),
    ("not_utf8", "not UTF-8"),
    ("no_weights", "has no weights file policy.safetensors"),
    ("no_spec", "has no policy.json"),
    ("garbage_weights", "corrupt weights file"),
])
def test_damaged_files_fail_on_one_line(per_agent, tmp_path, damage, fragment):
    folder = _copy(per_agent[1], tmp_path)
    if damage == "corrupt_json":
        (folder / "policy.json").write_text('{"format": "marl-fgmf-policy", ')
    elif damage == "deep_json":
        (folder / "policy.json").write_text("[" * 200000 + "]" * 200000)
    elif damage == "not_utf8":
        (folder / "policy.json").write_bytes(b"\xff\xfe\x00")
    elif damage == "no_weights":
        (folder / "policy.safetensors").unlink()
    elif damage == "no_spec":
        (folder / "policy.json").unlink()
    else:
        garbage = b"\x08\x00\x00\x00\x00\x00\x00\x00not json"
        (folder / "policy.safetensors").write_bytes(garbage)
        _rewrite(folder, _set(["weights", "sha256"], hashlib.sha256(garbage).hexdigest()))
    assert is_portable(folder)  # recognised, so the error names what is wrong
    with pytest.raises(PortableError) as err:
        load_portable(folder, "agent_0", device="cpu")
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not is_portable(tmp_path / "elsewhere")


def test_a_foreign_rllib_module_is_refused_on_one_line(tmp_path, capsys):
    """RLlib's own default PPO module (no marl-fgmf network inside) is not exported (the format
    rebuilds the toolkit's architectures only): one line naming what was found."""
    import gymnasium as gym
    import numpy as np
    from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import \
        DefaultPPOTorchRLModule

    module = DefaultPPOTorchRLModule(
        observation_space=gym.spaces.Box(0.0, 255.0, (21, 21, 3), np.float32),
        action_space=gym.spaces.Discrete(5),
        model_config={"conv_filters": [[8, [3, 3], 2], [16, [3, 3], 2]],
                      "head_fcnet_hiddens": [16]})
    ckpt = tmp_path / "ppo"
    module.save_to_path(str(ckpt / "learner_group" / "learner" / "rl_module" / "ppo_policy"))
    out = tmp_path / "out"
    _one_line_error(capsys, _export(ckpt, out, "--env", "beacon", "--env-kwargs",
                                    "n_agents=2,max_steps=4"),
                    "module 'ppo_policy'", "is a DefaultPPOTorchRLModule",
                    "export takes marl-fgmf modules only")
    assert not out.exists()


def test_commands_take_an_export_as_a_checkpoint(sgam_run, sgam_export, tmp_path):
    """load_policy reads an export, and ``attack`` on it (no --env: the spec names it) gives
    the numbers of the same attack on the RLlib run it came from."""
    torch.testing.assert_close(load_policy(sgam_export, device="cpu")(_obs()),
                               load_policy(sgam_run, device="cpu")(_obs()), rtol=0, atol=1e-6)
    results = {}
    for name, checkpoint in (("run", sgam_run), ("export", sgam_export)):
        out = tmp_path / f"attack_{name}.json"
        assert main(["attack", "--checkpoint", str(checkpoint), "--attack", "pgd", "--steps",
                     "3", "--eps", "8/255", "--episodes", "2", "--quiet", "--out",
                     str(out)]) == 0
        results[name] = json.loads(out.read_text())
    run, export = results["run"], results["export"]
    assert export["env"] == run["env"] == "beacon"
    for a, b in zip(run["results"], export["results"]):
        assert a["team_returns"] == b["team_returns"]
        assert a["success_rate"] == b["success_rate"]
    assert export["clean"]["team_returns"] == run["clean"]["team_returns"]
