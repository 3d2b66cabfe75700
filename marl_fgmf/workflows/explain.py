"""Explain every agent's actions over an episode, with figures: ``marl-fgmf explain``'s work.

Plays ``episodes`` episodes of the run's environment (or ``env``) with the greedy policy and
explains the greedy action of every agent of every ``every``-th step, all agents of a frame in
ONE batched call (:func:`marl_fgmf.pgca.explain` for ``pgca``, the explainer of
:data:`marl_fgmf.explainers.METHODS` otherwise). :func:`explain_run` writes into ``out``:

* ``frame_XXXX.png``: the first, middle and last explained steps of the first episode, one row
  per agent (observation with the ground-truth relevance outlined when the env gives one, the
  SGAM mask when the policy has one, gradient map, perturbation map, consensus over the
  observation, action probabilities; :func:`marl_fgmf.viz.plot_frame`);
* ``episode_XX.gif``: every explained step of episode ``XX``, every agent's map over its
  observation (:func:`marl_fgmf.viz.animate_episode`), one GIF frame per explained step;
* ``metrics.json``: per agent and pooled, mean and 95 % half-width (Student t,
  :func:`marl_fgmf.stats.summarize`) over the explained steps of GHR and pointing game (when
  the env gives ``info[agent]["relevance"]``), deletion and insertion AUC, PGCA agreement
  (``pgca`` only) and the explained action's probability; each metric's direction is in
  ``higher_is_better``.

Every file is written atomically. ``marl-fgmf explain`` and ``marl-fgmf demo`` call
:func:`explain_run`; :func:`format_summary` is the table they print. Bad input (a missing
checkpoint, an unknown method, env or policy id, a setting the method does not take) raises
:class:`~marl_fgmf.workflows.common.UsageError` or ``ValueError`` (one line) before any work.
"""
from __future__ import annotations

import inspect
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.checkpoint import check_policy_fits_env, load_agent_policies, run_env
from envs import is_import_path, list_envs, make_env
from marl_fgmf import explainers, viz
from marl_fgmf import metrics as M
from marl_fgmf import pgca
from marl_fgmf.io import atomic_write_text, to_jsonable
from marl_fgmf.protocol import eval_mode
from marl_fgmf.stats import summarize
from marl_fgmf.workflows.common import UsageError, check_output

__all__ = ["DIRECTIONS", "METHOD_NAMES", "METHOD_TITLES", "METRIC_KEYS", "explain_run",
           "format_summary", "metric_summary", "select_frames"]

METHOD_NAMES = ("pgca", *(m for m in explainers.METHODS if m != "pgca"))
"""The explainers ``--method`` accepts: the keys of :data:`marl_fgmf.explainers.METHODS`, PGCA
(the default) first; ``random`` and ``brightness`` are the model-free baselines."""

METRIC_KEYS = ("ghr", "pointing_game", "deletion_auc", "insertion_auc", "agreement", "action_prob")
"""Per-agent metrics of ``metrics.json`` (GHR and pointing game need relevance masks,
agreement is PGCA's)."""

DIRECTIONS = {"agreement": True, "action_prob": None}
"""Directions of the metrics :data:`marl_fgmf.metrics.HIGHER_IS_BETTER` does not list: PGCA's
agreement (higher: both paradigms rank the pixels alike) and the explained action's probability
(descriptive, no direction)."""

METHOD_TITLES = {"pgca": "PGCA consensus", "ig": "Integrated Gradients |IG|",
                 "smoothgrad": "SmoothGrad |SG|", "occlusion": "occlusion |drop|",
                 "gradcampp": "Grad-CAM++", "rise": "RISE",
                 "random": "random baseline (foreground)", "brightness": "brightness baseline"}


def metric_summary(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "ci95", "n"}`` of the finite values: :func:`marl_fgmf.stats.summarize`
    (Student-t 95 % half-width) in ``metrics.json``'s record, ``None`` where undefined (no
    values, or one value: its half-width)."""
    stats = summarize([float(v) for v in values if math.isfinite(float(v))])
    return to_jsonable({k: stats[k] for k in ("mean", "ci95", "n")})


def _check_settings(method: str, settings: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the setting when ``method``'s call does not take it."""
    fn = pgca.explain if method == "pgca" else explainers.METHODS[method].attribute
    params = inspect.signature(fn).parameters
    allowed = [k for k, v in params.items() if k not in ("self", "policy", "obs", "actions")
               and v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"method {method!r} has no setting {', '.join(map(repr, unknown))}; "
                         f"its settings: {', '.join(allowed)}")


