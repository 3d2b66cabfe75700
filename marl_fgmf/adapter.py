"""Any policy, declared once: a torch module from elsewhere onto the policy protocol.

The toolkit's attacks, regularizers and explainers take ``policy(obs) -> logits`` with ``obs``
float in [0, 1], shape ``(B, H, W, C)`` (:mod:`marl_fgmf.protocol`). A model trained elsewhere
usually wants something else: channels first (CleanRL, torchvision: ``(B, C, H, W)``), raw
pixel values (uint8 frames, or floats 0-255), and it may return ``(logits, value)`` or a dict.
:func:`adapt_policy` declares those three facts once::

    policy = adapt_policy(agent_net, layout="NCHW", input_range="uint8",
                          logits=lambda out: out[0], value=lambda out: out[1])
    logits = policy(obs)          # obs: float (B, H, W, C) in [0, 1]

* ``layout``: ``"NHWC"`` (the module takes ``(B, H, W, C)``) or ``"NCHW"`` (``(B, C, H, W)``).
* ``input_range``: ``"unit"`` (float in [0, 1]), ``"uint8"`` (a module written for uint8 frames
  0-255) or ``"float255"`` (float 0-255). For both 0-255 kinds the module receives
  ``255 * obs`` as floating point, NOT rounded to integers: rounding has no gradient, and
  attacks and explainers need the input gradient. A module written for uint8 frames that
  casts with ``x.float()`` (or divides by 255) works unchanged; one that casts to an integer
  type has no input gradient, which the gradient methods refuse on their first call.
* ``logits``: a function ``module output -> (B, n_actions) logits`` (default: the output itself).
* ``value``: optionally ``module output -> (B,)`` values; without it the wrapped module's own
  ``value`` method (if any) is called on the converted input.

The conversion is differentiable, so input gradients flow to the protocol input. On the first
call the adapter checks the input against the protocol (layout, dtype, range:
:func:`marl_fgmf.protocol.check_obs`), that the module accepts the converted input, and that
the logits are ``(B, n_actions)`` floating-point and finite; each failure is one
``ValueError`` line naming what was found and what is expected. Later calls check only the
shape (no device synchronization).

Torch only (an algorithm module): RLlib modules enter through ``agents.load_policy``, which
builds such an adapter from the checkpoint's observation space.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from marl_fgmf.protocol import check_obs, eval_mode

__all__ = ["LAYOUTS", "INPUT_RANGES", "PolicyAdapter", "adapt_policy", "describe_output",
           "from_protocol", "to_protocol"]

LAYOUTS = ("NHWC", "NCHW")
"""Input layouts a wrapped module may take: channels last or channels first."""

INPUT_RANGES = {"unit": 1.0, "uint8": 255.0, "float255": 255.0}
"""Input ranges a wrapped module may expect, with the factor applied to the [0, 1] protocol
input (``uint8`` and ``float255`` both receive unrounded floats 0-255)."""


def from_protocol(obs: torch.Tensor, layout: str, input_range: str) -> torch.Tensor:
    """Protocol input (float (B, H, W, C) in [0, 1]) -> what a module with this ``layout`` and
    ``input_range`` takes: ``255 * obs`` (unrounded) for the 0-255 ranges, channels first for
    ``NCHW``. Differentiable."""
    x = obs if input_range == "unit" else obs * INPUT_RANGES[input_range]
    return x.permute(0, 3, 1, 2) if layout == "NCHW" else x


def to_protocol(x: torch.Tensor, layout: str, input_range: str) -> torch.Tensor:
    """The inverse of :func:`from_protocol`: a module's input (any dtype, e.g. uint8 frames)
    -> float (B, H, W, C) in [0, 1]."""
    x = x.float()
    if layout == "NCHW":
        x = x.permute(0, 2, 3, 1)
    return x if input_range == "unit" else x / INPUT_RANGES[input_range]


def describe_output(out: Any) -> str:
    """A short description of a module output for error messages: ``a tuple of 2 (Tensor
    (4, 5), Tensor (4,))``, ``a dict with keys ['logits', 'value']``, ``Tensor (4, 5) float32``."""
    if torch.is_tensor(out):
        return f"a tensor of shape {tuple(out.shape)} ({out.dtype})"
    if isinstance(out, dict):
        return f"a dict with keys {sorted(map(str, out))}"
    if isinstance(out, (tuple, list)):
        parts = ", ".join(f"tensor {tuple(o.shape)}" if torch.is_tensor(o) else type(o).__name__
                          for o in list(out)[:4])
        return f"a {type(out).__name__} of {len(out)} ({parts}{', ...' if len(out) > 4 else ''})"
    return f"a {type(out).__name__}"


def _logits_hint(out: Any) -> str:
    if isinstance(out, dict):
        return "; pass logits=lambda out: out['<key>'] to pick the logits"
    if isinstance(out, (tuple, list)):
        return "; pass logits=lambda out: out[0] (or the index of the logits) to pick them"
    return ""


class PolicyAdapter(nn.Module):
    """A module with a declared layout, input range and logits function, on the policy protocol.

    Build it with :func:`adapt_policy`. ``forward(obs)`` takes float ``(B, H, W, C)`` in [0, 1]
    and returns ``(B, n_actions)`` logits; ``value(obs)`` exists when a value function was
    declared or the wrapped module has a ``value`` method.

    Attributes:
        module: the wrapped module (its parameters are the adapter's).
        layout, input_range: as declared.
        obs_shape: ``(H, W, C)`` the policy takes, when declared (or learnt on the first call
            when not).
        n_actions: the number of logits, when declared (or learnt on the first call).
    """

    def __init__(self, module: nn.Module, layout: str = "NHWC", input_range: str = "unit",
                 logits: Callable[[Any], torch.Tensor] | None = None,
                 value: Callable[[Any], torch.Tensor] | None = None,
                 obs_shape: Sequence[int] | None = None, n_actions: int | None = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)} (the layout the module "
                             f"takes), got {layout!r}")
        if input_range not in INPUT_RANGES:
            raise ValueError(f"input_range must be one of {', '.join(INPUT_RANGES)} (unit: float "
                             f"[0, 1]; uint8: frames 0-255; float255: float 0-255), got "
                             f"{input_range!r}")
        for name, fn in (("logits", logits), ("value", value)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be a function of the module's output, got "
                                 f"{type(fn).__name__}")
        if obs_shape is not None:
            shape = tuple(obs_shape)
            if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool)
                                          and s > 0 for s in shape):
                raise ValueError(f"obs_shape must be (H, W, C) with positive integer sizes (the "
                                 f"protocol's channels-last shape), got {obs_shape!r}")
            obs_shape = shape
        if n_actions is not None and (isinstance(n_actions, bool) or not isinstance(n_actions, int)
                                      or n_actions < 1):
            raise ValueError(f"n_actions must be a positive integer, got {n_actions!r}")
        self.module = module
        self.layout = layout
        self.input_range = input_range
        self.logits_fn = logits
        self.value_fn = value
        self.obs_shape: tuple[int, int, int] | None = obs_shape
        self.n_actions: int | None = n_actions
        self._checked = False

    def extra_repr(self) -> str:
        return (f"layout={self.layout}, input_range={self.input_range}, "
                f"obs_shape={self.obs_shape}, n_actions={self.n_actions}")

    # ------------------------------------------------------------------ conversion
    def convert(self, obs: torch.Tensor) -> torch.Tensor:
        """Protocol input ``(B, H, W, C)`` in [0, 1] -> what the module takes (differentiable)."""
        return from_protocol(obs, self.layout, self.input_range)

    def _module_input_text(self, obs: torch.Tensor) -> str:
        b, h, w, c = obs.shape
        shape = (b, c, h, w) if self.layout == "NCHW" else (b, h, w, c)
        kind = "float in [0, 1]" if self.input_range == "unit" else "float 0-255"
        return f"{self.layout} input of shape {shape}, {kind} ({self.input_range})"

    # ------------------------------------------------------------------ checks
    def _check_input(self, obs: torch.Tensor) -> None:
        if not self._checked:
            check_obs(obs, self.obs_shape)
            return
        if obs.dim() != 4 or (self.obs_shape is not None and tuple(obs.shape[1:]) != self.obs_shape):
            check_obs(obs, self.obs_shape)  # names what is wrong

    def _logits_of(self, out: Any) -> torch.Tensor:
        return out if self.logits_fn is None else self.logits_fn(out)

    def _check_logits(self, logits: Any, out: Any, batch: int) -> None:
        what = "the logits function returned" if self.logits_fn is not None else "the module returned"
        if not torch.is_tensor(logits):
            hint = _logits_hint(out) if self.logits_fn is None else ""
            raise ValueError(f"{what} {describe_output(logits)}; expected a logits tensor of shape "
                             f"(B, n_actions) = ({batch}, {self.n_actions or 'n_actions'}){hint}")
        want_n = self.n_actions
        shape_ok = logits.dim() == 2 and logits.shape[0] == batch and (
            want_n is None or logits.shape[1] == want_n)
        if not shape_ok:
            raise ValueError(f"{what} logits of shape {tuple(logits.shape)}; expected (B, n_actions)"
                             f" = ({batch}, {want_n if want_n is not None else 'n_actions'})"
                             f"{_logits_hint(out) if self.logits_fn is None else ''}")
        if not logits.is_floating_point():
            raise ValueError(f"{what} logits of dtype {logits.dtype}; expected floating point "
                             f"(unnormalized log-probabilities, not actions)")
        if not bool(torch.isfinite(logits.detach()).all()):
            raise ValueError(f"{what} non-finite logits (NaN/inf) for finite input; expected finite "
                             f"(B, n_actions) logits: is input_range={self.input_range!r} right?")

    def _first_call(self, obs: torch.Tensor) -> None:
        """The declaration's checks, on a detached copy (the caller's graph is untouched)."""
        x = self.convert(obs.detach())
        try:
            with torch.no_grad(), eval_mode(self.module):
                out = self.module(x)
        except Exception as exc:  # the module's own error, on one line, with what it was given
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(f"the wrapped {type(self.module).__name__} does not accept "
                             f"{self._module_input_text(obs)}: {type(exc).__name__}: {text}; "
                             f"check layout= and input_range=") from None
        try:
            logits = self._logits_of(out)
        except Exception as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(f"the logits function failed on {describe_output(out)}: "
                             f"{type(exc).__name__}: {text}") from None
        self._check_logits(logits, out, obs.shape[0])
        if self.obs_shape is None:
            self.obs_shape = tuple(int(s) for s in obs.shape[1:])  # type: ignore[assignment]
        if self.n_actions is None:
            self.n_actions = int(logits.shape[1])
        self._checked = True

    # ------------------------------------------------------------------ protocol
    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` float in [0, 1] -> ``(B, n_actions)`` logits."""
        self._check_input(obs)
        if not self._checked:
            self._first_call(obs)
        out = self.module(self.convert(obs))
        logits = self._logits_of(out)
        if not torch.is_tensor(logits) or logits.dim() != 2 or logits.shape[0] != obs.shape[0]:
            self._check_logits(logits, out, obs.shape[0])
        return logits

    @property
    def value(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``value(obs) -> (B,)``: the declared value function, or the wrapped module's own
        ``value`` on the converted input. Absent (``AttributeError``) when there is neither, so
        ``getattr(policy, "value", None)`` tells whether a critic exists."""
        if self.value_fn is not None:
            return self._declared_value
        own = getattr(self.module, "value", None)
        if callable(own):
            return self._module_value
        raise AttributeError(f"{type(self.module).__name__} adapter has no value function "
                             f"(pass value= to adapt_policy)")

    def _declared_value(self, obs: torch.Tensor) -> torch.Tensor:
        self._check_input(obs)
        return self.value_fn(self.module(self.convert(obs)))  # type: ignore[misc]

    def _module_value(self, obs: torch.Tensor) -> torch.Tensor:
        self._check_input(obs)
        return self.module.value(self.convert(obs))


def adapt_policy(module: nn.Module, layout: str = "NHWC", input_range: str = "unit",
                 logits: Callable[[Any], torch.Tensor] | None = None,
                 value: Callable[[Any], torch.Tensor] | None = None,
                 obs_shape: Sequence[int] | None = None,
                 n_actions: int | None = None) -> PolicyAdapter:
    """Wrap ``module`` so that it follows the policy protocol.

    Args:
        module: any ``torch.nn.Module`` computing action logits from observations.
        layout: ``"NHWC"`` or ``"NCHW"``: the layout ``module`` takes.
        input_range: ``"unit"`` (float [0, 1]), ``"uint8"`` (written for uint8 frames 0-255)
            or ``"float255"`` (float 0-255): what ``module`` expects. 0-255 modules receive
            ``255 * obs`` unrounded (rounding has no gradient).
        logits: ``module output -> (B, n_actions)`` logits, for modules that return a tuple
            or a dict (default: the output is the logits).
        value: ``module output -> (B,)`` values (optional).
        obs_shape: the ``(H, W, C)`` observation shape, checked on every call when given.
        n_actions: the number of actions, checked on the first call when given.

    Returns:
        A :class:`PolicyAdapter` (an ``nn.Module``; move it with ``.to(device)`` as usual).

    Raises:
        ValueError: a declaration outside the allowed values (one line). Problems only a call
            can reveal (the module refuses the converted input, the logits have the wrong
            shape) raise ``ValueError`` on the first call.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
        >>> policy = adapt_policy(net, layout="NCHW", input_range="uint8")
        >>> policy(torch.rand(2, 9, 9, 3)).shape
        torch.Size([2, 5])
    """
    return PolicyAdapter(module, layout=layout, input_range=input_range, logits=logits,
                         value=value, obs_shape=obs_shape, n_actions=n_actions)
