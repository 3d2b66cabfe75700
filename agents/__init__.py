"""Policy networks (plain torch) and RLlib training.

``make_policy_network`` needs torch only; ``load_policy`` (:mod:`agents.checkpoint`) and the
training code import RLlib lazily, inside the functions that need it, so that importing this
package stays light.
"""
from __future__ import annotations

from agents.checkpoint import load_policy
from agents.networks import ARCHS, PolicyNetwork, make_policy_network

__all__ = ["ARCHS", "PolicyNetwork", "make_policy_network", "load_policy"]
