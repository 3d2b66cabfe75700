"""The benchmark's numbers: per-run robust returns normalized per env, aggregates with
stratified bootstrap CIs, probability of improvement, performance profiles, the ablation,
the cost, faithfulness, and the three claims with a verdict each (Agarwal et al., "Deep RL at
the Edge of the Statistical Precipice", NeurIPS 2021; DESIGN.md section 3).

Normalization per env: ``(x - random) / (reference - random)`` with ``random`` the uniform
random policy's mean team return and ``reference`` beacon's scripted optimum (``optimum``
envs) or the mean clean return of the env's undefended runs. A run's robust return at eps is
the tournament's: the minimum over its attackers of the mean team return.

Verdicts (never typed by hand): a claim with threshold ``t`` on a statistic with 95% CI
``[low, high]`` **holds** if ``low >= t``, **does not hold** if ``high < t``, and is
**undecided at this power** otherwise (for claim 3, an upper bound: holds if ``high <= t``,
does not hold if ``low > t``). With fewer than :data:`MIN_RUNS` runs per env and method the
bootstrap has no spread, so the verdict is "undecided at this power" whatever the estimate.

Claim 1 ("FGMF beats adv by 30%") is decided on the margin ``IQM(fgmf) - 1.3 IQM(adv)`` of
normalized robust returns (:func:`marl_fgmf.stats.margin_of_aggregates`), not on the ratio:
where adv's robust return nears the random policy's (0), the ratio's interval is unbounded
and says nothing, while the margin's stays finite. It holds if the margin's ``low >= 0`` and
adv's own IQM interval lies above 0 (beating a policy no better than random by 30% is not the
claim), does not hold if the margin's ``high < 0``; the ratio is shown beside it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from marl_fgmf.benchmark.suites import Suite
from marl_fgmf.protocol import eps_label
from marl_fgmf.stats import (aggregate_with_ci, margin_of_aggregates, mean_ci95,
                             normalize_score, performance_profile, probability_of_improvement,
                             ratio_of_aggregates, stratified_bootstrap_ci)

__all__ = ["CLAIMS", "SINGLE_METHODS", "TIMING_KEYS", "analyse", "cost", "cost_verdict",
           "margin_verdict", "timing_record", "verdict"]

SINGLE_METHODS = ("ig", "occlusion", "gradcampp", "rise", "smoothgrad")
"""The single attribution methods PGCA is compared with (those the suite ran)."""
CLAIMS = {
    "robust_return": ("FGMF beats baseline adversarial training (SA-PPO) by 30% in robust "
                      "return", 1.3, "lower"),
    "faithfulness": ("PGCA keeps saliency 25% more faithful to ground truth (GHR) than the "
                     "best single method", 1.25, "lower"),
    "cost": ("FGMF costs only a constant factor (at most 1.5x) of PPO's training time",
             1.5, "upper"),
}
MIN_RUNS = 3
"""Runs per env and method below which no claim is decided."""
SANITY_LIMIT = 0.5
"""A method whose map keeps a rank correlation above this after randomizing the policy's
weights (over foreground pixels) fails the sanity check (Adebayo et al., NeurIPS 2018)."""


def verdict(low: float, high: float, threshold: float, kind: str = "lower",
            runs: int = MIN_RUNS) -> str:
    """``holds`` / ``does not hold`` / ``undecided at this power`` (see the module doc);
    ``runs``: the fewest runs of any env and method behind the interval."""
    if runs < MIN_RUNS or math.isnan(low) or math.isnan(high):
        return "undecided at this power"
    if kind == "lower":
        return ("holds" if low >= threshold else "does not hold" if high < threshold
                else "undecided at this power")
    return ("holds" if high <= threshold else "does not hold" if low > threshold
            else "undecided at this power")


def margin_verdict(low: float, high: float, baseline_low: float, runs: int = MIN_RUNS) -> str:
    """Claim 1's verdict on the margin ``X - t Y`` (see the module doc): holds if ``low >= 0``
    and the baseline's interval is above zero (``baseline_low > 0``), does not hold if
    ``high < 0``, else (or below :data:`MIN_RUNS` runs) undecided at this power."""
    if runs < MIN_RUNS or any(math.isnan(v) for v in (low, high, baseline_low)):
        return "undecided at this power"
    if high < 0:
        return "does not hold"
    return "holds" if low >= 0 and baseline_low > 0 else "undecided at this power"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _interval(est: float, low: float, high: float) -> dict[str, float]:
    return {"estimate": float(est), "low": float(low), "high": float(high)}


def analyse(suite: Suite, out: Path, refs: dict[str, Any], boards: dict[str, dict[str, Any]]
            ) -> dict[str, Any]:
    """Everything the report shows, as JSON-able data (``DIR/benchmark.json``)."""
    labels = [eps_label(e) for e in sorted(suite.eps)]
    envs: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    for plan in suite.envs:
        board = boards[plan.env]
        rows = {r["defender"]: r for r in board["defenders"]}
        random = refs[plan.env]["random"]["mean"]
        plan_runs = [r for r in suite.runs() if r["env"] == plan.env]
        clean_none = [rows[r["name"]]["clean"]["mean"] for r in plan_runs
                      if r["defence"] == "none" and rows[r["name"]]["clean"]]
        optimum = refs[plan.env].get("optimum")
        reference = optimum if plan.optimum and optimum is not None else float(np.mean(clean_none))
        none_steps = [(_read(out / "runs" / f"{r['name']}.json") or {}).get("env_steps")
                      for r in plan_runs if r["defence"] == "none"]
        envs[plan.env] = {"random": random, "optimum": optimum, "reference": reference,
                          "trained_clean": dict(zip(("mean", "ci95"), mean_ci95(clean_none)))
                          if clean_none else None,
                          "env_steps": max((x for x in none_steps if x), default=None),
                          "reference_kind": "scripted optimum" if plan.optimum
                          else "clean undefended return", "iterations": plan.iterations,
                          "seeds": list(plan.seeds), "episodes": plan.episodes,
                          "eval_kwargs": dict(plan.eval_kwargs), "note": plan.note}
        for r in plan_runs:
            row = rows[r["name"]]
            done = _read(out / "runs" / f"{r['name']}.json") or {}
            rec = {**r, **timing_record(done), "env_steps": done.get("env_steps"),
                   "iterations": done.get("iterations"),
                   "clean": row["clean"]["mean"] if row["clean"] else None,
                   "flagged": row["flagged"], "audit_failed": row["audit_failed"],
                   "robust": {}, "worst": {}, "norm_robust": {}, "cells": {}}
            rec["norm_clean"] = (None if rec["clean"] is None else
                                 float(normalize_score(rec["clean"], random, reference)))
            for lab in labels:
                rob = row["robust"].get(lab)
                rec["robust"][lab] = None if rob is None else rob["mean"]
                rec["worst"][lab] = None if rob is None else rob["worst_attacker"]
                rec["norm_robust"][lab] = (None if rob is None else
                                           float(normalize_score(rob["mean"], random, reference)))
                rec["cells"][lab] = {a: None if c is None else
                                     {"mean": c["mean"], "success_rate": c["success_rate"]}
                                     for a, c in row["cells"].get(lab, {}).items()}
            runs.append(rec)
    defences = list(suite.defences) + [f"{w}-wall" for w in suite.wallclock]
    summary: dict[str, Any] = {"suite": suite.name, "digest": suite.digest(), "eps": labels,
                               "envs": envs, "defences": defences, "runs": runs}
    summary.update(robustness(runs, defences, labels))
    summary["cost"] = cost(runs, suite)
    summary["faithfulness"] = faithfulness(suite, out)
    summary["external_check"] = external_check(runs, labels)
    summary["claims"] = claims(summary, labels)
    return summary


def scores_of(runs: list[dict[str, Any]], defence: str, key: str, lab: str | None = None
              ) -> dict[str, np.ndarray]:
    """``{env: per-seed scores}`` of a defence (runs without the score left out)."""
    out: dict[str, list[float]] = {}
    for r in runs:
        if r["defence"] != defence:
            continue
        v = r[key][lab] if lab is not None else r[key]
        if v is not None and math.isfinite(v):
            out.setdefault(r["env"], []).append(float(v))
    return {env: np.asarray(v) for env, v in out.items()}


def robustness(runs: list[dict[str, Any]], defences: list[str], labels: list[str]
               ) -> dict[str, Any]:
    """Aggregates (IQM, mean, median with CIs), probability of improvement over adv and none,
    and performance profiles of the normalized robust return, per eps."""
    aggregates, poi, profiles = {}, {}, {}
    for lab in labels:
        by = {d: scores_of(runs, d, "norm_robust", lab) for d in defences}
        by = {d: s for d, s in by.items() if s}
        aggregates[lab] = aggregate_with_ci(by)["methods"] if by else {}
        poi[lab] = {}
        for d, s in by.items():
            poi[lab][d] = {}
            for base in ("adv", "none"):
                if base in by and base != d and s.keys() == by[base].keys():
                    poi[lab][d][f"over {base}"] = _interval(*probability_of_improvement(s, by[base]))
        values = np.concatenate([v for s in by.values() for v in s.values()]) if by else np.zeros(1)
        taus = np.linspace(min(0.0, float(values.min())), max(1.0, float(values.max())), 41)
        profiles[lab] = {d: performance_profile(s, taus) for d, s in by.items()}
    clean = {d: scores_of(runs, d, "norm_clean") for d in defences}
    clean_agg = aggregate_with_ci({d: s for d, s in clean.items() if s})["methods"]
    return {"aggregates": aggregates, "clean_aggregates": clean_agg,
            "probability_of_improvement": poi, "profiles": profiles}


TIMING_KEYS = ("wall_time_s", "cpu_s", "load", "cpus", "resumed")
"""What :func:`timing_of` and :func:`cost` read of a training record (``DIR/runs/<run>.json``)."""


def timing_record(done: dict[str, Any]) -> dict[str, Any]:
    """A training record's :data:`TIMING_KEYS` (None where it has none)."""
    return {k: done.get(k) for k in TIMING_KEYS}


