"""``marl-fgmf demo``: train, attack, audit and explain on beacon, end to end, in one command.

Examples::

    marl-fgmf demo --out results/demo                 # ~15 minutes on 2 CPU cores
    marl-fgmf demo --out /tmp/demo --budget tiny      # a smoke run (a couple of minutes)

What it does, with progress all along:

1. trains an undefended team (``--defense none``) and an FGMF-defended team
   (``--defense fgmf``) on beacon into ``DIR/runs/``; each run has an iteration cap and a
   wall-time budget, so the demo fits its time on a slow machine too;
2. plays a tournament (FGSM, PGD, Square, random noise at eps 4/255 and 8/255, plus clean) with
   the gradient-masking audit into ``DIR/tournament/``;
3. explains one episode of the defended team with ``marl-fgmf explain``;
4. writes ``DIR/report.md``.

Reruns reuse what exists: a finished training run is reused as is, an interrupted one is
resumed, and the tournament skips finished matches. Nothing falls back: if a step fails (FGMF
training, the tournament, the explanation) the demo stops with that step's cause (exit 1);
it never deletes anything.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from marl_fgmf.commands import CommandFailed, check_output, cluster_settings

BUDGETS: dict[str, dict[str, Any]] = {
    "small": {
        "train": {},  # TrainConfig defaults (2000 agent steps per iteration, 4 epochs)
        # iteration caps for a quiet machine; the wall-time budgets bound a loaded one
        "iterations": {"none": 40, "fgmf": 30},
        "time_budget_s": {"none": 170.0, "fgmf": 360.0},
        "episodes": 5,
        "attackers": [{"name": "fgsm", "attack": "fgsm"},
                      {"name": "pgd", "attack": "pgd", "settings": {"steps": 10}},
                      {"name": "square", "attack": "square", "settings": {"n_queries": 100}},
                      {"name": "random", "attack": "random"}],
        "audit": {"n_obs": 64, "episodes": 4},
        "explain_max_steps": None,
    },
    "tiny": {
        "train": {"train_batch_size": 200, "minibatch_size": 100, "num_epochs": 1,
                  "num_envs_per_env_runner": 2},
        "iterations": {"none": 1, "fgmf": 1},
        "time_budget_s": {"none": 60.0, "fgmf": 60.0},
        "episodes": 1,
        "attackers": [{"name": "fgsm", "attack": "fgsm"},
                      {"name": "pgd", "attack": "pgd", "settings": {"steps": 3}},
                      {"name": "square", "attack": "square", "settings": {"n_queries": 20}},
                      {"name": "random", "attack": "random"}],
        "audit": {"n_obs": 16, "episodes": 1, "steps": [1, 3, 5], "restarts": [1, 2],
                  "n_queries": 30},
        "explain_max_steps": 8,
    },
}
EPS = ["4/255", "8/255"]
STATE_FILE = "demo_state.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="demo directory")
    p.add_argument("--budget", choices=tuple(BUDGETS), default="small",
                   help="small: the real demo (~15 min on 2 cores); tiny: a smoke run")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (steps still print)")


class _Steps:
    """Numbered progress lines: ``[demo 2/5 +34s] ...``."""

    def __init__(self, total: int):
        self.total, self.i, self.t0 = total, 0, time.time()

    def __call__(self, text: str, new_step: bool = True) -> None:
        if new_step:
            self.i += 1
        print(f"[demo {self.i}/{self.total} +{time.time() - self.t0:.0f}s] {text}", flush=True)


def _load_state(out: Path) -> dict[str, Any]:
    f = out / STATE_FILE
    if f.is_file():
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def _save_state(out: Path, state: dict[str, Any]) -> None:
    from marl_fgmf.io import atomic_write_text
    atomic_write_text(out / STATE_FILE, json.dumps(state, indent=2))


def train_team(out: Path, defense: str, budget: dict[str, Any], state: dict[str, Any],
               address: str | None, progress: bool) -> dict[str, Any]:
    """Train (or reuse, or resume) the ``defense`` team into ``out/runs/<defense>``.

    A run marked done in the demo state is reused; a run without the mark (interrupted) is
    resumed; otherwise a new run starts. Returns the run's summary (also kept in ``state``).
    """
    from agents.checkpoint import latest_checkpoint
    from agents.train import TrainConfig, train
    run_dir = out / "runs" / defense
    done = state.get("runs", {}).get(defense)
    if done and done.get("done") and latest_checkpoint(run_dir) is not None:
        return {**done, "reused": True}
    cfg = TrainConfig(env="beacon", defense=defense, iterations=budget["iterations"][defense],
                      **budget["train"])
    # an interrupted run of an earlier demo is resumed (from its newest complete checkpoint,
    # or from the start if it never saved one); the demo never deletes a run
    resume = (run_dir / "run.json").is_file()
    t0 = time.time()
    result = train(cfg, run_dir, resume=resume, address=address, progress=progress,
                   time_budget_s=budget["time_budget_s"][defense])
    records = result.get("records") or []
    last = records[-1] if records else (result.get("last") or {})
    summary = {"defense": defense, "run_dir": str(run_dir), "done": True,
               "iterations": int(last.get("iteration", 0)),
               "iterations_target": cfg.iterations,
               "env_steps": int(last.get("env_steps", 0)),
               "agent_return_mean": last.get("agent_return_mean"),
               "reference_return": result.get("reference_return"),
               "train_s": time.time() - t0, "resumed": resume, "reused": False}
    state.setdefault("runs", {})[defense] = summary
    return summary


def _explain(out: Path, checkpoint: Path, max_steps: int | None, quiet: bool) -> dict[str, Any]:
    """``marl-fgmf explain`` on one episode of the defended team, into ``out/explain``.
    A failure fails the demo (no fallback hides it)."""
    from marl_fgmf.commands import explain as explain_cmd
    explain_dir = out / "explain"
    parser = argparse.ArgumentParser(prog="marl-fgmf explain")
    explain_cmd.add_arguments(parser)
    argv = ["--checkpoint", str(checkpoint), "--out", str(explain_dir), "--episodes", "1"]
    if max_steps is not None:
        argv += ["--max-steps", str(max_steps)]
    if quiet:
        argv.append("--quiet")
    code = explain_cmd.run(parser.parse_args(argv))
    if code:
        raise CommandFailed(f"marl-fgmf explain exited {code} on {checkpoint}")
    files = sorted(str(p.relative_to(out)) for p in explain_dir.rglob("*") if p.is_file())
    if not files:
        raise CommandFailed(f"marl-fgmf explain wrote nothing into {explain_dir}")
    return {"status": "ok", "exit": code, "dir": str(explain_dir), "files": files, "note": ""}


def tournament_config(out: Path, defenders: dict[str, Path], budget: dict[str, Any]):
    """The demo's tournament: the trained teams x fgsm, pgd, square, random at 4/255, 8/255."""
    from marl_fgmf.tournament import TournamentConfig
    return TournamentConfig.from_dict({
        "name": "demo",
        "defenders": [{"name": name, "checkpoint": str(path)} for name, path in defenders.items()],
        "attackers": budget["attackers"], "eps": EPS, "seeds": [0],
        "episodes": budget["episodes"], "audit": {**budget["audit"], "eps": "8/255"},
    })


