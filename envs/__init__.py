"""Environment registry: PettingZoo ``ParallelEnv`` s with uint8 (H, W, C) pixel observations.

``make_env(name, **kwargs)`` builds one; ``list_envs()`` names them. ``beacon`` is this
project's measurement environment (ground-truth relevance in ``info[agent]["relevance"]``);
the others are real PettingZoo environments preprocessed with SuperSuit: ``pistonball``,
``pursuit``, ``cooperative_pong`` (each module's docstring documents agents, spaces, rewards,
preprocessing and speed). Unknown settings raise ``ValueError`` naming the env and the
setting. :func:`envs.rllib.register_rllib_env` registers any of them with RLlib;
:mod:`envs.conformance` checks that an env's observations change and show what matters.

**Your own environment**: wherever an env name is accepted, an import path
``"package.module:factory"`` names a callable that returns a PettingZoo ``ParallelEnv`` (its
keyword parameters are the env's settings, checked like the built-in envs' settings). The
toolkit needs image observations, ``Box`` spaces of shape (H, W, C) with finite bounds (uint8
0-255 as the built-in envs emit them, or float in [0, 1]), and ``Discrete`` actions; anything
else is refused with one line saying what was found. Action names (:func:`action_names`) come
from an ``ACTION_NAMES`` tuple on the factory or in its module, if there is one. The module must
be importable wherever the env is built, Ray's env runners included (installed, on
``PYTHONPATH``, or in the current directory; env runners on the same machine also look in the
folder the driver imported it from).
"""
from __future__ import annotations

import importlib
import inspect
import math
import numbers
import os
import re
import sys
from typing import Any, Callable

from gymnasium import spaces
from pettingzoo import AECEnv, ParallelEnv

_REGISTRY: dict[str, Callable[..., ParallelEnv]] = {}
_LAZY: dict[str, tuple[str, str]] = {}  # name -> (module, constructor) of the built-in envs
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_EXPECTED = "an import path 'package.module:factory' to a function returning a pettingzoo ParallelEnv"


def register_env(name: str, factory: Callable[..., ParallelEnv]) -> None:
    """Register ``factory(**kwargs) -> ParallelEnv`` under ``name`` (replacing any env of that
    name; its keyword parameters are the env's settings)."""
    _REGISTRY[name] = factory
    _LAZY.pop(name, None)


def list_envs() -> list[str]:
    """Names accepted by :func:`make_env` (import paths ``module:factory`` are accepted too)."""
    return sorted(_REGISTRY)


def is_import_path(name: str) -> bool:
    """Whether ``name`` is written as an env factory import path (``package.module:factory``)."""
    return isinstance(name, str) and ":" in name


def check_env_name(name: str) -> str:
    """Return ``name`` if it names an env: a registered name, or an import path
    ``package.module:factory`` whose module imports and whose factory is callable (nothing is
    built). Callers that validate their settings before building anything use this.

    Raises:
        ValueError: one line naming what was found and what is expected.
    """
    env_factory(name)
    return name


def env_factory(name: str) -> Callable[..., ParallelEnv]:
    """The callable behind env ``name`` (a registered name or an import path), unchecked
    settings; :func:`make_env` is the checked way to call it.

    Raises:
        ValueError: an unknown name, or an import path that does not resolve to a callable.
    """
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    if not is_import_path(name):
        raise ValueError(f"unknown env {name!r}; allowed: {', '.join(list_envs())}, or "
                         f"{_EXPECTED}")
    if not _IMPORT_PATH.match(name):
        raise ValueError(f"env {name!r} is not a valid import path; expected {_EXPECTED}, "
                         f"e.g. 'mypackage.envs:make_env'")
    module_name, attr = name.split(":")
    try:
        obj: Any = _import_module(module_name)
    except Exception as exc:  # ImportError, or any error raised while importing it
        raise ValueError(f"env {name!r}: module {module_name!r} does not import "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                         f"expected {_EXPECTED} (is the module installed or on PYTHONPATH?)"
                         ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"env {name!r}: module {module_name!r} has no attribute {attr!r}; "
                             f"expected {_EXPECTED}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"env {name!r}: {attr!r} is a {type(obj).__name__}, not callable; "
                         f"expected {_EXPECTED}")
    return obj


