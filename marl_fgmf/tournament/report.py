"""The tournament's written outputs: ``leaderboard.json/.md``, the heat maps, the robust
return curves and ``report.md`` (all written atomically)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from marl_fgmf.audit import AuditReport
from marl_fgmf.io import atomic_write_text, to_jsonable
from marl_fgmf.protocol import eps_label, eps_slug
from marl_fgmf.tournament.config import CLEAN, AttackerSpec, TournamentConfig
from marl_fgmf.tournament.errors import first_line
from marl_fgmf.tournament.leaderboard import format_cell, format_leaderboard
from marl_fgmf.viz import plot_curves, plot_heatmap

__all__ = ["added_note", "cell_tables", "heat_matrix", "write_outputs"]


def columns(board: dict[str, Any]) -> list[str]:
    """The attackers of the tables and heat maps: the config's, then the added ones."""
    return list(board["attackers"]) + list(board.get("added_attackers", []))


def column_title(board: dict[str, Any], name: str) -> str:
    return f"{name} (added)" if name in board.get("added_attackers", ()) else name


def heat_matrix(board: dict[str, Any], eps: str) -> tuple[list[list[float]], list[str], list[str]]:
    """Defenders x (clean + attackers) mean team returns at ``eps`` (NaN: not played)."""
    cols = [CLEAN] + [column_title(board, a) for a in columns(board)]
    names, matrix = [], []
    for r in board["defenders"]:
        flag = " (FLAGGED)" if r["flagged"] else ""
        names.append(r["defender"] + flag)
        row = [r["clean"]["mean"] if r["clean"] else float("nan")]
        for a in columns(board):
            c = r["cells"][eps].get(a)
            row.append(c["mean"] if c else float("nan"))
        matrix.append(row)
    return matrix, names, cols


def write_outputs(cfg: TournamentConfig, out: Path, board: dict[str, Any],
                  records: dict[str, dict[str, Any]], audits: dict[str, dict[str, Any]],
                  warn: Callable[[str], None] | None = None,
                  added: dict[str, list[AttackerSpec]] | None = None) -> dict[str, Path]:
    """Write ``leaderboard.json/.md``, the heat maps, the curves and ``report.md`` (atomically).
    A figure that fails is reported through ``warn`` and skipped; the tables are always written.
    ``added``: the attackers the tournament added per defender (as for
    :func:`~marl_fgmf.tournament.leaderboard.build_leaderboard`)."""
    warn = warn or (lambda m: None)
    out = Path(out)
    files: dict[str, Path] = {}
    atomic_write_text(out / "leaderboard.json", json.dumps(to_jsonable(board), indent=2))
    files["leaderboard.json"] = out / "leaderboard.json"
    for e, lab in zip(board["eps_values"], board["eps"]):
        path = out / f"heatmap_{eps_slug(e)}.png"
        matrix, rows, cols = heat_matrix(board, lab)
        try:
            _plot_heatmap(matrix, rows, cols, path,
                          f"mean team return, eps {lab} (clean column: no attack)")
            files[path.name] = path
        except Exception as exc:  # a figure must never lose the tables
            warn(f"heat map {path.name} not written: {type(exc).__name__}: {first_line(exc)}")
    curves = {}
    for r in board["defenders"]:
        xs, ys, errs = [], [], []
        for e, lab in zip(board["eps_values"], board["eps"]):
            if r["robust"][lab] is not None:
                xs.append(e)
                ys.append(r["robust"][lab]["mean"])
                errs.append(r["robust"][lab]["ci95"])
        if xs:
            curves[r["defender"] + (" (FLAGGED)" if r["flagged"] else "")] = (xs, ys, errs)
    if curves:
        path = out / "robust_vs_eps.png"
        try:
            in_255 = all(eps_label(e).endswith("/255") for e in board["eps_values"])
            _plot_curves(curves, path, in_255)
            files[path.name] = path
        except Exception as exc:
            warn(f"curves {path.name} not written: {type(exc).__name__}: {first_line(exc)}")
    md = leaderboard_markdown(board)
    atomic_write_text(out / "leaderboard.md", md)
    files["leaderboard.md"] = out / "leaderboard.md"
    atomic_write_text(out / "report.md",
                      report_markdown(cfg, board, records, audits, files, added))
    files["report.md"] = out / "report.md"
    return files


def leaderboard_markdown(board: dict[str, Any]) -> str:
    lines = [f"# Leaderboard: {board['name']}", "",
             f"Ranked by {board['ranked_by']}. Returns are mean team returns ± 95% CI over "
             f"{board['episodes']} episodes x {len(board['seeds'])} seed(s). FLAGGED defenders "
             f"failed the gradient-masking audit: their robust return is not trustworthy. Read "
             f"the robust return beside the clean one: a policy that scores little without an "
             f"attack has little for an attacker to take away.", "",
             format_leaderboard(board, markdown=True), ""] + added_note(board)
    if not board["complete"]:
        lines += [f"**Incomplete**: {board['matches_finished']} of {board['matches_total']} "
                  f"matches finished.", ""]
    lines += cell_tables(board)
    return "\n".join(lines)


def cell_tables(board: dict[str, Any]) -> list[str]:
    """One Markdown table per eps: defenders x (clean + attackers), return and success."""
    lines: list[str] = []
    for lab in board["eps"]:
        cols = columns(board)
        lines += [f"## eps {lab}: team return per attacker", "",
                  "| defender | clean | " + " | ".join(column_title(board, a) for a in cols)
                  + " |", "|---|---|" + "---|" * len(cols)]
        for r in board["defenders"]:
            cells = [format_cell(r["cells"][lab].get(a)) + (
                f" ({100 * r['cells'][lab][a]['success_rate']:.0f}%)" if r["cells"][lab].get(a)
                else "") for a in cols]
            lines.append(f"| {r['defender']} | {format_cell(r['clean'])} | "
                         + " | ".join(cells) + " |")
        lines += ["", "(percent: attack success, the fraction of agent-steps whose greedy "
                      "action the attack changed)", ""]
    return lines


