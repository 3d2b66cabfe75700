"""Figures and episode animations: per-agent explanations, learning curves, heat maps, curves.

Everything is drawn on matplotlib's Agg canvas (``Figure`` + ``FigureCanvasAgg``, no pyplot
state, no display needed, the process-wide backend untouched) and every file is written
atomically: drawn into a temporary file in the destination directory, then ``os.replace``-d,
so a reader never sees half a PNG or GIF. GIFs are assembled with Pillow.

Colour maps (all perceptually uniform and readable in grey scale; see Crameri et al. 2020):
``magma`` for the gradient and perturbation magnitudes, ``viridis`` for the consensus overlay
(over the observation's dimmed grey luminance, so colours come from the map alone; zero
consensus is transparent) and heat maps, ``gray`` for the SGAM mask (white = passed
unchanged). The ground-truth relevance mask, when given, is outlined in cyan along pixel edges.

Main entry points:

* :func:`plot_agent_frame` one agent, one frame: observation, SGAM mask (if any), gradient map,
  perturbation map, consensus over the observation, action probabilities.
* :func:`plot_frame` the same, one row per agent.
* :func:`animate_episode` GIF of every agent's consensus map over its observation, step by step.
* :func:`plot_learning_curve` mean return against environment steps (training loop).
* :func:`plot_heatmap` annotated matrix (tournament: defenders x attackers).
* :func:`plot_curves` several y(x) curves with error bands (robust return against eps).
"""
from __future__ import annotations

import csv
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

__all__ = ["plot_agent_frame", "plot_frame", "animate_episode", "plot_learning_curve",
           "plot_heatmap", "plot_curves", "save_figure", "render_rgb", "BEACON_ACTIONS"]

BEACON_ACTIONS = ("stay", "up", "down", "left", "right")
"""Action names of the beacon environment (``Discrete(5)``)."""

MAGNITUDE_CMAP = "magma"
CONSENSUS_CMAP = "viridis"
RELEVANCE_COLOUR = "cyan"
DPI = 120


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------

def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a figure is as readable as any file
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Save ``fig`` atomically; the format follows the suffix (``.png`` if none)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return _atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi,
                                                       bbox_inches="tight"))


def _finish(fig: Figure, path) -> Figure | Path:
    return fig if path is None else save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# arrays
# ---------------------------------------------------------------------------------------------

def _np(x) -> np.ndarray | None:
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _image(obs) -> np.ndarray:
    """(H, W, C) observation -> displayable (H, W, 3) float in [0, 1] (or (H, W) grey)."""
    raw = _np(obs)
    img = raw.astype(np.float64)
    if raw.dtype.kind in "ui" or (img.size and img.max() > 1.0 + 1e-6):
        img = img / 255.0
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    elif img.ndim == 3 and img.shape[-1] not in (3, 4):
        img = img[..., :3] if img.shape[-1] > 3 else img.mean(-1)
    if img.ndim not in (2, 3):
        raise ValueError(f"observation must be (H, W) or (H, W, C), got {img.shape}")
    return np.clip(img, 0.0, 1.0)


def _colorbar(fig: Figure, ax, mappable, label: str | None = None) -> None:
    cb = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.03)
    cb.ax.tick_params(labelsize=7)
    cb.ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    if label:
        cb.set_label(label, fontsize=7)


def _mask_edges(mask: np.ndarray) -> list[list[tuple[float, float]]]:
    """Pixel-exact boundary of a boolean (H, W) mask as line segments in imshow coordinates."""
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    segments = []
    rows, cols = np.nonzero(m[1:, 1:-1] != m[:-1, 1:-1])  # edge above pixel (r, c)
    segments += [[(c - 0.5, r - 0.5), (c + 0.5, r - 0.5)] for r, c in zip(rows, cols)]
    rows, cols = np.nonzero(m[1:-1, 1:] != m[1:-1, :-1])  # edge left of pixel (r, c)
    segments += [[(c - 0.5, r - 0.5), (c - 0.5, r + 0.5)] for r, c in zip(rows, cols)]
    return segments


