"""The tournament's errors: every problem of a config, every failed job, one line each."""
from __future__ import annotations

from typing import Sequence

__all__ = ["ConfigError", "TournamentError", "first_line"]


class ConfigError(ValueError):
    """An invalid tournament configuration; ``errors`` holds one line per problem."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class TournamentError(RuntimeError):
    """Some matches or audits failed; ``errors`` holds one line per failure."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))



def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
