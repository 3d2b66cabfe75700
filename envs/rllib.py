"""Registering ``envs`` environments with RLlib (Ray Tune's env registry).

RLlib builds environments from a registered name inside its env runners, so an environment
must be registered (in every process that builds it, which Ray does by pickling the creator)
before ``config.environment(env=...)`` can name it::

    from envs.rllib import register_rllib_env
    env_name = register_rllib_env("pistonball", n_pistons=5, size=32)
    config = PPOConfig().environment(env=env_name)

Each registered env is a ``ray.rllib.env.wrappers.pettingzoo_env.ParallelPettingZooEnv``
around :func:`envs.make_env`. Ray is imported only inside the functions here, so importing
``envs`` never pulls Ray in.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
from typing import Any

from envs import is_import_path, make_env

PREFIX = "fgmf"


def rllib_env_name(name: str, **kwargs: Any) -> str:
    """The deterministic registry name for env ``name`` with settings ``kwargs``.

    ``fgmf-<name>`` without settings, else ``fgmf-<name>-<10 hex digits>`` where the digits
    are a SHA-1 of the sorted settings' reprs: the same settings always give the same name (in
    any process, in any order), different settings a different one, and the name is safe in
    file names (RLlib puts it in its log directories). An import path ``pkg.module:factory``
    gives ``fgmf-pkg_module_factory-<10 hex digits>`` (the digits hash the path and settings).
    """
    if is_import_path(name):  # "pkg.module:factory": its characters kept safe, the path hashed
        slug = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")
        canonical = repr((name, sorted(kwargs.items())))
        return f"{PREFIX}-{slug}-{hashlib.sha1(canonical.encode('utf-8')).hexdigest()[:10]}"
    if not kwargs:
        return f"{PREFIX}-{name}"
    canonical = repr(sorted(kwargs.items()))
    digest = hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:10]
    return f"{PREFIX}-{name}-{digest}"


def _module_root(name: str) -> str | None:
    """The directory from which the driver imported the top-level package of the import path
    ``name`` (``None`` if it has no file), so that env runners started on this machine without
    the driver's ``sys.path`` (a folder added at run time) import it from the same place."""
    top = name.split(":")[0].split(".")[0]
    module = importlib.import_module(top)
    location = getattr(module, "__file__", None)
    if not location:
        return None
    folder = os.path.dirname(os.path.abspath(location))
    return os.path.dirname(folder) if os.path.basename(location) == "__init__.py" else folder


def register_rllib_env(name: str, **kwargs: Any) -> str:
    """Register ``envs.make_env(name, **kwargs)`` with Ray Tune and return its registry name.

    The env is built once here (and closed) so that a bad name or setting fails now, with
    :func:`envs.make_env`'s ``ValueError``, instead of later inside a Ray worker. Keys of the
    ``env_config`` that RLlib passes to the creator override ``kwargs``. Registering the same
    name and settings twice is harmless. No ``ray.init`` is needed.

    Args:
        name: an env from :func:`envs.list_envs`, or an import path ``pkg.module:factory``
            (the module must be importable in the env runners too: installed or on
            ``PYTHONPATH``).
        **kwargs: its settings, as for :func:`envs.make_env`.

    Returns:
        The registry name (see :func:`rllib_env_name`), for ``config.environment(env=...)``.

    Raises:
        ValueError: unknown env name or bad setting.

    Example:
        >>> register_rllib_env("beacon")
        'fgmf-beacon'
    """
    make_env(name, **kwargs).close()  # fail early on a bad name or setting

    # lazy: Ray/RLlib (seconds to import); envs alone must not need it
    from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv
    from ray.tune.registry import register_env  # lazy: Ray, as above

    root = _module_root(name) if is_import_path(name) else None

    def creator(env_config: Any = None) -> ParallelPettingZooEnv:
        if root is not None and root not in sys.path:  # a worker on this machine finds it too
            sys.path.append(root)
        settings = {**kwargs, **dict(env_config or {})}
        return ParallelPettingZooEnv(make_env(name, **settings))

    registry_name = rllib_env_name(name, **kwargs)
    register_env(registry_name, creator)
    return registry_name
