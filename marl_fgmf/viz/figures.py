"""Per-agent explanation figures: one agent's frame (:func:`plot_agent_frame`) or every
agent's (:func:`plot_frame`), one panel per map the result carries (see :mod:`marl_fgmf.viz`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from marl_fgmf.viz.common import (CONSENSUS_CMAP, MAGNITUDE_CMAP, as_image, colorbar, field,
                                  finish, grey, new_figure, outline, to_numpy)

__all__ = ["plot_agent_frame", "plot_frame", "BEACON_ACTIONS", "PANEL_TITLES"]

BEACON_ACTIONS = ("stay", "up", "down", "left", "right")
"""Action names of the beacon environment (``Discrete(5)``)."""


def _clean_axis(ax, title: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def _panels(result: Any, index: int) -> list[str]:
    names = ["observation"]
    if field(result, "sgam_mask", index) is not None:
        names.append("sgam_mask")
    for name in ("gradient", "perturbation", "consensus"):
        if field(result, name, index) is not None:
            names.append(name)
    if field(result, "probs", index) is not None:
        names.append("probs")
    return names


PANEL_TITLES = {
    "sgam_mask": "SGAM mask m(x)",
    "gradient": "gradient map G = sum_c |IG|",
    "perturbation": "perturbation map P\n(blur occlusion, |drop|)",
    "consensus": "PGCA consensus over obs",
    "consensus_colorbar": "consensus C",
}
"""Default panel titles (and the consensus panel's colour-bar label); ``labels={"consensus":
"IG over obs", "consensus_colorbar": "|IG| / max"}`` overrides them (e.g. when the consensus
slot shows another method's map)."""


def _draw_agent_row(fig: Figure, axes: Sequence, obs, result: Any, index: int, agent: str,
                    action_names: Sequence[str] | None, relevance,
                    labels: Mapping[str, str] | None = None) -> None:
    """Draw one agent's panels into ``axes`` (as many as :func:`_panels` names)."""
    titles = {**PANEL_TITLES, **(labels or {})}
    img = as_image(obs)
    rel = None if relevance is None else to_numpy(relevance).astype(bool)
    action = field(result, "actions", index)
    action = None if action is None else int(action)
    prob = field(result, "action_prob", index)
    agreement = field(result, "agreement", index)

    def action_label(a: int) -> str:
        return action_names[a] if action_names is not None and a < len(action_names) else str(a)

    for ax, name in zip(axes, _panels(result, index)):
        if name == "observation":
            ax.imshow(img, interpolation="nearest", cmap="gray", vmin=0, vmax=1)
            outline(ax, rel)
            head = f"{agent}: observation"
            if rel is not None:
                head += "\n(cyan: ground-truth relevance)"
            _clean_axis(ax, head)
            if action is not None:
                text = f"action {action_label(action)}"
                if prob is not None:
                    text += f"  p={float(prob):.2f}"
                ax.set_xlabel(text, fontsize=8)
        elif name == "sgam_mask":
            im = ax.imshow(field(result, "sgam_mask", index), cmap="gray", vmin=0, vmax=1,
                           interpolation="nearest")
            outline(ax, rel)  # does the mask keep what matters?
            colorbar(fig, ax, im, "kept (1) / smoothed (0)")
            _clean_axis(ax, titles["sgam_mask"])
        elif name in ("gradient", "perturbation"):
            data = field(result, name, index).astype(np.float64)
            peak = float(data.max())
            im = ax.imshow(data, cmap=MAGNITUDE_CMAP, vmin=0.0, vmax=peak if peak > 0 else 1.0,
                           interpolation="nearest")
            outline(ax, rel)
            colorbar(fig, ax, im, "|d log pi| (nats)")
            _clean_axis(ax, titles[name])
        elif name == "consensus":
            data = field(result, "consensus", index).astype(np.float64)
            ax.imshow(grey(img), interpolation="nearest", cmap="gray", vmin=0, vmax=1)
            shown = np.ma.masked_where(data <= 0, data)
            im = ax.imshow(shown, cmap=CONSENSUS_CMAP, vmin=0.0, vmax=1.0, alpha=0.9,
                           interpolation="nearest")
            outline(ax, rel)
            colorbar(fig, ax, im, titles["consensus_colorbar"])
            title = titles["consensus"]
            if agreement is not None and np.isfinite(agreement):
                title += f"\nagreement rho={float(agreement):.2f}"
            _clean_axis(ax, title)
        elif name == "probs":
            probs = field(result, "probs", index).astype(np.float64)
            labels = [action_label(a) for a in range(len(probs))]
            colours = ["tab:orange" if a == action else "tab:blue" for a in range(len(probs))]
            ypos = np.arange(len(probs))
            ax.barh(ypos, probs, color=colours)
            ax.set_yticks(ypos, labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlim(0, 1)
            ax.tick_params(axis="x", labelsize=7)
            for y, p in zip(ypos, probs):
                ax.text(min(p + 0.02, 0.8), y, f"{p:.2f}", va="center", fontsize=7)
            ax.set_title("pi(a | x)  (orange: explained)", fontsize=8)
            ax.set_box_aspect(1)


def plot_agent_frame(obs, result: Any, index: int = 0, *, agent: str | None = None,
                     action_names: Sequence[str] | None = None, relevance=None,
                     title: str | None = None, labels: Mapping[str, str] | None = None,
                     path: str | os.PathLike | None = None) -> Figure | Path:
    """One agent's explanation of one frame.

    Panels: the observation (ground-truth relevance outlined when given; explained action and
    its probability below), the SGAM mask (when the result carries one), the gradient map
    ``G``, the perturbation map ``P``, the consensus ``C`` over the dimmed observation (with
    the agreement score), and the action distribution (explained action in orange).

    Args:
        obs: (H, W, C) observation of this agent (float in [0, 1] or uint8).
        result: a :class:`marl_fgmf.pgca.PGCAResult` or a mapping with any of the keys
            ``gradient, perturbation, consensus, probs, actions, action_prob, agreement,
            sgam_mask`` (batched; panels of absent keys are skipped).
        index: this agent's row in ``result``.
        agent: label (default ``agent_<index>``).
        action_names: e.g. :data:`BEACON_ACTIONS`.
        relevance: (H, W) bool ground-truth mask to outline.
        labels: panel-title overrides by key (see :data:`PANEL_TITLES`).
        path: write a PNG there (atomically) and return the path; else return the Figure.
    """
    panels = _panels(result, index)
    fig = new_figure(2.7 * len(panels), 3.1)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    _draw_agent_row(fig, axes, obs, result, index, agent or f"agent_{index}", action_names,
                    relevance, labels)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return finish(fig, path)


def plot_frame(obs, result: Any, *, agents: Sequence[str] | None = None,
               action_names: Sequence[str] | None = None, relevance=None,
               title: str | None = None, labels: Mapping[str, str] | None = None,
               path: str | os.PathLike | None = None) -> Figure | Path:
    """All agents of one frame, one row per agent (panels as :func:`plot_agent_frame`).

    Args:
        obs: (N, H, W, C) the agents' observations, in the order of ``result``'s rows.
        result: PGCAResult (or mapping) for those ``N`` observations.
        agents: row labels (default ``agent_0 ..``).
        relevance: (N, H, W) ground-truth masks to outline, or ``None``.
    """
    obs_np = to_numpy(obs)
    n = obs_np.shape[0]
    names = list(agents) if agents is not None else [f"agent_{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} agent labels for {n} observations")
    ncols = max(len(_panels(result, i)) for i in range(n))
    fig = new_figure(2.7 * ncols, 3.0 * n)
    axes = fig.subplots(n, ncols, squeeze=False)
    rel = None if relevance is None else to_numpy(relevance)
    for i in range(n):
        _draw_agent_row(fig, axes[i], obs_np[i], result, i, names[i], action_names,
                        None if rel is None else rel[i], labels)
        for ax in axes[i][len(_panels(result, i)):]:
            ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return finish(fig, path)
