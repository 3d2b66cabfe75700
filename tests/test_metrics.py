"""marl_fgmf.metrics: hand-checked tiny examples, batching, directions and bad input."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from agents import make_policy_network
from marl_fgmf import metrics, stats
from marl_fgmf.perturbation import linf_pgd


class SumPolicy(nn.Module):
    """Two actions, ``logits = [c (sum(x) - offset), 0]``: ``pi(0) = sigmoid(c (S - offset))``."""

    def __init__(self, c: float = 2.0, offset: float = 0.0):
        super().__init__()
        self.c, self.offset = c, offset

    def forward(self, x):
        s = x.sum(dim=(1, 2, 3))
        return torch.stack([self.c * (s - self.offset), torch.zeros_like(s)], dim=-1)


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def trapezoid(ys: list[float]) -> float:
    k = len(ys) - 1
    return sum((ys[i] + ys[i + 1]) / 2 for i in range(k)) / k


OBS = torch.tensor([0.9, 0.1, 0.5, 0.3], dtype=torch.float64).view(1, 1, 4, 1)
ATTR = torch.tensor([0.2, 0.9, 0.5, 0.1], dtype=torch.float64).view(1, 1, 4)  # order 1, 2, 0, 3


# ------------------------------------------------------------------------------- deletion
def test_deletion_auc_by_hand():
    # K = 4: one pixel per step, removed (zeroed) in the order 1, 2, 0, 3
    sums = [1.8, 1.7, 1.2, 0.3, 0.0]
    expected = trapezoid([sigmoid(2 * s) for s in sums])
    got = metrics.deletion_auc(SumPolicy(), OBS, ATTR, steps=4, substrate="zero")
    assert got.shape == (1,) and abs(float(got) - expected) < 1e-12
    # K = 3: round(k * 4 / 3) = 0, 1, 3, 4 pixels removed
    sums3 = [1.8, 1.7, 0.3, 0.0]
    got3 = metrics.deletion_auc(SumPolicy(), OBS, ATTR, steps=3, substrate="zero")
    assert abs(float(got3) - trapezoid([sigmoid(2 * s) for s in sums3])) < 1e-12


def test_insertion_auc_by_hand():
    # from a constant 0.1 frame, insert pixels 1, 2, 0, 3; a* = 0 (the clean greedy action)
    sums = [0.4, 0.4, 0.8, 1.6, 1.8]
    policy = SumPolicy(offset=1.0)
    expected = trapezoid([sigmoid(2 * (s - 1.0)) for s in sums])
    got = metrics.insertion_auc(policy, OBS, ATTR, steps=4, substrate=0.1)
    assert abs(float(got) - expected) < 1e-12


def test_removal_curve_explains_the_given_action():
    curve = metrics.removal_curve(SumPolicy(), OBS, ATTR, actions=torch.tensor([1]), steps=4)
    sums = [1.8, 1.7, 1.2, 0.3, 0.0]
    assert torch.allclose(curve[0], torch.tensor([1 - sigmoid(2 * s) for s in sums],
                                                 dtype=torch.float64))


def test_deletion_batched_equals_unbatched_and_accepts_pixel_maps():
    torch.manual_seed(0)
    policy = make_policy_network("cnn", (9, 9, 3), 5, channels=(4, 8, 8), hidden=16).double()
    obs = torch.rand(3, 9, 9, 3, dtype=torch.float64)
    attr = torch.rand(3, 9, 9, 3, dtype=torch.float64)  # (B, H, W, C): reduced to sum_c |A|
    full = metrics.deletion_auc(policy, obs, attr, internal_batch_size=None)
    chunked = metrics.deletion_auc(policy, obs, attr, internal_batch_size=5)
    single = torch.cat([metrics.deletion_auc(policy, obs[i:i + 1], attr[i:i + 1])
                        for i in range(3)])
    assert torch.allclose(full, chunked, atol=1e-12) and torch.allclose(full, single, atol=1e-12)
    same = metrics.deletion_auc(policy, obs, attr.abs().sum(-1))
    assert torch.allclose(full, same, atol=1e-12)
    ins = metrics.insertion_auc(policy, obs, attr)
    assert ins.shape == (3,) and ((ins >= 0) & (ins <= 1)).all()


# ------------------------------------------------------------------------------- ghr, pointing
def test_ghr_by_hand():
    attr = torch.tensor([[[0.1, 0.9], [0.5, 0.2]], [[0.9, 0.1], [0.5, 0.2]]])
    rel = torch.tensor([[True, False], [True, False]])  # |R| = 2, broadcast over the batch
    assert torch.allclose(metrics.ghr(attr, rel), torch.tensor([0.5, 1.0]))
    # ties never decide by position: a constant map scores |R| / N wherever R lies
    flat = torch.ones(1, 2, 2)
    for rel in ([[True, True], [False, False]], [[False, False], [True, True]]):
        assert torch.allclose(metrics.ghr(flat, torch.tensor([rel])), torch.tensor([0.5]))
    # top-2 of [[3, 1], [1, 0]]: the 3 for sure, one of the two 1s at random
    part = torch.tensor([[[3.0, 1.0], [1.0, 0.0]]])
    assert torch.allclose(metrics.ghr(part, torch.tensor([[[True, False], [True, False]]])),
                          torch.tensor([0.75]))  # row-major order would have said 0.5


def monte_carlo(maps, k, draws=4000):
    """P(pixel in top-k) by drawing random tie orders: the oracle for the exact inclusion."""
    gen = torch.Generator().manual_seed(0)
    hits = sum((metrics._rank(maps, gen) < k).double() for _ in range(draws))
    return hits / draws


def test_tie_expectations_agree_with_random_tie_orders():
    gen = torch.Generator().manual_seed(1)
    maps = torch.randint(0, 3, (4, 5, 5), generator=gen).double()  # many ties
    rel = torch.rand(4, 5, 5, generator=gen) < 0.3
    rel[:, 0, 0] = True
    k = rel.flatten(1).sum(1)
    p = monte_carlo(maps, k[:, None])
    assert torch.allclose(metrics._inclusion(maps, k), p, atol=0.03)
    want = (p * rel.flatten(1)).sum(1) / k
    assert torch.allclose(metrics.ghr(maps, rel), want, atol=0.03)
    other = torch.randint(0, 3, (4, 5, 5), generator=gen).double()
    q = monte_carlo(other, 6)
    assert torch.allclose(metrics.top_k_intersection(maps, other, 6),
                          (monte_carlo(maps, 6) * q).sum(1) / 6, atol=0.03)
    two_peaks = torch.zeros(1, 3, 3)
    two_peaks[0, 0, 0] = two_peaks[0, 2, 2] = 1.0
    rel = torch.zeros(1, 3, 3, dtype=torch.bool)
    rel[0, 2, 2] = True
    assert float(metrics.pointing_game(two_peaks, rel)) == 0.5


class FirstRowPolicy(nn.Module):
    """``pi(0) = sigmoid(10 (mean of row ``row`` - 0.5))``: only one row of the frame matters."""

    def __init__(self, row: int):
        super().__init__()
        self.row = row

    def forward(self, x):
        s = x[:, self.row].mean(dim=(1, 2))
        return torch.stack([10 * (s - 0.5), torch.zeros_like(s)], dim=-1)


def test_deletion_of_tied_pixels_does_not_depend_on_their_position():
    obs = torch.ones(1, 6, 6, 1, dtype=torch.float64)
    flat = torch.zeros(1, 6, 6, dtype=torch.float64)  # a map that says nothing
    top, bottom = FirstRowPolicy(0), FirstRowPolicy(5)
    # one (row-major) order: deleting the top row first looks very faithful, the bottom not
    rm_top = float(metrics.deletion_auc(top, obs, flat, tie_orders=1))
    rm_bottom = float(metrics.deletion_auc(bottom, obs, flat, tie_orders=1))
    assert rm_bottom - rm_top > 0.3
    # random tie orders: the same score wherever the decisive row is
    r_top = float(metrics.deletion_auc(top, obs, flat, tie_orders=64))
    r_bottom = float(metrics.deletion_auc(bottom, obs, flat, tie_orders=64))
    assert abs(r_top - r_bottom) < 0.05
    assert r_top == float(metrics.deletion_auc(top, obs, flat, tie_orders=64))  # seeded
    # a map without ties at the cuts takes the one exact order
    ranked = torch.arange(36, dtype=torch.float64).view(1, 6, 6)
    assert float(metrics.deletion_auc(top, obs, ranked, tie_orders=8)) == \
        float(metrics.deletion_auc(top, obs, ranked, tie_orders=1))
    with pytest.raises(ValueError, match="tie_orders must be an integer >= 1"):
        metrics.deletion_auc(top, obs, flat, tie_orders=0)


def test_pointing_game_by_hand():
    attr = torch.tensor([[[0.1, 0.9, 0.0], [0.5, 0.2, 0.0], [0.0, 0.0, 0.0]]])
    rel = torch.zeros(1, 3, 3, dtype=torch.bool)
    rel[0, 1, 0] = True
    assert float(metrics.pointing_game(attr, rel)) == 0.0  # peak at (0, 1)
    assert float(metrics.pointing_game(attr, rel, tolerance=1)) == 1.0  # within one pixel
    rel[0, 0, 1] = True
    assert float(metrics.pointing_game(attr, rel)) == 1.0


# ------------------------------------------------------------------------------- asr-m
def test_asr_m_by_hand():
    obs = (torch.arange(9, dtype=torch.float64) / 10).view(1, 3, 3, 1)

    def attribution_fn(x, actions):
        return x.sum(-1)  # the brightest pixels are the most attributed

    def brighten_corner(x, actions):
        x = x.clone()
        x[:, 0, 0] = 1.0
        return x

    relevance = torch.zeros(1, 3, 3, dtype=torch.bool)
    relevance[0, 2, 1:] = True  # |R| = 2: clean top-2 {8, 7}, attacked top-2 {0, 8}
    policy = SumPolicy()
    got = metrics.asr_m(policy, obs, attribution_fn, eps=0.1, relevance=relevance,
                        perturbation=brighten_corner)
    assert torch.allclose(got, torch.tensor([0.5], dtype=torch.float64))
    # without relevance k = max(1, round(5% of 9)) = 1: top-1 {8} against {0}
    assert float(metrics.asr_m(policy, obs, attribution_fn, 0.1,
                               perturbation=brighten_corner)) == 0.0
    assert float(metrics.asr_m(policy, obs, attribution_fn, 0.0)) == 1.0  # eps 0: no change


def test_internal_pgd_stays_in_budget_and_raises_the_loss():
    torch.manual_seed(1)
    policy = make_policy_network("cnn", (9, 9, 3), 5, channels=(4, 8, 8), hidden=16).double()
    nn.init.normal_(policy.pi.weight, std=0.5)
    obs = torch.rand(4, 9, 9, 3, dtype=torch.float64)
    actions = policy(obs).argmax(-1)
    eps = 8 / 255
    adv = metrics.pgd_perturbation(policy, obs, actions, eps, steps=10)
    assert (adv - obs).abs().max() <= eps + 1e-12 and adv.min() >= 0 and adv.max() <= 1

    def loss(x):
        return -torch.log_softmax(policy(x), -1).gather(1, actions[:, None]).squeeze(1)

    assert (loss(adv) > loss(obs)).all()
    asr = metrics.asr_m(policy, obs, lambda x, a: x.sum(-1), eps, pgd_steps=3)
    assert asr.shape == (4,) and ((asr >= 0) & (asr <= 1)).all()


def test_attack_success():
    policy = SumPolicy(offset=1.0)
    obs = OBS.repeat(2, 1, 1, 1)
    adv = obs.clone()
    adv[1] = 0.0  # sum 0 < offset: the greedy action flips to 1
    assert torch.equal(metrics.attack_success(policy, obs, adv),
                       torch.tensor([0.0, 1.0], dtype=torch.float64))


# ------------------------------------------------------------------------------- statistics
def test_mean_ci95_by_hand():
    """The statistics the explain metrics are averaged with (marl_fgmf.stats; no tests/test_stats.py yet)."""
    mean, half = stats.mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and abs(half - 4.302652729749464 / math.sqrt(3)) < 1e-9
    mean, half = stats.mean_ci95(torch.tensor([5.0]))
    assert mean == 5.0 and math.isnan(half)
    for df, t in [(1, 12.706204736), (4, 2.776445105), (30, 2.042272456), (200, 1.971896224)]:
        assert abs(stats.t_quantile(0.95, df) - t) < 1e-6
    with pytest.raises(ValueError, match="at least one value"):
        stats.mean_ci95([])
    with pytest.raises(ValueError, match="non-finite values"):
        stats.mean_ci95([1.0, float("nan")])


def test_pgd_perturbation_is_the_shared_linf_pgd_with_a_seeded_start():
    """pgd_perturbation = perturbation.linf_pgd on -log pi(a|x), random start from a generator
    seeded with ``seed``, alpha 2.5 eps / steps, last iterate."""
    torch.manual_seed(2)
    policy = make_policy_network("cnn", (9, 9, 3), 5, channels=(4, 8, 8), hidden=16).double()
    obs = torch.rand(3, 9, 9, 3, dtype=torch.float64)
    actions = policy(obs).argmax(-1)

    def objective(x):
        return -torch.log_softmax(policy(x), -1).gather(1, actions[:, None]).squeeze(1)

    eps = 8 / 255
    ref = linf_pgd(objective, obs, eps, 5, alpha=2.5 * eps / 5, random_start=True,
                   generator=torch.Generator().manual_seed(3))
    assert torch.equal(metrics.pgd_perturbation(policy, obs, actions, eps, steps=5, seed=3), ref)
    assert not torch.equal(metrics.pgd_perturbation(policy, obs, actions, eps, steps=5, seed=4),
                           ref)
    plain = linf_pgd(objective, obs, eps, 5)
    assert torch.equal(metrics.pgd_perturbation(policy, obs, actions, eps, steps=5,
                                                random_start=False), plain)
    assert not hasattr(metrics, "mean_ci95")  # statistics live in marl_fgmf.stats


def test_every_metric_states_its_direction():
    for name in ("deletion_auc", "insertion_auc", "ghr", "pointing_game", "asr_m",
                 "attack_success"):
        assert name in metrics.HIGHER_IS_BETTER and hasattr(metrics, name)
    assert metrics.HIGHER_IS_BETTER["deletion_auc"] is False
    assert metrics.HIGHER_IS_BETTER["insertion_auc"] is True


# ------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(ValueError, match=r"attribution shape \(1, 4, 1\) does not match obs "
                                         r"\(1, 1, 4, 1\)"):
        metrics.deletion_auc(SumPolicy(), OBS, torch.zeros(1, 4, 1))
    with pytest.raises(ValueError, match=r"relevance shape \(3, 3\) does not match attribution "
                                         r"\(1, 2, 2\)"):
        metrics.ghr(torch.zeros(1, 2, 2), torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"relevance mask of shape \(2, 2, 2\) is empty for "
                                         r"sample\(s\) \[1\]"):
        rel = torch.zeros(2, 2, 2, dtype=torch.bool)
        rel[0, 0, 0] = True
        metrics.ghr(torch.zeros(2, 2, 2), rel)
    with pytest.raises(ValueError, match="empty"):
        metrics.pointing_game(torch.zeros(1, 2, 2), torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="1 non-finite values"):
        metrics.ghr(torch.tensor([[[float("nan"), 0.0]]]), torch.tensor([[True, False]]))
    bad = OBS.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        metrics.insertion_auc(SumPolicy(), bad, ATTR)
    with pytest.raises(ValueError, match=r"actions must be in \[0, 1\]"):
        metrics.deletion_auc(SumPolicy(), OBS, ATTR, actions=torch.tensor([2]))
    with pytest.raises(ValueError, match=r"perturbed obs shape \(1, 4\)"):
        metrics.asr_m(SumPolicy(), OBS, lambda x, a: x.sum(-1), 0.1,
                      perturbation=lambda x, a: x.view(1, 4))
