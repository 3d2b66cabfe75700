"""The benchmark: the smoke suite end to end on Ray (crash, resume, replay gives the same
numbers), the analysis against oracles, the claims' verdict rule, the README block, bad input."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from marl_fgmf.benchmark import get_suite
from marl_fgmf.benchmark.analysis import margin_verdict, pgca_ratio, verdict
from marl_fgmf.benchmark.report import BEGIN, END, claims_markdown, update_readme
from marl_fgmf.io import to_jsonable
from marl_fgmf.stats import iqm, margin_of_aggregates, ratio_of_aggregates
from tests.conftest import tree_hash

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- end to end
def _done(count: dict) -> dict:
    return {k: v for k, v in count.items() if k != "seconds"}


def test_smoke_suite_crash_resume_and_replay_give_the_same_numbers(ray_session, tmp_path,
                                                                    monkeypatch):
    """The smoke suite trains every defence, attacks, audits, explains and reports. A crash
    after the first match records resumes without retraining; replaying one run's matches
    from scratch (same seeds) gives the same numbers."""
    import marl_fgmf.tournament.driver as driver
    from marl_fgmf.benchmark.runner import run_benchmark

    suite, out = get_suite("smoke"), tmp_path / "bench"

    def crash(written: int) -> None:
        if written >= 4:
            raise RuntimeError("simulated crash")
    monkeypatch.setattr(driver, "after_match_written", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_benchmark(suite, out, progress=False, log=lambda m: None)
    monkeypatch.undo()
    assert len((out / "tournaments" / "beacon" / "matches.jsonl").read_text().splitlines()) >= 4

    result = run_benchmark(suite, out, progress=False, log=lambda m: None)
    counts = result.counts
    assert _done(counts["training"]) == {"reused": 6, "new": 0}, counts
    assert _done(counts["wall-clock training"]) == {"reused": 2, "new": 0}, counts
    assert _done(counts["adversaries"]) == {"reused": 8, "new": 0}, counts
    assert all(v["seconds"] >= 0 for v in counts.values())
    assert counts["matches beacon"]["reused"] >= 4 and counts["matches beacon"]["replayed"] == 0
    summary = result.summary

    # every file of the report, every run with finite numbers, per-seed points
    for name in ("benchmark.json", "report.md", "profiles.png", "robust_vs_eps_beacon.png",
                 "ablation.png", "cost_vs_robustness.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert len(summary["runs"]) == 8
    for r in summary["runs"]:
        assert math.isfinite(r["clean"]) and math.isfinite(r["robust"]["8/255"]), r["name"]
        assert r["wall_time_s"] > 0 and r["worst"]["8/255"] is not None
        assert r["cells"]["8/255"]["paad"] is not None, "each defender meets its own PA-AD"
        if r["defence"] in ("sgam", "fgmf", "fgmf+adv", "fgmf-wall"):
            assert r["cells"]["8/255"].get("bpda") is not None, "input filter without BPDA"
    # the robust return is the minimum over the ensemble
    for r in summary["runs"]:
        cells = [c["mean"] for c in r["cells"]["8/255"].values() if c is not None]
        assert r["robust"]["8/255"] == pytest.approx(min(cells))
    ref = summary["envs"]["beacon"]
    assert ref["reference_kind"] == "scripted optimum" and ref["reference"] > ref["random"]
    kinds = {c["claim"] for c in summary["claims"]}
    assert kinds == {"robust_return", "faithfulness", "cost"}, summary["claims"]
    assert all(c["verdict"].startswith("undecided") for c in summary["claims"]), \
        "one seed decides nothing"
    assert all(r["cpu_s"] > 0 and len(r["load"]) == 2 for r in summary["runs"])
    faith = summary["faithfulness"]["per_run"]
    assert set(faith) == {r["name"] for r in summary["runs"] if not r["wallclock"]}
    assert {"pgca", "random", "brightness", "ig"} <= set(faith["beacon.fgmf.s0"]["methods"])
    report = (out / "report.md").read_text()
    assert "beacon.fgmf.s0" in report and "## The claims" in report
    saved = json.loads((out / "benchmark.json").read_text())
    assert saved["claims"] == json.loads(json.dumps(to_jsonable(summary["claims"])))

    # replay one run's matches from nothing: the same numbers (same seeds)
    log = out / "tournaments" / "beacon" / "matches.jsonl"
    kept = [ln for ln in log.read_text().splitlines()
            if json.loads(ln)["defender"] != "beacon.fgmf.s0"]
    log.write_text("\n".join(kept) + "\n")
    (out / "faithfulness" / "beacon.fgmf.s0.json").unlink()
    again = run_benchmark(suite, out, progress=False, log=lambda m: None)
    assert again.counts["matches beacon"]["new"] > 0
    assert _done(again.counts["faithfulness"]) == {"reused": 5, "new": 1}
    before = {r["name"]: r for r in summary["runs"]}
    for r in again.summary["runs"]:
        assert r["cells"] == before[r["name"]]["cells"], r["name"]
    assert (again.summary["faithfulness"]["per_run"]["beacon.fgmf.s0"]
            == summary["faithfulness"]["per_run"]["beacon.fgmf.s0"])

    # another suite's folder is refused, nothing changed
    digest = tree_hash(out)
    from marl_fgmf.benchmark.runner import check_out
    with pytest.raises(ValueError, match="holds the results of suite 'smoke'"):
        check_out(get_suite("small"), out)
    assert tree_hash(out) == digest


@pytest.mark.parametrize("name", ["small", "full"])
def test_built_in_suites_pass_their_checks_and_env_runners_are_refused(name, tmp_path):
    """A benchmark training is a Ray job of one CPU sampling in its own process: an env
    runner (an actor of one CPU the job does not hold) never starts once every CPU is held
    by a training job, so pistonball's declared two runners hung the full suite's trainings.
    Every built-in suite passes the check; the env's declaration alone is refused."""
    import dataclasses

    from marl_fgmf.benchmark.runner import check_suite
    suite = get_suite(name)
    check_suite(suite, tmp_path)
    real = [p for p in suite.envs if p.env != "beacon"]
    if not real:
        return
    bad = dataclasses.replace(suite, envs=tuple(
        dataclasses.replace(p, train={}) if p.env != "beacon" else p for p in suite.envs))
    with pytest.raises(ValueError, match="set num_env_runners to 0.*declares 2"):
        check_suite(bad, tmp_path)
    assert not any(tmp_path.iterdir()), "the check writes nothing"


