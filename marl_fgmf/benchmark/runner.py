"""``run_benchmark``: train the suite's grid, attack it, audit and explain it, aggregate.

Phases, each resumable (a killed benchmark loses at most the jobs in flight):

1. **references** per env: a uniform random policy's team return (``random_episodes``
   episodes) and, for beacon, the scripted optimum; ``DIR/references.json``.
2. **training**: every (env, defence, seed) at equal env steps, then ``fgmf`` and ``adv`` for
   the median wall-clock time the undefended runs of the same env took (``<name>-wall``);
   Ray jobs of ``cpus_per_training`` CPUs, pinned to the driver's node (they write
   ``DIR/runs``). A finished run leaves ``DIR/runs/<name>.json`` (its settings' fingerprint,
   wall time, env steps); an interrupted one is resumed from its last checkpoint.
3. **PA-AD** adversaries, one per defender (:func:`agents.adversary.train_adversary`, mode
   ``pa-ad``, at the largest eps), ``DIR/adversaries/<name>``.
4. **tournament** per env (:func:`marl_fgmf.tournament.run_tournament`, its resumable match
   log and fingerprints): every run against FGSM, PGD, APGD-CE, APGD-DLR, Square, the
   ``autoattack`` preset, BPDA/EOT for input filters (added by the tournament), its own PA-AD
   adversary and, on each env's seed-0 runs, torchattacks' AutoAttack (if installed); the
   gradient-masking audit per policy. ``DIR/tournaments/<env>``.
5. **faithfulness** per equal-steps run (:mod:`marl_fgmf.benchmark.faithfulness`),
   ``DIR/faithfulness/<name>.json`` keyed by the policy's weights and the settings.
6. **analysis and report** (:mod:`marl_fgmf.benchmark.analysis`,
   :mod:`marl_fgmf.benchmark.report`): ``DIR/benchmark.json``, ``DIR/report.md``, figures.

``DIR/suite.json`` holds the suite; a ``DIR`` made by another suite is refused. When the
same suite's settings changed (a new attack budget, say), each record whose fingerprint
changed is replayed and the rest reused, as in a tournament; a finished training run whose
settings changed is refused (use another ``DIR``), never retrained over.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from agents.checkpoint import latest_checkpoint, load_agent_policies
from agents.jobs import Job, run_jobs, ship
from agents.ray_session import check_address, ensure_ray
from envs import make_env, training_defaults
from marl_fgmf.benchmark.analysis import analyse
from marl_fgmf.benchmark.references import eval_kwargs, references
from marl_fgmf.benchmark.report import write_report
from marl_fgmf.benchmark.suites import EnvPlan, Suite
from marl_fgmf.benchmark.tasks import faithfulness_job, train_adversary_job, train_run_job
from marl_fgmf.io import DirLock, atomic_write_text, to_jsonable
from marl_fgmf.tournament import ConfigError, TournamentConfig, TournamentError, run_tournament
from marl_fgmf.tournament.checks import check_attackers, check_env
from marl_fgmf.tournament.specs import fingerprint, weights_hash

__all__ = ["BenchmarkError", "BenchmarkResult", "check_out", "run_benchmark"]


class BenchmarkError(RuntimeError):
    """Some jobs failed (one line each in ``errors``); what finished is kept for a rerun."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass
class BenchmarkResult:
    out: Path
    summary: dict[str, Any]
    files: dict[str, Path]
    seconds: float
    counts: dict[str, dict[str, int]]


def check_out(suite: Suite, out: str | os.PathLike) -> Path:
    """``DIR`` as an absolute path; ``ValueError`` when it holds another suite's results or
    is a file."""
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    saved = out / "suite.json"
    if saved.is_file():
        try:
            data = json.loads(saved.read_text())
        except (OSError, json.JSONDecodeError):
            raise ValueError(f"{saved} is unreadable; use another --out") from None
        if data.get("name") != suite.name:
            raise ValueError(f"{out} holds the results of suite {data.get('name')!r}, not "
                             f"{suite.name!r}; use another --out (nothing there is reused or "
                             f"overwritten)")
    elif out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty and holds no benchmark; use a new folder")
    return out


