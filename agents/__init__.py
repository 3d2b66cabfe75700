"""Policy networks (plain torch) and RLlib training.

``make_policy_network`` needs torch only; ``load_policy`` and the training code import RLlib
lazily, so that attacks and explainers stay light.
"""
from __future__ import annotations

from agents.networks import ARCHS, PolicyNetwork, make_policy_network

__all__ = ["ARCHS", "PolicyNetwork", "make_policy_network", "load_policy"]


def load_policy(checkpoint_dir, policy_id=None, device=None):
    """Load a trained checkpoint as a torch module on the policy protocol (see
    :func:`agents.checkpoint.load_policy`)."""
    from agents.checkpoint import load_policy as _load
    return _load(checkpoint_dir, policy_id, device)
