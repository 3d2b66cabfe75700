"""Tournaments: matches on Ray, the atomic JSONL log, resume after a crash, the leaderboard,
configuration errors, and the CLI as a user runs it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from agents.train import TrainConfig, train
from marl_fgmf.tournament import driver
from marl_fgmf.tournament import (ConfigError, Match, MatchLog, TournamentConfig,
                                  TournamentResult, build_leaderboard, format_leaderboard,
                                  run_tournament)

TINY = dict(train_batch_size=200, minibatch_size=100, num_epochs=1, num_envs_per_env_runner=2,
            iterations=1)
AUDIT = {"n_obs": 12, "episodes": 1, "steps": [1, 3], "restarts": [1, 2], "n_queries": 20}


@pytest.fixture(scope="module")
def defenders(ray_session, tmp_path_factory) -> dict[str, Path]:
    """Two tiny beacon runs (one RLlib iteration each): undefended and FGMF-defended."""
    root = tmp_path_factory.mktemp("defenders")
    runs = {}
    for defense in ("none", "fgmf"):
        out = root / defense
        train(TrainConfig(defense=defense, **TINY), out, progress=False)
        runs[defense] = out
    return runs


def tiny_config(defenders: dict[str, Path], audit: object = False, **extra) -> dict:
    return {"name": "tiny",
            "defenders": [{"name": n, "checkpoint": str(p)} for n, p in defenders.items()],
            "attackers": ["fgsm", {"name": "pgd3", "attack": "pgd", "settings": {"steps": 3}},
                          "random"],
            "eps": ["8/255"], "episodes": 2, "seeds": [0], "audit": audit, **extra}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


ADDED = ("bpda", "eot")  # added for the SGAM-filtered fgmf defender (the configs list neither)


def expected_keys(cfg: TournamentConfig) -> set[str]:
    """The config's matches, plus bpda and eot for every defender that is an fgmf run."""
    keys = {m.key for m in cfg.matches()}
    for d in cfg.defenders:
        if d.name == "fgmf" or (d.train or {}).get("defense") == "fgmf":
            keys |= {Match(d.name, a, e, s).key for a in ADDED for e in cfg.eps
                     for s in cfg.seeds}
    return keys