def _outline(ax, relevance):
    """Outline the ground-truth relevance mask (cyan, pixel edges); returns the artist."""
    if relevance is None or not np.any(relevance):
        return None
    lines = LineCollection(_mask_edges(relevance), colors=RELEVANCE_COLOUR, linewidths=1.2)
    ax.add_collection(lines)
    return lines


def _grey(img: np.ndarray, level: float = 0.5) -> np.ndarray:
    """Dimmed luminance of an observation: the backdrop of an overlay, so that the overlay's
    colours come from its colour map alone."""
    lum = img if img.ndim == 2 else img[..., :3] @ np.array([0.299, 0.587, 0.114])
    return level * lum


def _clean_axis(ax, title: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def _field(result: Any, name: str, index: int):
    """``result.name[index]`` for a PGCAResult-like object or a mapping; ``None`` if absent."""
    value = result.get(name) if isinstance(result, Mapping) else getattr(result, name, None)
    if value is None:
        return None
    value = _np(value)
    return value[index] if value.ndim >= 1 else value


# ---------------------------------------------------------------------------------------------
# per-agent explanation figures
# ---------------------------------------------------------------------------------------------

def _panels(result: Any, index: int) -> list[str]:
    names = ["observation"]
    if _field(result, "sgam_mask", index) is not None:
        names.append("sgam_mask")
    for name in ("gradient", "perturbation", "consensus"):
        if _field(result, name, index) is not None:
            names.append(name)
    if _field(result, "probs", index) is not None:
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
    img = _image(obs)
    rel = None if relevance is None else _np(relevance).astype(bool)
    action = _field(result, "actions", index)
    action = None if action is None else int(action)
    prob = _field(result, "action_prob", index)
    agreement = _field(result, "agreement", index)

    def action_label(a: int) -> str:
        return action_names[a] if action_names is not None and a < len(action_names) else str(a)

    for ax, name in zip(axes, _panels(result, index)):
        if name == "observation":
            ax.imshow(img, interpolation="nearest", cmap="gray", vmin=0, vmax=1)
            _outline(ax, rel)
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
            im = ax.imshow(_field(result, "sgam_mask", index), cmap="gray", vmin=0, vmax=1,
                           interpolation="nearest")
            _outline(ax, rel)  # does the mask keep what matters?
            _colorbar(fig, ax, im, "kept (1) / smoothed (0)")
            _clean_axis(ax, titles["sgam_mask"])
        elif name in ("gradient", "perturbation"):
            data = _field(result, name, index).astype(np.float64)
            peak = float(data.max())
            im = ax.imshow(data, cmap=MAGNITUDE_CMAP, vmin=0.0, vmax=peak if peak > 0 else 1.0,
                           interpolation="nearest")
            _outline(ax, rel)
            _colorbar(fig, ax, im, "|d log pi| (nats)")
            _clean_axis(ax, titles[name])
        elif name == "consensus":
            data = _field(result, "consensus", index).astype(np.float64)
            ax.imshow(_grey(img), interpolation="nearest", cmap="gray", vmin=0, vmax=1)
            shown = np.ma.masked_where(data <= 0, data)
            im = ax.imshow(shown, cmap=CONSENSUS_CMAP, vmin=0.0, vmax=1.0, alpha=0.9,
                           interpolation="nearest")
            _outline(ax, rel)
            _colorbar(fig, ax, im, titles["consensus_colorbar"])
            title = titles["consensus"]
            if agreement is not None and np.isfinite(agreement):
                title += f"\nagreement rho={float(agreement):.2f}"
            _clean_axis(ax, title)
        elif name == "probs":
            probs = _field(result, "probs", index).astype(np.float64)
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
    fig = _new_figure(2.7 * len(panels), 3.1)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    _draw_agent_row(fig, axes, obs, result, index, agent or f"agent_{index}", action_names,
                    relevance, labels)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


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
    obs_np = _np(obs)
    n = obs_np.shape[0]
    names = list(agents) if agents is not None else [f"agent_{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} agent labels for {n} observations")
    ncols = max(len(_panels(result, i)) for i in range(n))
    fig = _new_figure(2.7 * ncols, 3.0 * n)
    axes = fig.subplots(n, ncols, squeeze=False)
    rel = None if relevance is None else _np(relevance)
    for i in range(n):
        _draw_agent_row(fig, axes[i], obs_np[i], result, i, names[i], action_names,
                        None if rel is None else rel[i], labels)
        for ax in axes[i][len(_panels(result, i)):]:
            ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------------
# episode animation
# ---------------------------------------------------------------------------------------------

def render_rgb(fig: Figure) -> np.ndarray:
    """The figure's pixels as an (H, W, 3) uint8 array (Agg canvas)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def animate_episode(frames, consensus_maps, path: str | os.PathLike, fps: float = 4.0, *,
                    agents: Sequence[str] | None = None, actions=None,
                    action_names: Sequence[str] | None = None, relevance=None,
                    title: str = "PGCA consensus", map_label: str = "consensus C") -> Path:
    """GIF of every agent's consensus map over its observation as the episode plays.

    One GIF frame per step, one column per agent (label and explained action on top): the
    observation above, the consensus in ``viridis`` on a fixed [0, 1] scale over the dimmed
    observation below, one shared colour bar; the title counts the steps.

    Args:
        frames: the observations of each step, (T, N, H, W, C) or a list of (N, H, W, C)
            arrays (one view per agent); a 3-D (H, W, C) frame is one view shown under every
            agent.
        consensus_maps: (T, N, H, W) consensus (or any [0, 1] map).
        path: the ``.gif`` to write (atomically).
        fps: frames per second.
        agents: panel labels; actions: (T, N) explained actions; relevance: (T, N, H, W).
        title: the title's head (the step counter follows); map_label: the colour bar's label
            (e.g. ``"|IG| (min-max)"`` when the maps are another method's).
    Returns:
        ``path``.
    """
    maps = _np(consensus_maps)
    if maps is None or maps.ndim != 4:
        raise ValueError(f"consensus_maps must be (T, N, H, W), got "
                         f"{None if maps is None else maps.shape}")
    t_steps, n = maps.shape[:2]
    frames = [_np(f) for f in frames]
    if len(frames) != t_steps:
        raise ValueError(f"{len(frames)} frames for {t_steps} consensus steps")
    if t_steps < 1 or not fps > 0:
        raise ValueError(f"need at least one step and fps > 0, got {t_steps} steps, fps={fps}")
    names = list(agents) if agents is not None else [f"agent_{i}" for i in range(n)]
    acts = _np(actions)
    rel = _np(relevance)

    def view(t: int, i: int) -> np.ndarray:
        f = frames[t]
        return _image(f if f.ndim <= 3 else f[i])  # (H, W, C): one view shared by all

    fig = _new_figure(2.4 * n + 0.9, 5.0)
    grid = fig.subplots(2, n, squeeze=False)  # row 0: observation, row 1: consensus overlay
    obs_im, bg, fg = [], [], []
    outlines: list = [None] * (2 * n)
    for i in range(n):
        obs_im.append(grid[0, i].imshow(view(0, i), interpolation="nearest", cmap="gray",
                                        vmin=0, vmax=1))
        bg.append(grid[1, i].imshow(_grey(view(0, i)), interpolation="nearest", cmap="gray",
                                    vmin=0, vmax=1))
        fg.append(grid[1, i].imshow(np.ma.masked_where(maps[0, i] <= 0, maps[0, i]),
                                    cmap=CONSENSUS_CMAP, vmin=0, vmax=1, alpha=0.9,
                                    interpolation="nearest"))
        for ax in grid[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    grid[0, 0].set_ylabel("observation", fontsize=8)
    grid[1, 0].set_ylabel("consensus over obs" if map_label.startswith("consensus")
                          else "attribution over obs", fontsize=8)
    fig.colorbar(fg[-1], ax=list(grid[1]), fraction=0.05, pad=0.03).set_label(map_label,
                                                                            fontsize=8)
    fig.colorbar(obs_im[-1], ax=list(grid[0]), fraction=0.05, pad=0.03).remove()  # align rows
    suptitle = fig.suptitle("", fontsize=10)
    images = []
    for t in range(t_steps):
        for i in range(n):
            obs_im[i].set_data(view(t, i))
            bg[i].set_data(_grey(view(t, i)))
            fg[i].set_data(np.ma.masked_where(maps[t, i] <= 0, maps[t, i]))
            for row in range(2):
                k = 2 * i + row
                if outlines[k] is not None:
                    outlines[k].remove()
                outlines[k] = None if rel is None else _outline(grid[row, i], rel[t, i])
            label = names[i]
            if acts is not None:
                a = int(acts[t, i])
                label += f": {action_names[a] if action_names and a < len(action_names) else a}"
            grid[0, i].set_title(label, fontsize=9)
        suptitle.set_text(f"{title} - step {t + 1}/{t_steps}"
                          + ("  (cyan: ground-truth relevance)" if rel is not None else ""))
        images.append(_to_pil(render_rgb(fig)))
    duration = max(20, int(round(1000.0 / fps)))

    def write(tmp: str) -> None:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=duration, loop=0)

    return _atomic_write(path, write)


def _to_pil(rgb: np.ndarray):
    from PIL import Image
    return Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))  # (H, W, 3) -> RGB


# ---------------------------------------------------------------------------------------------
# training and tournament plots
# ---------------------------------------------------------------------------------------------

_X_KEYS = ("env_steps", "num_env_steps_sampled_lifetime", "timesteps", "steps", "step")
_Y_KEYS = ("mean_return", "episode_return_mean", "return_mean", "return")


def _records(csv_or_records) -> list[dict[str, Any]]:
    """CSV path, list of dicts or dict of lists -> list of dicts."""
    if isinstance(csv_or_records, (str, os.PathLike)):
        with open(csv_or_records, newline="") as fh:
            return [dict(row) for row in csv.DictReader(fh)]
    if isinstance(csv_or_records, Mapping):
        keys = list(csv_or_records)
        columns = [list(csv_or_records[k]) for k in keys]
        return [dict(zip(keys, row)) for row in zip(*columns)]
    return [dict(r) for r in csv_or_records]


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def plot_learning_curve(csv_or_records, path: str | os.PathLike, *, x: str | None = None,
                        y: str | None = None, group: str | None = None, ci: str | None = None,
                        reference: float | None = None, reference_label: str = "reference",
                        title: str = "Learning curve") -> Path:
    """Mean return against environment steps (what the training loop logs).

    Args:
        csv_or_records: a CSV file, a list of dicts or a dict of columns.
        path: PNG to write.
        x, y: column names; default the first present of ``env_steps,
            num_env_steps_sampled_lifetime, timesteps, steps, step`` and ``mean_return,
            episode_return_mean, return_mean, return``.
        group: column splitting the rows into several curves (e.g. ``defense``).
        ci: column of 95 % half-widths drawn as a band.
        reference: a horizontal dashed line (e.g. the scripted policy's return).
    """
    rows = _records(csv_or_records)
    if not rows:
        raise ValueError("plot_learning_curve got no records")
    columns = set().union(*(r.keys() for r in rows))
    x = x or next((k for k in _X_KEYS if k in columns), None)
    y = y or next((k for k in _Y_KEYS if k in columns), None)
    if x not in columns or y not in columns:
        raise ValueError(f"learning-curve columns {x!r} / {y!r} not found; have {sorted(columns)}")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get(group, "")) if group else "", []).append(r)
    fig = _new_figure(6.0, 3.8)
    ax = fig.subplots()
    for label, rs in groups.items():
        pts = sorted((_float(r[x]), _float(r[y]), _float(r.get(ci)) if ci else float("nan"))
                     for r in rs)
        pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
        if not pts:
            continue
        xs, ys, hs = (np.array(v) for v in zip(*pts))
        line, = ax.plot(xs, ys, marker="o", markersize=3, label=label or y)
        if ci and np.isfinite(hs).any():
            ax.fill_between(xs, ys - hs, ys + hs, color=line.get_color(), alpha=0.2, linewidth=0)
    if reference is not None:
        ax.axhline(float(reference), color="black", linestyle="--", linewidth=1,
                   label=reference_label)
    ax.set_xlabel("environment steps" if x in _X_KEYS else x)
    ax.set_ylabel("mean episodic return" if y in _Y_KEYS else y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_heatmap(matrix, row_labels: Sequence[str], col_labels: Sequence[str],
                 path: str | os.PathLike, title: str = "", *, cmap: str = "viridis",
                 fmt: str = ".2f", cbar_label: str | None = None, vmin: float | None = None,
                 vmax: float | None = None, xlabel: str | None = None,
                 ylabel: str | None = None) -> Path:
    """Annotated heat map (e.g. defenders x attackers robust return); NaN cells are grey.

    Cell text is black or white depending on the cell colour's luminance, so every number
    stays readable.
    """
    data = np.asarray(_np(matrix), dtype=np.float64)
    if data.ndim != 2 or data.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"matrix shape {data.shape} does not match {len(row_labels)} row "
                         f"labels x {len(col_labels)} column labels")
    rows, cols = data.shape
    fig = _new_figure(max(4.0, 1.1 * cols + 2.5), max(3.0, 0.55 * rows + 1.8))
    ax = fig.subplots()
    masked = np.ma.masked_invalid(data)
    colours = matplotlib.colormaps[cmap].with_extremes(bad="lightgrey")
    im = ax.imshow(masked, cmap=colours, vmin=vmin, vmax=vmax, aspect="auto")
    _colorbar(fig, ax, im, cbar_label)
    ax.set_xticks(range(cols), [str(c) for c in col_labels], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(rows), [str(r) for r in row_labels], fontsize=8)
    for r in range(rows):
        for c in range(cols):
            v = data[r, c]
            if not np.isfinite(v):
                ax.text(c, r, "-", ha="center", va="center", fontsize=8)
                continue
            rgba = im.cmap(im.norm(v))
            lum = 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]
            ax.text(c, r, format(v, fmt), ha="center", va="center", fontsize=8,
                    color="black" if lum > 0.5 else "white")
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _curve(spec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if isinstance(spec, Mapping):
        xs, ys, err = spec["x"], spec["y"], spec.get("err")
    else:
        xs, ys, *rest = spec
        err = rest[0] if rest else None
    xs, ys = np.asarray(_np(xs), float), np.asarray(_np(ys), float)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"curve x {xs.shape} and y {ys.shape} must be equal 1-D shapes")
    return xs, ys, None if err is None else np.asarray(_np(err), float)


def plot_curves(curves: Mapping[str, Any], path: str | os.PathLike, *, xlabel: str = "eps",
                ylabel: str = "robust return", title: str = "",
                reference: float | None = None, reference_label: str = "clean",
                eps_in_255: bool = False) -> Path:
    """Several labelled curves ``y(x)`` with optional 95 % bands (robust return against eps).

    Args:
        curves: ``{label: (x, y)}``, ``{label: (x, y, half_width)}`` or
            ``{label: {"x": .., "y": .., "err": ..}}``.
        reference: a horizontal dashed line (e.g. the clean return).
        eps_in_255: label the x ticks as ``k/255`` (x given in [0, 1] units).
    """
    if not curves:
        raise ValueError("plot_curves got no curves")
    fig = _new_figure(6.0, 3.8)
    ax = fig.subplots()
    markers = "osD^vP*X"
    for j, (label, spec) in enumerate(curves.items()):
        xs, ys, err = _curve(spec)
        order = np.argsort(xs)
        xs, ys = xs[order], ys[order]
        line, = ax.plot(xs, ys, marker=markers[j % len(markers)], markersize=4, label=str(label))
        if err is not None:
            err = err[order]
            ax.fill_between(xs, ys - err, ys + err, color=line.get_color(), alpha=0.18,
                            linewidth=0)
    if reference is not None:
        ax.axhline(float(reference), color="black", linestyle="--", linewidth=1,
                   label=reference_label)
    if eps_in_255:
        ticks = sorted({float(x) for spec in curves.values() for x in _curve(spec)[0]})
        ax.set_xticks(ticks, [f"{round(t * 255):g}/255" for t in ticks], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)
