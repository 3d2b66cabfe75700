"""The leaderboard: defenders ranked by robust return (the minimum over the attackers of the
mean team return, DESIGN.md section 3) per eps, from the finished match records."""
from __future__ import annotations

import math
from typing import Any

from marl_fgmf.protocol import eps_label
from marl_fgmf.stats import summarize
from marl_fgmf.tournament.config import CLEAN, AttackerSpec, Match, TournamentConfig

__all__ = ["attacker_label", "build_leaderboard", "format_cell", "format_leaderboard", "pool"]


def pool(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the episodes of several seeds: mean and 95% CI of the team return, mean success."""
    returns = [r for rec in records for r in rec["team_returns"]]
    stats = summarize(returns)
    steps = sum(int(rec.get("agent_steps", 0)) for rec in records)
    success = (sum(rec.get("success_rate", 0.0) * int(rec.get("agent_steps", 0)) for rec in records)
               / steps) if steps else 0.0
    linf = (sum(rec.get("mean_linf", 0.0) * int(rec.get("agent_steps", 0)) for rec in records)
            / steps) if steps else 0.0
    return {"mean": stats["mean"], "ci95": stats["ci95"], "n_episodes": stats["n"],
            "seeds": len(records), "success_rate": success, "mean_linf": linf,
            "wall_s": sum(float(rec.get("wall_s", 0.0)) for rec in records)}


def build_leaderboard(cfg: TournamentConfig, records: dict[str, dict[str, Any]],
                      audits: dict[str, dict[str, Any]] | None = None,
                      added: dict[str, list[AttackerSpec]] | None = None) -> dict[str, Any]:
    """The leaderboard from finished match records (and audits).

    Per defender: the clean return, every cell (attacker x eps, episodes pooled over seeds),
    and per eps the robust return = the minimum over attackers of the mean team return, with
    the attacker achieving it. Defenders are ranked by the robust return at the LARGEST eps
    (the hardest budget), ties broken by the mean robust return over all eps, then the clean
    return. A defender missing a match at some eps has no robust return there (``None``) and
    ranks last; ``complete`` says whether every match has finished.

    ``added``: the attackers the tournament added per defender (adaptive attacks through an
    input filter, :mod:`marl_fgmf.tournament.adaptive`); they count in that defender's
    robust return like the config's, are listed in its row's ``added`` and in the board's
    ``added_attackers`` (the board's ``attackers`` are the config's).
    """
    audits = audits or {}
    added = added or {}
    eps_sorted = sorted(cfg.eps)
    rows = []
    total = found = 0
    for d in cfg.defenders:
        clean_recs = [records[m.key] for m in (Match(d.name, CLEAN, None, s) for s in cfg.seeds)
                      if m.key in records]
        total += len(cfg.seeds)
        found += len(clean_recs)
        clean = pool(clean_recs) if clean_recs else None
        cells: dict[str, dict[str, Any]] = {}
        robust: dict[str, Any] = {}
        for e in eps_sorted:
            lab = eps_label(e)
            cells[lab] = {}
            complete = True
            for a in cfg.attackers_of(d.name, added):
                recs = [records[m.key] for m in (Match(d.name, a.name, e, s) for s in cfg.seeds)
                        if m.key in records]
                total += len(cfg.seeds)
                found += len(recs)
                if len(recs) < len(cfg.seeds):
                    complete = False
                cells[lab][a.name] = pool(recs) if recs else None
            present = {k: v for k, v in cells[lab].items() if v is not None}
            if present and complete:
                worst = min(present, key=lambda k: present[k]["mean"])
                robust[lab] = {"mean": present[worst]["mean"], "ci95": present[worst]["ci95"],
                               "worst_attacker": worst,
                               "success_rate": present[worst]["success_rate"]}
            else:
                robust[lab] = None
        a = audits.get(d.name)
        failed = []
        if a is not None:
            for pid, rep in a.get("policies", {}).items():
                failed += [c["name"] + ("" if len(a["policies"]) == 1 else f"({pid})")
                           for c in rep.get("checks", []) if not c.get("passed", True)]
        rows.append({"defender": d.name, "clean": clean, "robust": robust, "cells": cells,
                     "added": [x.name for x in added.get(d.name, [])],
                     "audited": a is not None, "flagged": bool(a and a.get("flagged")),
                     "audit_failed": failed,
                     "checkpoint": str(d.checkpoint) if d.checkpoint else f"defenders/{d.name}"})

    def sort_key(row: dict[str, Any]) -> tuple:
        vals = [row["robust"][eps_label(e)] for e in eps_sorted]
        last = vals[-1]["mean"] if vals and vals[-1] is not None else -math.inf
        means = [v["mean"] for v in vals if v is not None]
        avg = sum(means) / len(means) if len(means) == len(vals) and means else -math.inf
        clean_mean = row["clean"]["mean"] if row["clean"] else -math.inf
        return (-last, -avg, -clean_mean, row["defender"])

    rows.sort(key=sort_key)
    extra = list(dict.fromkeys(x.name for d in cfg.defenders for x in added.get(d.name, [])))
    for i, row in enumerate(rows, start=1):
        row["rank"] = i
    return {"name": cfg.name, "eps": [eps_label(e) for e in eps_sorted],
            "eps_values": eps_sorted, "attackers": [a.name for a in cfg.attackers] + cfg.own_attacker_names(),
            "added_attackers": extra,
            "seeds": list(cfg.seeds), "episodes": cfg.episodes,
            "ranked_by": f"robust return at eps {eps_label(eps_sorted[-1])} (min over attackers "
                         f"of the mean team return), then mean robust return over eps, then clean",
            "complete": found == total, "matches_finished": found, "matches_total": total,
            "defenders": rows}


def format_cell(v: dict[str, Any] | None, ci: bool = True) -> str:
    """``3.50 ± 0.20`` (mean ± 95% CI), ``3.50`` when there is no CI (one episode: NaN), ``-``
    when there is no value."""
    if v is None or v.get("mean") is None or v["mean"] != v["mean"]:
        return "-"
    no_ci = v.get("ci95") is None or v["ci95"] != v["ci95"]
    if ci and not no_ci:
        return f"{v['mean']:.2f} ± {v['ci95']:.2f}"
    return f"{v['mean']:.2f}"


def attacker_label(name: str, row: dict[str, Any]) -> str:
    """An attacker's name, with `` (added)`` when the tournament added it for ``row``'s
    defender (:mod:`marl_fgmf.tournament.adaptive`)."""
    return f"{name} (added)" if name in row.get("added", ()) else name


def format_leaderboard(board: dict[str, Any], markdown: bool = False) -> str:
    """The leaderboard as a text table (or a Markdown table): rank, defender, clean return,
    robust return per eps (with the worst attacker, marked when added), audit verdict."""
    head = ["rank", "defender", "clean"] + [f"robust@{e}" for e in board["eps"]] + \
           ["worst attacker", "audit"]
    rows = []
    for r in board["defenders"]:
        worst = ", ".join(f"{e}: {attacker_label(r['robust'][e]['worst_attacker'], r)}"
                          for e in board["eps"] if r["robust"][e] is not None) or "-"
        verdict = ("FLAGGED (" + ", ".join(r["audit_failed"]) + ")") if r["flagged"] else \
            ("ok" if r["audited"] else "not audited")
        rows.append([str(r["rank"]), r["defender"], format_cell(r["clean"])] +
                    [format_cell(r["robust"][e]) for e in board["eps"]] + [worst, verdict])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    if not board["complete"]:
        lines.append(f"(incomplete: {board['matches_finished']} of {board['matches_total']} "
                     f"matches finished)")
    return "\n".join(lines)
