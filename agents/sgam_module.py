"""SGAM in front of any RLlib ``TorchRLModule``: :class:`SGAMInputMixin`.

A marl-fgmf network has an ``input_filter`` slot where SGAM sits (:func:`marl_fgmf.sgam.
attach_sgam`). Any other RLlib module gets the same layer by putting the mixin first in its
class's bases::

    from agents.sgam_module import SGAMInputMixin

    class MySGAMModule(SGAMInputMixin, MyTorchRLModule):
        pass

    spec = RLModuleSpec(module_class=MySGAMModule,
                        model_config={..., "sgam": {"keep": 0.5}})   # SGAMConfig settings

For RLlib's default PPO module the class exists: :class:`SGAMDefaultPPOTorchRLModule`.

What the mixin does: after the module's own ``setup()`` it builds ``self.input_filter =
SGAM(in_channels=C, **model_config["sgam"])`` (``C`` from the observation space); every
forward pass (``_forward``, ``_forward_train``, ``_forward_inference``,
``_forward_exploration``) and ``compute_values`` (without given embeddings) then sees the
observations filtered: ``batch[OBS]`` is brought to the policy protocol (float (B, H, W, C) in
[0, 1], by the layout and scaling read from the observation space, as ``agents.load_policy``
does), passed through SGAM and brought back, once per call (a forward that calls another
forward filters once). The layer is part of the module: trained by the learner, saved in
checkpoints, present on env runners (inference-only modules too). ``agents.load_policy``
serves such a module with ``policy.input_filter`` being this layer, so the audit, BPDA/EOT
and tournaments treat it like a marl-fgmf SGAM policy; the FGMF learner distills its saliency
head toward the policy's Grad-CAM++ map (``--defense sgam`` / ``fgmf``), on the deepest
feature map the logits depend on (:func:`marl_fgmf.attribution.probe_feature_layer`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.core.columns import Columns

from agents.checkpoint import observation_declaration
from marl_fgmf.adapter import from_protocol, to_protocol
from marl_fgmf.sgam import SGAM, SGAMConfig

__all__ = ["SGAMInputMixin", "SGAMDefaultPPOTorchRLModule"]


class SGAMInputMixin:
    """Put :class:`marl_fgmf.sgam.SGAM` in front of a ``TorchRLModule`` (module docstring).

    ``model_config["sgam"]``: :class:`marl_fgmf.sgam.SGAMConfig` settings (a dict; ``{}``
    for the defaults). Raises ``ValueError`` at build time, one line, when the setting is
    missing or wrong, or the observation space is not an image ``Box`` in [0, 1] or [0, 255].
    """

    def setup(self) -> None:
        super().setup()  # type: ignore[misc]
        settings = (self.model_config or {}).get("sgam")  # type: ignore[attr-defined]
        if not isinstance(settings, dict):
            raise ValueError(f"{type(self).__name__} needs model_config['sgam'] (a dict of SGAM "
                             f"settings, {{}} for the defaults), got {settings!r}")
        layout, input_range, obs_shape = observation_declaration(
            self.observation_space, type(self).__name__)  # type: ignore[attr-defined]
        config = SGAMConfig(**settings)  # ValueError naming a bad setting
        self._sgam_layout, self._sgam_range = layout, input_range
        self._sgam_skip = False
        self.input_filter = SGAM(in_channels=int(obs_shape[-1]), **config.to_dict())

    @contextlib.contextmanager
    def without_input_filter(self) -> Iterator[None]:
        """Within the context the module's forward passes skip SGAM (a caller that applies
        ``input_filter`` itself, e.g. ``agents.load_policy``'s policy)."""
        previous, self._sgam_skip = self._sgam_skip, True
        try:
            yield
        finally:
            self._sgam_skip = previous

    def _filtered(self, batch: dict[str, Any]) -> dict[str, Any]:
        x = to_protocol(batch[Columns.OBS], self._sgam_layout, self._sgam_range)
        y = from_protocol(self.input_filter(x), self._sgam_layout, self._sgam_range)
        return {**batch, Columns.OBS: y}

    def _once(self, forward, batch: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self._sgam_skip:
            return forward(batch, *args, **kwargs)
        with self.without_input_filter():
            return forward(self._filtered(batch), *args, **kwargs)

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return self._once(super()._forward, batch, **kwargs)  # type: ignore[misc]

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return self._once(super()._forward_train, batch, **kwargs)  # type: ignore[misc]

    def _forward_inference(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return self._once(super()._forward_inference, batch, **kwargs)  # type: ignore[misc]

    def _forward_exploration(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return self._once(super()._forward_exploration, batch, **kwargs)  # type: ignore[misc]

    def compute_values(self, batch: dict[str, Any], embeddings: Any | None = None) -> Any:
        if embeddings is not None:  # computed from already-filtered observations
            return super().compute_values(batch, embeddings)  # type: ignore[misc]
        return self._once(super().compute_values, batch)  # type: ignore[misc]


class SGAMDefaultPPOTorchRLModule(SGAMInputMixin, DefaultPPOTorchRLModule):
    """RLlib's default PPO module (catalog encoder, pi and vf heads) with SGAM in front.

    ``model_config``: RLlib's own settings (``conv_filters``, ``conv_activation``, ...)
    plus ``"sgam"`` (SGAM settings). Use smooth activations (``conv_activation="silu"``,
    ``head_fcnet_activation="silu"``) with SCOR-PIO: RLlib's default ReLU gives a zero input
    curvature (NOTES-rllib.md, pitfall 7).
    """
