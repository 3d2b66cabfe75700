"""Which FGMF components a ``--defense`` switches on, with their validated settings.

==========  =========================================================================
defense     learner terms / model change
==========  =========================================================================
none        plain PPO
adv         SA-PPO-style KL smoothness on PGD-perturbed observations (the baseline)
scorpio     SCOR-PIO 2.0 curvature regularizer
sgam        SGAM masking layer in front of the encoder, distilled toward Grad-CAM++
fgmf        scorpio + sgam (the Frontier Gradient-Masking Framework)
fgmf+adv    fgmf + the adversarial-training term
==========  =========================================================================

Settings are plain dicts (JSON in ``run.json``), validated here at config time so a bad value
fails before Ray starts, with a message naming the setting and its range.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from marl_fgmf.adv_training import AdvTrainingConfig
from marl_fgmf.scorpio import ScorpioConfig
from marl_fgmf.sgam import SGAMConfig

COMPONENTS = {
    "none": (),
    "adv": ("adv",),
    "scorpio": ("scorpio",),
    "sgam": ("sgam",),
    "fgmf": ("scorpio", "sgam"),
    "fgmf+adv": ("scorpio", "sgam", "adv"),
}


def build_defense_settings(defense: str, settings: dict[str, Any] | None = None,
                           arch: str | None = None) -> dict[str, Any]:
    """Validate the component settings of ``defense``.

    Also the way to defend an RLlib module of your own: pass ``learner_config`` as the
    ``learner_config_dict`` of :class:`agents.learner.FGMFPPOTorchLearner`, and ``sgam`` as
    ``model_config["sgam"]`` of a module with SGAM in front
    (:class:`agents.sgam_module.SGAMInputMixin`); ``arch`` None skips the marl-fgmf arch check.

    Returns:
        ``{"learner_config": {...}, "sgam": dict | None}``: the learner's
        ``learner_config_dict`` and the SGAM layer settings for the RLModule.
    Raises:
        ValueError: unknown defense or component, or a setting out of range.
    """
    if defense not in COMPONENTS:
        raise ValueError(f"unknown defense {defense!r}; allowed: {', '.join(COMPONENTS)}")
    settings = dict(settings or {})
    unknown = set(settings) - {"scorpio", "sgam", "adv"}
    if unknown:
        raise ValueError(f"unknown defense component(s) {sorted(unknown)}; allowed: adv, scorpio, sgam")
    enabled = COMPONENTS[defense]
    learner: dict[str, Any] = {"defense": defense}
    sgam_settings = None
    if "scorpio" in enabled:
        learner["scorpio"] = _checked(ScorpioConfig, settings.get("scorpio", {}), "scorpio")
    if "adv" in enabled:
        learner["adv"] = _checked(AdvTrainingConfig, settings.get("adv", {}), "adv")
    if "sgam" in enabled:
        sgam_all = dict(settings.get("sgam", {}))
        distill_weight = float(sgam_all.pop("distill_weight", 1.0))
        if distill_weight < 0:
            raise ValueError(f"sgam distill_weight must be >= 0, got {distill_weight}")
        distill_fraction = float(sgam_all.pop("distill_fraction", 0.0625))
        if not 0 < distill_fraction <= 1:
            raise ValueError(f"sgam distill_fraction must be in (0, 1], got {distill_fraction}")
        sgam_settings = _checked(SGAMConfig, sgam_all, "sgam")
        if arch is not None and arch not in ("cnn", "vit", "hybrid"):
            raise ValueError(f"SGAM distillation needs a Grad-CAM++ layer; arch {arch!r} has none")
        learner["sgam"] = {"distill_weight": distill_weight, "distill_fraction": distill_fraction}
    return {"learner_config": learner, "sgam": sgam_settings}


def _checked(cls, values: dict[str, Any], component: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    bad = set(values) - names
    if bad:
        raise ValueError(f"unknown {component} setting(s) {sorted(bad)}; allowed: {', '.join(sorted(names))}")
    return dataclasses.asdict(cls(**values))  # __post_init__ validates ranges