def timing_of(runs: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Which time the cost compares, and why it cannot be trusted (None: it can). CPU time
    when every run recorded it in one uninterrupted job (it does not grow when other work
    shares the machine); else the training loop's wall time, trusted only when every run
    recorded a load average no higher than 1.25x the machine's CPUs."""
    if runs and all(r.get("cpu_s") and not r.get("resumed") for r in runs):
        return "cpu_s", None
    loads = [max(r["load"]) / r["cpus"] for r in runs if r.get("load") and r.get("cpus")]
    if len(loads) < len(runs):
        return "wall_time_s", ("the machine's load was not recorded for every training, so "
                               "the wall times may include waiting for the CPU")
    if max(loads) > 1.25:
        return "wall_time_s", (f"the machine was overloaded during some trainings (load "
                               f"{max(loads):.1f}x its CPUs)")
    return "wall_time_s", None


def cost(runs: list[dict[str, Any]], suite: Suite) -> dict[str, Any]:
    """Per env and equal-steps defence: mean training time (:func:`timing_of` says which)
    and its ratio to the undefended runs' (bootstrap over seeds, each defence resampled
    independently); ``untrusted`` says why the times cannot decide the cost claim."""
    out: dict[str, Any] = {}
    for plan in suite.envs:
        mine = [r for r in runs if r["env"] == plan.env and not r["wallclock"]]
        key, untrusted = timing_of(mine)
        walls = {d: scores_of(mine, d, key) for d in suite.defences}
        env_out: dict[str, Any] = {"timing": key, "untrusted": untrusted}
        for d, s in walls.items():
            if not s:
                continue
            entry: dict[str, Any] = {"mean_s": float(np.mean(s[plan.env])),
                                     "seconds": s[plan.env].tolist()}
            if walls.get("none"):
                entry["ratio_to_none"] = _interval(*ratio_of_aggregates(s, walls["none"], "mean"))
            env_out[d] = entry
        out[plan.env] = env_out
    return out


def faithfulness(suite: Suite, out: Path) -> dict[str, Any]:
    """Per defence and method: the mean over runs of each run's mean score, a t CI over runs;
    the per-run means; the sanity check; and, per env with ground truth, the ratio of PGCA's
    GHR to the best single method's (paired bootstrap over runs)."""
    per_run: dict[str, dict[str, Any]] = {}
    for r in suite.runs():
        data = _read(out / "faithfulness" / f"{r['name']}.json")
        if data is None or r["wallclock"]:
            continue
        methods = data["scores"]["methods"]
        per_run[r["name"]] = {"env": r["env"], "defence": r["defence"], "seed": r["seed"],
                              "methods": {m: _means(v) for m, v in methods.items()}}
    metrics = ("ghr", "deletion_auc", "insertion_auc", "asr_m", "sanity_spearman_all",
               "sanity_spearman_fg")
    table: dict[str, Any] = {}
    for d in suite.defences:
        mine = [p for p in per_run.values() if p["defence"] == d]
        if not mine:
            continue
        table[d] = {}
        for m in mine[0]["methods"]:
            table[d][m] = {}
            for k in metrics:
                vals = [p["methods"][m].get(k) for p in mine]
                vals = [v for v in vals if v is not None and math.isfinite(v)]
                mean, half = mean_ci95(vals) if vals else (float("nan"), float("nan"))
                table[d][m][k] = {"mean": mean, "ci95": half, "n_runs": len(vals)}
            fg = table[d][m]["sanity_spearman_fg"]["mean"]
            table[d][m]["fails_sanity"] = bool(math.isfinite(fg) and fg > SANITY_LIMIT)
    return {"per_run": per_run, "table": table, "pgca_ratio": pgca_ratio(per_run),
            "settings": dict(suite.faithfulness)}


def _means(values: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k, v in values.items():
        if k == "seconds":  # a timing, not a score
            continue
        if isinstance(v, list):
            vals = [float(x) for x in v if x is not None and math.isfinite(float(x))]
            out[k] = float(np.mean(vals)) if vals else None
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def pgca_ratio(per_run: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """GHR(PGCA) / GHR(best single method) over the runs with ground truth, overall and on
    the FGMF runs; the best method is fixed on the point estimate, and the interval resamples
    runs (paired: every method explains the same policies) within each env."""
    out: dict[str, Any] = {}
    for label, keep in (("all defences", lambda p: True), ("fgmf", lambda p: p["defence"] == "fgmf")):
        rows = [p for p in per_run.values() if keep(p)
                and p["methods"].get("pgca", {}).get("ghr") is not None]
        if not rows:
            continue
        singles = [m for m in SINGLE_METHODS if all(m in p["methods"] and
                                                   p["methods"][m].get("ghr") is not None
                                                   for p in rows)]
        if not singles:
            continue
        envs = sorted({p["env"] for p in rows})
        ghr = {env: np.asarray([[p["methods"][m]["ghr"] for m in ["pgca", *singles]]
                                for p in rows if p["env"] == env]) for env in envs}
        best = singles[int(np.argmax(np.concatenate(list(ghr.values())).mean(0)[1:]))]
        col = 1 + singles.index(best)

        def statistic(idx: dict[str, np.ndarray]) -> float:
            pooled = np.concatenate([ghr[env][idx[env].astype(int)] for env in envs])
            return float(pooled[:, 0].mean() / pooled[:, col].mean())

        est, low, high = stratified_bootstrap_ci(
            {env: np.arange(len(ghr[env]), dtype=float) for env in envs}, statistic)
        # the power is the number of independent training seeds, not of policies: eight
        # defences trained from one seed are one draw of the training noise
        seeds = {env: {p["seed"] for p in rows if p["env"] == env} for env in envs}
        out[label] = {**_interval(est, low, high), "best_single": best, "runs": len(rows),
                      "min_env_runs": min(len(seeds[env]) for env in envs),
                      "pgca_ghr": float(np.concatenate(list(ghr.values()))[:, 0].mean()),
                      "best_ghr": float(np.concatenate(list(ghr.values()))[:, col].mean())}
    return out


def external_check(runs: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """The toolkit's ``autoattack`` preset against torchattacks' AutoAttack on the runs that
    played both: attack success rate and team return per eps."""
    rows = []
    for r in runs:
        for lab in labels:
            cells = r["cells"].get(lab, {})
            ours, theirs = cells.get("autoattack"), cells.get("ta-autoattack")
            if ours and theirs:
                rows.append({"run": r["name"], "eps": lab,
                             "success_ours": ours["success_rate"],
                             "success_torchattacks": theirs["success_rate"],
                             "return_ours": ours["mean"], "return_torchattacks": theirs["mean"]})
    return rows


def claims(summary: dict[str, Any], labels: list[str]) -> list[dict[str, Any]]:
    """The three claims, each with its statistic, CI and verdict (see the module doc)."""
    out = []
    lab = labels[-1]
    text, thr, kind = CLAIMS["robust_return"]
    for fg, adv, how in (("fgmf", "adv", "equal env steps"),
                         ("fgmf-wall", "adv-wall", "equal wall-clock")):
        x = scores_of(summary["runs"], fg, "norm_robust", lab)
        y = scores_of(summary["runs"], adv, "norm_robust", lab)
        if x and y and x.keys() == y.keys():
            iv = _interval(*margin_of_aggregates(x, y, thr))
            ratio = _interval(*ratio_of_aggregates(x, y))
            base = summary["aggregates"][lab][adv]["iqm"]  # adv's IQM, from robustness()
            runs = min(v.size for v in (*x.values(), *y.values()))
            out.append({"claim": "robust_return", "text": text, "setting": f"{how}, eps {lab}",
                        "statistic": f"IQM normalized robust return, {fg} - {thr} x {adv} "
                                     f"(ratio {ratio['estimate']:.2f}; IQM {adv} "
                                     f"{base['estimate']:.2f}, {base['low']:.2f} to "
                                     f"{base['high']:.2f})",
                        "threshold": ">= 0", **iv, "runs": runs, "ratio": ratio,
                        "baseline_iqm": base, "verdict": margin_verdict(
                            iv["low"], iv["high"], base["low"], runs=runs)})
    text, thr, kind = CLAIMS["faithfulness"]
    for label, iv in summary["faithfulness"]["pgca_ratio"].items():
        out.append({"claim": "faithfulness", "text": text, "setting": f"policies: {label}",
                    "statistic": f"GHR(PGCA) / GHR({iv['best_single']})", "threshold": thr,
                    **{k: iv[k] for k in ("estimate", "low", "high")}, "runs": iv["runs"],
                    "verdict": verdict(iv["low"], iv["high"], thr, runs=iv["min_env_runs"])})
    text, thr, kind = CLAIMS["cost"]
    for env, entry in summary["cost"].items():
        decided = cost_verdict(entry)
        if decided:
            said, runs = decided
            what = "CPU" if entry["timing"] == "cpu_s" else "wall-clock"
            out.append({"claim": "cost", "text": text, "setting": env,
                        "statistic": f"training {what} time fgmf / none (equal env steps)",
                        "threshold": thr, **entry["fgmf"]["ratio_to_none"], "runs": runs,
                        "verdict": said})
    return out


def cost_verdict(entry: dict[str, Any]) -> tuple[str, int] | None:
    """Claim 3's verdict on one env's :func:`cost` entry and the runs behind it (None without
    both fgmf and none): "undecided: <why>" when the times are not trusted."""
    iv = (entry.get("fgmf") or {}).get("ratio_to_none")
    if not iv:
        return None
    runs = min(len(entry["fgmf"]["seconds"]), len(entry["none"]["seconds"]))
    if entry["untrusted"]:
        return f"undecided: {entry['untrusted']}", runs
    return verdict(iv["low"], iv["high"], CLAIMS["cost"][1], "upper", runs=runs), runs
