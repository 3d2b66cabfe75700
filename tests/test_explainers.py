"""The explainer registry (marl_fgmf.explainers): names, shapes, the common (B, H, W) currency.

The methods themselves are tested in tests/test_attribution.py and tests/test_pgca.py.
"""
from __future__ import annotations

import pytest
import torch

from marl_fgmf import attribution, pgca
from marl_fgmf.explainers import METHODS, attribution_map, make_explainer, spatial_map

SHAPE = (11, 11, 3)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def obs():
    return torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


SETTINGS = {"ig": dict(steps=4), "smoothgrad": dict(n_samples=2), "occlusion": {},
            "gradcampp": {}, "rise": dict(n_masks=20), "pgca": dict(steps=4),
            "random": dict(seed=3), "brightness": {}}


def test_registry_names_classes_and_shapes(policy, obs):
    assert set(METHODS) == set(SETTINGS)
    assert METHODS["ig"] is attribution.IntegratedGradients and METHODS["pgca"] is pgca.PGCA
    assert METHODS["random"] is attribution.RandomBaseline
    assert METHODS["brightness"] is attribution.BrightnessBaseline
    for name, kw in SETTINGS.items():
        explainer = make_explainer(name, policy)
        assert isinstance(explainer, METHODS[name])
        out = explainer.attribute(obs, None, **kw)
        assert out.shape[:3] == obs.shape[:3], name
        amap = attribution_map(name, policy, obs, **kw)
        assert amap.shape == obs.shape[:3] and (amap >= 0).all(), name
        assert torch.allclose(amap, spatial_map(out)), name


def test_registry_matches_the_method_calls(policy, obs):
    """``attribution_map`` is the method's own call reduced to a magnitude, with the given
    actions passed through."""
    actions = torch.tensor([1, 3])
    ig = attribution.integrated_gradients(policy, obs, actions, steps=4)
    assert torch.allclose(attribution_map("ig", policy, obs, actions, steps=4), ig.abs().sum(-1))
    occ = attribution.Occlusion(policy).attribute(obs, actions, patch=3)
    assert torch.allclose(attribution_map("occlusion", policy, obs, actions, patch=3), occ.abs())
    res = pgca.explain(policy, obs, actions, steps=4)
    assert torch.equal(make_explainer("pgca", policy).attribute(obs, actions, steps=4),
                       res.consensus)


def test_spatial_map():
    assert torch.equal(spatial_map(-torch.ones(1, 2, 2, 3)), torch.full((1, 2, 2), 3.0))
    assert torch.equal(spatial_map(-torch.ones(1, 2, 2)), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, H, W\) or \(B, H, W, C\)"):
        spatial_map(torch.ones(2, 2))


def test_unknown_method_one_line(policy):
    with pytest.raises(ValueError, match="unknown attribution method 'lime'; allowed: ig, "):
        make_explainer("lime", policy)
