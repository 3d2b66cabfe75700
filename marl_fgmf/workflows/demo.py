"""The demo workflow: train, attack, audit and explain on beacon, end to end.

:func:`run_demo` is what ``marl-fgmf demo`` calls (:mod:`marl_fgmf.commands.demo` only parses
and prints). In ``out`` it

1. trains an undefended team (``defense="none"``) and an FGMF-defended team
   (``defense="fgmf"``: SCOR-PIO + SGAM) on beacon into ``out/runs/``, each with an iteration
   cap and a wall-time budget (:data:`BUDGETS`), so the demo fits its time on a slow machine;
2. plays a tournament (FGSM, PGD, Square, random noise at eps 4/255 and 8/255, plus clean;
   BPDA and EOT are added for the SGAM team, whose input filter needs adaptive attacks) with
   the gradient-masking audit into ``out/tournament/``;
3. explains one episode of the defended team (:func:`marl_fgmf.workflows.explain.explain_run`)
   into ``out/explain/``;
4. writes ``out/report.md``; ``out/demo_state.json`` remembers what is done.

Reruns reuse what exists: a finished training run is reused as is, an interrupted one is
resumed, and the tournament skips finished matches. Nothing falls back: if a step fails (FGMF
training, the tournament, the explanation) the demo stops with that step's cause; it never
deletes anything.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from agents.checkpoint import latest_checkpoint
from agents.train import TrainConfig, ensure_ray, train
from marl_fgmf.io import atomic_write_text
from marl_fgmf.protocol import eps_slug
from marl_fgmf.tournament import (TournamentConfig, TournamentError, format_leaderboard,
                                  run_tournament)
from marl_fgmf.workflows.common import CommandFailed
from marl_fgmf.workflows.explain import explain_run, format_summary

__all__ = ["BUDGETS", "EPS", "STATE_FILE", "Steps", "run_demo", "train_team",
           "tournament_config"]

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


class Steps:
    """Numbered progress lines through ``log``: ``[demo 2/5 +34s] ...``."""

    def __init__(self, total: int, log: Callable[[str], None] = print):
        self.total, self.i, self.t0, self.log = total, 0, time.time(), log

    def __call__(self, text: str, new_step: bool = True) -> None:
        if new_step:
            self.i += 1
        self.log(f"[demo {self.i}/{self.total} +{time.time() - self.t0:.0f}s] {text}")


def load_state(out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``out/demo_state.json`` (empty when absent; an unreadable one is reported, then
    ignored: the runs and the match log it summarizes are still reused or resumed)."""
    f = out / STATE_FILE
    if not f.is_file():
        return {}
    try:
        state = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        log(f"warning: {f} is unreadable ({exc}); starting a fresh state (runs are resumed "
            f"from their checkpoints, finished matches reused)")
        return {}
    return state if isinstance(state, dict) else {}


def save_state(out: Path, state: dict[str, Any]) -> None:
    atomic_write_text(out / STATE_FILE, json.dumps(state, indent=2))


def train_team(out: Path, defense: str, budget: dict[str, Any], state: dict[str, Any],
               address: str | None, progress: bool) -> dict[str, Any]:
    """Train (or reuse, or resume) the ``defense`` team into ``out/runs/<defense>``.

    A run marked done in the demo state is reused; a run without the mark (interrupted) is
    resumed; otherwise a new run starts. Returns the run's summary (also kept in ``state``).
    """
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


