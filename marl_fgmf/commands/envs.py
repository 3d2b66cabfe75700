"""``marl-fgmf envs``: the environments, with their settings, observation shapes and actions.

Examples::

    marl-fgmf envs                                   # every built-in env
    marl-fgmf envs --env pursuit                     # one env
    marl-fgmf envs --env mypackage.envs:make_env     # your own PettingZoo env (an import path)
    marl-fgmf envs --env pistonball --env-kwargs n_pistons=10 --check

For each env: its first docstring line, its settings with their defaults (set them with
``--env-kwargs`` in every command that takes ``--env``), the observation shape and dtype and
the agents of the env built with those settings, and its action names. ``--check`` also runs
:func:`envs.conformance.frames_change_test` (observations change under random actions) and,
for the built-in envs, :func:`envs.conformance.objects_visible_test`. Nothing is written.
"""
from __future__ import annotations

import argparse
import inspect

import envs
from envs.conformance import VISIBLE_OBJECTS, frames_change_test, objects_visible_test
from marl_fgmf.commands import CommandFailed, parse_settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", action="append", default=None, metavar="NAME",
                   help="an env name or an import path 'package.module:factory' (repeatable; "
                        "default: every built-in env)")
    p.add_argument("--env-kwargs", type=parse_settings, default={}, metavar="K=V,...",
                   help="settings for the env(s) shown (default: their defaults)")
    p.add_argument("--check", action="store_true",
                   help="also run the conformance checks (frames change; the objects that "
                        "matter are visible) with 30 random steps (default: off)")


def _first_line(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].replace("``", "") if doc.strip() else ""


def describe(name: str, settings: dict, check: bool = False) -> list[str]:
    """The lines ``marl-fgmf envs`` prints for env ``name`` built with ``settings``."""
    constructor = envs.env_constructor(name)
    module = inspect.getmodule(constructor)
    summary = _first_line(module) if name in envs.list_envs() else _first_line(constructor)
    defaults = envs.env_settings(name)
    env = envs.make_env(name, **settings)
    try:
        agents = list(env.possible_agents)
        space = env.observation_space(agents[0])
        shape = tuple(int(s) for s in space.shape)
        dtype = str(getattr(space, "dtype", "?"))
    finally:
        env.close()
    actions = envs.action_names(name, **settings)
    shown = ", ".join(f"{k}={'(required)' if v is inspect.Parameter.empty else repr(v)}"
                      for k, v in defaults.items()) or "(none)"
    lines = [f"{name}: {summary}" if summary else name,
             f"  settings:    {shown}",
             f"  observation: {shape} {dtype} per agent; {len(agents)} agents "
             f"({', '.join(map(str, agents[:3]))}{', ...' if len(agents) > 3 else ''})",
             f"  actions:     " + ", ".join(f"{i} {a}" for i, a in enumerate(actions))]
    if settings:
        lines.insert(2, "  with:        " + ", ".join(f"{k}={v!r}" for k, v in settings.items()))
    if check:
        frames_change_test(envs.make_env(name, **settings), steps=30, seed=0)
        result = "frames change"
        if name in VISIBLE_OBJECTS:
            objects_visible_test(name, steps=30, seed=0, **settings)
            result += f"; {VISIBLE_OBJECTS[name]} visible"
        lines.append(f"  check:       passed ({result})")
    return lines


def run(args: argparse.Namespace) -> int:
    names = args.env or envs.list_envs()
    for name in names:  # every name and setting checked before anything is printed
        envs.check_env_name(name)
        envs.check_settings(name, envs.env_constructor(name), args.env_kwargs)
    blocks = []
    for name in names:
        try:
            blocks.append("\n".join(describe(name, args.env_kwargs, args.check)))
        except AssertionError as exc:
            raise CommandFailed(f"env {name!r} failed the conformance check: "
                             f"{str(exc).splitlines()[0]}") from exc
    print("\n\n".join(blocks))
    return 0


__all__ = ["add_arguments", "describe", "run"]
