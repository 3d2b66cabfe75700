"""External attacks named by import path: what tournament configs write as ``external:``.

``"package.module:attr"`` names a torchattacks ``Attack`` class or a factory ``(eps=...,
**settings) -> torchattacks Attack | function obs -> adversarial obs``; :func:`build_external`
builds it at a budget and wraps it in :class:`~attacks.external.ExternalAttack` with that
budget declared, so every output is checked against it.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
from typing import Any

from torch import nn

from attacks.base import Attack
from attacks.external import ExternalAttack
from attacks.torchattacks_bridge import is_torchattacks, is_torchattacks_class, unbound_model
from marl_fgmf.protocol import parse_budget

__all__ = ["build_external", "external_code_id", "load_external"]

_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_EXPECTED = ("a torchattacks Attack class, or a factory (eps=..., **settings) returning a "
             "torchattacks Attack or a function obs -> adversarial obs")


def load_external(path: str) -> Any:
    """The object at the import path ``"package.module:attr"`` (``attr`` may be dotted). A
    module in the current directory is found too, as ``python -m`` would.

    Raises:
        ValueError: a malformed path, a module that does not import, a missing attribute.

    Example:
        >>> load_external("torchattacks:PGD")
    """
    if not isinstance(path, str) or not _IMPORT_PATH.match(path):
        raise ValueError(f"external attack {path!r} is not an import path 'package.module:attr' "
                         f"(e.g. 'torchattacks:PGD')")
    module_name, attr = path.split(":")
    try:
        obj: Any = _import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises while importing
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"external attack {path!r}: module {module_name!r} does not import "
                         f"({type(exc).__name__}: {first})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"external attack {path!r}: {module_name!r} has no attribute "
                             f"{attr!r}")
        obj = getattr(obj, part)
    return obj


def external_code_id(path: str) -> str:
    """An identity of the code an import path names: the sha256 of its module's source file
    and its package's version (tournaments fingerprint it: editing that module replays its
    matches; edits in the modules it imports are not seen).

    Example:
        >>> external_code_id("torchattacks:PGD")   # 'torchattacks 3.5.1 sha256:...'
    """
    load_external(path)  # the same one-line errors
    module = sys.modules[path.split(":")[0]]
    top = sys.modules.get(module.__name__.split(".")[0])
    version = getattr(top, "__version__", None)
    file = getattr(module, "__file__", None)
    digest = "none"
    if file and os.path.isfile(file):
        with open(file, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    return f"{module.__name__} {version if isinstance(version, str) else '-'} sha256:{digest}"


def _import_module(module_name: str) -> Any:
    # the same fallback as envs' import paths (kept separate: attacks never import envs)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != module_name.split(".")[0] or here in sys.path or "" in sys.path:
            raise
        sys.path.append(here)
        return importlib.import_module(module_name)


def build_external(path: str, eps: float | str, settings: dict[str, Any] | None = None, *,
                   norm: str | None = None, seed: int | None = None,
                   policy: nn.Module | None = None) -> ExternalAttack:
    """Build the external attack an import path names, at budget ``eps``.

    ``path`` names a torchattacks ``Attack`` class (built as ``cls(unbound_model(), eps=eps,
    **settings)``) or a factory called as ``factory(eps=eps, **settings)`` that returns a
    torchattacks ``Attack`` or a function ``obs -> adversarial obs``. The result is wrapped in
    :class:`ExternalAttack` with ``eps`` (and ``norm``) declared, so its output is checked
    against that budget.

    Raises:
        ValueError: one line: a path that does not resolve, an object of another kind, a
            build that fails (its exception's first line), or an invalid budget.

    Example:
        >>> attack = build_external("torchattacks:PGD", "8/255", {"steps": 10}, seed=0)
    """
    settings = dict(settings or {})
    eps = parse_budget(eps)
    target = load_external(path)
    if isinstance(target, type) and issubclass(target, Attack):
        raise ValueError(f"external attack {path!r} is a toolkit attack: name it with attack: "
                         f"instead")
    is_class = isinstance(target, type) and is_torchattacks_class(target)
    if not is_class and (not callable(target) or is_torchattacks(target)):
        raise ValueError(f"external attack {path!r} is a {type(target).__name__}; expected "
                         f"{_EXPECTED}")
    call = f"{path}(model, eps=..., **settings)" if is_class else f"{path}(eps=..., **settings)"
    try:
        built = (target(unbound_model(), eps=eps, **settings) if is_class
                 else target(eps=eps, **settings))
    except Exception as exc:  # whatever the user's code raises: one line, with its cause
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"external attack {path!r}: {call} with settings {sorted(settings)} "
                         f"failed: {type(exc).__name__}: {first}") from exc
    if isinstance(built, Attack) or not (is_torchattacks(built) or callable(built)):
        raise ValueError(f"external attack {path!r} returned a {type(built).__name__}; "
                         f"expected {_EXPECTED}")
    return ExternalAttack(built, policy, eps=eps, norm=norm, seed=seed)