# --------------------------------------------------------------------------- analysis
def test_ratio_of_aggregates_matches_a_brute_force_bootstrap():
    rng = np.random.default_rng(3)
    x = {"a": rng.normal(1.0, 0.2, 5), "b": rng.normal(0.8, 0.1, 3)}
    y = {"a": rng.normal(0.5, 0.2, 5), "b": rng.normal(0.6, 0.1, 3)}
    est, low, high = ratio_of_aggregates(x, y, n_resamples=500, seed=7)
    pooled = lambda d: iqm(np.concatenate([d["a"], d["b"]]))  # noqa: E731
    assert est == pytest.approx(pooled(x) / pooled(y))
    # the oracle: the same draws, in the order stats' stratified bootstrap makes them
    g = np.random.default_rng(7)
    dx = {k: v[g.integers(0, v.size, size=(500, v.size))] for k, v in sorted(x.items())}
    dy = {k: v[g.integers(0, v.size, size=(500, v.size))] for k, v in sorted(y.items())}
    vals = [pooled({k: dx[k][b] for k in dx}) / pooled({k: dy[k][b] for k in dy})
            for b in range(500)]
    assert (low, high) == pytest.approx(tuple(np.quantile(vals, [0.025, 0.975])))
    assert low < est < high


def test_ratio_to_a_non_positive_aggregate_is_unbounded_not_a_number():
    est, low, high = ratio_of_aggregates({"t": np.array([0.5, 0.6])},
                                         {"t": np.array([-0.1, 0.0])}, n_resamples=50)
    assert est == math.inf and high == math.inf


def test_margin_of_aggregates_matches_a_brute_force_bootstrap_and_stays_finite():
    rng = np.random.default_rng(5)
    x = {"a": rng.normal(0.3, 0.2, 5), "b": rng.normal(0.1, 0.1, 3)}
    y = {"a": rng.normal(0.0, 0.1, 5), "b": rng.normal(0.05, 0.1, 3)}
    est, low, high = margin_of_aggregates(x, y, 1.3, n_resamples=400, seed=11)
    pooled = lambda d: iqm(np.concatenate([d["a"], d["b"]]))  # noqa: E731
    assert est == pytest.approx(pooled(x) - 1.3 * pooled(y))
    g = np.random.default_rng(11)
    dx = {k: v[g.integers(0, v.size, size=(400, v.size))] for k, v in sorted(x.items())}
    dy = {k: v[g.integers(0, v.size, size=(400, v.size))] for k, v in sorted(y.items())}
    vals = [pooled({k: dx[k][b] for k in dx}) - 1.3 * pooled({k: dy[k][b] for k in dy})
            for b in range(400)]
    assert (low, high) == pytest.approx(tuple(np.quantile(vals, [0.025, 0.975])))
    # the ratio to this baseline near zero is unbounded; the margin is not
    assert math.isinf(ratio_of_aggregates(x, y, n_resamples=400, seed=11)[2])
    assert math.isfinite(low) and math.isfinite(high) and low < est < high
    with pytest.raises(ValueError, match="same tasks"):
        margin_of_aggregates(x, {"a": y["a"]}, 1.3)


