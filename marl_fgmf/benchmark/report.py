"""The benchmark's report: ``DIR/benchmark.json`` (everything :func:`analyse` computed),
``DIR/report.md`` (per-seed points, aggregates, claims, faithfulness, cost) and the figures
(performance profiles, robust return vs eps per env with CI bands and per-seed points, the
ablation bars, cost vs robustness), plus the README's claims block generated from the JSON
(:func:`claims_markdown`; ``python -m marl_fgmf.benchmark.report JSON README`` rewrites it
between its markers, so no claim is ever typed by hand)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from marl_fgmf.benchmark.suites import Suite
from marl_fgmf.io import atomic_write_text, to_jsonable
from marl_fgmf.stats import mean_ci95
from marl_fgmf.viz.common import new_figure, save_figure
from marl_fgmf.viz.plots import plot_performance_profiles

__all__ = ["BEGIN", "END", "claims_markdown", "main", "update_readme", "write_report"]

BEGIN = "<!-- benchmark-claims:begin (generated from the benchmark JSON; do not edit) -->"
END = "<!-- benchmark-claims:end -->"


def _f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def _iv(d: dict[str, Any] | None, digits: int = 2) -> str:
    if not d:
        return "-"
    return f"{_f(d['estimate'], digits)} ({_f(d['low'], digits)} to {_f(d['high'], digits)})"


def claims_markdown(summary: dict[str, Any]) -> str:
    """The claims table (and its one-line reading) from ``benchmark.json``'s data."""
    lines = [f"Suite `{summary['suite']}` (`benchmark.json` digest {summary['digest'][:12]}); "
             f"95% stratified bootstrap CIs; verdict rule in `marl_fgmf/benchmark/analysis.py`.",
             "", "| claim | setting | statistic | estimate (95% CI) | threshold | runs | "
             "verdict |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in summary["claims"]:
        lines.append(f"| {c['text']} | {c['setting']} | {c['statistic']} | "
                     f"{_iv(c)} | {c['threshold']} | {c.get('runs', '-')} | "
                     f"**{c['verdict']}** |")
    if not summary["claims"]:
        lines.append("| (no claim could be computed: a defence is missing) | | | | | | |")
    return "\n".join(lines)


def markdown(suite: Suite, summary: dict[str, Any]) -> str:
    labels = summary["eps"]
    out = [f"# Benchmark `{suite.name}`", "", suite.description, "", suite.summary(), ""]
    out += ["## The claims", "", claims_markdown(summary), ""]
    out += ["## Environments", "", "| env | budget per run | seeds | random team return | "
            "trained undefended (clean) | reference (1.0) | kind |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for env, e in summary["envs"].items():
        trained = e.get("trained_clean") or {}
        out.append(f"| {env} | {e['iterations']} iterations = {e.get('env_steps') or '-'} env "
                   f"steps | {len(e['seeds'])} | {_f(e['random'])} | "
                   f"{_f(trained.get('mean'))} ± {_f(trained.get('ci95'))} | "
                   f"{_f(e['reference'])} | {e['reference_kind']} |")
    evals = {env: e.get("eval_kwargs") for env, e in summary["envs"].items() if e.get("eval_kwargs")}
    if evals:
        out += ["", "Evaluated (attacks, audit, explanations, references) with the env settings "
                + "; ".join(f"{env}: {kw}" for env, kw in evals.items())
                + " over the training ones."]
    out += ["", "Trained (clean) normalized return per defence, IQM (95% CI): "
            + ", ".join(f"{d} {_iv(v['iqm'])}" for d, v in summary["clean_aggregates"].items()),
            ""]
    out += ["## Normalized robust return (min over the attack ensemble), IQM with 95% CIs", "",
            "| defence | " + " | ".join(labels) + " | P(improvement) over adv at "
            f"{labels[-1]} | over none |", "|---" * (len(labels) + 3) + "|"]
    for d in summary["defences"]:
        cells = [_iv(summary["aggregates"].get(lab, {}).get(d, {}).get("iqm")) for lab in labels]
        poi = summary["probability_of_improvement"].get(labels[-1], {}).get(d, {})
        out.append(f"| {d} | " + " | ".join(cells)
                   + f" | {_iv(poi.get('over adv'))} | {_iv(poi.get('over none'))} |")
    out += ["", "## Per seed (each row a training run)", "",
            "| run | clean | " + " | ".join(f"robust {lab} (worst attacker)" for lab in labels)
            + " | norm. robust " + labels[-1] + " | train time (s) | audit |",
            "|---" * (len(labels) + 5) + "|"]
    for r in summary["runs"]:
        cells = [f"{_f(r['robust'][lab])} ({r['worst'][lab]})" for lab in labels]
        audit = "FLAGGED: " + ", ".join(r["audit_failed"]) if r["flagged"] else "passed"
        out.append(f"| {r['name']} | {_f(r['clean'])} | " + " | ".join(cells)
                   + f" | {_f(r['norm_robust'][labels[-1]])} | {_f(r['wall_time_s'], 0)} | "
                   f"{audit} |")
    out += ["", "## Cost (training time, equal env steps; CPU time where recorded)", "",
            "| env | defence | mean time (s) | ratio to none (95% CI) |", "| --- | --- | --- | --- |"]
    for env, entries in summary["cost"].items():
        if entries.get("untrusted"):
            out.append(f"| {env} | (times not trusted: {entries['untrusted']}) | | |")
        for d, e in entries.items():
            if not isinstance(e, dict):
                continue
            out.append(f"| {env} | {d} | {_f(e['mean_s'], 1)} | {_iv(e.get('ratio_to_none'))} |")
    out += ["", "## Faithfulness (mean over runs of per-run means, 95% t CI over runs)", ""]
    f = summary["faithfulness"]
    out += ["| defence | method | GHR | deletion AUC | insertion AUC | ASR-M | sanity rho "
            "(all / fg) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for d, methods in f["table"].items():
        for m, v in methods.items():
            def cell(k: str) -> str:
                return f"{_f(v[k]['mean'], 3)} ± {_f(v[k]['ci95'], 3)}"
            flag = " (fails)" if v["fails_sanity"] else ""
            out.append(f"| {d} | {m} | {cell('ghr')} | {cell('deletion_auc')} | "
                       f"{cell('insertion_auc')} | {cell('asr_m')} | "
                       f"{_f(v['sanity_spearman_all']['mean'])} / "
                       f"{_f(v['sanity_spearman_fg']['mean'])}{flag} |")
    out += ["", "`random` and `brightness` are model-free baselines: a score they reach says "
            "nothing about the policy. Sanity rho: Spearman correlation of a method's map "
            "before and after randomizing every policy layer (Adebayo et al. 2018); above "
            "0.5 over foreground pixels it fails.", ""]
    ext = summary["external_check"]
    out += ["## Independent check: torchattacks' AutoAttack against the toolkit's preset", ""]
    if ext:
        out += ["| run | eps | success (toolkit) | success (torchattacks) | return (toolkit) | "
                "return (torchattacks) |", "| --- | --- | --- | --- | --- | --- |"]
        out += [f"| {x['run']} | {x['eps']} | {_f(x['success_ours'], 3)} | "
                f"{_f(x['success_torchattacks'], 3)} | {_f(x['return_ours'])} | "
                f"{_f(x['return_torchattacks'])} |" for x in ext]
    else:
        out.append("Not run: torchattacks is not installed (`pip install torchattacks "
                   "--no-deps`) or the suite turns it off.")
    run = summary.get("this_run") or {}
    if run:
        out += ["", "## Time of the invocation that wrote this report", "",
                f"{run['seconds']:.0f} s in all (a resumed benchmark times only what it "
                f"redid): " + "; ".join(f"{k} {v.get('seconds', 0):.0f} s ({v.get('new', 0)} "
                                        f"new, {v.get('reused', 0)} reused)"
                                        for k, v in run["counts"].items())]
    out += ["", "Figures: `profiles.png`, `robust_vs_eps_<env>.png`, `ablation.png`, "
            "`cost_vs_robustness.png`.", ""]
    return "\n".join(out)


def write_report(suite: Suite, out: Path, summary: dict[str, Any]) -> dict[str, Path]:
    """Write the JSON, the Markdown report and the figures; return their paths."""
    files = {"benchmark.json": out / "benchmark.json", "report.md": out / "report.md"}
    atomic_write_text(files["benchmark.json"],
                      json.dumps(to_jsonable(summary), indent=1, allow_nan=True))
    atomic_write_text(files["report.md"], markdown(suite, summary))
    labels = summary["eps"]
    if summary["profiles"].get(labels[-1]):
        files["profiles.png"] = plot_performance_profiles(
            summary["profiles"][labels[-1]], out / "profiles.png",
            title=f"Performance profiles, normalized robust return at {labels[-1]}")
    for env in summary["envs"]:
        files[f"robust_vs_eps_{env}.png"] = plot_robust_vs_eps(summary, env,
                                                               out / f"robust_vs_eps_{env}.png")
    files["ablation.png"] = plot_ablation(summary, out / "ablation.png")
    files["cost_vs_robustness.png"] = plot_cost(summary, out / "cost_vs_robustness.png")
    return files


def plot_robust_vs_eps(summary: dict[str, Any], env: str, path: Path) -> Path:
    """Per defence: mean normalized robust return over seeds vs eps (0 = clean) with a t CI
    band, and every seed as a point."""
    labels = summary["eps"]
    fig = new_figure(6.4, 4.0)
    ax = fig.subplots()
    xs = np.arange(len(labels) + 1)
    for k, d in enumerate(summary["defences"]):
        runs = [r for r in summary["runs"] if r["env"] == env and r["defence"] == d]
        if not runs:
            continue
        ys = [[r["norm_clean"]] + [r["norm_robust"][lab] for lab in labels] for r in runs]
        ys = np.asarray([[np.nan if v is None else v for v in y] for y in ys], float)
        mean = np.nanmean(ys, 0)
        half = np.asarray([mean_ci95(col[np.isfinite(col)])[1] if np.isfinite(col).sum() > 1
                           else 0.0 for col in ys.T])
        line, = ax.plot(xs, mean, marker="o", label=d)
        ax.fill_between(xs, mean - half, mean + half, color=line.get_color(), alpha=0.15)
        jitter = (k - len(summary["defences"]) / 2) * 0.02
        for y in ys:
            ax.scatter(xs + jitter, y, s=8, color=line.get_color(), alpha=0.6)
    ax.set_xticks(xs, ["clean", *labels])
    ax.set_ylabel("normalized return (0 random, 1 reference)")
    ax.set_title(f"{env}: robust return vs eps (mean over seeds, 95% CI; dots: seeds)")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_ablation(summary: dict[str, Any], path: Path) -> Path:
    """IQM normalized robust return at the largest eps per defence, with CIs."""
    lab = summary["eps"][-1]
    agg = summary["aggregates"].get(lab, {})
    names = [d for d in summary["defences"] if d in agg]
    fig = new_figure(6.4, 3.6)
    ax = fig.subplots()
    est = np.asarray([agg[d]["iqm"]["estimate"] for d in names])
    low = np.asarray([agg[d]["iqm"]["low"] for d in names])
    high = np.asarray([agg[d]["iqm"]["high"] for d in names])
    ax.bar(np.arange(len(names)), est, yerr=[est - low, high - est], capsize=4,
           color=["#999999" if d in ("none", "adv", "adv-wall") else "#3a7dc9" for d in names])
    ax.set_xticks(np.arange(len(names)), names, rotation=20, fontsize=8)
    ax.set_ylabel(f"IQM normalized robust return at {lab}")
    ax.set_title("Ablation: which FGMF component does the work (95% CIs)")
    return save_figure(fig, path)


def plot_cost(summary: dict[str, Any], path: Path) -> Path:
    """Each run: training hours against its normalized robust return at the largest eps."""
    lab = summary["eps"][-1]
    fig = new_figure(6.4, 3.8)
    ax = fig.subplots()
    for d in summary["defences"]:
        pts = [(r["wall_time_s"] / 3600.0, r["norm_robust"][lab]) for r in summary["runs"]
               if r["defence"] == d and r["wall_time_s"] is not None
               and r["norm_robust"][lab] is not None]
        if pts:
            ax.scatter(*zip(*pts), label=d, s=18)
    ax.set_xlabel("training time (hours, training loop)")
    ax.set_ylabel(f"normalized robust return at {lab}")
    ax.set_title("Cost vs robustness (one point per training run)")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def update_readme(json_path: str | Path, readme: str | Path) -> bool:
    """Replace the README's claims block (between :data:`BEGIN` and :data:`END`) with
    :func:`claims_markdown` of ``json_path``; True when the file changed."""
    summary = json.loads(Path(json_path).read_text())
    text = Path(readme).read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no benchmark claims block ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{claims_markdown(summary)}\n{END}{tail}"
    if new != text:
        atomic_write_text(Path(readme), new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    """``python -m marl_fgmf.benchmark.report BENCHMARK_JSON README``: rewrite the block."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m marl_fgmf.benchmark.report BENCHMARK_JSON README", file=sys.stderr)
        return 2
    changed = update_readme(argv[0], argv[1])
    print(f"{argv[1]}: claims block {'updated' if changed else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