def _import_module(module_name: str) -> Any:
    """``importlib.import_module``, also looking in the current directory (as ``python -m``
    does) when the top-level package is not found on ``sys.path``: a console script such as
    ``marl-fgmf`` does not put the directory it runs in on ``sys.path``."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != module_name.split(".")[0] or here in sys.path or "" in sys.path:
            raise
        sys.path.append(here)
        return importlib.import_module(module_name)


def make_env(name: str, **kwargs) -> ParallelEnv:
    """Build the environment ``name`` (see :func:`list_envs`, or an import path
    ``package.module:factory``) with its keyword settings.

    Raises:
        ValueError: unknown name (the message lists the valid ones), a bad setting, or an
            import path that does not give a pixel ``ParallelEnv`` (see the module docstring).
    """
    factory = env_factory(name)
    check_settings(name, factory, kwargs)
    env = factory(**kwargs)
    if name not in _REGISTRY:
        check_user_env(name, env)
    return env


def check_user_env(name: str, env: Any) -> None:
    """Raise ``ValueError`` unless ``env`` (built by a user's factory ``name``) is a PettingZoo
    ``ParallelEnv`` with (H, W, C) image ``Box`` observations with finite bounds and
    ``Discrete`` actions for every possible agent."""
    if isinstance(env, AECEnv):
        raise ValueError(f"env {name!r}: the factory returned an AECEnv ({type(env).__name__}), "
                         f"expected a pettingzoo ParallelEnv (wrap it with "
                         f"pettingzoo.utils.conversions.aec_to_parallel)")
    if not isinstance(env, ParallelEnv):
        raise ValueError(f"env {name!r}: the factory returned {type(env).__name__}, expected a "
                         f"pettingzoo ParallelEnv")
    agents = list(getattr(env, "possible_agents", None) or [])
    if not agents:
        raise ValueError(f"env {name!r}: possible_agents is empty, expected the list of agents")
    for agent in agents:
        obs_space, act_space = env.observation_space(agent), env.action_space(agent)
        if not (isinstance(obs_space, spaces.Box) and len(obs_space.shape) == 3
                and bool((abs(obs_space.low) < math.inf).all())
                and bool((abs(obs_space.high) < math.inf).all())):
            raise ValueError(f"env {name!r}: agent {agent!r} has observation space {obs_space}, "
                             f"expected an image Box of shape (H, W, C) with finite bounds "
                             f"(uint8 0-255 or float in [0, 1])")
        if not isinstance(act_space, spaces.Discrete):
            raise ValueError(f"env {name!r}: agent {agent!r} has action space {act_space}, "
                             f"expected Discrete(n)")


def env_constructor(name: str) -> Callable[..., Any]:
    """The callable whose keyword parameters are env ``name``'s settings (a built-in env's
    constructor, imported on demand, or the registered or user factory)."""
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    return env_factory(name)


def env_settings(name: str) -> dict[str, Any]:
    """Env ``name``'s settings and their defaults, in signature order (a setting without a
    default maps to ``inspect.Parameter.empty``)."""
    params = inspect.signature(env_constructor(name)).parameters
    return {k: p.default for k, p in params.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            and k != "self"}


def action_names(name: str, **kwargs: Any) -> tuple[str, ...]:
    """The names of env ``name``'s discrete actions, index by index (figures and reports use
    them), for the env built with settings ``kwargs``.

    Built-in envs document them as ``ACTION_NAMES`` in their modules, checked against the
    PettingZoo source. A user's env: an ``ACTION_NAMES`` tuple on its factory or in the
    factory's module, else ``("action 0", "action 1", ...)``.

    Raises:
        ValueError: a bad name or setting (as :func:`make_env`), or declared names whose count
            is not the action space's.
    """
    names = _env_module_attr(name, "ACTION_NAMES")
    env = make_env(name, **kwargs)
    try:
        space = env.action_space(env.possible_agents[0])
        n = int(space.n)
    finally:
        env.close()
    if names is None:
        return tuple(f"action {i}" for i in range(n))
    names = tuple(str(x) for x in names)
    if len(names) != n:
        raise ValueError(f"env {name!r}: ACTION_NAMES has {len(names)} names {names}, but its "
                         f"action space is {space}")
    return names


def _env_module_attr(name: str, attr: str) -> Any:
    """``attr`` declared on env ``name``'s constructor or in its module (None if neither)."""
    constructor = env_constructor(name)
    value = getattr(constructor, attr, None)
    if value is None and getattr(constructor, "__module__", None):
        value = getattr(importlib.import_module(constructor.__module__), attr, None)
    return value


EPISODE_LIMIT_SETTINGS = ("max_cycles", "max_steps", "max_episode_steps")
"""Setting names read as an env's episode length limit (truncation), in this order."""