# ---------------------------------------------------------------------- a whole tournament
def test_tiny_tournament_runs_on_ray_and_writes_everything(defenders, tmp_path):
    cfg = TournamentConfig.from_dict(tiny_config(defenders, audit=AUDIT))
    out = tmp_path / "t"
    result = run_tournament(cfg, out, workers=2, progress=False, log=lambda m: None)
    records = jsonl(out / "matches.jsonl")
    assert len(records) == 2 * 3 + 2 + 2 == len(expected_keys(cfg))
    assert {r["key"] for r in records} == expected_keys(cfg)
    added = {r["key"] for r in records if r["added"]}
    assert added == {"fgmf|bpda|0.03137254902|0", "fgmf|eot|0.03137254902|0"}, added
    by_key = {r["key"]: r for r in records}
    bpda, eot = by_key["fgmf|bpda|0.03137254902|0"], by_key["fgmf|eot|0.03137254902|0"]
    # through the filter, with the config's pgd3 budget
    assert bpda["attack_settings"]["attack"] == "bpda"
    assert bpda["attack_settings"]["preprocess"] == "input_filter"
    assert bpda["attack_settings"]["inner"]["steps"] == 3
    assert eot["attack_settings"]["attack"] == "eot"
    assert eot["attack_settings"]["inner"]["attack"] == "bpda"
    assert all(r["pid"] != os.getpid() for r in records), "matches must run in Ray workers"
    for r in records:
        assert r["episodes"] == 2 and len(r["team_returns"]) == 2
        assert set(r["team_return"]) >= {"mean", "ci95"} and set(r["agent_return"]) == {
            "agent_0", "agent_1"}
        assert r["wall_s"] > 0 and 0.0 <= r["success_rate"] <= 1.0
        if r["attacker"] != "clean":
            assert 0 < r["mean_linf"] <= 8 / 255 + 1e-6
    for name in ("leaderboard.json", "leaderboard.md", "report.md", "heatmap_eps8_255.png",
                 "robust_vs_eps.png", "audit_none.json", "audit_fgmf.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["complete"] and board["matches_total"] == len(records)
    assert [r["rank"] for r in board["defenders"]] == [1, 2]
    robust = [r["robust"]["8/255"]["mean"] for r in board["defenders"]]
    assert robust == sorted(robust, reverse=True), "ranks must follow the robust return"
    assert board["attackers"] == ["fgsm", "pgd3", "random"]
    assert board["added_attackers"] == list(ADDED)
    rows = {r["defender"]: r for r in board["defenders"]}
    assert rows["fgmf"]["added"] == list(ADDED) and rows["none"]["added"] == []
    assert set(rows["fgmf"]["cells"]["8/255"]) == {"fgsm", "pgd3", "random", *ADDED}
    assert set(rows["none"]["cells"]["8/255"]) == {"fgsm", "pgd3", "random"}
    for row in board["defenders"]:
        cells = row["cells"]["8/255"]
        worst = min(cells, key=lambda a: cells[a]["mean"])
        assert row["robust"]["8/255"]["mean"] == pytest.approx(cells[worst]["mean"])
        assert row["audited"] and isinstance(row["flagged"], bool)
    report = (out / "report.md").read_text()
    assert "Gradient-masking audit" in report and "heatmap_eps8_255.png" in report
    assert "**Added**: bpda, eot" in report and "| fgmf | eot (added) | 8/255 |" in report
    assert "| none | bpda" not in report
    table = format_leaderboard(result.leaderboard)
    assert "robust@8/255" in table and "none" in table and "fgmf" in table
    audit = json.loads((out / "audit_fgmf.json").read_text())
    assert audit["policies"]["shared"]["policy"]["input_filter"] == "SGAM"

    # rerunning does nothing new: every match is skipped, the audits are reused
    before = (out / "matches.jsonl").read_bytes()
    mtime = (out / "audit_none.json").stat().st_mtime_ns
    again = run_tournament(cfg, out, workers=2, progress=False, log=lambda m: None)
    assert again.played == 0 and again.skipped == len(expected_keys(cfg))
    assert (out / "matches.jsonl").read_bytes() == before
    assert (out / "audit_none.json").stat().st_mtime_ns == mtime


def test_crash_after_first_matches_then_resume_completes_without_duplicates(
        defenders, tmp_path, monkeypatch):
    def crash(written: int) -> None:
        if written >= 3:
            raise RuntimeError(f"test hook: stopping after {written} matches")

    cfg = TournamentConfig.from_dict(tiny_config(defenders))
    out = tmp_path / "t"
    with monkeypatch.context() as patch:
        patch.setattr(driver, "after_match_written", crash)
        with pytest.raises(RuntimeError, match="test hook"):
            run_tournament(cfg, out, workers=2, progress=False, log=lambda m: None)
    first = jsonl(out / "matches.jsonl")
    assert len(first) == 3, "the crash must come after exactly the matches written"
    result = run_tournament(cfg, out, workers=2, progress=False, log=lambda m: None)
    records = jsonl(out / "matches.jsonl")
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)), "a match was played twice"
    assert set(keys) == expected_keys(cfg), "a match is missing"
    assert result.skipped == 3 and result.played == len(expected_keys(cfg)) - 3
    assert records[:3] == first, "finished matches must not be rewritten"

    # a crash mid-write leaves a truncated last line: reported, set aside, and replayed
    data = (out / "matches.jsonl").read_bytes()
    lost = jsonl(out / "matches.jsonl")[-1]["key"]
    (out / "matches.jsonl").write_bytes(data[:-40])
    warnings: list[str] = []
    result = run_tournament(cfg, out, workers=2, progress=False, log=warnings.append)
    n = len(expected_keys(cfg))
    assert any(f"line {n} is truncated" in w for w in warnings), warnings
    assert result.played == 1
    records = jsonl(out / "matches.jsonl")
    assert sorted(r["key"] for r in records) == sorted(expected_keys(cfg))
    assert records[-1]["key"] == lost
    assert (out / "matches.corrupt.txt").read_bytes() == data[:-40].split(b"\n")[-1] + b"\n"