def _explain_group(method: str, policy, obs, settings: dict[str, Any]) -> dict[str, Any]:
    """Explain a (B, H, W, C) batch (all agents of a frame that share ``policy``) in one call.

    Returns a mapping in :func:`marl_fgmf.viz.plot_frame`'s vocabulary: ``consensus`` (the
    shown map, in [0, 1]), ``actions``, ``action_prob``, ``probs``; for PGCA also
    ``gradient``, ``perturbation``, ``agreement``, ``sgam_mask``; ``raw`` the (B, H, W)
    magnitude map the metrics rank.
    """
    if method == "pgca":
        res = pgca.explain(policy, obs, **settings)
        return {"consensus": res.consensus, "raw": res.consensus, "gradient": res.gradient,
                "perturbation": res.perturbation, "agreement": res.agreement,
                "actions": res.actions, "action_prob": res.action_prob, "probs": res.probs,
                "sgam_mask": res.sgam_mask}
    with eval_mode(policy), torch.no_grad():
        logits = policy(obs)
        sgam = pgca.sgam_mask(policy)
    actions = logits.argmax(-1)
    probs = torch.softmax(logits.double(), -1).to(obs.dtype)
    raw = explainers.spatial_map(explainers.make_explainer(method, policy).attribute(
        obs, actions, **settings))
    low = raw.flatten(1).amin(1).view(-1, 1, 1)  # min-max for display: RISE's floor is high
    return {"consensus": pgca.normalize_map(raw - low), "raw": raw, "actions": actions,
            "action_prob": probs.gather(1, actions[:, None]).squeeze(1), "probs": probs,
            "sgam_mask": sgam}


