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

__all__ = ["row_keys", "select_keyed_rows", "IterationSubspaces"]


def row_keys(obs: torch.Tensor, salt: int) -> list[bytes]:
    """One 8-byte key per row: BLAKE2b of the row's bytes, keyed by ``salt``.

    Equal rows get equal keys (so a row is recognized in any minibatch it is sliced into), a
    different ``salt`` gives an independent draw, and the keys do not depend on the process
    (unlike Python's ``hash``), so a seeded run draws the same rows again.
    """
    arr = obs.detach().contiguous().cpu().reshape(obs.shape[0], -1).numpy()
    key = int(salt).to_bytes(8, "little", signed=True)
    return [hashlib.blake2b(row.tobytes(), digest_size=8, key=key).digest() for row in arr]


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
    """SCOR-PIO over one training iteration: each SGD step penalizes rows of its own minibatch.

    :meth:`penalty` draws about ``reg_fraction`` of the minibatch's rows
    (:func:`select_keyed_rows` on :func:`row_keys` with this iteration's ``salt``), computes
    the exploitable subspace of the drawn rows not seen before in this iteration (once per
    row: :func:`compute_exploitable_subspace` at the parameters of that step), and returns
    :func:`scorpio_regularizer` on the drawn rows. Make one object per iteration (a new
    ``salt`` each time: a fresh draw) and drop it after the iteration's last SGD step.

    Cost per iteration: ``1 + ig_steps + power_iters`` passes for each distinct drawn row
    (about ``reg_fraction`` of the train batch) plus 3 passes per drawn row per SGD step.
    """

    def __init__(self, config: ScorpioConfig, salt: int,
                 timed: Callable[[str], ContextManager] | None = None) -> None:
        self.config = config
        self.salt = int(salt)
        # profiling hook: timed("scorpio_subspace") wraps the subspace computation
        self._timed = timed or (lambda name: contextlib.nullcontext())
        self._rows: dict[bytes, ExploitableSubspace] = {}
        self.computed_rows = 0  # rows whose subspace this iteration computed

    def __len__(self) -> int:
        return len(self._rows)

    def penalty(self, policy: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor,
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """``(R, info)`` of :func:`scorpio_regularizer` on the drawn rows of ``obs``, plus
        ``info["new_subspace_rows"]``: rows whose subspace this call computed.

        ``transform`` (optional): maps drawn rows to what ``policy`` is regularized at, once
        per row per iteration (no gradient flows through it); e.g. an input filter's output,
        with ``policy`` the network behind the filter. Rows are still drawn on ``obs``."""
        check_obs(obs)
        keys = row_keys(obs, self.salt)
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
        subspace = ExploitableSubspace.cat([self._rows[keys[i]] for i in drawn])
        reg, info = scorpio_regularizer(policy, None, self.config,
                                        subspace=subspace.to(obs.device))
        info["new_subspace_rows"] = float(len(new))
        return reg, info
