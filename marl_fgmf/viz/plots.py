"""Training and tournament plots: :func:`plot_learning_curve` (mean return against environment
steps), :func:`plot_heatmap` (annotated matrix), :func:`plot_curves` (y(x) with 95 % bands) and
:func:`plot_performance_profiles` (fraction of runs above tau, with bootstrap bands)."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np

from marl_fgmf.viz.common import colorbar, new_figure, save_figure, to_numpy

__all__ = ["plot_learning_curve", "plot_heatmap", "plot_curves", "plot_performance_profiles"]

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
    fig = new_figure(6.0, 3.8)
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
    return _finish(fig, ax, "environment steps" if x in _X_KEYS else x,
                   "mean episodic return" if y in _Y_KEYS else y, title, path)


def plot_heatmap(matrix, row_labels: Sequence[str], col_labels: Sequence[str],
                 path: str | os.PathLike, title: str = "", *, cmap: str = "viridis",
                 fmt: str = ".2f", cbar_label: str | None = None, vmin: float | None = None,
                 vmax: float | None = None, xlabel: str | None = None,
                 ylabel: str | None = None) -> Path:
    """Annotated heat map (e.g. defenders x attackers robust return); NaN cells are grey.

    Cell text is black or white depending on the cell colour's luminance, so every number
    stays readable.
    """
    data = np.asarray(to_numpy(matrix), dtype=np.float64)
    if data.ndim != 2 or data.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"matrix shape {data.shape} does not match {len(row_labels)} row "
                         f"labels x {len(col_labels)} column labels")
    rows, cols = data.shape
    fig = new_figure(max(4.0, 1.1 * cols + 2.5), max(3.0, 0.55 * rows + 1.8))
    ax = fig.subplots()
    masked = np.ma.masked_invalid(data)
    colours = matplotlib.colormaps[cmap].with_extremes(bad="lightgrey")
    im = ax.imshow(masked, cmap=colours, vmin=vmin, vmax=vmax, aspect="auto")
    colorbar(fig, ax, im, cbar_label)
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
    xs, ys = np.asarray(to_numpy(xs), float), np.asarray(to_numpy(ys), float)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"curve x {xs.shape} and y {ys.shape} must be equal 1-D shapes")
    return xs, ys, None if err is None else np.asarray(to_numpy(err), float)


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
    fig = new_figure(6.0, 3.8)
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
    return _finish(fig, ax, xlabel, ylabel, title, path)


def plot_performance_profiles(profiles: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                              *, title: str = "Performance profiles",
                              xlabel: str = "normalized robust return tau",
                              ylabel: str = "fraction of runs > tau") -> Path:
    """Performance profiles (Agarwal et al., NeurIPS 2021): one line per method, the fraction
    of runs scoring above ``tau``, with its confidence band where given.

    Args:
        profiles: ``{method: {"tau": .., "fraction": .., "low": .., "high": ..}}`` (what
            ``marl_fgmf.stats.performance_profile`` returns; ``low`` and ``high`` optional).
        path: PNG to write.
    """
    if not profiles:
        raise ValueError("plot_performance_profiles got no profiles")
    fig = new_figure(6.0, 3.8)
    ax = fig.subplots()
    for label, profile in profiles.items():
        if "tau" not in profile or "fraction" not in profile:
            raise ValueError(f"profile {label!r} needs 'tau' and 'fraction'; has {sorted(profile)}")
        taus, fraction = _curve((profile["tau"], profile["fraction"]))[:2]
        order = np.argsort(taus)
        line, = ax.plot(taus[order], fraction[order], linewidth=1.8, label=str(label))
        if profile.get("low") is not None and profile.get("high") is not None:
            low = np.asarray(to_numpy(profile["low"]), float)[order]
            high = np.asarray(to_numpy(profile["high"]), float)[order]
            ax.fill_between(taus[order], low, high, color=line.get_color(), alpha=0.2,
                            linewidth=0)
    ax.set_ylim(-0.02, 1.02)
    return _finish(fig, ax, xlabel, ylabel, title, path)


def _finish(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str,
            path: str | os.PathLike) -> Path:
    """Labels, title, grid and legend of a line plot, then write it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)
