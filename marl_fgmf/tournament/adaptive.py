"""Adaptive attacks through an input filter, added where the config lists none.

DESIGN.md section 3: every evaluation of a defender with an input filter (SGAM, a quantizer:
:func:`marl_fgmf.audit.has_input_filter`) includes adaptive attacks through that filter. For
each such defender the tournament adds, when the config lists no attacker of that attack:

* ``bpda``: BPDA(PGD), the filter replaced by the identity on the backward pass;
* ``eot``: EOT(BPDA(PGD)), the same averaged over stochastic forward passes.

The inner PGD takes the settings of the config's first ``pgd`` attacker (the same budget as
the plain attack; PGD's defaults when there is none). An added attacker is an
:class:`~marl_fgmf.tournament.config.AttackerSpec` with ``added=True``: its matches are
played, logged, ranked and reported like the others, marked ``added`` in the records, the
leaderboard and the report. A config that lists BPDA (or EOT) gets no second one.
"""
from __future__ import annotations

from typing import Any

from attacks import ALIASES
from marl_fgmf.audit import has_input_filter
from marl_fgmf.tournament.config import AttackerSpec, TournamentConfig

__all__ = ["ADAPTIVE", "adaptive_attackers", "added_attackers", "attack_key", "filters_input"]

ADAPTIVE = ("bpda", "eot")
"""The attacks added for a defender with an input filter, in this order."""


def attack_key(attack: str | None) -> str | None:
    """An attacker's registry key as :func:`attacks.make_attack` resolves it (aliases and
    spelling); None for a learned adversary."""
    if attack is None:
        return None
    key = str(attack).strip().lower().replace("-", "_")
    return ALIASES.get(key, key)


def filters_input(policy: Any) -> bool:
    """Whether a loaded defender (one module, or ``{agent: module}``) has an input filter in
    any of its modules."""
    modules = policy.values() if isinstance(policy, dict) else [policy]
    return any(has_input_filter(m) for m in modules)


def adaptive_attackers(attackers: list[AttackerSpec]) -> list[AttackerSpec]:
    """The adaptive attackers missing from ``attackers`` (see the module docstring), marked
    ``added``; named after the attack, or ``<attack>-added`` when that name is taken."""
    listed = {attack_key(a.attack) for a in attackers}
    names = {a.name for a in attackers}
    pgd = next((a for a in attackers if attack_key(a.attack) == "pgd"), None)
    inner = dict(pgd.settings) if pgd is not None else {}
    out = []
    for key in ADAPTIVE:
        if key in listed:
            continue
        settings = dict(inner) if key == "bpda" else {"attack": "bpda", **inner}
        name = key if key not in names else f"{key}-added"
        out.append(AttackerSpec(name=name, attack=key, settings=settings, added=True))
    return out


def added_attackers(cfg: TournamentConfig, filtered: dict[str, bool]
                    ) -> dict[str, list[AttackerSpec]]:
    """Per defender with an input filter (``filtered``: by defender name), the adaptive
    attackers the tournament adds to the config's (none where the config, or the defender's
    own attackers, list them all)."""
    out = {}
    for d in cfg.defenders:
        if filtered.get(d.name):
            extra = adaptive_attackers(list(cfg.attackers) + list(d.attackers))
            if extra:
                out[d.name] = extra
    return out
