"""Subcommands of the ``marl-fgmf`` CLI (one module each) and their shared argument helpers."""
from __future__ import annotations

import argparse
from fractions import Fraction


class UsageError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits 2."""


def parse_eps(text: str) -> float:
    """Parse a perturbation budget such as ``8/255``, ``0.03`` or ``4/255``; must be in (0, 1]."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"eps must be a number or fraction such as 8/255, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"eps must be in (0, 1], got {text} = {value:g}")
    return value


def parse_eps_list(text: str) -> list[float]:
    """Comma-separated budgets: ``2/255,4/255,8/255``."""
    return [parse_eps(t) for t in text.split(",") if t.strip()]


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what} (>= {minimum}), got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0 (argparse type)."""
    return _int_at_least(text, 0, "an integer >= 0")
