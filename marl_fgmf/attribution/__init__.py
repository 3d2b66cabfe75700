"""Attribution methods on the policy protocol (torch only), one method per file (Captum's layout).

Every method explains the log-probability (or probability, or logit) of an action, by default
the clean greedy action ``a* = argmax pi(x)`` (detached), for a policy ``policy(obs) -> logits``
with ``obs`` float in [0, 1] shaped (B, H, W, C). Each method is a class with a Captum-like
call, ``Method(policy).attribute(obs, actions=None, ...)``, returning maps in the input's shape
(pixel methods) or (B, H, W) (spatial methods); :func:`integrated_gradients` is the functional
form DESIGN.md names.

* :mod:`~marl_fgmf.attribution.base`: the gradient base (explained actions, log-prob scores,
  chunked input gradients) and the perturbation base (substrates, patch masks, batched masked
  forwards).
* Gradient methods: :class:`IntegratedGradients` (Sundararajan et al. 2017,
  ``integrated_gradients.py``), :class:`SmoothGrad` (Smilkov et al. 2017, ``smoothgrad.py``),
  :class:`GradCAMPlusPlus` (Chattopadhay et al. 2018, ``grad_cam.py``).
* Perturbation methods: :class:`Occlusion` (Zeiler & Fergus 2014, ``occlusion.py``),
  :class:`RISE` (Petsiuk et al. 2018, ``rise.py``).
* Model-free baselines (``baselines.py``): :class:`RandomBaseline` (uniform over the frame's
  non-background pixels) and :class:`BrightnessBaseline` (summed channel intensity): the
  scores an explanation must beat without looking at the policy.

The registry of methods by name (with PGCA) is :mod:`marl_fgmf.explainers`; this package never
imports :mod:`marl_fgmf.pgca`, which builds on it.
"""
from __future__ import annotations

from marl_fgmf.attribution.base import (DEFAULT_CHUNK, Attribution, GradientAttribution,
                                        PerturbationAttribution, PerturbationForwards,
                                        action_log_prob, action_score, check_chunk, gaussian_blur,
                                        greedy_actions, input_gradients, make_substrate,
                                        masked_scores, patch_masks, resolve_actions,
                                        spatial_map)
from marl_fgmf.attribution.baselines import (BACKGROUND_RULES, BrightnessBaseline,
                                             RandomBaseline, background_mask)
from marl_fgmf.attribution.grad_cam import GradCAMPlusPlus, find_cam_layer, grad_cam_plus_plus
from marl_fgmf.attribution.integrated_gradients import IntegratedGradients, integrated_gradients
from marl_fgmf.attribution.occlusion import Occlusion, occlusion_patch_deltas, patch_deltas_to_map
from marl_fgmf.attribution.rise import RISE, rise_masks
from marl_fgmf.attribution.smoothgrad import SmoothGrad

__all__ = [
    # methods
    "IntegratedGradients", "integrated_gradients", "SmoothGrad", "GradCAMPlusPlus",
    "grad_cam_plus_plus", "find_cam_layer", "Occlusion", "RISE",
    # model-free baselines
    "RandomBaseline", "BrightnessBaseline", "background_mask", "BACKGROUND_RULES",
    # bases and their building blocks
    "Attribution", "GradientAttribution", "PerturbationAttribution", "DEFAULT_CHUNK",
    "greedy_actions", "resolve_actions", "action_log_prob", "input_gradients", "check_chunk",
    "gaussian_blur", "make_substrate", "patch_masks", "action_score", "PerturbationForwards",
    "masked_scores", "spatial_map", "rise_masks", "occlusion_patch_deltas", "patch_deltas_to_map",
]
