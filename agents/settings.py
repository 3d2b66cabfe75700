"""Checks of training settings: one :class:`SettingError` (a ``ValueError``) naming the bad
setting and what is allowed, raised before anything is written (``--resume`` reports it
against the run's ``run.json``)."""
from __future__ import annotations

import json
import math
import numbers
from typing import Any

from envs import make_env

__all__ = ["SettingError", "check_env_settings", "check_int_setting", "check_number_setting",
           "is_int"]


class SettingError(ValueError):
    """A bad setting: ``setting`` names it (``--resume`` reports it against ``run.json``)."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int_setting(name: str, value: Any, minimum: int) -> int:
    """An integer >= ``minimum`` (a bool, 7.9 or "abc" is refused, not converted)."""
    if not is_int(value) or value < minimum:
        raise SettingError(name, f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number_setting(name: str, value: Any, low: float | None = None,
                         high: float | None = None, low_open: bool = False,
                         high_open: bool = False) -> float:
    """A finite number in the interval ``low..high`` (open or closed ends)."""
    ok = _is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if high is None:
            where = f"{'>' if low_open else '>='} {low:g}" if low is not None else ""
        else:
            where = (f"in {'(' if low_open else '['}{low:g}, {high:g}"
                     f"{')' if high_open else ']'}")
        raise SettingError(name, f"{name} must be a finite number{' ' + where if where else ''}"
                           f", got {value!r}")
    return float(value)


_ENV_SETTINGS_OK: set[str] = set()


def check_env_settings(env: str, kwargs: Any) -> None:
    """Build ``env`` once with ``kwargs`` (then close it): an unknown setting, a value of the
    wrong type or range, or one too large for memory raises one :class:`SettingError`
    naming the env and the setting. Successful settings are remembered (no second build)."""
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise SettingError("env_kwargs", f"env_kwargs must be a JSON object of settings "
                           f"(name: value), got {kwargs!r}")
    try:
        key = json.dumps([env, kwargs], sort_keys=True)
    except (TypeError, ValueError):
        key = None
    if key is not None and key in _ENV_SETTINGS_OK:
        return
    try:
        make_env(env, **kwargs).close()
    except MemoryError:
        raise SettingError("env_kwargs", f"env {env!r}: settings {kwargs} need more memory "
                           f"than this machine has") from None
    except Exception as exc:  # the env's own check, or its failure to build, on one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not msg.startswith(f"env {env!r}"):
            msg = f"env {env!r}: {msg}"
        raise SettingError("env_kwargs", msg) from None
    if key is not None:
        _ENV_SETTINGS_OK.add(key)