def report_markdown(cfg: TournamentConfig, board: dict[str, Any],
                    records: dict[str, dict[str, Any]], audits: dict[str, dict[str, Any]],
                    files: dict[str, Path],
                    added: dict[str, list[AttackerSpec]] | None = None) -> str:
    lines = [f"# Tournament report: {cfg.name}", "",
             f"{len(cfg.defenders)} defenders x {len(cfg.attackers)} attackers x "
             f"{len(cfg.eps)} eps x {len(cfg.seeds)} seed(s), {cfg.episodes} episodes per match; "
             f"{board['matches_finished']} of {board['matches_total']} matches finished. "
             f"Attack success = fraction of agent-steps whose perturbed greedy action differs "
             f"from the clean one. Robust return = minimum over the attackers of the mean team "
             f"return (DESIGN.md section 3).", "",
             "## Leaderboard", "", format_leaderboard(board, markdown=True), ""]
    lines += added_note(board)
    flagged = [r["defender"] for r in board["defenders"] if r["flagged"]]
    if flagged:
        lines += [f"**FLAGGED** by the gradient-masking audit: {', '.join(flagged)}. Their "
                  f"robust returns may come from hidden gradients, not robustness; see the audit "
                  f"below and evaluate them with adaptive attacks.", ""]
    if "robust_vs_eps.png" in files:
        lines += ["## Robust return against eps", "", "![robust return vs eps](robust_vs_eps.png)", ""]
    lines += ["## Heat maps (defenders x attackers)", ""]
    for e, lab in zip(board["eps_values"], board["eps"]):
        name = f"heatmap_{eps_slug(e)}.png"
        if name in files:
            lines += [f"eps {lab}:", "", f"![heat map eps {lab}]({name})", ""]
    lines += cell_tables(board)
    lines += ["## Gradient-masking audit", ""]
    if not audits:
        lines += ["No audit was run.", ""]
    for d in cfg.defenders:
        a = audits.get(d.name)
        if a is None:
            lines += [f"### {d.name}", "", "not audited", ""]
            continue
        for pid, rep in a["policies"].items():
            title = d.name if len(a["policies"]) == 1 else f"{d.name} / {pid}"
            lines += [AuditReport.from_dict(rep).to_markdown(title=title)]
    lines += nodes_markdown(board)
    lines += ["## Matches", "", "| defender | attacker | eps | seed | team return | success | "
              "mean Linf | wall s | node |", "|---|---|---|---|---|---|---|---|---|"]
    for m in cfg.matches(added):
        attacker = column_title(board, m.attacker) if m.defender in added_to(board) \
            else m.attacker
        r = records.get(m.key)
        if r is None:
            lines.append(f"| {m.defender} | {attacker} | {eps_label(m.eps)} | {m.seed} | "
                         f"not finished | | | | |")
            continue
        lines.append(f"| {m.defender} | {attacker} | {eps_label(m.eps)} | {m.seed} | "
                     f"{format_cell(r['team_return'])} | {r.get('success_rate', 0):.3f} | "
                     f"{r.get('mean_linf', 0):.4f} | {r.get('wall_s', 0):.1f} | "
                     f"{(r.get('node_id') or '-')[:8]} |")
    lines += ["", "Files: `matches.jsonl` (one line per match), `leaderboard.json`, "
                  "`leaderboard.md`, `audit_<defender>.json`.", ""]
    return "\n".join(lines)


def added_to(board: dict[str, Any]) -> list[str]:
    """The defenders the tournament added attackers for."""
    return [r["defender"] for r in board["defenders"] if r.get("added")]


def added_note(board: dict[str, Any]) -> list[str]:
    """The report's note on the adaptive attackers the tournament added, if any."""
    names = added_to(board)
    if not names:
        return []
    extra = ", ".join(board.get("added_attackers", []))
    return [f"**Added**: {extra} (marked \"added\") were added by the tournament for "
            f"{', '.join(names)}, which {'has' if len(names) == 1 else 'have'} an input filter: "
            f"every evaluation of such a defender includes adaptive attacks through the filter "
            f"(BPDA, EOT; DESIGN.md section 3), and the config listed none. They count in the "
            f"robust return like the listed attackers.", ""]


def nodes_markdown(board: dict[str, Any]) -> list[str]:
    nodes = board.get("nodes") or []
    if not nodes:
        return []
    lines = ["## Ray nodes", "", f"{len(nodes)} node(s) ran this tournament's matches and "
             f"audits (the node id in `matches.jsonl` and `audit_<defender>.json`):", "",
             "| node id | address | CPUs | matches | audits |", "|---|---|---|---|---|"]
    for n in nodes:
        cpus = "-" if n.get("cpus") is None else f"{n['cpus']:g}"
        lines.append(f"| {n['node_id']} | {n.get('ip') or n.get('host') or '-'} | {cpus} | "
                     f"{n['matches']} | {n['audits']} |")
    return lines + [""]


def _plot_heatmap(matrix: list[list[float]], rows: list[str], cols: list[str], path: Path,
                  title: str) -> None:
    plot_heatmap(matrix, rows, cols, path, title, cbar_label="mean team return",
                 xlabel="attacker", ylabel="defender")


def _plot_curves(curves: dict[str, tuple], path: Path, in_255: bool) -> None:
    plot_curves(curves, path, xlabel="eps (Linf, [0, 1] units)",
                ylabel="robust return (min over attackers)",
                title="robust team return against the budget", eps_in_255=in_255)
