"""Policy networks (plain torch) and RLlib training.

``make_policy_network`` needs torch only; ``load_policy`` (:mod:`agents.checkpoint`) and the
training code import RLlib lazily, inside the functions that need it, so that importing this
package stays light. ``adapt_policy`` (:mod:`marl_fgmf.adapter`, re-exported) puts any other
torch policy on the protocol by declaring its layout, input range and logits.
"""
from __future__ import annotations

from agents.checkpoint import load_policies, load_policy
from agents.networks import ARCHS, PolicyNetwork, make_policy_network
from marl_fgmf.adapter import PolicyAdapter, adapt_policy

__all__ = ["ARCHS", "PolicyNetwork", "make_policy_network", "load_policy", "load_policies",
           "adapt_policy", "PolicyAdapter"]
