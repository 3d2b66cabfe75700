"""Every ``--help`` shows its defaults (issue 9, part 5)."""
from __future__ import annotations

import argparse

import pytest

from marl_fgmf import cli


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_option_with_a_default_says_it(command):
    parser = cli.build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [a.option_strings[0] for a in sub.choices[command]._actions
               if a.option_strings and a.default not in (None, False, argparse.SUPPRESS)
               and a.default != {} and "default" not in (a.help or "")]
    assert not missing, f"{command}: options whose --help hides the default: {missing}"


def test_defaults_are_shown_once_as_a_user_types_them(capsys):
    with pytest.raises(SystemExit):
        cli.main(["audit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "PGD steps (default: 1,10,50)" in text and "(64) (default" not in text
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--iterations ITERATIONS default: 60" in text and "--seed SEED default: 0" in text
    assert "cooperative_pong 4000" in text  # the env-dependent default says how it is chosen