@pytest.mark.parametrize("low,high,base_low,expected", [
    (0.05, 0.4, 0.1, "holds"),
    (0.05, 0.4, -0.02, "undecided at this power"),  # 30% over a random-level baseline
    (-0.3, -0.01, -0.02, "does not hold"),
    (-0.1, 0.2, 0.1, "undecided at this power"),
])
def test_margin_verdict(low, high, base_low, expected):
    assert margin_verdict(low, high, base_low) == expected
    assert margin_verdict(low, high, base_low, runs=2) == "undecided at this power"


def test_cost_times_are_trusted_only_when_controlled():
    """CPU time of uninterrupted jobs decides; wall time only under a recorded, sane load."""
    from marl_fgmf.benchmark.analysis import timing_of
    cpu = [{"cpu_s": 10.0, "resumed": False, "load": [3.9, 4.0], "cpus": 2}] * 3
    assert timing_of(cpu) == ("cpu_s", None)
    resumed = cpu[:2] + [{"cpu_s": 4.0, "resumed": True, "load": [1.0, 1.0], "cpus": 2}]
    key, why = timing_of(resumed)
    assert key == "wall_time_s" and "overloaded" in why
    assert "not recorded" in timing_of([{"wall_time_s": 5.0}])[1]
    assert timing_of([{"resumed": True, "load": [1.9, 2.2], "cpus": 2}]) == ("wall_time_s", None)


@pytest.mark.parametrize("low,high,kind,expected", [
    (1.4, 2.0, "lower", "holds"), (0.5, 1.2, "lower", "does not hold"),
    (1.1, 1.6, "lower", "undecided at this power"), (1.2, 1.4, "upper", "holds"),
    (1.6, 1.9, "upper", "does not hold"), (1.3, 1.7, "upper", "undecided at this power")])
def test_verdict_rule(low, high, kind, expected):
    assert verdict(low, high, 1.3 if kind == "lower" else 1.5, kind) == expected
    # one or two runs: no spread to decide on
    assert verdict(low, high, 1.3 if kind == "lower" else 1.5, kind, runs=2) == \
        "undecided at this power"


def test_pgca_ratio_is_paired_and_picks_the_best_single_method():
    per_run = {}
    for i in range(6):
        per_run[f"r{i}"] = {"env": "beacon", "defence": "fgmf" if i < 3 else "adv", "seed": i,
                            "methods": {"pgca": {"ghr": 0.8 + 0.01 * i},
                                        "ig": {"ghr": 0.5 + 0.01 * i},
                                        "occlusion": {"ghr": 0.6 + 0.01 * i}}}
    out = pgca_ratio(per_run)
    fg = out["fgmf"]
    assert fg["best_single"] == "occlusion" and fg["runs"] == 3
    assert fg["estimate"] == pytest.approx(np.mean([0.8, 0.81, 0.82]) / np.mean([0.6, 0.61, 0.62]))
    # paired: every resample takes the same runs for both methods, so the ratio barely moves
    assert fg["high"] - fg["low"] < 0.02
    assert out["all defences"]["runs"] == 6
    assert fg["min_env_runs"] == 3 and out["all defences"]["min_env_runs"] == 6


def test_pgca_ratio_counts_seeds_not_policies():
    """Eight defences trained from one seed are one draw of the training noise: the claim's
    power (min_env_runs) is the number of seeds, so one seed can never decide it."""
    per_run = {f"d{i}": {"env": "beacon", "defence": f"d{i}", "seed": 0,
                         "methods": {"pgca": {"ghr": 0.9 + 0.001 * i}, "ig": {"ghr": 0.3}}}
               for i in range(8)}
    out = pgca_ratio(per_run)["all defences"]
    assert out["runs"] == 8 and out["min_env_runs"] == 1
    assert out["low"] > 1.25  # a tight interval far above the threshold ...
    assert verdict(out["low"], out["high"], 1.25, runs=out["min_env_runs"]) == \
        "undecided at this power"  # ... still decides nothing


