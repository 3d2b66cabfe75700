"""marl_fgmf.viz: figures and the episode GIF are written (atomically) and non-empty."""
from __future__ import annotations

import csv
import os
import stat

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from agents import make_policy_network
from marl_fgmf import viz
from marl_fgmf.pgca import explain
from marl_fgmf.stats import performance_profile

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def frame():
    """Two agents' observations, their PGCA result and relevance masks."""
    torch.manual_seed(0)
    policy = make_policy_network("cnn", (9, 9, 3), 5, channels=(4, 8, 8), hidden=16)
    obs = torch.zeros(2, 9, 9, 3)
    obs[0, 0:3, 0:3, 0] = 1.0
    obs[0, 6:9, 3:6, 1] = 1.0
    obs[1, 3:6, 6:9, 0] = 1.0
    obs[1, 0:3, 3:6, 1] = 1.0
    relevance = obs.amax(-1) > 0
    return obs, explain(policy, obs, steps=4), relevance


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000


def no_temp_files(directory):
    """No temporary file left beside the outputs (marl_fgmf.io names them ``.<name>.tmp<pid>``)."""
    return not [p for p in directory.iterdir() if p.name.startswith(".") or ".tmp" in p.name]


def test_plot_agent_frame(tmp_path, frame):
    obs, result, relevance = frame
    out = viz.plot_agent_frame(obs[1], result, 1, agent="agent_1",
                               action_names=viz.BEACON_ACTIONS, relevance=relevance[1],
                               path=tmp_path / "sub" / "agent_1.png")
    assert out == tmp_path / "sub" / "agent_1.png"
    assert_png(out)
    assert no_temp_files(out.parent)
    fig = viz.plot_agent_frame(obs[0], result, 0)  # no path: the Figure itself
    assert isinstance(fig, Figure) and len(fig.axes) >= 5


def test_plot_agent_frame_with_sgam_mask_and_mapping(tmp_path, frame):
    obs, result, _ = frame
    data = {"consensus": result.consensus, "gradient": result.gradient,
            "perturbation": result.perturbation, "probs": result.probs,
            "actions": result.actions, "sgam_mask": torch.rand(2, 9, 9)}
    fig = viz.plot_agent_frame(obs[0], data, 0)
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "SGAM mask" in titles and "consensus" in titles
    only_map = viz.plot_agent_frame(obs[0], {"consensus": result.consensus}, 0,
                                    labels={"consensus": "IG over obs"})
    assert [ax.get_title() for ax in only_map.axes][1] == "IG over obs"
    assert_png(viz.save_figure(only_map, tmp_path / "only.png"))


def test_files_follow_the_umask_and_replace_the_old_file(tmp_path, frame):
    obs, result, _ = frame
    fig = viz.plot_agent_frame(obs[0], result, 0)
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")
    old_mask = os.umask(0o027)
    try:
        out = viz.save_figure(fig, target)
    finally:
        os.umask(old_mask)
    assert out == target and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert_png(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]


def test_plot_frame(tmp_path, frame):
    obs, result, relevance = frame
    out = viz.plot_frame(obs, result, agents=["red", "blue"], action_names=viz.BEACON_ACTIONS,
                         relevance=relevance, title="frame 0", path=tmp_path / "frame.png")
    assert_png(out)
    with pytest.raises(ValueError, match="1 agent labels for 2 observations"):
        viz.plot_frame(obs, result, agents=["red"])


def test_animate_episode_has_one_frame_per_step(tmp_path, frame):
    obs, result, relevance = frame
    steps = 4
    frames = [torch.roll(obs, t, dims=2) for t in range(steps)]
    maps = torch.stack([torch.roll(result.consensus, t, dims=2) for t in range(steps)])
    actions = torch.tensor([[1, 2]] * steps)
    out = viz.animate_episode(frames, maps, tmp_path / "episode.gif", fps=5, actions=actions,
                              action_names=viz.BEACON_ACTIONS,
                              relevance=relevance[None].repeat(steps, 1, 1, 1))
    assert out.stat().st_size > 1000 and no_temp_files(tmp_path)
    with Image.open(out) as gif:
        assert gif.format == "GIF" and gif.n_frames == steps
        assert gif.info["duration"] == 200
    with pytest.raises(ValueError, match="3 frames for 4 consensus steps"):
        viz.animate_episode(frames[:3], maps, tmp_path / "bad.gif")


def test_plot_learning_curve_from_csv_and_records(tmp_path):
    path = tmp_path / "progress.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["env_steps", "mean_return", "defense"])
        writer.writeheader()
        for i in range(6):
            writer.writerow({"env_steps": 1000 * i, "mean_return": 0.5 * i, "defense": "none"})
            writer.writerow({"env_steps": 1000 * i, "mean_return": 0.4 * i, "defense": "fgmf"})
    assert_png(viz.plot_learning_curve(path, tmp_path / "curve.png", group="defense",
                                       reference=3.0, reference_label="scripted"))
    records = [{"num_env_steps_sampled_lifetime": s, "episode_return_mean": r, "ci": 0.1}
               for s, r in [(0, 0.0), (500, 1.0), (1000, 1.5)]]
    assert_png(viz.plot_learning_curve(records, tmp_path / "curve2.png", ci="ci"))
    with pytest.raises(ValueError, match="not found"):
        viz.plot_learning_curve([{"a": 1}], tmp_path / "x.png")


def test_plot_heatmap_and_curves(tmp_path):
    matrix = np.array([[1.0, 0.5, np.nan], [0.2, 0.9, 0.4]])
    assert_png(viz.plot_heatmap(matrix, ["ppo", "fgmf"], ["none", "fgsm", "pgd"],
                                tmp_path / "heat.png", "robust return", cbar_label="return"))
    with pytest.raises(ValueError, match=r"matrix shape \(2, 3\) does not match 2 row labels "
                                         r"x 2 column labels"):
        viz.plot_heatmap(matrix, ["a", "b"], ["c", "d"], tmp_path / "bad.png")
    eps = [0.0, 2 / 255, 4 / 255, 8 / 255]
    curves = {"ppo": (eps, [3.0, 2.0, 1.0, 0.2]),
              "fgmf": (eps, [2.9, 2.7, 2.4, 1.8], [0.1, 0.1, 0.2, 0.3])}
    assert_png(viz.plot_curves(curves, tmp_path / "robust.png", reference=3.0, eps_in_255=True,
                               title="robust return vs eps"))


def test_plot_performance_profiles(tmp_path):
    rng = np.random.default_rng(0)
    taus = np.linspace(-0.25, 1.5, 36)
    profiles = {name: performance_profile({t: rng.normal(mu + d, 0.25, 5)
                                           for t, d in [("beacon", 0.1), ("pong", -0.1)]},
                                          taus, n_resamples=200)
                for name, mu in [("fgmf", 0.8), ("ppo", 0.4)]}
    profiles["no band"] = {"tau": [0.0, 0.5, 1.0], "fraction": [1.0, 0.5, 0.0]}
    path = viz.plot_performance_profiles(profiles, tmp_path / "profiles.png")
    assert_png(path)
    with Image.open(path) as image:
        assert image.size[0] > 300 and image.size[1] > 200
    with pytest.raises(ValueError, match="got no profiles"):
        viz.plot_performance_profiles({}, tmp_path / "none.png")
    with pytest.raises(ValueError, match="needs 'tau' and 'fraction'"):
        viz.plot_performance_profiles({"m": {"tau": [0.0]}}, tmp_path / "bad.png")
