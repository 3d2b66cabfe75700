"""The tournament driver: train the defenders given as specs, load and ship the weights,
decide what to replay, play the matches and audits as Ray tasks (appending each finished
match to the log), then write the leaderboard and the report.

See :mod:`marl_fgmf.tournament` for the whole picture.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from agents.checkpoint import latest_checkpoint
from agents.ray_session import Job, check_address, cluster_summary, ensure_ray, run_jobs
from agents.train import TrainConfig, train
from marl_fgmf.io import DirLock, atomic_write_text, to_jsonable
from marl_fgmf.protocol import eps_label
from marl_fgmf.tournament.config import CLEAN, TournamentConfig
from marl_fgmf.tournament.errors import TournamentError, first_line
from marl_fgmf.tournament.leaderboard import build_leaderboard
from marl_fgmf.tournament.matchlog import MatchLog
from marl_fgmf.tournament.report import write_outputs
from marl_fgmf.tournament.specs import (Shipped, audit_is_current, audit_spec, load_weights,
                                        match_spec)
from marl_fgmf.tournament.tasks import audit_defender, play_match

__all__ = ["TournamentResult", "after_match_written", "run_tournament"]


@dataclass
class TournamentResult:
    """What :func:`run_tournament` did and wrote.

    ``reused`` matches had a record with the current fingerprint, ``replayed`` ones a record
    with another fingerprint or none (moved to ``matches.stale.jsonl``), ``new`` ones no record;
    ``played`` = replayed + new, ``skipped`` = reused.
    """

    out: Path
    leaderboard: dict[str, Any]
    played: int
    skipped: int
    warnings: list[str]
    files: dict[str, Path]
    seconds: float
    reused: int
    replayed: int
    new: int


def after_match_written(written: int) -> None:
    """Called by the driver after each match record is appended to the log, with how many
    this run has written. Does nothing; a test monkeypatches it to raise, which simulates a
    crash with matches in flight (the hook is not part of :func:`run_tournament`'s
    signature)."""


def train_defenders(cfg: TournamentConfig, out: Path, address: str | None, progress: bool,
                    log: Callable[[str], None]) -> None:
    """Train (or resume) every defender given as a training spec into ``DIR/defenders``; a
    run that already has its iterations is reused."""
    for d in cfg.defenders:
        if d.train is None:
            continue
        run_dir = d.run_dir(out)
        tcfg = TrainConfig.from_json(d.train)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None and int(ckpt.name.split("_")[-1]) >= tcfg.iterations:
            log(f"defender {d.name}: trained run found in {run_dir}, reused")
            continue
        resume = (run_dir / "run.json").is_file()
        log(f"defender {d.name}: {'resuming' if resume else 'training'} {tcfg.defense} "
            f"on {tcfg.env} for {tcfg.iterations} iterations into {run_dir}")
        # Ray already runs (the tournament's session): the learner and checkpoints stay on
        # the driver, env runners may go to any node
        train(tcfg, run_dir, resume=resume, address=None, progress=progress)


def run_tournament(config: TournamentConfig, out: str | os.PathLike, *,
                   address: str | None = None, workers: int | None = None,
                   progress: bool = True, audit: bool | None = None,
                   log: Callable[[str], None] | None = None,
                   runtime_env: dict[str, Any] | None = None,
                   max_node_failures: int = 3) -> TournamentResult:
    """Play every match without a current record in ``DIR/matches.jsonl`` (one with the
    match's fingerprint; see :mod:`marl_fgmf.tournament`), audit, and write the
    leaderboard.

    Args:
        config: the tournament (validated here first; nothing runs if it is invalid).
        out: the tournament directory ``DIR``.
        address: Ray cluster address (default: ``config.address``, else a local Ray);
            checked before anything is written.
        workers: matches in flight at once (default: ``config.max_concurrency``, else the
            cluster's CPUs divided by ``num_cpus_per_match``).
        progress: show a progress bar over the matches.
        audit: run the audit (default: ``config.audit.enabled``).
        log: where status lines go (default: print).
        runtime_env: Ray ``runtime_env`` (code for nodes that lack the package).
        max_node_failures: a node whose last this-many tasks failed with the same cause gets
            no more work while another node is healthy (its failed tasks are retried there).

    Returns:
        A :class:`TournamentResult` (leaderboard dict, counts of reused, replayed and new
        matches, warnings, written files).

    Raises:
        ConfigError: invalid configuration (every problem, one line each).
        TournamentError: some matches or audits failed (the others are written, and the
            leaderboard is written from what finished).
        ValueError: an unreachable or unsupported Ray address.
    """
    t0 = time.perf_counter()
    log = log or print
    out = Path(os.path.abspath(out))
    config.check(out)
    address = check_address(address or config.address)
    run_audit = config.audit.enabled if audit is None else bool(audit)
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        log(f"warning: {msg}")

    import ray  # lazy: importing Ray takes seconds; only a running tournament needs it

    started = ensure_ray(address, runtime_env=runtime_env, log=log)  # before anything is written
    try:
        out.mkdir(parents=True, exist_ok=True)
        with DirLock(out, ".tournament.lock", "another tournament is running"):
            atomic_write_text(out / "tournament.json", json.dumps(config.to_dict(), indent=2))
            train_defenders(config, out, address, progress, log)
            shipped = load_weights(config, out, log)
            specs = {m.key: match_spec(config, m, out, shipped)
                     for m in config.matches(shipped.added)}
            match_log = MatchLog(out / "matches.jsonl")
            finished = match_log.load(warn)
            reused = {k for k, spec in specs.items()
                      if k in finished and finished[k].get("fingerprint") == spec["fingerprint"]}
            stale = {k for k in specs if k in finished and k not in reused}
            match_log.set_aside(stale)  # before anything is appended: one record per match
            pending = [spec for k, spec in specs.items() if k not in reused]
            if reused:
                log(f"resuming: {len(reused)} of {len(specs)} matches already finished")
            log(f"{len(reused)} reused, {len(stale)} replayed (settings changed), "
                f"{len(pending) - len(stale)} new" + (
                    f"; the replaced records are in {match_log.path.stem}.stale.jsonl"
                    if stale else ""))
            audit_specs = {d.name: audit_spec(config, d, out, shipped) for d in config.defenders}
            audit_jobs = [spec for name, spec in audit_specs.items() if run_audit and not
                          audit_is_current(out / f"audit_{name}.json", spec["fingerprint"])]
            try:
                errors = play_all(config, out, pending, audit_jobs, shipped, match_log,
                                  workers, progress, log, max_node_failures)
            finally:
                match_log.close()
            nodes = cluster_summary()["nodes"]
            # only this config's matches with the current fingerprint are shown (others stay
            # in the log untouched)
            records = {k: r for k, r in MatchLog(out / "matches.jsonl").load(warn).items()
                       if k in specs and r.get("fingerprint") == specs[k]["fingerprint"]}
            audits = read_audits(config, out, audit_specs, warn)
            leaderboard = build_leaderboard(config, records, audits, shipped.added)
            leaderboard["nodes"] = node_table(records, audits, nodes)
            files = write_outputs(config, out, leaderboard, records, audits, warn,
                                  added=shipped.added)
    finally:
        if started:
            ray.shutdown()
    if errors:
        raise TournamentError(errors)
    return TournamentResult(out=out, leaderboard=leaderboard, played=len(pending),
                            skipped=len(reused), warnings=warnings, files=files,
                            seconds=time.perf_counter() - t0, reused=len(reused),
                            replayed=len(stale), new=len(pending) - len(stale))


def node_table(records: dict[str, dict[str, Any]], audits: dict[str, dict[str, Any]],
               nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per Ray node that ran a match or audit of this tournament: its id, address, CPUs and
    how many matches and audits it ran (records from earlier runs included)."""
    known = {n["node_id"]: n for n in nodes}
    table: dict[str, dict[str, Any]] = {}
    for kind, items in (("matches", records.values()), ("audits", audits.values())):
        for rec in items:
            nid = rec.get("node_id") or "unknown"
            row = table.setdefault(nid, {"node_id": nid, "ip": rec.get("node_ip"),
                                         "host": rec.get("host"), "matches": 0, "audits": 0,
                                         "cpus": known.get(nid, {}).get("cpus")})
            row[kind] += 1
    return sorted(table.values(), key=lambda r: (-r["matches"], r["node_id"]))


def play_all(cfg: TournamentConfig, out: Path, specs: list[dict[str, Any]],
             audit_jobs: list[dict[str, Any]], shipped: Shipped, match_log: MatchLog,
             workers: int | None, progress: bool, log: Callable[[str], None],
             max_node_failures: int) -> list[str]:
    """Submit the matches (:func:`match_spec`) and audits (:func:`audit_spec`) as Ray tasks
    (:func:`agents.ray_session.run_jobs`); append each finished match to the log as it arrives,
    stamped with its spec's ``fingerprint`` and ``defender_hash``. Returns the failures, one
    line each. :func:`after_match_written` is called after each appended match."""
    # longest first (audits, then by estimated cost): the short matches fill the gaps at the
    # end, which keeps the last worker from finishing long after the others
    jobs = [Job(audit_defender, a, (shipped.policies[a["defender"]],),
                title=f"audit of {a['defender']}", tag="audit") for a in audit_jobs]
    for spec in sorted(specs, key=cost_estimate, reverse=True):
        objs = (shipped.policies[spec["defender"]],)
        if spec["kind"] == "learned":
            objs += (shipped.adversaries[spec["adversary_key"]],)
        jobs.append(Job(play_match, spec, objs, title=match_title(spec), tag="match"))
    bar = None
    if progress:
        bar = tqdm(total=len(jobs), desc="tournament", unit="match")
    written = 0

    def on_result(job: Job, result: dict[str, Any]) -> None:
        nonlocal written
        node = result.get("node") or {}
        record = {**result["value"], "node_id": node.get("node_id"), "node_ip": node.get("ip"),
                  "host": node.get("host"), "pid": node.get("pid"), "wall_s": result["wall_s"],
                  "fingerprint": job.spec["fingerprint"],
                  "defender_hash": job.spec["defender_hash"]}
        if job.tag == "match":
            match_log.append(record)
            written += 1
            after_match_written(written)
        else:
            atomic_write_text(out / f"audit_{job.spec['defender']}.json",
                              json.dumps(to_jsonable(record), indent=2))

    def on_done(job: Job, result: dict[str, Any]) -> None:
        if bar is not None:
            bar.set_postfix_str(job.title[:40])
            bar.update(1)

    try:
        return run_jobs(jobs, num_cpus=cfg.num_cpus_per_match,
                        limit=workers or cfg.max_concurrency, on_result=on_result,
                        on_done=on_done, log=log, max_node_failures=max_node_failures)
    finally:
        if bar is not None:
            bar.close()


def cost_estimate(spec: dict[str, Any]) -> float:
    """Relative cost of a match: forward/backward passes per attacked step (a scheduling
    heuristic only). Square: its query budget; PGD/APGD: steps x restarts (x EOT samples)."""
    if spec["kind"] == "clean":
        return 0.5
    if spec["kind"] == "learned":
        return 2.0
    settings = spec.get("settings") or {}
    name = str(spec.get("attack") or spec.get("external") or "").lower()
    defaults = {"square": ("n_queries", 5000), "apgd": ("steps", 100), "pgd": ("steps", 10)}
    cost = 1.0
    for key, (setting, default) in defaults.items():
        if key in name:
            cost = float(settings.get(setting, default))
    cost *= float(settings.get("restarts", 1)) * float(settings.get("samples", 1))
    return cost


def match_title(spec: dict[str, Any]) -> str:
    """A match as the progress bar shows it: ``fgmf vs pgd @8/255 s0``."""
    if spec["attacker"] == CLEAN:
        return f"{spec['defender']} clean s{spec['seed']}"
    return f"{spec['defender']} vs {spec['attacker']} @{eps_label(spec['eps'])} s{spec['seed']}"


def read_audits(cfg: TournamentConfig, out: Path, audit_specs: dict[str, dict[str, Any]],
                warn: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The finished audits of the config's defenders whose fingerprint is the current one
    (``audit_specs``: :func:`audit_spec` by defender); another audit is reported, not shown."""
    audits = {}
    for d in cfg.defenders:
        path = out / f"audit_{d.name}.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            warn(f"cannot read {path.name}: {first_line(exc)}")
            continue
        if not isinstance(data, dict) or data.get("status") != "ok":
            continue
        if data.get("fingerprint") != audit_specs[d.name]["fingerprint"]:
            warn(f"{path.name} audited other weights or settings than defender {d.name} has "
                 f"now; not shown (run the audit to replace it)")
            continue
        audits[d.name] = data
    return audits