# --------------------------------------------------------------------------- README and CLI
def test_readme_claims_block_is_generated_from_the_committed_json(tmp_path):
    """The README's claims block is either empty (no suite committed yet) or exactly what
    the committed small-suite JSON generates; update_readme rewrites only the block."""
    summary_path = ROOT / "docs" / "benchmark" / "small" / "benchmark.json"
    readme = (ROOT / "README.md").read_text()
    assert BEGIN in readme and END in readme
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    if block:
        assert block == claims_markdown(json.loads(summary_path.read_text())).strip()
    else:
        assert not summary_path.exists(), "a committed suite must be in the README"
    summary = {"suite": "small", "digest": "0" * 64, "claims": [
        {"text": "claim one", "setting": "beacon", "statistic": "x / y", "estimate": 1.4,
         "low": 1.31, "high": 1.5, "threshold": 1.3, "runs": 5, "verdict": "holds"}]}
    (tmp_path / "b.json").write_text(json.dumps(summary))
    copy = tmp_path / "README.md"
    copy.write_text(f"head\n{BEGIN}\ntyped by hand\n{END}\ntail\n")
    assert update_readme(tmp_path / "b.json", copy)
    text = copy.read_text()
    assert text.startswith("head\n") and text.endswith(f"{END}\ntail\n")
    assert "typed by hand" not in text and "| claim one | beacon | x / y | 1.40 (1.31 to 1.50) | 1.3 | 5 | **holds** |" in text
    assert not update_readme(tmp_path / "b.json", copy), "a second run changes nothing"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marl_fgmf.cli", "benchmark", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path):
    bad = _cli("--suite", "huge", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice: 'huge'" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "x").exists()
    missing = _cli("--out", str(tmp_path / "x"), cwd=tmp_path)
    assert missing.returncode == 2 and "give --suite" in missing.stderr
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    before = tree_hash(other)
    refused = _cli("--suite", "smoke", "--out", str(other), cwd=tmp_path)
    assert refused.returncode == 2 and "not empty" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and tree_hash(other) == before
    listed = _cli("--list", cwd=tmp_path)
    assert listed.returncode == 0 and "smoke" in listed.stdout and "small" in listed.stdout


def test_the_same_seed_trains_the_same_weights(ray_session, tmp_path):
    """What makes a rerun of a suite give the same numbers: RLlib training with the same seed
    (and settings) gives bit-identical weights; another seed does not."""
    from agents.checkpoint import load_agent_policies
    from agents.train import TrainConfig, train
    from marl_fgmf.tournament.specs import weights_hash

    def trained(name: str, seed: int) -> str:
        cfg = TrainConfig(env="beacon", env_kwargs={"max_steps": 12}, defense="fgmf",
                          iterations=2, seed=seed, train_batch_size=200, minibatch_size=100,
                          num_epochs=1, num_envs_per_env_runner=2)
        train(cfg, tmp_path / name, progress=False)
        return weights_hash(load_agent_policies(str(tmp_path / name), ["agent_0", "agent_1"],
                                                single_if_shared=True))
    first = trained("a", 3)
    assert trained("b", 3) == first
    assert trained("c", 4) != first


def test_an_interrupted_training_resumes_and_a_checkpointless_one_is_kept_aside(ray_session,
                                                                               tmp_path):
    """A run killed after a checkpoint continues from it (no iteration trained twice, the
    wall-clock budget counts the time already spent); one killed before its first checkpoint
    is moved aside, not deleted, and trained again."""
    import dataclasses

    from agents.train import TrainConfig, train
    from marl_fgmf.benchmark.runner import train_config, train_phase

    smoke = get_suite("smoke")
    plan = dataclasses.replace(smoke.envs[0], iterations=2)
    suite = dataclasses.replace(smoke, envs=(plan,), defences=("none", "adv"), wallclock=())
    out = tmp_path / "bench"
    runs = {r["name"]: r for r in suite.runs()}
    partial = dict(train_config(suite, runs["beacon.none.s0"]), iterations=1)
    train(TrainConfig.from_json(partial), out / "runs" / "beacon.none.s0", progress=False)
    (out / "runs" / "beacon.adv.s0").mkdir(parents=True)
    (out / "runs" / "beacon.adv.s0" / "run.json").write_text("{}")  # no checkpoint yet
    assert train_phase(suite, out, 2, False, lambda m: None, wall=False) == {"reused": 0, "new": 2}
    done = json.loads((out / "runs" / "beacon.none.s0.json").read_text())
    assert done["iterations"] == 2
    rows = (out / "runs" / "beacon.none.s0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in rows] == [1, 2]
    aside = [p.name for p in (out / "runs").iterdir() if ".incomplete-" in p.name]
    assert len(aside) == 1 and aside[0].startswith("beacon.adv.s0")
    assert json.loads((out / "runs" / "beacon.adv.s0.json").read_text())["iterations"] == 2
    assert train_phase(suite, out, 2, False, lambda m: None, wall=False) == {"reused": 2, "new": 0}


def test_small_suite_evaluates_with_its_eval_settings_and_trains_with_the_defaults(tmp_path):
    """The small suite: every defence at its defaults (no training overrides), 5 seeds; the
    tournament, the references and the explanations use the evaluation settings."""
    from marl_fgmf.benchmark.references import eval_kwargs
    from marl_fgmf.benchmark.runner import tournament_config, train_config
    suite = get_suite("small")
    plan = suite.envs[0]
    assert plan.seeds == (0, 1, 2, 3, 4) and plan.train == {}
    run = suite.runs()[0]
    assert train_config(suite, run)["env_kwargs"] == {}
    cfg = tournament_config(suite, plan, tmp_path, check=False)
    assert cfg.env_kwargs == eval_kwargs(plan) == {"max_steps": 20}
    assert sorted(cfg.eps) == pytest.approx([2 / 255, 4 / 255, 8 / 255])
    names = [a.name for a in cfg.attackers]
    assert names == ["fgsm", "pgd", "apgd-ce", "apgd-dlr", "autoattack"]
    own = {d.name: [a.name for a in d.attackers] for d in cfg.defenders}
    assert own["beacon.none.s1"] == ["paad"]
    assert own["beacon.fgmf.s2"] == ["paad", "bpda", "eot"]
    assert len(cfg.defenders) == 40


def test_benchmark_cost_script_decides_claim_3_from_training_records(tmp_path):
    """scripts/benchmark_cost.py applies the benchmark's cost rule to finished training
    records (CPU time of uninterrupted jobs) before any match is played."""
    runs = tmp_path / "bench" / "runs"
    runs.mkdir(parents=True)
    for seed in range(5):
        for defence, cpu in (("none", 100.0), ("fgmf", 120.0)):
            (runs / f"beacon.{defence}.s{seed}.json").write_text(json.dumps(
                {"cpu_s": cpu + seed, "load": [1.0, 1.0], "cpus": 2, "resumed": False,
                 "wall_time_s": cpu + seed + 5}))
    out = tmp_path / "cost.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark_cost.py"), str(tmp_path / "bench"),
           "--suite", "small", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    entry = json.loads(out.read_text())["cost"]["beacon"]
    assert entry["timing"] == "cpu_s" and entry["untrusted"] is None
    assert entry["fgmf"]["ratio_to_none"]["estimate"] == pytest.approx(122 / 102)
    assert entry["claim"] == "holds" and "claim 3 (fgmf / none <= 1.5): holds" in res.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


def test_small_and_full_share_the_grid_and_differ_only_in_evaluation_budgets():
    """README: small and full share the defences, the training budget and the attack
    ensemble; small (to fit 2 hours on 2 cores) evaluates shorter episodes, trains PA-AD for
    fewer iterations and audits and explains fewer observations."""
    small, full = get_suite("small"), get_suite("full")
    sb, fb = small.envs[0], full.envs[0]
    assert sb.env == fb.env == "beacon"
    assert (sb.iterations, sb.seeds, sb.train, sb.env_kwargs, sb.episodes) == \
        (fb.iterations, fb.seeds, fb.train, fb.env_kwargs, fb.episodes)
    for key in ("defences", "wallclock", "eps", "attackers", "adaptive", "external",
                "paad_batch", "eval_seeds"):
        assert getattr(small, key) == getattr(full, key), key
    assert (sb.eval_kwargs, fb.eval_kwargs) == ({"max_steps": 20}, {"max_steps": 25})
    assert (small.paad_iterations, full.paad_iterations) == (3, 5)
    assert (small.audit["n_obs"], full.audit["n_obs"]) == (16, 24)
    assert (small.faithfulness["n_obs"], full.faithfulness["n_obs"]) == (8, 16)
    assert {**small.audit, "n_obs": 0} == {**full.audit, "n_obs": 0}
    assert {**small.faithfulness, "n_obs": 0} == {**full.faithfulness, "n_obs": 0}