def run_benchmark(suite: Suite, out: str | os.PathLike, *, address: str | None = None,
                  workers: int | None = None, progress: bool = True,
                  log: Callable[[str], None] | None = None,
                  runtime_env: dict[str, Any] | None = None) -> BenchmarkResult:
    """Run (or resume) ``suite`` into ``out`` (see the module docstring).

    Raises:
        ValueError: ``out`` holds another suite, or an unreachable Ray address.
        BenchmarkError: some jobs failed (rerun to retry them).
    """
    t0 = time.perf_counter()
    log = log or print
    out = check_out(suite, out)
    check_suite(suite, out)
    address = check_address(address)
    started = ensure_ray(address, runtime_env=runtime_env, log=log)
    counts: dict[str, dict[str, int]] = {}
    try:
        out.mkdir(parents=True, exist_ok=True)
        with DirLock(out, ".benchmark.lock", "another benchmark is running"):
            previous = (json.loads((out / "suite.json").read_text())
                        if (out / "suite.json").is_file() else None)
            if previous is not None and previous.get("digest") != suite.digest():
                log(f"suite {suite.name}: its settings changed since {out} was made; every "
                    f"record whose settings changed is replayed, the rest reused (a training "
                    f"run or adversary with other settings is moved aside and trained again)")
            atomic_write_text(out / "suite.json", json.dumps(
                {**suite.to_dict(), "digest": suite.digest()}, indent=2))
            refs = references(suite, out, log)

            def timed(name: str, phase: Callable[[], dict[str, int]]) -> None:
                t = time.perf_counter()
                counts[name] = {**phase(), "seconds": round(time.perf_counter() - t, 1)}
            timed("training", lambda: train_phase(suite, out, workers, progress, log,
                                                  wall=False))
            timed("wall-clock training", lambda: train_phase(suite, out, workers, progress,
                                                             log, wall=True))
            timed("adversaries", lambda: adversary_phase(suite, out, workers, progress, log))
            boards = {}
            for plan in suite.envs:
                t_env = time.perf_counter()
                try:
                    cfg = tournament_config(suite, plan, out)
                    res = run_tournament(cfg, out / "tournaments" / plan.env, workers=workers,
                                         progress=progress, log=log)
                except (ConfigError, TournamentError) as exc:  # one line each, kept for a rerun
                    raise BenchmarkError([f"{plan.env} tournament: {e}"
                                          for e in exc.errors]) from None
                boards[plan.env] = res.leaderboard
                counts[f"matches {plan.env}"] = {
                    "reused": res.reused, "new": res.new, "replayed": res.replayed,
                    "seconds": round(time.perf_counter() - t_env, 1)}
            timed("faithfulness", lambda: faithfulness_phase(suite, out, workers, progress,
                                                             log))
            summary = analyse(suite, out, refs, boards)
            # this invocation's phases (a resumed benchmark times only what it redid)
            summary["this_run"] = {"counts": counts,
                                   "seconds": round(time.perf_counter() - t0, 1)}
            files = write_report(suite, out, summary)
    finally:
        if started:
            import ray  # lazy: Ray is imported by ensure_ray already
            ray.shutdown()
    return BenchmarkResult(out=out, summary=summary, files=files,
                           seconds=time.perf_counter() - t0, counts=counts)


# --------------------------------------------------------------------------- training
def plan_of(suite: Suite, env: str) -> EnvPlan:
    return next(p for p in suite.envs if p.env == env)


def run_dir(out: Path, name: str) -> Path:
    return out / "runs" / name


def train_config(suite: Suite, run: dict[str, Any]) -> dict[str, Any]:
    plan = plan_of(suite, run["env"])
    iterations = plan.iterations * (4 if run["wallclock"] else 1)
    return {"env": plan.env, "env_kwargs": dict(plan.env_kwargs), "defense": run["kind"],
            "seed": run["seed"], "iterations": iterations, "keep_checkpoints": 1,
            **plan.train}