@pytest.mark.slow
def test_killed_cli_tournament_resumes(defenders, tmp_path):
    """SIGKILL the real CLI once the first match is on disk; the rerun completes it."""
    cfg_path = tmp_path / "t.json"
    conf = tiny_config(defenders)
    conf["attackers"].append({"name": "square", "attack": "square", "settings": {"n_queries": 40}})
    cfg_path.write_text(json.dumps(conf))
    out = tmp_path / "out"
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rt"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "marl_fgmf.cli", "tournament", "--config", str(cfg_path),
           "--out", str(out), "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    log = out / "matches.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and log.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the tournament finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray with it
    proc.wait(timeout=60)
    done_before = len(jsonl(log))
    assert 1 <= done_before < len(expected_keys(TournamentConfig.from_file(cfg_path)))
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming: {done_before} of" in rerun.stdout
    keys = [r["key"] for r in jsonl(log)]
    assert len(keys) == len(set(keys))
    assert set(keys) == expected_keys(TournamentConfig.from_file(cfg_path))
    assert "rank" in rerun.stdout and "robust@8/255" in rerun.stdout


# ---------------------------------------------------------------------- reruns: fingerprints
PGD3 = {"name": "pgd3", "attack": "pgd", "settings": {"steps": 3}}


def small_config(defenders: dict[str, Path], **extra) -> dict:
    """Two defenders x (fgsm, pgd3) + clean, and bpda + eot added for fgmf: 8 matches of one
    episode, no audit."""
    return tiny_config(defenders, **{"attackers": ["fgsm", PGD3], "episodes": 1, **extra})


def play(conf: dict, out: Path) -> tuple[TournamentResult, str]:
    """Run the tournament quietly; returns the result and its counts line."""
    lines: list[str] = []
    result = run_tournament(TournamentConfig.from_dict(conf), out, workers=2, progress=False,
                            log=lines.append)
    counts = [line for line in lines if " reused, " in line]
    assert len(counts) == 1, lines
    return result, counts[0]


