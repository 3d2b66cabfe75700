"""marl-fgmf: the Frontier Gradient-Masking Framework for multi-agent RL policies.

Algorithm modules (``attribution``, ``scorpio``, ``sgam``, ``pgca``, ``metrics``, ``sanity``)
depend on torch alone; workflow modules (``tournament``, ``audit``, ``viz``, ``cli``) on everything.
"""
__version__ = "0.1.0"