def explain_team(out: Path, checkpoint: Path, max_steps: int | None, progress: bool,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """PGCA on one greedy episode of ``checkpoint`` into ``out/explain``; a failure fails the
    demo (no fallback hides it)."""
    explain_dir = out / "explain"
    result = explain_run(checkpoint, explain_dir, episodes=1, max_steps=max_steps,
                         progress=progress)
    log(format_summary(result))
    files = sorted(str(p.relative_to(out)) for p in explain_dir.rglob("*") if p.is_file())
    if not files:
        raise CommandFailed(f"the explanation wrote nothing into {explain_dir}")
    return {"status": "ok", "dir": str(explain_dir), "files": files, "note": ""}


def tournament_config(out: Path, defenders: dict[str, Path],
                      budget: dict[str, Any]) -> TournamentConfig:
    """The demo's tournament: the trained teams x fgsm, pgd, square, random at 4/255, 8/255."""
    return TournamentConfig.from_dict({
        "name": "demo",
        "defenders": [{"name": name, "checkpoint": str(path)} for name, path in defenders.items()],
        "attackers": budget["attackers"], "eps": EPS, "seeds": [0],
        "episodes": budget["episodes"], "audit": {**budget["audit"], "eps": "8/255"},
    })


def run_demo(out: Path, budget_name: str = "small", address: str | None = None,
             progress: bool = True, log: Callable[[str], None] = print,
             command: str | None = None) -> dict[str, Any]:
    """Run the demo into ``out`` (an absolute, already checked directory; see the module
    docstring). Returns ``{"report": path, "board": leaderboard, "failed": [tournament
    errors], "seconds": float}``; a failed tournament job is reported in ``failed`` and in the
    report's notes (its other matches still count), any other failure raises."""
    budget = BUDGETS[budget_name]
    out.mkdir(parents=True, exist_ok=True)
    state = load_state(out, log)
    state["budget"] = budget_name
    step = Steps(5, log)
    t0 = time.time()
    notes: list[str] = []

    import ray  # lazy: Ray (3 s), only once the arguments are checked
    started = ensure_ray(address, log=log)
    try:
        step("training the undefended team (--defense none) on beacon")
        runs = {"none": train_team(out, "none", budget, state, address, progress)}
        save_state(out, state)
        say_trained(step, runs["none"])

        step("training the FGMF-defended team (--defense fgmf: SCOR-PIO + SGAM)")
        defended = "fgmf"  # no fallback: if FGMF training fails, the demo fails and says why
        runs["fgmf"] = train_team(out, "fgmf", budget, state, address, progress)
        save_state(out, state)
        say_trained(step, runs[defended])

        step(f"tournament: {{none, {defended}}} x {{fgsm, pgd, square, random}} x eps "
             f"{{{', '.join(EPS)}}} + clean (+ bpda, eot through {defended}'s input filter), "
             f"with the gradient-masking audit")
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
        log(table)

        step(f"explaining one episode of the {defended} team (PGCA)")
        previous = state.get("explain") or {}
        if (previous.get("status") == "ok" and previous.get("team") == defended
                and runs[defended].get("reused") and (out / "explain").is_dir()):
            explanation = previous
            step(f"explanation reused: {out / 'explain'}", new_step=False)
        else:
            explanation = explain_team(out, out / "runs" / defended,
                                       budget["explain_max_steps"], progress, log)
            explanation["team"] = defended

        step("writing the report")
        state["explain"] = explanation
        state["notes"] = notes
        save_state(out, state)
        seconds = time.time() - t0
        command = command or f"marl-fgmf demo --out {out} --budget {budget_name}"
        report = render_report(budget_name, command, runs, defended, board, table, explanation,
                               notes, seconds)
        atomic_write_text(out / "report.md", report)
    finally:
        if started:
            ray.shutdown()
    return {"report": out / "report.md", "board": board, "failed": failed,
            "seconds": time.time() - t0}


def say_trained(step: Steps, run: dict[str, Any]) -> None:
    ret = run.get("agent_return_mean")
    ref = run.get("reference_return")
    how = "reused" if run.get("reused") else ("resumed and trained" if run.get("resumed")
                                              else "trained")
    ret_txt = "" if ret is None else f", mean agent return {ret:.2f}"
    ref_txt = "" if not ref else f" (scripted optimum {ref:.2f})"
    step(f"{run['defense']}: {how}, {run['iterations']} iterations{ret_txt}{ref_txt} "
         f"-> {run['run_dir']}", new_step=False)


def render_report(budget_name: str, command: str, runs: dict[str, dict[str, Any]],
                  defended: str, board: dict[str, Any], table: str,
                  explanation: dict[str, Any], notes: list[str], seconds: float) -> str:
    """``report.md``: training, leaderboard (with the figures), audit verdicts, explanation."""
    lines = ["# marl-fgmf demo", "",
             f"Budget `{budget_name}`, beacon environment, {seconds:.0f}s on this machine. "
             f"Command: `{command}` (rerun it to reuse the trained teams and finished "
             f"matches).", ""]
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
        lines += [f"PGCA (`marl-fgmf explain`) on the {defended} team wrote:", ""]
        lines += [f"- [{f}]({f})" for f in explanation.get("files", [])] or ["- (no files)"]
    else:
        lines.append(f"Skipped: {explanation['note']}.")
    lines += ["", "## Leaderboard as printed", "", "```", table, "```", ""]
    return "\n".join(lines)

