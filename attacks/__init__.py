"""Observation attacks on the policy protocol (DESIGN.md section 1) and their evaluation.

Every attack is built on a policy ``policy(obs) -> logits`` (obs float (B, H, W, C) in [0, 1])
and called as ``adv_obs = attack(obs, actions=None)``; the result stays inside the eps-ball
of ``obs`` and inside [0, 1]. ``B`` is any batch (all agents of a frame, several frames).

==============  ===============================================  ==============================
name            class                                            distance
==============  ===============================================  ==============================
random          :class:`RandomNoise`                              Linf, L2
fgsm            :class:`FGSM` (Goodfellow et al. 2015)            Linf, L2
pgd             :class:`PGD` (Madry et al. 2018)                  Linf, L2
apgd            :class:`APGD` (Croce & Hein 2020), CE / DLR       Linf, L2
apgdt           :class:`APGDT`, APGD-T, targeted DLR (>= 4 act.)  Linf, L2
fab             :class:`FAB`, FAB-T (Croce & Hein 2020), minimal  Linf, L2
square          :class:`Square` (Andriushchenko et al. 2020)      Linf, gradient-free
bpda            :class:`BPDA` wrapper (Athalye et al. 2018)       the wrapped attack's
eot             :class:`EOT` wrapper (Athalye et al. 2018)        the wrapped attack's
ensemble        :class:`Ensemble`, per-sample strongest           the members'
autoattack      :class:`AutoAttack` preset: APGD-CE, APGD-T,      Linf
                FAB-T, Square (Croce & Hein 2020, standard)
==============  ===============================================  ==============================

Third-party attacks: :class:`ExternalAttack` wraps a torchattacks ``Attack`` or a function
``obs -> adversarial obs`` (checked output, never clipped; :mod:`attacks.external`);
``evaluate`` wraps a torchattacks object itself, and ``build_external("pkg.mod:attr", eps)``
builds one from an import path (what tournament configs name with ``external:``).

Objectives, targets and the success criterion are defined once in :mod:`attacks.objectives`;
the base class (device, eval mode, seeding, projection) in :mod:`attacks.base`.
:class:`LearnedAdversary` replays a trained adversary agent (:mod:`attacks.learned`).
``make_attack(name, policy, **settings)`` builds any of them by name;
``evaluate(policy, env, attack, episodes, seed)`` rolls a PettingZoo env out under attack.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

from torch import nn

from attacks.apgd import APGD, apgd_checkpoints
from attacks.apgdt import APGDT
from attacks.autoattack import AutoAttack
from attacks.base import NORMS, Attack, AttackContext
from attacks.bpda import BPDA, StraightThrough
from attacks.ensemble import Ensemble
from attacks.eot import EOT
from attacks.evaluate import evaluate
from attacks.external import ExternalAttack
from attacks.external_paths import build_external, external_code_id, load_external
from attacks.fab import FAB, project_hyperplane_box
from attacks.fgsm import FGSM
from attacks.learned import LearnedAdversary
from attacks.objectives import OBJECTIVES
from attacks.pgd import PGD
from attacks.random_noise import RandomNoise
from attacks.square import Square
from attacks.torchattacks_bridge import NCHWPolicy, is_torchattacks, unbound_model

ATTACKS: dict[str, type[Attack]] = {
    "random": RandomNoise,
    "fgsm": FGSM,
    "pgd": PGD,
    "apgd": APGD,
    "apgdt": APGDT,
    "fab": FAB,
    "square": Square,
    "bpda": BPDA,
    "eot": EOT,
    "ensemble": Ensemble,
    "autoattack": AutoAttack,
}
ALIASES = {"noise": "random", "random_noise": "random", "randomnoise": "random",
           "auto_pgd": "apgd", "autopgd": "apgd", "apgd_t": "apgdt", "fab_t": "fab",
           "fabt": "fab", "auto_attack": "autoattack", "aa": "autoattack"}
WRAPPERS = ("bpda", "eot")
DEFAULT_ENSEMBLE = ("fgsm", "pgd", "apgd", "square")


def list_attacks() -> list[str]:
    """Names accepted by :func:`make_attack`."""
    return list(ATTACKS)


def _parameters(cls: type) -> list[str]:
    sig = inspect.signature(cls.__init__)
    return [n for n, p in sig.parameters.items()
            if n not in ("self", "policy", "attack", "attacks")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _typed_settings(cls: type, settings: dict[str, Any], key: str) -> dict[str, Any]:
    """``settings`` checked against the types of ``cls``'s defaults: a boolean setting takes
    only true/false/1/0/yes/no (``random_start=maybe`` is an error, never truthy), an integer
    setting only whole numbers (``steps=2.5`` is an error, never truncated), a float setting
    only finite numbers. Other settings pass unchanged (the attack checks them)."""
    params = inspect.signature(cls.__init__).parameters
    out = dict(settings)
    for name, value in settings.items():
        p = params.get(name)
        if p is None or p.default is inspect.Parameter.empty or p.default is None:
            continue
        default = p.default
        if isinstance(default, bool):
            word = str(value).strip().lower() if isinstance(value, (str, int)) else None
            if isinstance(value, bool):
                continue
            if word in _BOOL_WORDS:
                out[name] = _BOOL_WORDS[word]
                continue
            raise ValueError(f"setting {name} of attack {key!r} must be true/false/1/0/yes/no, "
                             f"got {value!r}")
        if isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"setting {name} of attack {key!r} must be a whole number, "
                                 f"got {value!r}")
            out[name] = int(value)
        elif isinstance(default, float) and not isinstance(value, str):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(float(value)):
                raise ValueError(f"setting {name} of attack {key!r} must be a finite number, "
                                 f"got {value!r}")
    return out


def _resolve_name(name: Any) -> str:
    if not isinstance(name, str):
        raise ValueError(f"attack name must be a string; allowed: {', '.join(ATTACKS)}")
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; allowed: {', '.join(ATTACKS)}")
    return key


def make_attack(name: str, policy: nn.Module, **settings: Any) -> Attack:
    """Build the attack ``name`` (see :func:`list_attacks`) on ``policy``.

    Plain attacks take their constructor's keyword settings (``eps``, ``steps``, ...).
    ``bpda`` and ``eot`` take ``attack=`` (an inner name, default ``"pgd"``, or an
    :class:`Attack`), their own settings (``preprocess``, ``backward`` / ``samples``,
    ``eval_mode``), and pass every other setting to the inner attack. ``ensemble`` takes
    ``attacks=`` (names or Attack instances, default fgsm, pgd, apgd, square) and passes each
    other setting to every member that accepts it (``seed`` becomes ``seed + i`` for member i;
    ``objective``/``target`` also set the ensemble's yardstick). ``autoattack`` builds its own
    members (:class:`AutoAttack`) from ``steps``, ``n_queries``, ``n_target_classes``, ``seed``.

    Raises:
        ValueError: unknown name (listing the valid ones) or a setting the attack does not take
            (listing the allowed settings), or any invalid value.

    Example:
        >>> attack = make_attack("pgd", policy, eps="4/255", steps=20)
        >>> attack = make_attack("bpda", policy, attack="apgd", eps=8/255, steps=50)
        >>> attack = make_attack("autoattack", policy, eps=8/255, seed=0, n_queries=1000)
    """
    key = _resolve_name(name)
    cls = ATTACKS[key]
    if key in WRAPPERS:
        own = _typed_settings(cls, {k: settings.pop(k) for k in _parameters(cls)
                                    if k in settings}, key)
        inner = settings.pop("attack", "pgd")
        if isinstance(inner, Attack):
            if settings:
                raise ValueError(f"settings {sorted(settings)} cannot apply to an already built "
                                 f"inner attack; allowed for {key}: {', '.join(_parameters(cls))}")
        else:
            inner = make_attack(_resolve_name(inner), policy, **settings)
        return cls(inner, **own)
    if key == "ensemble":
        members = settings.pop("attacks", DEFAULT_ENSEMBLE)
        own = {k: settings.pop(k) for k in ("skip_successful",) if k in settings}
        for k in ("objective", "target"):
            if k in settings:
                own[k] = settings[k]
        built: list[Attack] = []
        used: set[str] = set()
        seed = settings.get("seed")
        for i, member in enumerate(members):
            if isinstance(member, Attack):
                built.append(member)
                continue
            member_key = _resolve_name(member)
            allowed = set(_parameters(ATTACKS[member_key]))
            if member_key in WRAPPERS:
                allowed |= {k for k in settings}  # wrappers forward the rest to their inner attack
            mine = {k: v for k, v in settings.items() if k in allowed}
            if "seed" in mine and seed is not None:
                mine["seed"] = seed + i
            used |= set(mine)
            built.append(make_attack(member_key, policy, **mine))
        unused = set(settings) - used - {"objective", "target"}
        if unused:
            raise ValueError(f"unknown setting(s) {', '.join(sorted(unused))} for attack "
                             f"'ensemble': no member takes them")
        return Ensemble(built, **own)
    allowed = _parameters(cls)
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)} for attack {key!r}; "
                         f"allowed: {', '.join(allowed)}")
    return cls(policy, **_typed_settings(cls, settings, key))


__all__ = [
    "ALIASES", "APGD", "APGDT", "ATTACKS", "Attack", "AttackContext", "AutoAttack", "BPDA", "EOT",
    "Ensemble", "ExternalAttack", "FAB", "FGSM", "LearnedAdversary", "NCHWPolicy", "NORMS",
    "OBJECTIVES", "PGD", "RandomNoise", "Square", "StraightThrough", "WRAPPERS",
    "apgd_checkpoints", "build_external", "evaluate", "external_code_id", "is_torchattacks",
    "list_attacks", "load_external", "make_attack", "project_hyperplane_box", "unbound_model",
]
