"""The episode animation: a GIF of every agent's consensus map over its observation, step by
step (:func:`animate_episode`), and a figure's pixels (:func:`render_rgb`)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from marl_fgmf.io import atomic_write_bytes
from marl_fgmf.viz.common import CONSENSUS_CMAP, as_image, grey, new_figure, outline, to_numpy

__all__ = ["animate_episode", "render_rgb"]


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
    maps = to_numpy(consensus_maps)
    if maps is None or maps.ndim != 4:
        raise ValueError(f"consensus_maps must be (T, N, H, W), got "
                         f"{None if maps is None else maps.shape}")
    t_steps, n = maps.shape[:2]
    frames = [to_numpy(f) for f in frames]
    if len(frames) != t_steps:
        raise ValueError(f"{len(frames)} frames for {t_steps} consensus steps")
    if t_steps < 1 or not fps > 0:
        raise ValueError(f"need at least one step and fps > 0, got {t_steps} steps, fps={fps}")
    names = list(agents) if agents is not None else [f"agent_{i}" for i in range(n)]
    acts = to_numpy(actions)
    rel = to_numpy(relevance)

    def view(t: int, i: int) -> np.ndarray:
        f = frames[t]
        return as_image(f if f.ndim <= 3 else f[i])  # (H, W, C): one view shared by all

    fig = new_figure(2.4 * n + 0.9, 5.0)
    grid = fig.subplots(2, n, squeeze=False)  # row 0: observation, row 1: consensus overlay
    obs_im, bg, fg = [], [], []
    outlines: list = [None] * (2 * n)
    for i in range(n):
        obs_im.append(grid[0, i].imshow(view(0, i), interpolation="nearest", cmap="gray",
                                        vmin=0, vmax=1))
        bg.append(grid[1, i].imshow(grey(view(0, i)), interpolation="nearest", cmap="gray",
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
            bg[i].set_data(grey(view(t, i)))
            fg[i].set_data(np.ma.masked_where(maps[t, i] <= 0, maps[t, i]))
            for row in range(2):
                k = 2 * i + row
                if outlines[k] is not None:
                    outlines[k].remove()
                outlines[k] = None if rel is None else outline(grid[row, i], rel[t, i])
            label = names[i]
            if acts is not None:
                a = int(acts[t, i])
                label += f": {action_names[a] if action_names and a < len(action_names) else a}"
            grid[0, i].set_title(label, fontsize=9)
        suptitle.set_text(f"{title} - step {t + 1}/{t_steps}"
                          + ("  (cyan: ground-truth relevance)" if rel is not None else ""))
        images.append(_to_pil(render_rgb(fig)))
    duration = max(20, int(round(1000.0 / fps)))

    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=duration, loop=0)
    return atomic_write_bytes(path, buffer.getvalue())


def _to_pil(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))  # (H, W, 3) -> RGB
