"""SCOR-PIO in a training iteration: which rows each SGD step penalizes, and their subspaces
computed once per iteration (DESIGN.md section 3; no RLlib here, the learner calls it)."""
from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, ContextManager

import torch

from marl_fgmf.protocol import check_obs
from marl_fgmf.scorpio.regularizer import (ExploitableSubspace, ScorpioConfig,
                                           compute_exploitable_subspace, scorpio_regularizer)

__all__ = ["row_digests", "row_keys", "select_keyed_rows", "IterationSubspaces"]


def row_digests(obs: torch.Tensor) -> list[bytes]:
    """One 16-byte BLAKE2b digest of each row's bytes (equal rows, equal digests); hash a
    minibatch once and derive every draw's keys from it (:func:`row_keys`)."""
    arr = obs.detach().contiguous().cpu().reshape(obs.shape[0], -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in arr]


def row_keys(obs: torch.Tensor | list[bytes], salt: int) -> list[bytes]:
    """One 8-byte key per row: BLAKE2b, keyed by ``salt``, of the row's digest
    (:func:`row_digests`; pass the digests instead of ``obs`` to reuse them).

    Equal rows get equal keys (so a row is recognized in any minibatch it is sliced into), a
    different ``salt`` gives an independent draw, and the keys do not depend on the process
    (unlike Python's ``hash``), so a seeded run draws the same rows again.
    """
    digests = obs if isinstance(obs, list) else row_digests(obs)
    key = int(salt).to_bytes(8, "little", signed=True)
    return [hashlib.blake2b(d, digest_size=8, key=key).digest() for d in digests]


def select_keyed_rows(keys: list[bytes], config: ScorpioConfig | float,
                      max_rows: int | None = None) -> list[int]:
    """The rows of a minibatch to regularize, drawn by key: row ``i`` is drawn when
    ``u_i < fraction`` with ``u_i`` its key read as a number in [0, 1).

    A content-based Bernoulli(``fraction``) draw: about ``fraction`` of every minibatch, and
    the same observation is drawn (or not) in every minibatch of the iteration. At least one
    row (the lowest key) and at most ``max_rows`` (the lowest keys); returned sorted.
    ``config``: a :class:`ScorpioConfig` (``fraction`` = ``reg_fraction``, ``max_rows`` =
    ``max_reg_samples``) or the fraction itself, in (0, 1].
    """
    if not keys:
        raise ValueError("select_keyed_rows needs at least one row")
    if isinstance(config, ScorpioConfig):
        fraction, max_rows = config.reg_fraction, config.max_reg_samples
    else:
        fraction = float(config)
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {config!r}")
    u = [int.from_bytes(k, "little") / 2.0 ** (8 * len(k)) for k in keys]
    order = sorted(range(len(u)), key=u.__getitem__)
    chosen = [i for i in order if u[i] < fraction] or order[:1]
    if max_rows is not None:
        chosen = chosen[:max_rows]
    return sorted(chosen)