def read_done(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def wall_budget(suite: Suite, out: Path, env: str) -> float:
    """The median training-loop time of the env's undefended runs (the equal-wall-clock
    budget)."""
    times = [read_done(out / "runs" / f"{r['name']}.json") for r in suite.runs()
             if r["env"] == env and r["defence"] == "none"]
    walls = [t["wall_time_s"] for t in times if t]
    if not walls:
        raise BenchmarkError([f"{env}: no finished undefended run to take the wall-clock "
                              f"budget from"])
    return float(statistics.median(walls))


def train_phase(suite: Suite, out: Path, workers: int | None, progress: bool,
                log: Callable[[str], None], wall: bool) -> dict[str, int]:
    """Train every run of the phase that has no finished record with its fingerprint."""
    jobs, reused = [], 0
    for run in suite.runs():
        if run["wallclock"] != wall:
            continue
        config = train_config(suite, run)
        budget = wall_budget(suite, out, run["env"]) if wall else None
        fp = fingerprint({"train": config, "time_budget_s": budget})
        done_path = out / "runs" / f"{run['name']}.json"
        done = read_done(done_path)
        if done is not None and done.get("fingerprint") == fp:
            reused += 1
            continue
        rdir = run_dir(out, run["name"])
        if done is not None:  # trained with other settings: kept aside, trained again
            aside = set_aside(rdir, done_path, "stale")
            log(f"{run['name']}: trained with other settings than the suite has now; moved to "
                f"{aside.name} and trained again")
        resume = (rdir / "run.json").is_file() and latest_checkpoint(rdir) is not None
        if rdir.exists() and not resume:  # killed before its first checkpoint: kept aside
            set_aside(rdir, None, "incomplete")
        left = budget
        if resume and budget is not None:
            rows = (rdir / "metrics.jsonl").read_text().splitlines()
            spent = json.loads(rows[-1]).get("wall_time_s", 0.0) if rows else 0.0
            left = max(budget - float(spent), 1e-3)
        jobs.append(Job(train_run_job, {"config": config, "out": str(rdir), "resume": resume,
                                          "time_budget_s": left},
                        title=f"train {run['name']}", tag=(run, fp, budget)))
    if not jobs:
        return {"reused": reused, "new": 0}
    log(f"{'wall-clock ' if wall else ''}training: {len(jobs)} run(s) to train, {reused} done")
    run_all(jobs, suite.cpus_per_training, workers, progress,
            "training" + (" (wall-clock)" if wall else ""), log, on_train_result(out))
    return {"reused": reused, "new": len(jobs)}


def set_aside(folder: Path, record: Path | None, why: str) -> Path:
    """Move a run folder (and its record) to ``<name>.<why>-<time>``: never deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder.with_name(f"{folder.name}.{why}-{stamp}")
    if folder.exists():
        folder.rename(target)
    if record is not None and record.exists():
        record.rename(record.with_name(f"{folder.name}.{why}-{stamp}.json"))
    return target


def on_train_result(out: Path) -> Callable[[Job, dict[str, Any]], None]:
    def record(job: Job, result: dict[str, Any]) -> None:
        run, fp, budget = job.tag
        last = result["value"]["last"]
        atomic_write_text(out / "runs" / f"{run['name']}.json", json.dumps(to_jsonable({
            **run, "fingerprint": fp, "time_budget_s": budget,
            "iterations": last.get("iteration"), "env_steps": last.get("env_steps"),
            "wall_time_s": last.get("wall_time_s"), "job_wall_s": result["value"]["wall_s"],
            "cpu_s": result["value"].get("cpu_s"), "load": result["value"].get("load"),
            "cpus": result["value"].get("cpus"), "resumed": job.spec["resume"],
            "threads": result["value"]["threads"],
            "final_return": last.get("agent_return_mean"),
            "node": (result.get("node") or {}).get("node_id")}), indent=2))
    return record


def run_all(jobs: list[Job], cpus: float, workers: int | None, progress: bool, desc: str,
            log: Callable[[str], None], on_result: Callable[[Job, dict[str, Any]], None],
            pin: bool = True) -> None:
    """Run ``jobs`` (pinned to the driver's node when ``pin``: they write ``DIR``); raise
    :class:`BenchmarkError` with the failures after all have run."""
    import ray  # lazy: started by run_benchmark

    bar = tqdm(total=len(jobs), desc=desc, unit="job", disable=not progress)
    node = ray.get_runtime_context().get_node_id() if pin else None
    try:
        failures = run_jobs(jobs, num_cpus=cpus, limit=workers, on_result=on_result, log=log,
                            on_done=lambda job, res: bar.update(1), node_id=node)
    finally:
        bar.close()
    if failures:
        raise BenchmarkError(failures)


# --------------------------------------------------------------------------- adversaries
def adversary_phase(suite: Suite, out: Path, workers: int | None, progress: bool,
                    log: Callable[[str], None]) -> dict[str, int]:
    """One PA-AD adversary per defender at the largest eps (none when ``paad_iterations``
    is 0)."""
    if suite.paad_iterations <= 0:
        return {"reused": 0, "new": 0}
    jobs, reused = [], 0
    for run in suite.runs():
        adir = out / "adversaries" / run["name"]
        done_path = out / "adversaries" / f"{run['name']}.json"
        victim = read_done(out / "runs" / f"{run['name']}.json") or {}
        settings = {"seed": run["seed"], "train_batch_size": suite.paad_batch,
                    "minibatch_size": min(250, suite.paad_batch)}
        # the victim's training fingerprint: a retrained victim gets a new adversary
        fp = fingerprint({"victim": victim.get("fingerprint"), "eps": max(suite.eps),
                          "iterations": suite.paad_iterations, "settings": settings})
        done = read_done(done_path)
        if done is None and adopt(adir, suite, run, settings, out):
            done = {"fingerprint": fp}  # finished before records existed (see adopt)
            atomic_write_text(done_path, json.dumps({"fingerprint": fp, "adopted": True}))
        if done is not None and done.get("fingerprint") == fp:
            reused += 1
            continue
        if done is not None:
            aside = set_aside(adir, done_path, "stale")
            log(f"PA-AD vs {run['name']}: trained with other settings or against another "
                f"victim; moved to {aside.name} and trained again")
        ckpt = latest_checkpoint(adir)
        if adir.exists() and ckpt is None:  # killed before its first checkpoint: kept aside
            set_aside(adir, None, "incomplete")
        resume = ckpt is not None and (adir / "run.json").is_file()
        spec = {"victim": str(run_dir(out, run["name"])), "out": str(adir),
                "eps": max(suite.eps), "iterations": suite.paad_iterations, "resume": resume,
                "settings": settings}
        jobs.append(Job(train_adversary_job, spec, title=f"PA-AD vs {run['name']}",
                        tag=(done_path, fp)))
    if jobs:
        log(f"PA-AD adversaries: {len(jobs)} to train, {reused} done")

        def record(job: Job, result: dict[str, Any]) -> None:
            path, fp = job.tag
            last = result["value"]["last"]
            atomic_write_text(path, json.dumps(to_jsonable({
                "fingerprint": fp, "iterations": last.get("iteration"),
                "wall_s": result["value"]["wall_s"]}), indent=2))
        run_all(jobs, suite.cpus_per_training, workers, progress, "PA-AD", log, record)
    return {"reused": reused, "new": len(jobs)}


def adopt(adir: Path, suite: Suite, run: dict[str, Any], settings: dict[str, Any],
          out: Path) -> bool:
    """Whether a finished adversary without a record (made before the benchmark kept them)
    matches the suite: its ``run.json`` names this victim, PA-AD, the suite's eps, iterations
    and settings, and it was trained after the victim's record was written."""
    ckpt = latest_checkpoint(adir)
    victim_record = out / "runs" / f"{run['name']}.json"
    if ckpt is None or not victim_record.is_file():
        return False
    cfg = read_done(adir / "run.json") or {}
    same = (cfg.get("victim") == str(run_dir(out, run["name"])) and cfg.get("mode") == "pa-ad"
            and cfg.get("iterations") == suite.paad_iterations
            and abs(float(cfg.get("eps", -1)) - max(suite.eps)) < 1e-12
            and all(cfg.get(k) == v for k, v in settings.items()))
    return same and ckpt.stat().st_mtime >= victim_record.stat().st_mtime


# --------------------------------------------------------------------------- tournament
def has_torchattacks() -> bool:
    try:
        import torchattacks  # noqa: F401  # lazy: optional, the independent check only
    except Exception:
        return False
    return True


def tournament_config(suite: Suite, plan: EnvPlan, out: Path, check: bool = True
                      ) -> TournamentConfig:
    """The env's tournament: every run of the env as a defender (with its own PA-AD
    adversary, and torchattacks' AutoAttack on seed 0), the suite's attack ensemble."""
    attackers: list[Any] = [dict(x) for x in suite.attackers]
    env = make_env(plan.env, **plan.env_kwargs)
    n_actions = int(env.action_space(env.possible_agents[0]).n)
    env.close()
    external = suite.external is not None and has_torchattacks()
    filtered = ("sgam", "fgmf", "fgmf+adv")  # the defences with SGAM, an input filter
    defenders = []
    for run in suite.runs():
        if run["env"] != plan.env:
            continue
        own: list[dict[str, Any]] = []
        if suite.paad_iterations > 0:
            own.append({"name": "paad", "adversary": str(out / "adversaries" / run["name"])})
        if run["kind"] in filtered:
            own += [dict(x) for x in suite.adaptive]
        if external and run["seed"] == plan.seeds[0]:
            own.append({"name": "ta-autoattack",
                        "external": "marl_fgmf.benchmark.tasks:torchattacks_autoattack",
                        "settings": {"n_classes": n_actions, **suite.external},
                        "norm": "linf"})
        defenders.append({"name": run["name"], "checkpoint": str(run_dir(out, run["name"])),
                          "attackers": own})
    data = tournament_data(suite, plan, out, attackers, defenders)
    cfg = TournamentConfig.from_dict(data, base_dir=out)
    if check:
        cfg.check(out / "tournaments" / plan.env)
    return cfg


def tournament_data(suite: Suite, plan: EnvPlan, out: Path, attackers: list[Any],
                    defenders: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": f"benchmark-{suite.name}-{plan.env}", "env": plan.env,
            "env_kwargs": eval_kwargs(plan), "episodes": plan.episodes,
            "seeds": list(suite.eval_seeds), "eps": list(suite.eps), "defenders": defenders,
            "attackers": attackers, "audit": {**suite.audit, "eps": max(suite.eps)}}


def check_suite(suite: Suite, out: Path) -> None:
    """Check the suite's attackers, audit and env settings (what can be checked before
    anything is trained): ``ValueError`` with every problem."""
    errors = []
    for plan in suite.envs:
        errors += check_env(plan.env, eval_kwargs(plan))
        if errors:
            continue
        runners = plan.train.get("num_env_runners",
                                 training_defaults(plan.env).get("num_env_runners", 0))
        if runners:  # an env runner is an actor of one CPU the job does not hold: with every
            # CPU held by a training job, none starts and the trainings wait for ever
            errors.append(f"{plan.env}: a benchmark training is a Ray job of "
                          f"{suite.cpus_per_training:g} CPU that samples in its own process; "
                          f"set num_env_runners to 0 in the suite's train settings (the env "
                          f"declares {runners})")
        cfg = tournament_config(suite, plan, out, check=False)
        errors += cfg.parse_errors + check_attackers(cfg.attackers, cfg.eps)
        errors += check_attackers([a for d in cfg.defenders for a in d.attackers
                                   if a.adversary is None][:1], cfg.eps)
    if errors:
        raise ValueError("; ".join(errors))


# --------------------------------------------------------------------------- faithfulness
def faithfulness_phase(suite: Suite, out: Path, workers: int | None, progress: bool,
                       log: Callable[[str], None]) -> dict[str, int]:
    """Faithfulness scores of every equal-steps run, keyed by its weights and the settings."""
    jobs, reused = [], 0
    folder = out / "faithfulness"
    for run in suite.runs():
        if run["wallclock"]:
            continue
        plan = plan_of(suite, run["env"])
        env = make_env(plan.env, **plan.env_kwargs)
        agents = list(env.possible_agents)
        env.close()
        policy = load_agent_policies(str(run_dir(out, run["name"])), agents, device="cpu",
                                     single_if_shared=True)
        spec = {"run": run["name"], "env": plan.env, "env_kwargs": eval_kwargs(plan),
                "seed": 0, "eps": 4 / 255, "faithfulness": dict(suite.faithfulness)}
        spec["fingerprint"] = fingerprint({**spec, "weights": weights_hash(policy)})
        done = read_done(folder / f"{run['name']}.json")
        if done is not None and done.get("fingerprint") == spec["fingerprint"]:
            reused += 1
            continue
        jobs.append(Job(faithfulness_job, spec, (ship(policy),),
                        title=f"faithfulness {run['name']}", tag=spec["fingerprint"]))
    if jobs:
        folder.mkdir(parents=True, exist_ok=True)
        log(f"faithfulness: {len(jobs)} polic(ies) to explain, {reused} done")

        def record(job: Job, result: dict[str, Any]) -> None:
            value = {**result["value"], "fingerprint": job.tag,
                     "node": (result.get("node") or {}).get("node_id")}
            atomic_write_text(folder / f"{value['run']}.json",
                              json.dumps(to_jsonable(value), allow_nan=True))
        run_all(jobs, 1.0, workers, progress, "faithfulness", log, record, pin=False)
    return {"reused": reused, "new": len(jobs)}
