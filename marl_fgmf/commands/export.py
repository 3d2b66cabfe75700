"""``marl-fgmf export``: a trained policy as safetensors weights plus a JSON spec.

Examples::

    marl-fgmf export --checkpoint runs/fgmf --out exports/fgmf
    marl-fgmf export --checkpoint runs/fgmf --out exports/fgmf --overwrite   # replace it

An RLlib checkpoint is a set of pickles: loading it runs whatever code its author put there.
The export is data only, a directory ``OUT/`` with ``policy.json`` (architecture and its
settings, observation space, layout, SGAM input filter, agent -> module mapping, env, action
names, toolkit version) and ``policy.safetensors`` (every module's weights); it loads with
:func:`agents.portable.load_portable` without unpickling anything (format:
:mod:`agents.portable`). Exporting reads the checkpoint's pickles once: export checkpoints you
trust (your own runs), then share the export.

Every module of the checkpoint is exported, and each is rebuilt from what would be written and
checked to give the same logits before anything is written. ``--out`` must be new or an empty
directory; an earlier export there is replaced only with ``--overwrite`` (atomically), and
nothing else is ever overwritten. Bad input exits 2 with one line, and nothing is written.
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Any

from marl_fgmf.commands import UsageError, add_checkpoint_arguments, check_output


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="export directory (new or empty): policy.json + policy.safetensors")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export at --out (default: refuse)")


def _action_names(env_name: str, env_kwargs: dict[str, Any], n_actions: int) -> list[str] | None:
    """The env's action names when ``envs.action_names`` exists and knows them, else None."""
    import envs  # lazy: PettingZoo and SuperSuit stay out of CLI start-up
    names_of = getattr(envs, "action_names", None)
    if not callable(names_of):
        return None
    try:
        names = names_of(env_name, **env_kwargs)
    except ValueError:  # metadata only: names that do not fit are left out, never guessed
        return None
    if names is None or len(names) != n_actions or not all(isinstance(a, str) for a in names):
        return None
    return list(names)


def export_checkpoint(checkpoint: str | Path, out: str | Path, env: str | None = None,
                      env_kwargs: dict[str, Any] | None = None, overwrite: bool = False
                      ) -> dict[str, Any]:
    """Export every module of ``checkpoint`` (a marl-fgmf run or checkpoint) to ``out``.

    Returns ``{"out", "modules", "agents", "env", "bytes"}``. Raises :class:`UsageError` (one
    line) for bad input, before anything is written.
    """
    # lazy: torch, RLlib (through load_rl_module) and the envs stay out of CLI start-up
    from agents.checkpoint import (agent_policy_map, check_policy_fits_env, load_rl_module,
                                   policy_ids, read_run_config, run_env)
    from agents.networks import PolicyNetwork  # lazy: see above
    from agents.portable import SPEC_FILE, WEIGHTS_FILE, is_portable  # lazy: see above
    from agents.portable_write import check_export_target, module_spec, write_portable  # lazy
    from envs import make_env  # lazy: see above

    src = Path(checkpoint)
    if not src.exists():
        raise UsageError(f"checkpoint not found: {checkpoint}")
    if is_portable(src):
        raise UsageError(f"{checkpoint} is already a portable export; copy it instead")
    target = check_output(out, "--out", "dir")
    if target == src.resolve() or src.resolve() in target.parents:
        raise UsageError(f"--out {out} is inside the checkpoint {checkpoint}; write elsewhere")
    try:
        check_export_target(target, overwrite)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    env_name, kwargs = run_env(src, env, env_kwargs)
    try:
        env_obj = make_env(env_name, **kwargs)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"cannot build env {env_name!r}: {first}") from None
    try:
        agents = list(env_obj.possible_agents)
        ids = policy_ids(src)
        mapping = agent_policy_map(src, agents)
        modules = {}
        for mid in ids:
            module = load_rl_module(src, mid)
            net = getattr(module, "net", None)
            config = dict(getattr(module, "model_config", None) or {})
            if not isinstance(net, PolicyNetwork) or config.get("arch", "cnn") != net.arch:
                raise UsageError(f"module {mid!r} of {checkpoint} is a {type(module).__name__}; "
                                 f"export takes marl-fgmf modules only (cnn, vit, hybrid, "
                                 f"optionally with SGAM: marl-fgmf train)")
            for agent, used in mapping.items():
                if used == mid:
                    check_policy_fits_env(net, env_obj, agent, mid)
            spec = module_spec(net, config.get("net") or {}, module.observation_space,
                               float(getattr(module, "obs_scale", 1.0)))
            modules[mid] = (net, spec)
    finally:
        env_obj.close()
    n_actions = next(iter(modules.values()))[1]["n_actions"]
    run = read_run_config(src)
    defense = ({"name": run.get("defense", "none"), "settings": run.get("defense_settings") or {}}
               if run else None)
    source = {"checkpoint": str(src.resolve()),
              "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds")}
    path = write_portable(target, modules, mapping, env={"name": env_name, "kwargs": kwargs},
                          action_names=_action_names(env_name, kwargs, n_actions),
                          defense=defense, source=source, overwrite=overwrite)
    size = sum((path / f).stat().st_size for f in (SPEC_FILE, WEIGHTS_FILE))
    return {"out": path, "modules": ids, "agents": mapping, "env": env_name, "bytes": size}


def run(args: argparse.Namespace) -> int:
    # lazy: torch (1 s) stays out of `marl-fgmf export --help`
    from agents.threads import apply_thread_budget, cpu_budget
    apply_thread_budget(min(2, cpu_budget()))  # small batches: 2 threads at most
    result = export_checkpoint(args.checkpoint, args.out, env=args.env,
                               env_kwargs=args.env_kwargs, overwrite=args.overwrite)
    print(f"exported {len(result['modules'])} module(s) ({', '.join(result['modules'])}) of "
          f"{args.checkpoint} ({result['env']}, {len(result['agents'])} agents) to "
          f"{result['out']}/ (policy.json + policy.safetensors, {result['bytes'] / 1024:.0f} kB);"
          f" agents.portable.load_portable reads it without unpickling anything")
    return 0