class IterationSubspaces:
    """SCOR-PIO over one training iteration: each SGD step's minibatch gives rows to penalize.

    :meth:`penalty` draws about ``reg_fraction`` of the minibatch's rows
    (:func:`select_keyed_rows` on :func:`row_keys` with this iteration's ``salt``) and computes
    the exploitable subspace of the drawn rows not seen before in this iteration (once per
    row: :func:`compute_exploitable_subspace` at the parameters of that step). Every
    ``reg_every``-th call returns ``reg_every`` times :func:`scorpio_regularizer` on the rows
    drawn in the last ``reg_every`` calls (the calls between return a zero without a graph and
    no ``"R"`` in ``info``): per iteration the same rows and the same total weight as a penalty
    at every step, in fewer double-backward calls (:attr:`ScorpioConfig.reg_every`). Make one
    object per iteration (a new ``salt`` each time: a fresh draw) and drop it after the
    iteration's last SGD step, passing :meth:`carry_over` to the next one: rows still pending
    at the end of an iteration (at most ``reg_every - 1`` minibatches') are penalized at the
    next iteration's first evaluating step, so no drawn row is lost, even when an iteration
    has fewer SGD steps than ``reg_every``.

    Cost per iteration: ``1 + ig_steps + power_iters`` passes for each distinct drawn row
    (about ``reg_fraction`` of the train batch) plus 3 passes per drawn row per epoch, in one
    call per ``reg_every`` SGD steps.
    """

    def __init__(self, config: ScorpioConfig, salt: int,
                 timed: Callable[[str], ContextManager] | None = None,
                 carry: tuple[list[ExploitableSubspace], int] | None = None) -> None:
        self.config = config
        self.salt = int(salt)
        # profiling hook: timed("scorpio_subspace") wraps the subspace computation
        self._timed = timed or (lambda name: contextlib.nullcontext())
        self._rows: dict[bytes, ExploitableSubspace] = {}
        # drawn rows not yet penalized (their subspaces), and the calls since the last penalty
        self._pending: list[ExploitableSubspace] = list(carry[0]) if carry else []
        self._calls = int(carry[1]) if carry else 0
        self.computed_rows = 0  # rows whose subspace this iteration computed

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def pending_rows(self) -> int:
        """Rows drawn since the last penalty evaluation (penalized at the next evaluating call)."""
        return sum(len(p) for p in self._pending)

    def carry_over(self) -> tuple[list[ExploitableSubspace], int]:
        """``(pending subspaces, calls since the last penalty)``: pass it as ``carry`` to the
        next iteration's object, which penalizes these rows at its first evaluating call."""
        return list(self._pending), self._calls % self.config.reg_every

    def penalty(self, policy: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor,
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                digests: list[bytes] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``(R, info)``: on every ``reg_every``-th call ``reg_every`` times
        :func:`scorpio_regularizer` on the rows drawn in the last ``reg_every`` calls, its
        ``info`` with ``R`` the returned (weighted) value; on the other calls a zero without a
        graph and an ``info`` without ``"R"``. ``info["new_subspace_rows"]`` (every call): rows
        whose subspace this call computed.

        ``transform`` (optional): maps drawn rows to what ``policy`` is regularized at, once
        per row per iteration (no gradient flows through it); e.g. an input filter's output,
        with ``policy`` the network behind the filter. Rows are still drawn on ``obs``.
        ``digests``: :func:`row_digests` of ``obs`` if the caller has them (hashed once)."""
        check_obs(obs)
        if digests is not None and len(digests) != obs.shape[0]:
            raise ValueError(f"digests has {len(digests)} entries for {obs.shape[0]} rows")
        keys = row_keys(digests if digests is not None else obs, self.salt)
        drawn = select_keyed_rows(keys, self.config)
        new: dict[bytes, int] = {}
        for i in drawn:
            if keys[i] not in self._rows and keys[i] not in new:
                new[keys[i]] = i
        if new:
            rows = obs[list(new.values())].detach()
            if transform is not None:
                with torch.no_grad():
                    rows = transform(rows).clamp(0.0, 1.0)  # float rounding of a convex blend
            with self._timed("scorpio_subspace"):
                fresh = compute_exploitable_subspace(policy, rows, self.config)
            for j, key in enumerate(new):
                self._rows[key] = fresh.rows([j])
            self.computed_rows += len(new)
        self._pending.extend(self._rows[keys[i]] for i in drawn)
        self._calls += 1
        every = self.config.reg_every
        if self._calls % every:
            zero = torch.zeros((), dtype=obs.dtype, device=obs.device)
            return zero, {"new_subspace_rows": float(len(new))}
        subspace = ExploitableSubspace.cat(self._pending)
        self._pending = []
        reg, info = scorpio_regularizer(policy, None, self.config,
                                        subspace=subspace.to(obs.device))
        if every > 1:
            reg = every * reg
            for name in ("R", "curvature_term", "gradient_term"):
                info[name] *= every
        info["new_subspace_rows"] = float(len(new))
        return reg, info
