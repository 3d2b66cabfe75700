"""Choosing one module of a checkpoint or an export by id (shared by :mod:`agents.checkpoint`
and :mod:`agents.portable`, which must not import each other both ways)."""
from __future__ import annotations

__all__ = ["choose_module_id"]


def choose_module_id(ids: list[str], module_id: str | None, *, holder: str = "checkpoint",
                     what: str = "policy", arg: str = "policy_id") -> str:
    """``module_id`` when ``ids`` holds it, the only id when ``module_id`` is None and there is
    one; otherwise a one-line ``ValueError`` naming the ``holder`` ("checkpoint", "export")
    and listing the valid ids (``what`` names the kind of module, ``arg`` the argument)."""
    if module_id is None:
        if len(ids) != 1:
            raise ValueError(f"{holder} holds {len(ids)} {what} modules; choose {arg} from: "
                             f"{', '.join(ids)}")
        return ids[0]
    if module_id not in ids:
        raise ValueError(f"unknown {what} id {module_id!r}; allowed: {', '.join(ids)}")
    return module_id