def run(args: argparse.Namespace) -> int:
    from agents.train import ensure_ray
    from marl_fgmf.io import atomic_write_text
    from marl_fgmf.tournament import TournamentError, format_leaderboard, run_tournament
    out = Path(os.path.abspath(args.out))  # RLlib's checkpoint loader needs absolute paths
    check_output(out, "--out", "dir")
    address, _ = cluster_settings(args)  # an unreachable cluster: one line, nothing written
    out.mkdir(parents=True, exist_ok=True)
    budget = BUDGETS[args.budget]
    state = _load_state(out)
    state["budget"] = args.budget
    progress = not args.quiet
    step = _Steps(5)
    t0 = time.time()
    notes: list[str] = []

    import ray
    started = ensure_ray(address, log=print)
    try:
        step("training the undefended team (--defense none) on beacon")
        runs = {"none": train_team(out, "none", budget, state, address, progress)}
        _save_state(out, state)
        _say_trained(step, runs["none"])

        step("training the FGMF-defended team (--defense fgmf: SCOR-PIO + SGAM)")
        defended = "fgmf"  # no fallback: if FGMF training fails, the demo fails and says why
        runs["fgmf"] = train_team(out, "fgmf", budget, state, address, progress)
        _save_state(out, state)
        _say_trained(step, runs[defended])

        step(f"tournament: {{none, {defended}}} x {{fgsm, pgd, square, random}} x eps "
             f"{{{', '.join(EPS)}}} + clean, with the gradient-masking audit")
        cfg = tournament_config(out, {"none": out / "runs" / "none",
                                      defended: out / "runs" / defended}, budget)
        failed: list[str] = []
        try:
            result = run_tournament(cfg, out / "tournament", address=address,
                                    progress=progress, log=lambda m: step(m, new_step=False))
            board = result.leaderboard
        except TournamentError as exc:
            failed = exc.errors
            notes += [f"tournament job failed: {e}" for e in exc.errors]
            board = json.loads((out / "tournament" / "leaderboard.json").read_text())
        table = format_leaderboard(board)
        print(table, flush=True)

        step(f"explaining one episode of the {defended} team (marl-fgmf explain)")
        previous = state.get("explain") or {}
        if (previous.get("status") == "ok" and previous.get("team") == defended
                and runs[defended].get("reused") and (out / "explain").is_dir()):
            explanation = previous
            step(f"explanation reused: {out / 'explain'}", new_step=False)
        else:
            explanation = _explain(out, out / "runs" / defended, budget["explain_max_steps"],
                                   args.quiet)
            explanation["team"] = defended

        step("writing the report")
        state["explain"] = explanation
        state["notes"] = notes
        _save_state(out, state)
        report = _report(args, out, runs, defended, board, table, explanation, notes,
                         time.time() - t0)
        atomic_write_text(out / "report.md", report)
    finally:
        if started:
            ray.shutdown()
    print(f"\ndemo finished in {time.time() - t0:.0f}s: {out / 'report.md'}")
    flagged = [r["defender"] for r in board["defenders"] if r["flagged"]]
    if flagged:
        print(f"FLAGGED by the gradient-masking audit: {', '.join(flagged)}")
    return 1 if failed else 0


