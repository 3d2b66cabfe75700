"""PGCA (marl_fgmf.pgca): agreement with Captum, the consensus formula, batching, ground truth."""
from __future__ import annotations

import math

import captum.attr as captum_attr  # a test dependency: a missing captum fails, never skips
import pytest
import torch
from torch import nn

from agents import make_policy_network
from marl_fgmf import metrics
from marl_fgmf.attribution import gaussian_blur
from marl_fgmf.explainers import make_explainer
from marl_fgmf.pgca import PGCA, PGCAResult, consensus_map, explain, normalize_map, spearman

SHAPE = (11, 11, 3)
FAST = dict(steps=8, patch=3, stride=1)


@pytest.fixture(scope="module")
def obs():
    return torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@pytest.fixture(scope="module")
def result(policy, obs):
    return explain(policy, obs, **FAST)


def log_probs(policy):
    return lambda x: torch.log_softmax(policy(x), dim=-1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------- Captum
def test_gradient_map_is_captum_ig_riemann_right(policy, obs, result):
    ig = captum_attr.IntegratedGradients(log_probs(policy)).attribute(
        obs, baselines=0.0, target=result.actions, n_steps=FAST["steps"], method="riemann_right")
    assert rel_err(result.gradient, ig.abs().sum(-1)) < 1e-4
    assert rel_err(result.gradient_signed, ig.sum(-1)) < 1e-4


def test_perturbation_map_is_captum_occlusion_with_blurred_baseline(policy, obs, result):
    blurred = gaussian_blur(obs, 2.0)
    window = dict(sliding_window_shapes=(3, 3, 3), strides=(1, 1, 3), baselines=blurred,
                  target=result.actions)
    signed = captum_attr.Occlusion(log_probs(policy)).attribute(obs, perturbations_per_eval=81,
                                                                **window)
    assert rel_err(result.perturbation_signed, signed[..., 0]) < 1e-4
    clean = log_probs(policy)(obs).detach()

    def minus_abs_change(x):  # Captum's f(x) - f(x~) becomes |log pi(x) - log pi(x~)|
        return -(log_probs(policy)(x) - clean).abs()

    magnitude = captum_attr.Occlusion(minus_abs_change).attribute(obs, perturbations_per_eval=1,
                                                                  **window)
    assert rel_err(result.perturbation, magnitude[..., 0]) < 1e-4


# ------------------------------------------------------------------------------- formula
def test_consensus_formula_by_hand(result):
    g = result.gradient / result.gradient.flatten(1).amax(1).view(-1, 1, 1)
    p = result.perturbation / result.perturbation.flatten(1).amax(1).view(-1, 1, 1)
    q = 0.5
    expected = torch.sqrt(g * p)
    for b in range(len(result)):
        qg, qp = torch.quantile(g[b].flatten(), q), torch.quantile(p[b].flatten(), q)
        expected[b][(g[b] < qg) | (p[b] < qp)] = 0
    assert torch.allclose(result.consensus, expected, atol=1e-12)
    assert torch.allclose(result.gradient_hat, g) and torch.allclose(result.perturbation_hat, p)
    assert result.consensus.max() <= 1 and result.consensus.min() >= 0
    # with q = 0.5 about half of the pixels fail at least one threshold
    assert ((result.consensus == 0).flatten(1).float().mean(1) >= 0.5).all()


def test_normalize_map():
    maps = torch.tensor([[[2.0, 1.0], [0.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert torch.equal(normalize_map(maps), torch.tensor([[[0.5, 0.25], [0.0, 1.0]],
                                                          [[0.0, 0.0], [0.0, 0.0]]]))


def test_consensus_map_tiny_example():
    g = torch.tensor([[[4.0, 2.0], [1.0, 0.0]]])
    p = torch.tensor([[[1.0, 0.0], [0.5, 0.25]]])
    # G^ = [1, .5, .25, 0]; P^ = [1, 0, .5, .25]; medians 0.375 and 0.375
    expected = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert torch.allclose(consensus_map(g, p, q=0.5), expected)
    # q = 0 keeps every pixel: C = sqrt(G^ P^)
    expected0 = torch.tensor([[[1.0, 0.0], [math.sqrt(0.125), 0.0]]])
    assert torch.allclose(consensus_map(g, p, q=0.0), expected0)


def test_agreement_is_spearman(result):
    import scipy.stats as stats
    for b in range(len(result)):
        ref = stats.spearmanr(result.gradient[b].flatten().numpy(),
                              result.perturbation[b].flatten().numpy())[0]
        assert abs(float(result.agreement[b]) - ref) < 1e-6


def test_spearman_ties_and_constant_maps():
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    b = torch.tensor([[10.0, 20.0, 20.0, 30.0]])
    assert torch.allclose(spearman(a, b), torch.tensor([1.0]))
    # ranks a = [1, 2.5, 2.5, 4], ranks c = [4, 3, 2, 1]: rho = -0.9486833
    c = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert abs(float(spearman(a, c)) + 0.9486833) < 1e-6
    assert torch.isnan(spearman(a, torch.ones(1, 4))).all()


def test_actions_and_probabilities(policy, obs, result):
    probs = torch.softmax(policy(obs), -1).detach()
    assert torch.equal(result.actions, probs.argmax(-1))
    assert torch.allclose(result.probs, probs)
    assert torch.allclose(result.action_prob, probs.gather(1, result.actions[:, None])[:, 0])
    chosen = torch.tensor([1, 1, 3, 0])
    other = explain(policy, obs, chosen, **FAST)
    assert torch.equal(other.actions, chosen)
    assert torch.allclose(other.action_prob, probs.gather(1, chosen[:, None])[:, 0])


# ------------------------------------------------------------------------------- batching
def test_batched_equals_unbatched(policy, obs, result):
    chunked = explain(policy, obs, internal_batch_size=7, **FAST)
    fields = ("consensus", "gradient", "perturbation", "agreement", "gradient_signed",
              "perturbation_signed")
    for i in range(len(obs)):
        single = explain(policy, obs[i:i + 1], **FAST)
        for name in fields:
            assert torch.allclose(getattr(result, name)[i:i + 1], getattr(single, name),
                                  atol=1e-10, equal_nan=True), name
    for name in fields:
        assert torch.allclose(getattr(result, name), getattr(chunked, name), atol=1e-10,
                              equal_nan=True), name
    picked = result.select(2)
    assert isinstance(picked, PGCAResult) and picked.consensus.shape == (1, 11, 11)


class RowCounter(nn.Module):
    """Wraps a policy and counts the rows of every forward call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.inner(x)


def test_one_clean_forward_and_no_redundant_work(policy, obs):
    """One clean forward of B rows (actions, scores, probabilities), steps*B IG rows, at most
    B*P occlusion rows; the class call and the registry give the same consensus."""
    counter = RowCounter(policy)
    explain(counter, obs, internal_batch_size=1000, **FAST)  # + the input-gradient guard, once
    counter.calls.clear()
    res = explain(counter, obs, internal_batch_size=1000, **FAST)
    b, steps, n_patches = len(obs), FAST["steps"], 9 * 9
    assert counter.calls[0] == b
    assert sum(counter.calls) <= b + steps * b + b * n_patches
    assert steps * b in counter.calls  # IG in one batch
    assert torch.equal(PGCA(policy).attribute(obs, **FAST), res.consensus)
    assert torch.equal(make_explainer("pgca", policy).attribute(obs, **FAST), res.consensus)


# ------------------------------------------------------------------------------- SGAM mask
class RecordingFilter(nn.Module):
    """Stands in for SGAM: identity that records a mask of its last input as ``last_mask``."""

    def forward(self, x):
        self.last_mask = (x.mean(-1) > 0.5).to(x.dtype)
        return x


def test_sgam_mask_of_the_clean_forward_is_returned(obs):
    torch.manual_seed(3)
    net = make_policy_network("cnn", SHAPE, 5, channels=(4, 8, 8), hidden=16).double()
    net.input_filter = RecordingFilter()
    net.train()
    res = explain(net, obs, **FAST)
    assert torch.equal(res.sgam_mask, (obs.mean(-1) > 0.5).to(obs.dtype))
    assert net.training  # eval mode inside, the caller's mode restored after
    plain = make_policy_network("cnn", SHAPE, 5, channels=(4, 8, 8), hidden=16).double()
    assert explain(plain, obs[:1], **FAST).sgam_mask is None


# ------------------------------------------------------------------------------- ground truth
class RegionPolicy(nn.Module):
    """Logits that depend only on the pixels of rows r0:r1, cols c0:c1 (a smooth MLP), with
    action 0 favoured by a bright region."""

    def __init__(self, rows=(4, 9), cols=(6, 11), channels=3, n_actions=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.rows, self.cols = rows, cols
        d = (rows[1] - rows[0]) * (cols[1] - cols[0]) * channels
        self.u = nn.Parameter(torch.randn(d, 8, generator=g, dtype=torch.float64) / d ** 0.5)
        self.v = nn.Parameter(torch.randn(8, n_actions, generator=g, dtype=torch.float64))

    def relevance(self, shape):
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[self.rows[0]:self.rows[1], self.cols[0]:self.cols[1]] = True
        return mask

    def forward(self, obs):
        region = obs[:, self.rows[0]:self.rows[1], self.cols[0]:self.cols[1], :].flatten(1)
        logits = torch.tanh(region @ self.u) @ self.v
        bonus = torch.zeros_like(logits)
        bonus[:, 0] = 6.0 * region.mean(1)
        return logits + bonus


def test_ground_truth_region_policy():
    """GHR of PGCA > 0.9 and deletion AUC below a random attribution's."""
    policy = RegionPolicy()
    g = torch.Generator().manual_seed(5)
    obs = torch.rand(6, 15, 15, 3, generator=g, dtype=torch.float64)
    obs[:, 4:9, 6:11] = 0.5 + 0.5 * obs[:, 4:9, 6:11]
    relevance = policy.relevance((15, 15))
    res = explain(policy, obs, steps=16)
    hit = metrics.ghr(res.consensus, relevance)
    assert (hit > 0.9).all(), hit
    random_map = torch.rand(obs.shape[:3], generator=g, dtype=torch.float64)
    d_pgca = metrics.deletion_auc(policy, obs, res.consensus, res.actions)
    d_random = metrics.deletion_auc(policy, obs, random_map, res.actions)
    assert d_pgca.mean() < d_random.mean(), (d_pgca, d_random)
    # nothing outside the region carries gradient, so nothing outside survives the consensus
    assert (res.consensus[:, ~relevance] == 0).all()


# ------------------------------------------------------------------------------- bad input
def test_bad_inputs(policy, obs):
    with pytest.raises(ValueError, match=r"patch \(13, 13\) is larger than the observation "
                                         r"\(11, 11\)"):
        explain(policy, obs, patch=13)
    bad = obs.clone()
    bad[0, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"got 1 NaN/inf"):
        explain(policy, bad)
    with pytest.raises(ValueError, match="q must be in"):
        explain(policy, obs, q=1.5)
    with pytest.raises(ValueError, match=r"obs must have shape \(B, H, W, C\), got \(11, 11, 3\)"):
        explain(policy, obs[0])
    with pytest.raises(ValueError, match="actions has 2 entries for a batch of 4"):
        explain(policy, obs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"actions must be in \[0, 4\] for a policy with 5"):
        explain(policy, obs, torch.tensor([0, 1, 2, 7]))