def episode_limit(name: str, **kwargs: Any) -> int | None:
    """The longest an episode of env ``name`` can last, in env steps, with settings ``kwargs``:
    the value of its first setting named in :data:`EPISODE_LIMIT_SETTINGS` (its default when
    ``kwargs`` does not set it), or None when the env declares no such setting."""
    settings = env_settings(name)
    for key in EPISODE_LIMIT_SETTINGS:
        if key in settings:
            value = kwargs.get(key, settings[key])
            if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0:
                return int(value)
    return None


TRAINING_KEYS = ("num_env_runners", "num_envs_per_env_runner", "cnn_channels", "policies")
"""What an env may declare about how it is trained (its ``TRAINING`` dict)."""


def training_defaults(name: str) -> dict[str, Any]:
    """How env ``name`` wants to be trained by default: the ``TRAINING`` dict declared in its
    module or on its factory (keys from :data:`TRAINING_KEYS`: ``num_env_runners`` and
    ``num_envs_per_env_runner``, integers >= 0, ``cnn_channels``, the ``cnn`` arch's three
    filter counts, and ``policies``, ``"shared"`` or ``"per-agent"``), else ``{}`` (the
    toolkit's defaults). The PettingZoo envs declare two env runners with one env each, so
    that their slow steps use both cores of a small machine, and a smaller CNN for their
    32 x 32 frames; cooperative_pong declares one policy per agent (both paddles see the same
    screen: a shared policy would move them alike).

    Raises:
        ValueError: a declaration with other keys or values (one line).
    """
    declared = _env_module_attr(name, "TRAINING") or {}
    if not (isinstance(declared, dict) and set(declared) <= set(TRAINING_KEYS)
            and all(_declared_ok(k, v) for k, v in declared.items())):
        raise ValueError(f"env {name!r}: TRAINING must be a dict of {', '.join(TRAINING_KEYS)} "
                         f"(runner counts integers >= 0; cnn_channels three integers >= 1; "
                         f"policies 'shared' or 'per-agent'), got {declared!r}")
    return dict(declared)


def _declared_ok(key: str, value: Any) -> bool:
    def count(v: Any, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low
    if key == "policies":
        return value in ("shared", "per-agent")
    if key == "cnn_channels":
        return isinstance(value, (list, tuple)) and len(value) == 3 and all(count(v, 1) for v in value)
    return count(value, 0)


def check_settings(name: str, constructor: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming env ``name`` and the setting when ``kwargs`` do not fit
    ``constructor``'s keyword parameters: unknown or positional-only names, or a value whose
    type is not its default's (an integer setting refuses ``7.9`` and ``"abc"`` instead of
    truncating them; a boolean one takes only true/false). A constructor taking ``**kwargs``
    accepts any name here and checks its settings itself."""
    try:
        params = inspect.signature(constructor).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return
    for key, value in kwargs.items():
        p = params.get(key)
        if p is not None and p.default is not inspect.Parameter.empty:
            _check_type(name, key, p.default, value)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [k for k, p in params.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
             and k != "self"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"env {name!r} has no setting {', '.join(map(repr, unknown))}; "
                         f"its settings: {', '.join(valid) or '(none)'}")
    missing = [k for k, p in params.items() if k in valid and k not in kwargs
               and p.default is inspect.Parameter.empty]
    if missing:
        raise ValueError(f"env {name!r}: setting {', '.join(map(repr, missing))} is required "
                         f"(it has no default)")


def _check_type(env: str, key: str, default: Any, value: Any) -> None:
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = is_int, "an integer"
    elif isinstance(default, float):
        ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
              and math.isfinite(value))
        want = "a finite number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    else:
        return
    if not ok:
        raise ValueError(f"env {env!r}: setting {key} must be {want} (default {default!r}), "
                         f"got {value!r}")


def _lazy(name: str, module: str, attr: str) -> Callable[..., ParallelEnv]:
    """A factory importing ``module.attr`` on first use (keeps ``import envs`` light) and
    checking the settings against its signature."""

    def factory(**kwargs: Any) -> ParallelEnv:
        constructor = getattr(importlib.import_module(module), attr)
        check_settings(name, constructor, kwargs)
        return constructor(**kwargs)

    factory.__name__ = f"make_{name}"
    factory.__doc__ = f"Build env {name!r} with ``{module}.{attr}(**kwargs)``."
    return factory


def _register_builtin(name: str, module: str, attr: str) -> None:
    register_env(name, _lazy(name, module, attr))
    _LAZY[name] = (module, attr)


_register_builtin("beacon", "envs.beacon", "BeaconEnv")
_register_builtin("pistonball", "envs.pistonball", "make_pistonball")
_register_builtin("pursuit", "envs.pursuit", "make_pursuit")
_register_builtin("cooperative_pong", "envs.cooperative_pong", "make_cooperative_pong")