def test_rerun_unchanged_reuses_every_match_and_replays_a_record_without_fingerprint(
        defenders, tmp_path):
    out = tmp_path / "t"
    conf = small_config(defenders)
    first, line = play(conf, out)
    assert line == "0 reused, 0 replayed (settings changed), 8 new"
    assert (first.reused, first.replayed, first.new, first.played) == (0, 0, 8, 8)
    records = jsonl(out / "matches.jsonl")
    assert all(len(r["fingerprint"]) == 64 for r in records)
    assert len({r["fingerprint"] for r in records}) == 8
    hashes = {r["defender"]: r["defender_hash"] for r in records}
    assert len(hashes) == 2 and len(set(hashes.values())) == 2
    assert all(r["defender_hash"] == hashes[r["defender"]] for r in records)

    # (a) nothing changed: everything reused, the log untouched
    before = (out / "matches.jsonl").read_bytes()
    again, line = play(conf, out)
    assert line == "8 reused, 0 replayed (settings changed), 0 new"
    assert (again.reused, again.replayed, again.new) == (8, 0, 0)
    assert (again.played, again.skipped) == (0, 8)
    assert (out / "matches.jsonl").read_bytes() == before
    assert not (out / "matches.stale.jsonl").exists()

    # a defender left out of the config: its records stay in the log but are not shown
    alone, line = play({**conf, "defenders": conf["defenders"][:1]}, out)
    assert line == "3 reused, 0 replayed (settings changed), 0 new"
    assert (out / "matches.jsonl").read_bytes() == before
    assert [r["defender"] for r in alone.leaderboard["defenders"]] == ["none"]
    assert alone.leaderboard["complete"] and alone.leaderboard["matches_total"] == 3

    # (e) an old log: a record without a fingerprint is replayed, and reported
    old = records[2]
    rewritten = [{k: v for k, v in r.items() if k not in ("fingerprint", "defender_hash")}
                 if r["key"] == old["key"] else r for r in records]
    (out / "matches.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rewritten))
    replay, line = play(conf, out)
    assert line.startswith("7 reused, 1 replayed (settings changed), 0 new")
    assert "matches.stale.jsonl" in line
    assert (replay.replayed, replay.played, replay.skipped) == (1, 1, 7)
    assert jsonl(out / "matches.stale.jsonl") == [rewritten[2]]
    now = jsonl(out / "matches.jsonl")
    assert sorted(r["key"] for r in now) == sorted(r["key"] for r in records)
    assert now[-1]["key"] == old["key"] and now[-1]["fingerprint"] == old["fingerprint"]
    assert now[:-1] == records[:2] + records[3:], "the other records must stay as they were"


def test_changed_settings_replay_exactly_the_matches_they_decide(defenders, tmp_path):
    out = tmp_path / "t"
    conf = small_config(defenders)
    play(conf, out)
    first = {r["key"]: r for r in jsonl(out / "matches.jsonl")}

    # (c) one attacker's settings: only its matches are replayed, and those of the added
    # bpda and eot, whose inner PGD takes pgd3's settings
    pgd4 = {**PGD3, "settings": {"steps": 4}}
    changed = small_config(defenders, attackers=["fgsm", pgd4])
    result, line = play(changed, out)
    assert line.startswith("4 reused, 4 replayed (settings changed), 0 new"), line
    pgd_keys = {k for k, r in first.items() if r["attacker"] == "pgd3"}
    added_keys = {k for k, r in first.items() if r["added"]}
    assert len(pgd_keys) == 2 and {first[k]["attacker"] for k in added_keys} == set(ADDED)
    stale = jsonl(out / "matches.stale.jsonl")
    assert stale == [first[k] for k in first if k in pgd_keys | added_keys]
    now = {r["key"]: r for r in jsonl(out / "matches.jsonl")}
    assert len(now) == len(jsonl(out / "matches.jsonl")) == 8, "one record per match"
    assert all(now[k] == first[k] for k in first if k not in pgd_keys | added_keys)
    assert all(now[k]["attack_settings"]["steps"] == 4 for k in pgd_keys)
    assert now["fgmf|bpda|0.03137254902|0"]["attack_settings"]["inner"]["steps"] == 4
    assert all(now[k]["fingerprint"] != first[k]["fingerprint"] for k in pgd_keys | added_keys)

    # (b) episodes: every match is replayed, the leaderboard shows the new episodes only
    more = small_config(defenders, attackers=["fgsm", pgd4], episodes=2)
    result, line = play(more, out)
    assert line.startswith("0 reused, 8 replayed (settings changed), 0 new"), line
    assert (result.played, result.skipped) == (8, 0)
    records = jsonl(out / "matches.jsonl")
    assert len(records) == 8 and {r["key"] for r in records} == set(first)
    assert all(r["episodes"] == 2 and len(r["team_returns"]) == 2 for r in records)
    board = result.leaderboard
    assert board["episodes"] == 2 and board["complete"]
    for row in board["defenders"]:
        assert row["clean"]["n_episodes"] == 2
        assert all(cell["n_episodes"] == 2 for cell in row["cells"]["8/255"].values())
    stale = jsonl(out / "matches.stale.jsonl")
    assert len(stale) == 4 + 8 and all(r["episodes"] == 1 for r in stale)
    assert {r["key"] for r in stale[4:]} == set(first)


def test_further_trained_defender_is_replayed_with_its_audit(defenders, tmp_path):
    copy = tmp_path / "none"
    shutil.copytree(defenders["none"], copy)
    conf = {"name": "retrain", "episodes": 1, "eps": ["8/255"], "audit": AUDIT,
            "defenders": [{"name": "copy", "checkpoint": str(copy)},
                          {"name": "fgmf", "checkpoint": str(defenders["fgmf"])}],
            "attackers": ["fgsm"]}
    out = tmp_path / "t"
    play(conf, out)
    first = {r["key"]: r for r in jsonl(out / "matches.jsonl")}
    audit_copy = json.loads((out / "audit_copy.json").read_text())
    audit_fgmf = (out / "audit_fgmf.json").read_bytes()
    assert audit_copy["defender_hash"] == first["copy|clean|-|0"]["defender_hash"]
    assert len(audit_copy["fingerprint"]) == 64 and audit_copy["checkpoint"]

    # one more training iteration, same run folder: other weights under the same path
    train(TrainConfig(defense="none", **{**TINY, "iterations": 2}), copy, resume=True,
          progress=False)
    result, line = play(conf, out)
    assert line.startswith("4 reused, 2 replayed (settings changed), 0 new"), line
    now = {r["key"]: r for r in jsonl(out / "matches.jsonl")}
    for key, rec in first.items():
        if rec["defender"] == "copy":
            assert now[key]["defender_hash"] != rec["defender_hash"]
            assert now[key]["fingerprint"] != rec["fingerprint"]
        else:
            assert now[key] == rec
    assert sorted(r["key"] for r in jsonl(out / "matches.stale.jsonl")) == sorted(
        k for k, r in first.items() if r["defender"] == "copy")
    audit_again = json.loads((out / "audit_copy.json").read_text())
    assert audit_again["defender_hash"] == now["copy|clean|-|0"]["defender_hash"]
    assert audit_again["fingerprint"] != audit_copy["fingerprint"]
    assert (out / "audit_fgmf.json").read_bytes() == audit_fgmf, "fgmf's audit is current"
    assert all(row["audited"] for row in result.leaderboard["defenders"])


# ---------------------------------------------------------------------- configuration errors
def test_invalid_config_reports_every_problem_before_anything_runs(defenders, tmp_path):
    conf = {
        "env": "nowhere",
        "defenders": [{"name": "a", "checkpoint": str(defenders["none"])},
                      {"name": "a", "checkpoint": str(defenders["fgmf"])},
                      {"name": "gone", "checkpoint": str(tmp_path / "missing")}],
        "attackers": ["fgsm", "fgsm", {"name": "x", "attack": "laser"},
                      {"name": "p", "attack": "pgd", "settings": {"stepz": 3}}],
        "eps": ["8/255", 0.0313725490196, 2, "abc"],
        "episodes": 1,
        "audit": {"steps": [0, 3], "objective": "dlr", "colour": "red"},
    }
    cfg = TournamentConfig.from_dict(conf)
    errors = cfg.validate()
    expected = ["duplicate defender name 'a'", "duplicate attacker name 'fgsm'",
                "duplicate eps '8/255'", "invalid eps 2", "invalid eps 'abc'",
                "unknown env 'nowhere'", "defender gone: checkpoint not found",
                "attacker x: unknown attack 'laser'", "attacker p: unknown setting(s) stepz",
                "audit: unknown key(s) colour", "audit steps must be a non-empty list",
                "audit objective must be 'margin' or 'ce'"]
    for text in expected:
        assert any(text in e for e in errors), (text, errors)
    assert all("\n" not in e for e in errors)
    with pytest.raises(ConfigError) as info:
        run_tournament(cfg, tmp_path / "never", progress=False)
    assert len(info.value.errors) == len(errors)
    assert not (tmp_path / "never").exists(), "nothing may start for an invalid config"


def test_cli_config_errors_one_line_each_exit_2(defenders, tmp_path):
    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text(
        "defenders:\n"
        f"  - {{name: ok, checkpoint: {defenders['none']}}}\n"
        "  - {name: lost, checkpoint: no/such/run}\n"
        "attackers: [fgsm, {name: z, attack: zap}]\n"
        "eps: [8/255, 0]\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "marl_fgmf.cli", "tournament", "--config",
                           str(cfg_path), "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 3, proc.stderr
    assert all(line.startswith("marl-fgmf tournament: error: ") for line in lines)
    text = "\n".join(lines)
    # relative paths resolve against the config file's folder
    assert f"defender lost: checkpoint not found: {tmp_path / 'no/such/run'}" in text
    assert "attacker z: unknown attack 'zap'" in text and "invalid eps 0" in text
    assert "Traceback" not in proc.stderr and not out.exists()
    missing = subprocess.run([sys.executable, "-m", "marl_fgmf.cli", "tournament", "--config",
                              str(tmp_path / "nope.yaml"), "--out", str(out)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "config file not found" in missing.stderr


def test_defender_that_does_not_fit_the_env_is_one_error(defenders, tmp_path):
    """A checkpoint trained on 21x21 frames against an env override giving 27x27: one line
    naming the defender and the shapes, before any match (not a torch shape error per match)."""
    cfg = TournamentConfig.from_dict(tiny_config({"none": defenders["none"]}, env="beacon",
                                                 env_kwargs={"grid": 9}))
    with pytest.raises(ConfigError) as info:
        run_tournament(cfg, tmp_path / "t", progress=False, log=lambda m: None)
    assert info.value.errors == [
        "defender none: policy 'policy' takes observations of shape (21, 21, 3) but 'agent_0' "
        "sees (27, 27, 3): wrong --env or --env-kwargs?"], info.value.errors
    assert not (tmp_path / "t" / "matches.jsonl").exists()


def test_yaml_config_and_relative_paths(defenders, tmp_path, monkeypatch):
    (tmp_path / "runs").symlink_to(defenders["none"].parent)
    cfg_path = tmp_path / "t.yml"
    cfg_path.write_text("defenders:\n  - {name: d, checkpoint: runs/none}\n"
                        "attackers:\n  - fgsm\n  - {name: sq, attack: square, settings: "
                        "{n_queries: 10}}\neps: [4/255, 8/255]\nseeds: [0, 1]\nepisodes: 3\n"
                        "audit: {eps: 4/255, n_obs: 8}\n")
    cfg = TournamentConfig.from_file(cfg_path)
    assert cfg.validate() == []
    assert cfg.defenders[0].checkpoint == tmp_path / "runs" / "none"
    assert cfg.eps == pytest.approx([4 / 255, 8 / 255]) and cfg.audit_eps() == pytest.approx(4 / 255)
    assert len(cfg.matches()) == 2 + 2 * 2 * 2
    assert cfg.attackers[1].settings == {"n_queries": 10}
    # a relative config path still gives absolute checkpoints (RLlib and Ray workers need them)
    monkeypatch.chdir(tmp_path)
    rel = TournamentConfig.from_file("t.yml")
    assert rel.defenders[0].checkpoint.is_absolute()
    assert rel.defenders[0].checkpoint == tmp_path / "runs" / "none"


# ---------------------------------------------------------------------- log and leaderboard
def test_match_log_reports_a_corrupt_middle_line(tmp_path):
    log = MatchLog(tmp_path / "matches.jsonl")
    rec = {"key": "d|a|0.1|0", "defender": "d", "attacker": "a", "seed": 0, "episodes": 1,
           "team_return": {"mean": 1.0, "ci95": 0.0}, "team_returns": [1.0]}
    log.append(rec)
    log.close()
    with open(tmp_path / "matches.jsonl", "ab") as fh:
        fh.write(b'{"key": "garbage\n')
    log = MatchLog(tmp_path / "matches.jsonl")
    log.append({**rec, "key": "d|a|0.2|0"})
    log.close()
    warnings: list[str] = []
    records = MatchLog(tmp_path / "matches.jsonl").load(warnings.append)
    assert set(records) == {"d|a|0.1|0", "d|a|0.2|0"}
    assert len(warnings) == 1 and "line 2 is corrupt" in warnings[0]
    assert len(jsonl(tmp_path / "matches.jsonl")) == 2
    assert b"garbage" in (tmp_path / "matches.corrupt.txt").read_bytes()


def test_leaderboard_ranks_by_worst_attacker_and_marks_flagged():
    cfg = TournamentConfig.from_dict({
        "defenders": [{"name": "a", "checkpoint": "x"}, {"name": "b", "checkpoint": "y"}],
        "attackers": ["fgsm", "pgd"], "eps": ["4/255", "8/255"], "seeds": [0]})

    def rec(m: Match, ret: float) -> dict:
        return {"key": m.key, "defender": m.defender, "attacker": m.attacker, "seed": 0,
                "episodes": 2, "team_returns": [ret, ret], "success_rate": 0.5,
                "agent_steps": 10, "team_return": {"mean": ret, "ci95": 0.0}}

    returns = {("a", "clean"): 10, ("b", "clean"): 12,
               ("a", "fgsm"): 6, ("a", "pgd"): 4, ("b", "fgsm"): 5, ("b", "pgd"): 2}
    records = {}
    for m in cfg.matches():
        value = returns[(m.defender, m.attacker)] - (1 if m.eps and m.eps > 5 / 255 else 0)
        records[m.key] = rec(m, value)
    audits = {"a": {"status": "ok", "flagged": True, "policies": {"shared": {"checks": [
        {"name": "large_budget", "passed": False}]}}}}
    board = build_leaderboard(cfg, records, audits)
    a, b = board["defenders"]
    assert (a["defender"], a["rank"], b["defender"]) == ("a", 1, "b")
    assert a["robust"]["8/255"]["mean"] == pytest.approx(3.0)
    assert a["robust"]["8/255"]["worst_attacker"] == "pgd"
    assert b["robust"]["8/255"]["mean"] == pytest.approx(1.0)
    assert a["flagged"] and a["audit_failed"] == ["large_budget"] and not b["flagged"]
    assert board["complete"]
    assert "FLAGGED (large_budget)" in format_leaderboard(board)
    del records[Match("b", "pgd", 8 / 255, 0).key]
    partial = build_leaderboard(cfg, records)
    assert not partial["complete"]
    row_b = next(r for r in partial["defenders"] if r["defender"] == "b")
    assert row_b["robust"]["8/255"] is None and "incomplete" in format_leaderboard(partial)


# ---------------------------------------------------------------------- training specs, learned adversaries
def test_training_spec_defender_and_learned_adversary(defenders, tmp_path):
    """A defender given as a training spec is trained into DIR/defenders/<name> first; a
    learned adversary (agents.adversary) plays like any attacker, at every eps of the list."""
    from agents.adversary import train_adversary
    adv_dir = tmp_path / "adv"
    train_adversary(defenders["none"], adv_dir, eps="8/255", iterations=1, progress=False,
                    train_batch_size=200, minibatch_size=100, num_epochs=1,
                    num_envs_per_env_runner=2)
    conf = {"defenders": [{"name": "spec", "train": {"defense": "none", **TINY}},
                          {"name": "ckpt", "checkpoint": str(defenders["none"])}],
            "attackers": ["fgsm", {"name": "rl", "adversary": str(adv_dir)}],
            "eps": ["4/255"], "episodes": 1, "audit": False}
    cfg = TournamentConfig.from_dict(conf)
    assert cfg.validate() == []
    out = tmp_path / "t"
    run_tournament(cfg, out, progress=False, log=lambda m: None)
    assert (out / "defenders" / "spec" / "run.json").is_file()
    records = {r["key"]: r for r in jsonl(out / "matches.jsonl")}
    assert set(records) == expected_keys(cfg)
    learned = [r for r in records.values() if r["attacker"] == "rl"]
    assert len(learned) == 2 and all(r["kind"] == "learned" for r in learned)
    assert all(r["eps_actual"] == pytest.approx(4 / 255) for r in learned)
    assert all(r["mean_linf"] <= 4 / 255 + 1e-6 for r in learned)
    # a second run reuses the trained defender (no retraining) and every match
    again = run_tournament(cfg, out, progress=False, log=lambda m: None)
    assert again.played == 0
    bad = TournamentConfig.from_dict({**conf, "attackers": [
        {"name": "rl", "adversary": str(defenders["none"])}]})
    assert any("attacker rl: not an adversary run" in e for e in bad.validate())
    # a changed training spec is refused before anything runs: never resumed on top of the
    # run trained with the old spec, which stays as it was
    run_json = (out / "defenders" / "spec" / "run.json").read_bytes()
    changed = TournamentConfig.from_dict({**conf, "defenders": [
        {"name": "spec", "train": {"defense": "none", **TINY, "lr": 1e-3}},
        conf["defenders"][1]]})
    errors = changed.validate(out)
    assert errors == [f"defender spec: its training spec changed since "
                      f"{out / 'defenders' / 'spec'} was trained (lr: 0.0005 -> 0.001); move "
                      f"that run away (it is never deleted) or restore the spec"], errors
    with pytest.raises(ConfigError):
        run_tournament(changed, out, progress=False, log=lambda m: None)
    assert (out / "defenders" / "spec" / "run.json").read_bytes() == run_json
    longer = TournamentConfig.from_dict({**conf, "defenders": [
        {"name": "spec", "train": {"defense": "none", **{**TINY, "iterations": 2}}},
        conf["defenders"][1]]})
    assert longer.validate(out) == [], "more iterations of the same spec resume the run"


def test_own_attackers_play_their_defender_only_and_are_checked(tmp_path):
    """A defender's own attackers: listed for it alone (after the config's), one leaderboard
    column across defenders, adaptive attacks not added twice, and every problem named."""
    from marl_fgmf.tournament.adaptive import added_attackers
    from tests.conftest import save_untrained_run
    a, b = save_untrained_run(tmp_path / "a", ["shared"]), save_untrained_run(tmp_path / "b", ["shared"])
    conf = {"env": "beacon", "env_kwargs": {"n_agents": 2, "max_steps": 4}, "eps": ["8/255"],
            "attackers": ["fgsm"],
            "defenders": [{"name": "a", "checkpoint": str(a),
                           "attackers": [{"name": "bpda", "attack": "bpda"},
                                         {"name": "mine", "attack": "pgd",
                                          "settings": {"steps": 2}}]},
                          {"name": "b", "checkpoint": str(b),
                           "attackers": [{"name": "mine", "attack": "apgd"}]}]}
    cfg = TournamentConfig.from_dict(conf)
    assert cfg.validate() == []
    assert [x.name for x in cfg.attackers_of("a")] == ["fgsm", "bpda", "mine"]
    assert [x.name for x in cfg.attackers_of("b")] == ["fgsm", "mine"]
    keys = {m.key for m in cfg.matches()}
    assert "a|bpda|0.03137254902|0" in keys and "b|bpda|0.03137254902|0" not in keys
    assert cfg.own_attacker_names() == ["bpda", "mine"]
    # a filtered defender that lists BPDA gets only EOT added; the other gets both
    added = added_attackers(cfg, {"a": True, "b": True})
    assert [x.name for x in added["a"]] == ["eot"]
    assert [x.name for x in added["b"]] == ["bpda", "eot"]
    board = build_leaderboard(cfg, {})
    assert board["attackers"] == ["fgsm", "bpda", "mine"]

    conf["defenders"][0]["attackers"] += [{"name": "fgsm", "attack": "fgsm"},
                                          {"name": "mine", "attack": "fgsm"},
                                          {"name": "bad name", "attack": "pgd"},
                                          {"name": "z", "attack": "laser"}]
    conf["defenders"][1]["attackers"] = "pgd"
    errors = TournamentConfig.from_dict(conf).validate()
    for text in ("defender a: its attacker 'fgsm' has the name of a config attacker",
                 "defender a: duplicate attacker name 'mine'",
                 "defender a: attacker name 'bad name' must start",
                 "defender a: attacker z: unknown attack 'laser'",
                 "defender b: attackers must be a list"):
        assert any(text in e for e in errors), (text, errors)