def select_frames(n: int) -> list[int]:
    """Indices of the first, middle and last of ``n`` explained steps (distinct)."""
    return sorted({0, (n - 1) // 2, n - 1}) if n else []


def explain_run(checkpoint: str | Path, out: str | Path, env: str | None = None,
                episodes: int = 1, method: str = "pgca", max_steps: int | None = None,
                every: int = 1, seed: int = 0, policy_id: str | None = None,
                env_kwargs: dict[str, Any] | None = None,
                settings: dict[str, Any] | None = None, fps: float = 4.0,
                figures: bool = True, gif: bool = True, metric_steps: int = 20,
                progress: bool = True) -> dict[str, Any]:
    """Roll out greedy episodes of a trained checkpoint and explain every agent's actions.

    Args:
        checkpoint: run directory or checkpoint (``marl-fgmf train --out``).
        out: output directory (created).
        env, env_kwargs: environment and its settings; default the run's (``run.json``).
        episodes: episodes to play; episode ``e`` is reset with ``seed + e``.
        method: one of :data:`METHOD_NAMES`.
        max_steps: cap on each episode's steps (default: the env's own length).
        every: explain every ``every``-th step (steps ``0, every, 2 every, ...``).
        policy_id: use this policy module for every agent.
        settings: keyword settings of the explainer (e.g. ``{"steps": 16}``).
        fps: GIF speed.
        figures, gif: write the frame figures / the episode GIFs.
        metric_steps: ``K`` of the deletion and insertion curves.
        progress: tqdm progress bar over the steps.
    Returns:
        The content of ``metrics.json``: settings, ``agents`` (per agent), ``all_agents``
        (pooled), ``higher_is_better``, ``episodes`` (steps, explained steps, returns, GIF) and
        ``figures`` (paths), ``explained_steps``, ``time_s``.
    Raises:
        UsageError: missing checkpoint, unknown method.
        ValueError: unknown env, env setting, policy id or explainer setting.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.exists():
        raise UsageError(f"checkpoint not found: {checkpoint}")
    out = check_output(out, "--out", "dir")
    if method not in METHOD_NAMES:
        raise UsageError(f"unknown method {method!r}; allowed: {', '.join(METHOD_NAMES)}")
    for name, value in (("episodes", episodes), ("every", every), ("metric_steps", metric_steps)):
        if int(value) < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if max_steps is not None and int(max_steps) < 1:
        raise UsageError(f"max_steps must be >= 1, got {max_steps}")
    settings = dict(settings or {})
    _check_settings(method, settings)

    env_name, env_kwargs = run_env(checkpoint, env, env_kwargs)
    if env_name not in list_envs() and not is_import_path(env_name):
        raise UsageError(f"unknown env {env_name!r}; allowed: {', '.join(list_envs())}")
    environment = make_env(env_name, **env_kwargs)
    agents = list(environment.possible_agents)
    # absolute: RLlib's loader rejects some relative paths; agents sharing a module share it
    policies = load_agent_policies(checkpoint.resolve(), agents, policy_id)
    for a in agents:
        check_policy_fits_env(policies[a], environment, a)
    action_names = viz.BEACON_ACTIONS if env_name == "beacon" else None
    env_len = getattr(environment, "max_steps", None) or getattr(
        getattr(environment, "unwrapped", None), "max_steps", None)
    per_episode = min(x for x in (max_steps, env_len) if x) if (max_steps or env_len) else None

    out.mkdir(parents=True, exist_ok=True)
    values: dict[str, dict[str, list[float]]] = {a: {k: [] for k in METRIC_KEYS} for a in agents}
    episode_rows, figure_paths = [], []
    has_relevance = True
    start = time.perf_counter()
    bar = tqdm(total=per_episode * episodes if per_episode else None, unit="step",
               desc=f"explain ({method})", disable=not progress, leave=False)
    try:
        for ep in range(int(episodes)):
            obs, infos = environment.reset(seed=int(seed) + ep)
            returns = {a: 0.0 for a in agents}
            frames: list[dict[str, Any]] = []  # one per explained step
            t = 0
            while environment.agents and (max_steps is None or t < int(max_steps)):
                live = [a for a in environment.agents if a in obs]
                explain_now = t % int(every) == 0
                actions: dict[str, int] = {}
                step_rows: dict[str, dict[str, Any]] = {}
                groups: dict[int, list[str]] = {}
                for a in live:
                    groups.setdefault(id(policies[a]), []).append(a)
                for members in groups.values():
                    policy = policies[members[0]]
                    param = next(policy.parameters(), None)
                    device = param.device if param is not None else torch.device("cpu")
                    x = torch.from_numpy(np.stack([obs[a] for a in members])).to(device)
                    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
                    if not explain_now:
                        with torch.no_grad():
                            greedy = policy(x).argmax(-1)
                        actions.update({a: int(g) for a, g in zip(members, greedy.tolist())})
                        continue
                    res = _explain_group(method, policy, x, settings)  # one call per frame
                    acts = res["actions"]
                    rel = [infos.get(a, {}).get("relevance") for a in members]
                    with_rel = all(r is not None and np.any(r) for r in rel)
                    has_relevance = has_relevance and with_rel
                    rel_t = torch.as_tensor(np.stack(rel)).to(device) if with_rel else None
                    deletion = M.deletion_auc(policy, x, res["raw"], acts, steps=metric_steps)
                    insertion = M.insertion_auc(policy, x, res["raw"], acts, steps=metric_steps)
                    hit = M.ghr(res["raw"], rel_t) if with_rel else None
                    point = M.pointing_game(res["raw"], rel_t) if with_rel else None
                    for i, a in enumerate(members):
                        actions[a] = int(acts[i])
                        v = values[a]
                        v["deletion_auc"].append(float(deletion[i]))
                        v["insertion_auc"].append(float(insertion[i]))
                        v["action_prob"].append(float(res["action_prob"][i]))
                        if with_rel:
                            v["ghr"].append(float(hit[i]))
                            v["pointing_game"].append(float(point[i]))
                        if "agreement" in res:
                            v["agreement"].append(float(res["agreement"][i]))
                        step_rows[a] = {k: (None if val is None else val[i].detach().cpu())
                                        for k, val in res.items() if torch.is_tensor(val) or val is None}
                        step_rows[a]["obs"] = x[i].cpu()
                        step_rows[a]["relevance"] = None if not with_rel else rel[i]
                if explain_now and step_rows:
                    frames.append({"t": t, "rows": step_rows})
                obs, rewards, _, _, infos = environment.step(actions)
                for a, r in rewards.items():
                    returns[a] = returns.get(a, 0.0) + float(r)
                t += 1
                bar.update(1)
            ep_row = {"episode": ep, "seed": int(seed) + ep, "steps": t,
                      "explained_steps": len(frames), "return": returns}
            if frames and gif:
                ep_row["gif"] = str(_write_gif(frames, agents, out / f"episode_{ep:02d}.gif",
                                               method, action_names, fps, int(every)))
            if frames and figures and ep == 0:
                for k in select_frames(len(frames)):
                    figure_paths.append(str(_write_frame_figure(
                        frames[k], agents, out / f"frame_{frames[k]['t']:04d}.png", method,
                        action_names, ep)))
            episode_rows.append(ep_row)
    finally:
        bar.close()
        environment.close()

    keys = [k for k in METRIC_KEYS if any(values[a][k] for a in agents)]
    result = {
        "checkpoint": str(checkpoint), "env": env_name, "env_kwargs": env_kwargs,
        "method": method, "settings": {k: (v if isinstance(v, (int, float, str, bool, type(None)))
                                           else str(v)) for k, v in settings.items()},
        "episodes": episode_rows, "every": int(every), "max_steps": max_steps, "seed": int(seed),
        "metric_steps": int(metric_steps), "relevance": has_relevance,
        "explained_steps": sum(r["explained_steps"] for r in episode_rows),
        "agents": {a: {k: metric_summary(values[a][k]) for k in keys} for a in agents},
        "all_agents": {k: metric_summary([v for a in agents for v in values[a][k]])
                       for k in keys},
        "higher_is_better": {k: M.HIGHER_IS_BETTER.get(k, DIRECTIONS.get(k)) for k in keys},
        "figures": figure_paths,
        "time_s": round(time.perf_counter() - start, 2),
    }
    result["metrics_json"] = str(out / "metrics.json")
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
    return result


def _frame_result(frame: dict[str, Any], agents: list[str]):
    """Stack one explained step's per-agent rows into (obs, result mapping, relevance, names)."""
    names = [a for a in agents if a in frame["rows"]]
    rows = [frame["rows"][a] for a in names]
    obs = torch.stack([r["obs"] for r in rows])
    keys = [k for k in ("consensus", "gradient", "perturbation", "agreement", "actions",
                        "action_prob", "probs", "sgam_mask") if rows[0].get(k) is not None]
    result = {k: torch.stack([r[k] for r in rows]) for k in keys}
    rel = None
    if all(r["relevance"] is not None for r in rows):
        rel = np.stack([r["relevance"] for r in rows])
    return obs, result, rel, names


def _write_frame_figure(frame, agents, path, method, action_names, episode):
    obs, result, rel, names = _frame_result(frame, agents)
    labels = None if method == "pgca" else {
        "consensus": f"{METHOD_TITLES[method]}\nover obs (min-max)",
        "consensus_colorbar": f"{METHOD_TITLES[method]}, scaled to [0, 1]"}
    return viz.plot_frame(obs, result, agents=names, action_names=action_names, relevance=rel,
                          title=f"episode {episode}, step {frame['t']}: {METHOD_TITLES[method]}",
                          labels=labels, path=path)


def _write_gif(frames, agents, path, method, action_names, fps, every=1):
    stacked = [_frame_result(f, agents) for f in frames]
    names = stacked[0][3]
    if any(s[3] != names for s in stacked):  # agents left mid-episode: keep the full rows
        keep = [i for i, s in enumerate(stacked) if s[3] == names]
        stacked = [stacked[i] for i in keep]
    maps = np.stack([s[1]["consensus"].numpy() for s in stacked])
    acts = np.stack([s[1]["actions"].numpy() for s in stacked])
    rel = None
    if all(s[2] is not None for s in stacked):
        rel = np.stack([s[2] for s in stacked])
    title = METHOD_TITLES[method]
    if every > 1:
        title += f", every {every} env steps"
    label = "consensus C" if method == "pgca" else f"{METHOD_TITLES[method]} (min-max)"
    return viz.animate_episode([s[0] for s in stacked], maps, path, fps=fps, agents=names,
                               actions=acts, action_names=action_names, relevance=rel,
                               title=title, map_label=label)


def format_summary(result: dict[str, Any]) -> str:
    """The pooled and per-agent metrics as a small text table, and where the files are."""
    keys = list(result["all_agents"])
    lines = [f"{result['method']} on {result['env']}: {result['explained_steps']} explained "
             f"steps in {len(result['episodes'])} episode(s), {result['time_s']:.1f}s"]
    header = f"{'agent':<12}" + "".join(f"{k:>22}" for k in keys)
    lines.append(header)

    def cell(s: dict[str, Any]) -> str:
        if s["mean"] is None:
            return f"{'-':>22}"
        half = "" if s["ci95"] is None else f" +- {s['ci95']:.3f}"
        return f"{s['mean']:.3f}{half}".rjust(22)

    for name, row in [*result["agents"].items(), ("all", result["all_agents"])]:
        lines.append(f"{name:<12}" + "".join(cell(row[k]) for k in keys))
    direction = ", ".join(f"{k} {'higher' if v else 'lower'}" for k, v in
                          result["higher_is_better"].items() if v is not None)
    lines.append(f"better: {direction}")
    gifs = [r["gif"] for r in result["episodes"] if "gif" in r]
    lines.append(f"wrote {result['metrics_json']}, {len(result['figures'])} figure(s), "
                 f"{len(gifs)} GIF(s) in {Path(result['metrics_json']).parent}")
    return "\n".join(lines)
