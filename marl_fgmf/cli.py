"""The ``marl-fgmf`` command line: ``train | attack | train-adversary | tournament | benchmark |
explain | audit | demo | envs | export``.

Each subcommand lives in ``marl_fgmf/commands/<name>.py`` with two functions,
``add_arguments(parser)`` and ``run(args) -> int``, imported only when that subcommand runs
(so ``marl-fgmf --help`` does not import RLlib).

Errors: bad input raises :class:`marl_fgmf.commands.UsageError` (or ``ValueError`` /
``FileNotFoundError``); the CLI prints one line ``marl-fgmf <cmd>: error: <message>`` and exits
with code 2, with no traceback (``--debug`` anywhere on the line, or ``MARL_FGMF_DEBUG=1``,
shows it). A runtime failure (a Ray task or env runner that failed on a
node) raises :class:`marl_fgmf.commands.CommandFailed`: one line naming the root cause, exit
1. Ctrl-C exits with 130 after the command's own clean-up.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
import warnings

from marl_fgmf.commands import CommandFailed, UsageError

COMMANDS = {
    "train": "train a multi-agent policy with RLlib PPO (optionally FGMF-defended)",
    "attack": "evaluate a trained policy under an observation attack",
    "train-adversary": "train learned adversary agents against a frozen victim",
    "tournament": "every defender against every attacker, with the gradient-masking audit",
    "benchmark": "multi-seed, multi-env robustness benchmark: train, attack, audit, explain, "
                 "aggregate with CIs",
    "explain": "PGCA explanations, per-agent figures and an episode animation",
    "audit": "gradient-masking audit of one trained policy",
    "demo": "train, attack, audit and explain on beacon, end to end",
    "envs": "the environments: settings (defaults), observation shapes, action names",
    "export": "write a policy as safetensors + JSON, loadable without unpickling anything",
}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def _module(name: str):
    return importlib.import_module(f"marl_fgmf.commands.{name.replace('-', '_')}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="marl-fgmf", description="Frontier Gradient-Masking Framework for "
                     "multi-agent RL: train, attack, audit and explain.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the chosen subcommand's module is imported
            _module(name).add_arguments(p)
            show_defaults(p)
    return parser


def _plain(value: object) -> str:
    """A default as a user would type it: ``1,10,50`` for a list, ``4`` for 4.0."""
    if isinstance(value, (list, tuple)):
        return ",".join(_plain(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every ``--help`` shows the defaults: an option's help that ends with its default in
    parentheses (``(64)``) says ``(default: 64)``; one that does not mention it gets
    ``(default: X)`` appended (options without a help text get one)."""
    for action in parser._actions:  # argparse keeps no public list of its actions
        default = action.default
        if (not action.option_strings or default is None or default is False
                or default is argparse.SUPPRESS or default == {} or "default" in (action.help or "")):
            continue
        shown = _plain(default).replace("%", "%%")
        text = (action.help or "").rstrip()
        if text.endswith(f"({shown})"):
            action.help = f"{text[:-len(shown) - 2]}(default: {shown})"
        else:
            action.help = f"{text} (default: {shown})" if text else f"default: {shown}"


# RLlib notices that every run would print and that say nothing about the user's run.
_NOISY_LOGGERS = ("ray.rllib.algorithms.algorithm_config", "ray._common.deprecation")
# RLlib's report of a failed env runner (a multi-line traceback); the CLI names the root cause
# on one line instead (--debug shows both)
_FAILURE_LOGGERS = ("ray.rllib.utils.actor_manager",)


def _quiet_library_notices(debug: bool = False) -> None:
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if not debug:
        for name in _FAILURE_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings the toolkit raises for the user (e.g. an untrusted checkpoint) on one line."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _one_line_warning
    # --debug anywhere on the line (or MARL_FGMF_DEBUG=1): tracebacks of failures are shown
    debug = "--debug" in argv or bool(os.environ.get("MARL_FGMF_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    _quiet_library_notices(debug)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        print(f"marl-fgmf: error: unknown command {command!r}; allowed: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if os.environ.get("MARL_FGMF_CPUS"):  # the thread budget, checked before any work
            from agents.threads import cpu_budget  # lazy: torch; only when the variable is set
            cpu_budget()
        return int(_module(args.command).run(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"marl-fgmf {args.command}: error: {msg}", file=sys.stderr)
        if debug:
            traceback.print_exception(exc)
        return 2
    except OSError as exc:  # a full disk, a read-only folder, a permission: a runtime failure
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = exc.strerror or text
        hint = {28: "; free some space or write elsewhere", 30: "; write elsewhere",
                13: "; check the permissions or write elsewhere"}.get(exc.errno or 0, "")
        print(f"marl-fgmf {args.command}: failed: {reason}{where}{hint}", file=sys.stderr)
        if debug:
            traceback.print_exception(exc)
        return 1
    except MemoryError:
        print(f"marl-fgmf {args.command}: failed: out of memory; use smaller settings (env size, "
              f"batch sizes, --n-obs)", file=sys.stderr)
        return 1
    except CommandFailed as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = "" if debug or exc.__cause__ is None else " (--debug shows the traceback)"
        print(f"marl-fgmf {args.command}: failed: {msg}{hint}", file=sys.stderr)
        if debug and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__)
        return 1
    except KeyboardInterrupt:
        print(f"marl-fgmf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
