"""The model-free baselines (marl_fgmf/attribution/baselines.py) and what GHR means on beacon.

``random``: uniform over the non-background pixels (background = the frame's most common colour,
or black), seeded; ``brightness``: the summed channel intensity. Both are registered explainers
with the common call, need no policy, and on real beacon frames reach GHR ~0.35, far above the
all-pixel chance level |R| / HW = 0.041 (scripts/bench_baselines.py prints the full table).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from marl_fgmf import metrics
from marl_fgmf.attribution import BrightnessBaseline, RandomBaseline, background_mask
from marl_fgmf.explainers import attribution_map, make_explainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def frames() -> torch.Tensor:
    """Two 4x4 frames: frame 0 black with two objects, frame 1 on a grey floor."""
    x = torch.zeros(2, 4, 4, 3)
    x[0, 0, 0] = torch.tensor([1.0, 0.2, 0.2])
    x[0, 2, 1:3] = 0.5
    x[1] = 0.4  # grey floor: the most common colour
    x[1, 3, 3] = torch.tensor([0.0, 0.0, 0.0])  # one black object pixel
    x[1, 1, 1] = torch.tensor([0.9, 0.9, 0.1])
    return x


def test_background_mask_mode_and_zero():
    x = frames()
    fg_mode = ~background_mask(x, "mode")
    assert fg_mode[0].sum() == 3 and fg_mode[0, 0, 0] and fg_mode[0, 2, 1] and fg_mode[0, 2, 2]
    # the grey floor is background under "mode"; the black pixel is an object there
    assert fg_mode[1].sum() == 2 and fg_mode[1, 3, 3] and fg_mode[1, 1, 1]
    fg_zero = ~background_mask(x, "zero")
    assert torch.equal(fg_zero[0], fg_mode[0])  # black floor: both rules agree
    assert fg_zero[1].sum() == 15 and not fg_zero[1, 3, 3]
    # a pixel is background only when ALL its channels match
    y = torch.zeros(1, 2, 2, 3)
    y[0, 0, 0, 2] = 0.1
    assert (~background_mask(y, "zero")).sum() == 1 and (~background_mask(y)).sum() == 1


def test_random_is_uniform_over_the_foreground_and_seeded():
    x = frames()
    maps = RandomBaseline(None).attribute(x, seed=5)
    fg = ~background_mask(x)
    assert maps.shape == (2, 4, 4) and maps.dtype == x.dtype
    assert (maps[fg] > 0).all() and (maps[fg] <= 1).all() and (maps[~fg] == 0).all()
    assert torch.equal(maps, RandomBaseline(None).attribute(x, seed=5))  # reproducible
    assert not torch.equal(maps, RandomBaseline(None).attribute(x, seed=6))
    zero = RandomBaseline(None).attribute(x, background="zero", seed=5)
    assert (zero[1] > 0).sum() == 15  # the grey floor counts as foreground under "zero"
    # an all-background frame: uniform over all its pixels
    flat = RandomBaseline(None).attribute(torch.full((1, 3, 3, 3), 0.2), seed=0)
    assert (flat > 0).all()


def test_random_top_k_is_a_uniform_draw_from_the_foreground():
    """Over many seeds every foreground pixel is the peak equally often; the background never."""
    x = torch.zeros(1, 5, 5, 3)
    x[0, 1, 1:4] = 0.7  # three foreground pixels
    x[0, 3, 2] = torch.tensor([0.1, 0.9, 0.3])  # a fourth
    fg = ~background_mask(x)
    counts = torch.zeros(5, 5)
    for seed in range(800):
        m = RandomBaseline(None).attribute(x, seed=seed)[0]
        counts.view(-1)[m.argmax()] += 1
    assert counts[~fg[0]].sum() == 0
    assert counts[fg[0]].min() > 150, counts[fg[0]]  # 200 expected each


def test_brightness_is_the_channel_sum_and_ignores_the_policy():
    x = frames()
    m = BrightnessBaseline(None).attribute(x)
    assert torch.equal(m, x.sum(-1))
    torch.manual_seed(0)
    assert torch.equal(make_explainer("brightness", torch.nn.Linear(3, 5)).attribute(x), m)
    assert torch.equal(attribution_map("brightness", None, x, torch.tensor([0, 1])), m)


def test_expected_ghr_of_random_is_the_foreground_fraction():
    """GHR of the random baseline averages to |R & F| / |F| (here 2 of 5 foreground pixels
    relevant, |R| = 2), the all-pixel uniform map to |R| / HW."""
    x = torch.zeros(1, 6, 6, 3)
    x[0, 0, :5] = 0.8
    rel = torch.zeros(6, 6, dtype=torch.bool)
    rel[0, :2] = True
    values = [float(metrics.ghr(RandomBaseline(None).attribute(x, seed=s), rel))
              for s in range(600)]
    assert abs(sum(values) / len(values) - 2 / 5) < 0.03
    uniform = metrics.ghr(torch.ones(1, 6, 6), rel)
    assert float(uniform) == pytest.approx(2 / 36)


def test_bad_input_one_line():
    x = frames()
    cases = [(lambda: RandomBaseline(None).attribute(x, background="grey"),
              "background must be one of mode, zero, got 'grey'"),
             (lambda: RandomBaseline(None).attribute(x, seed=1.5), "seed must be an integer"),
             (lambda: RandomBaseline(None).attribute(x, torch.tensor([1, 2, 3])),
              "actions has 3 entries for a batch of 2"),
             (lambda: BrightnessBaseline(None).attribute(x * 255), r"must lie in \[0, 1\]"),
             (lambda: BrightnessBaseline(None).attribute(x[0]), r"shape \(B, H, W, C\)"),
             (lambda: background_mask(x.to(torch.uint8)), "floating point")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_measured_ghr_of_the_baselines_on_beacon_frames():
    """400 real beacon observations (scripts/bench_baselines.py --n-obs 400): the all-pixel
    chance level is |R| / HW = 18/441 = 0.041, and a uniform map over all pixels measures it;
    the random map over the non-background pixels scores 0.342 (its exact expectation
    |R & F| / |F| is 0.345) and brightness 0.360: GHR ~0.04 is not the bar a method must beat."""
    import bench_baselines

    obs, rel = bench_baselines.collect(400, seed=0, p_scripted=0.8)
    assert obs.shape == (400, 21, 21, 3) and (rel.flatten(1).sum(1) == 18).all()
    values = bench_baselines.measure(obs, rel, seed=0)
    mean = {row: sum(v["ghr"]) / len(v["ghr"]) for row, v in values.items()}
    assert mean["chance"] == pytest.approx(18 / 441)
    assert abs(mean["uniform"] - 18 / 441) < 0.01
    assert mean["random_expected"] == pytest.approx(0.345, abs=0.005)
    assert mean["random"] == pytest.approx(0.342, abs=0.005)  # the stated numbers, seeded
    assert mean["brightness"] == pytest.approx(0.360, abs=0.005)
    for row in ("random", "brightness"):
        assert mean[row] > 7 * mean["chance"], row
