"""Figures and episode animations: per-agent explanations, learning curves, heat maps, curves.

A utility package (like :mod:`marl_fgmf.io`): it draws arrays and tensors with matplotlib and
imports only :mod:`marl_fgmf.io`, :mod:`marl_fgmf.protocol` and third-party code, so the
training loop in ``agents`` can draw its learning curve without importing a workflow.

Everything is drawn on matplotlib's Agg canvas (``Figure`` + ``FigureCanvasAgg``, no pyplot
state, no display needed, the process-wide backend untouched) and every file is written
atomically with :func:`marl_fgmf.io.atomic_write_bytes` (a temporary file in the destination
directory, then ``os.replace``), so a reader never sees half a PNG or GIF. GIFs are assembled
with Pillow.

Colour maps (all perceptually uniform and readable in grey scale; see Crameri et al. 2020):
``magma`` for the gradient and perturbation magnitudes, ``viridis`` for the consensus overlay
(over the observation's dimmed grey luminance, so colours come from the map alone; zero
consensus is transparent) and heat maps, ``gray`` for the SGAM mask (white = passed
unchanged). The ground-truth relevance mask, when given, is outlined in cyan along pixel edges.

Modules:

* :mod:`.common` the Agg figure, atomic :func:`save_figure`, array and overlay helpers.
* :mod:`.figures` :func:`plot_agent_frame` (one agent, one frame: observation, SGAM mask (if
  any), gradient map, perturbation map, consensus over the observation, action probabilities)
  and :func:`plot_frame` (the same, one row per agent).
* :mod:`.animation` :func:`animate_episode` (GIF of every agent's consensus map over its
  observation, step by step) and :func:`render_rgb`.
* :mod:`.plots` :func:`plot_learning_curve` (mean return against environment steps),
  :func:`plot_heatmap` (annotated matrix: defenders x attackers), :func:`plot_curves` (several
  y(x) curves with error bands: robust return against eps), :func:`plot_performance_profiles`
  (fraction of runs above tau per method, with bootstrap bands).
"""
from __future__ import annotations

from marl_fgmf.viz.animation import animate_episode, render_rgb
from marl_fgmf.viz.common import (CONSENSUS_CMAP, DPI, MAGNITUDE_CMAP, RELEVANCE_COLOUR,
                                  new_figure, save_figure)
from marl_fgmf.viz.figures import BEACON_ACTIONS, PANEL_TITLES, plot_agent_frame, plot_frame
from marl_fgmf.viz.plots import (plot_curves, plot_heatmap, plot_learning_curve,
                                 plot_performance_profiles)

__all__ = ["plot_agent_frame", "plot_frame", "animate_episode", "plot_learning_curve",
           "plot_heatmap", "plot_curves", "plot_performance_profiles", "save_figure",
           "render_rgb", "BEACON_ACTIONS", "PANEL_TITLES", "new_figure", "DPI", "MAGNITUDE_CMAP",
           "CONSENSUS_CMAP", "RELEVANCE_COLOUR"]
