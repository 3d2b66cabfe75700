"""BPDA: attack through a non-differentiable preprocessing step with a surrogate backward."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from attacks.base import Attack
from attacks.wrappers import Wrapper


class StraightThrough(nn.Module):
    """Forward ``preprocess(x)`` exactly; backward through ``backward(x)`` (identity default).

    ``out = g(x) + (f(x) - g(x)).detach()`` with ``f = preprocess`` and ``g = backward``: the
    value is ``f(x)``, the gradient is ``dg/dx`` (the identity's when ``backward`` is None).
    ``f`` runs without building a graph, so it may be anything: rounding, JPEG, a median
    filter, a module whose gradient was zeroed by ``.detach()`` tricks.

    Args:
        preprocess: the module or function applied in the forward pass.
        backward: a differentiable approximation of ``preprocess`` used for the gradient
            (for example a smooth quantizer); ``None`` = identity (BPDA's default).

    Example::

        >>> quantize = lambda x: torch.round(x * 8) / 8
        >>> policy_bpda = nn.Sequential(StraightThrough(quantize), net)   # attack this one
    """

    def __init__(self, preprocess: Callable[[torch.Tensor], torch.Tensor],
                 backward: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.preprocess = preprocess
        self.backward = backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = self.preprocess(x)
        approx = x if self.backward is None else self.backward(x)
        if approx.shape != y.shape:
            raise ValueError(f"BPDA backward approximation must keep the preprocessing's output "
                             f"shape {tuple(y.shape)}, got {tuple(approx.shape)}; "
                             f"pass backward= a differentiable approximation")
        return approx + (y - approx).detach()


def _module_path(policy: nn.Module, preprocess: Any) -> str:
    """The dotted name of the preprocessing module inside ``policy``."""
    if preprocess is None:
        if not isinstance(getattr(policy, "input_filter", None), nn.Module):
            raise ValueError(f"BPDA needs preprocess=: {type(policy).__name__} has no "
                             f"input_filter module (pass the module or its dotted name)")
        return "input_filter"
    if isinstance(preprocess, str):
        try:
            policy.get_submodule(preprocess)
        except AttributeError:
            raise ValueError(f"BPDA preprocess {preprocess!r} is not a submodule of "
                             f"{type(policy).__name__}") from None
        if not preprocess:
            raise ValueError("BPDA preprocess must name a submodule, not the policy itself")
        return preprocess
    if isinstance(preprocess, nn.Module):
        for name, module in policy.named_modules():
            if module is preprocess and name:
                return name
    raise ValueError(f"BPDA preprocess must be None (policy.input_filter), a dotted submodule "
                     f"name or a submodule of the policy, got {type(preprocess).__name__}; for "
                     f"preprocessing outside the policy attack nn.Sequential(StraightThrough(f), "
                     f"policy) instead")


class BPDA(Wrapper):
    r"""Backward Pass Differentiable Approximation: run any attack through a preprocessing
    step whose gradient is useless (zero, random or undefined).

    Paper: Athalye, Carlini and Wagner, "Obfuscated Gradients Give a False Sense of Security:
    Circumventing Defenses to Adversarial Examples", ICML 2018
    (https://arxiv.org/abs/1802.00420), section 4.1.

    During the wrapped attack's call the preprocessing module inside the policy is swapped for
    :class:`StraightThrough` (the forward pass is unchanged, the backward pass uses the
    identity or ``backward``) and restored afterwards, even on error. The preprocessing is

    * ``preprocess=None``: ``policy.input_filter`` (the hook of ``agents.PolicyNetwork``
      where SGAM or an input quantizer sits);
    * a dotted submodule name (``"0"`` for ``nn.Sequential(quantizer, net)``), or
    * the submodule itself (found inside the policy by identity).

    For preprocessing that is a plain function inside a policy's ``forward``, wrap the policy
    yourself with :class:`StraightThrough` (see its example) and attack that.

    Distance Measure: that of the wrapped attack.

    Arguments:
        attack (Attack): the attack to run (PGD, APGD, FGSM, EOT, ...); its policy is used.
        preprocess: None, a dotted name or a submodule (above). (Default: None)
        backward (callable | None): differentiable approximation of the preprocessing for the
            backward pass; None = identity. (Default: None)

    Shape:
        - obs: (B, H, W, C) float in [0, 1].
        - actions: (B,) integer or None (default: the clean greedy actions).
        - output: (B, H, W, C) within the wrapped attack's eps-ball and [0, 1].

    Example::

        >>> policy.input_filter = Quantizer()              # non-differentiable defence
        >>> attack = BPDA(PGD(policy, eps=8/255, steps=20))
        >>> adv_obs = attack(obs)
    """

    name = "bpda"

    def __init__(self, attack: Attack, preprocess: Any = None,
                 backward: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__(attack)
        self._preprocess_spec = preprocess
        self.preprocess_path = _module_path(attack.policy, preprocess)
        self.backward = backward

    @contextlib.contextmanager
    def _around(self) -> Iterator[None]:
        """The preprocessing swapped for :class:`StraightThrough`, restored on exit."""
        policy = self.attack.policy
        parent_name, _, child = self.preprocess_path.rpartition(".")
        parent = policy.get_submodule(parent_name) if parent_name else policy
        original = getattr(parent, child)
        setattr(parent, child, StraightThrough(original, self.backward))
        try:
            yield
        finally:
            setattr(parent, child, original)

    def with_policy(self, policy: nn.Module) -> "BPDA":
        spec = self._preprocess_spec
        if isinstance(spec, nn.Module):
            spec = self.preprocess_path
        return BPDA(self.attack.with_policy(policy), preprocess=spec, backward=self.backward)

    def settings(self) -> dict[str, Any]:
        return {"attack": self.name, "preprocess": self.preprocess_path,
                "backward": "identity" if self.backward is None else repr(self.backward),
                "inner": self.attack.settings()}
