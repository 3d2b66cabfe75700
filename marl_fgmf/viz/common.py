"""What every viz module shares: the Agg figure, the atomic save, array and overlay helpers."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from marl_fgmf.io import atomic_write_bytes

__all__ = ["DPI", "MAGNITUDE_CMAP", "CONSENSUS_CMAP", "RELEVANCE_COLOUR", "new_figure",
           "save_figure", "finish", "to_numpy", "as_image", "colorbar", "mask_edges", "outline",
           "grey", "field"]

MAGNITUDE_CMAP = "magma"
CONSENSUS_CMAP = "viridis"
RELEVANCE_COLOUR = "cyan"
DPI = 120


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------

def new_figure(width: float, height: float) -> Figure:
    """A ``width`` x ``height`` inch figure on its own Agg canvas (no pyplot state)."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Save ``fig`` atomically; the format follows the suffix (``.png`` if none)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def finish(fig: Figure, path) -> Figure | Path:
    """``fig`` itself when ``path`` is ``None``, else the path it was saved to."""
    return fig if path is None else save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# arrays
# ---------------------------------------------------------------------------------------------

def to_numpy(x) -> np.ndarray | None:
    """A tensor (detached, on the CPU) or array-like as a numpy array; ``None`` stays ``None``."""
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_image(obs) -> np.ndarray:
    """(H, W, C) observation -> displayable (H, W, 3) float in [0, 1] (or (H, W) grey)."""
    raw = to_numpy(obs)
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


def field(result: Any, name: str, index: int):
    """``result.name[index]`` for a PGCAResult-like object or a mapping; ``None`` if absent."""
    value = result.get(name) if isinstance(result, Mapping) else getattr(result, name, None)
    if value is None:
        return None
    value = to_numpy(value)
    return value[index] if value.ndim >= 1 else value


# ---------------------------------------------------------------------------------------------
# axes decorations and overlays
# ---------------------------------------------------------------------------------------------

def colorbar(fig: Figure, ax, mappable, label: str | None = None) -> None:
    """A slim colour bar beside ``ax`` (small ticks, ``%.2g`` labels)."""
    cb = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.03)
    cb.ax.tick_params(labelsize=7)
    cb.ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    if label:
        cb.set_label(label, fontsize=7)


def mask_edges(mask: np.ndarray) -> list[list[tuple[float, float]]]:
    """Pixel-exact boundary of a boolean (H, W) mask as line segments in imshow coordinates."""
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    segments = []
    rows, cols = np.nonzero(m[1:, 1:-1] != m[:-1, 1:-1])  # edge above pixel (r, c)
    segments += [[(c - 0.5, r - 0.5), (c + 0.5, r - 0.5)] for r, c in zip(rows, cols)]
    rows, cols = np.nonzero(m[1:-1, 1:] != m[1:-1, :-1])  # edge left of pixel (r, c)
    segments += [[(c - 0.5, r - 0.5), (c - 0.5, r + 0.5)] for r, c in zip(rows, cols)]
    return segments


def outline(ax, relevance):
    """Outline the ground-truth relevance mask (cyan, pixel edges); returns the artist."""
    if relevance is None or not np.any(relevance):
        return None
    lines = LineCollection(mask_edges(relevance), colors=RELEVANCE_COLOUR, linewidths=1.2)
    ax.add_collection(lines)
    return lines


def grey(img: np.ndarray, level: float = 0.5) -> np.ndarray:
    """Dimmed luminance of an observation: the backdrop of an overlay, so that the overlay's
    colours come from its colour map alone."""
    lum = img if img.ndim == 2 else img[..., :3] @ np.array([0.299, 0.587, 0.114])
    return level * lum