def _say_trained(step: _Steps, run: dict[str, Any]) -> None:
    ret = run.get("agent_return_mean")
    ref = run.get("reference_return")
    how = "reused" if run.get("reused") else ("resumed and trained" if run.get("resumed") else "trained")
    ret_txt = "" if ret is None else f", mean agent return {ret:.2f}"
    ref_txt = "" if not ref else f" (scripted optimum {ref:.2f})"
    step(f"{run['defense']}: {how}, {run['iterations']} iterations{ret_txt}{ref_txt} "
         f"-> {run['run_dir']}", new_step=False)


def _report(args: argparse.Namespace, out: Path, runs: dict[str, dict[str, Any]], defended: str,
            board: dict[str, Any], table: str, explanation: dict[str, Any], notes: list[str],
            seconds: float) -> str:
    from marl_fgmf.tournament import eps_slug, format_leaderboard
    lines = ["# marl-fgmf demo", "",
             f"Budget `{args.budget}`, beacon environment, {seconds:.0f}s on this machine. "
             f"Command: `marl-fgmf demo --out {args.out} --budget {args.budget}` (rerun it to "
             f"reuse the trained teams and finished matches).", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## 1. Training", "",
              "| team | defense | iterations | env steps | mean agent return | scripted optimum "
              "| train time |", "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        ret = r.get("agent_return_mean")
        ref = r.get("reference_return")
        status = " (reused)" if r.get("reused") else ""
        lines.append(f"| {name} | {r['defense']} | {r['iterations']} of {r['iterations_target']} "
                     f"| {r['env_steps']} | {'-' if ret is None else f'{ret:.2f}'} | "
                     f"{'-' if not ref else f'{ref:.2f}'} | {r.get('train_s', 0):.0f}s{status} |")
    lines += ["", "Runs in `runs/<defense>/` (checkpoints, metrics.csv, learning_curve.png).", "",
              "## 2. Tournament and leaderboard", "",
              "Robust return = the minimum over the attackers of the mean team return; FLAGGED "
              "= failed the gradient-masking audit (robustness not trustworthy).", "",
              format_leaderboard(board, markdown=True), "",
              "![robust return vs eps](tournament/robust_vs_eps.png)", ""]
    for lab, e in zip(board["eps"], board["eps_values"]):
        lines += [f"![heat map eps {lab}](tournament/heatmap_{eps_slug(e)}.png)", ""]
    lines += ["Full tables, every match and the audit details: "
              "[tournament/report.md](tournament/report.md).", "",
              "## 3. Gradient-masking audit", ""]
    for r in board["defenders"]:
        verdict = "FLAGGED: " + ", ".join(r["audit_failed"]) if r["flagged"] else \
            ("passed all checks" if r["audited"] else "not audited")
        lines.append(f"- **{r['defender']}**: {verdict} (`tournament/audit_{r['defender']}.json`)")
    lines += ["", "## 4. Explanation", ""]
    if explanation["status"] == "ok":
        lines += [f"`marl-fgmf explain` on the {defended} team wrote:", ""]
        lines += [f"- [{f}]({f})" for f in explanation.get("files", [])] or ["- (no files)"]
    else:
        lines.append(f"Skipped: {explanation['note']}.")
    lines += ["", "## Leaderboard as printed", "", "```", table, "```", ""]
    return "\n".join(lines)


__all__ = ["BUDGETS", "add_arguments", "run", "train_team", "tournament_config"]
