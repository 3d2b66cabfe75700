"""SCOR-PIO 2.0: curvature regularization on the exploitable subspace (torch only).

SCOR-PIO penalizes the input curvature (and, optionally, the input gradient) of the attacker
loss only along the coordinates an attacker would use and the decision does not rest on.
It is the contract of DESIGN.md section 3; the RLlib Learner adds ``R`` to the PPO loss.

Notation: logits ``z = f(x)``, ``pi = softmax(z)``, greedy action ``a* = argmax pi(x)``
(detached), attacker loss ``l(x) = -log pi(a* | x)``; ``x`` is (B, H, W, C) in [0, 1].

For a sub-batch (fraction ``reg_fraction`` of the minibatch, at most ``max_reg_samples``):

1. ``g = grad_x l(x)``; ``A = |IG(x)|`` with ``ig_steps`` right-Riemann steps, baseline 0
   (Integrated Gradients, Sundararajan, Taly and Yan, ICML 2017).
2. Exploitable mask ``M = top_rho(|g|) AND NOT top_rho_salient(A)`` per sample: high
   sensitivity, low contribution (:func:`exploitable_mask`).
3. Direction ``v = M * sign(g) / ||M * sign(g)||_2``, optionally refined by ``power_iters``
   power-iteration steps ``v <- normalize(M * Hv)`` toward the top curvature direction of the
   Hessian restricted to the subspace.
4. ``Hv`` by Pearlmutter's trick (Pearlmutter, "Fast exact multiplication by the Hessian",
   Neural Computation 1994): the exact Hessian-vector product as the gradient of
   ``<grad_x l, v>`` (double backward), never forming the Hessian (:func:`hvp`).
5. ``R = lambda_curv * mean_i ||M_i * (H v)_i||^2 + lambda_grad * mean_i ||M_i * g_i||^2``,
   differentiable w.r.t. the policy parameters (both terms are built with ``create_graph``).

The curvature term follows CURE (Moosavi-Dezfooli, Fawzi, Uesato and Frossard, "Robustness via
curvature regularization, and vice versa", CVPR 2019), which penalizes ``||H z||^2`` along
``z ~ sign(g)`` (by finite differences; here exactly), and the local-linearity regularizer LLR
(Qin et al., "Adversarial robustness through local linearization", NeurIPS 2019), which pairs
a curvature term with a gradient term. SCOR-PIO's change is the mask ``M``: the penalty acts on
the coordinates that are sensitive but not salient by IG, so the features the policy relies on
are left free while the directions an attacker would write into are flattened.

**Cost** (one "pass" = one forward + backward of the policy over the sub-batch of ``n`` rows):

* :func:`compute_exploitable_subspace` (on the rows it is given): ``1`` (``g`` and ``a*``
  from one forward/backward) ``+ ig_steps`` (IG) ``+ power_iters`` (one HVP each).
* :func:`scorpio_regularizer` with a precomputed subspace: ``3`` passes, the forward/backward
  that builds ``g`` with its graph, the double backward for ``Hv``, and the caller's backward
  of ``R`` through that graph.
* :func:`scorpio_regularizer` without a subspace: ``ig_steps + 3`` passes (``+ power_iters``),
  since ``g`` is computed once, with its graph, and reused for the mask.

The last two passes traverse higher-order graphs and are dearer than plain ones: measured on
the default CNN (one CPU core), the whole penalty costs about 14 plain forward/backward passes,
or 8-9 PPO minibatch steps, per regularized row. Either way the cost is a constant factor times
a backward pass on ``n = reg_fraction * B`` rows, so the overhead ratio over PPO does not grow
with the batch size (measured flat within 10% from B = 128 to 512). In training,
:class:`IterationSubspaces` serves one training iteration: each SGD step penalizes about
``reg_fraction`` of the rows of ITS OWN minibatch, drawn by content (the same observation is
drawn in every minibatch it falls into during the iteration), and each drawn row's subspace
is computed ONCE per iteration, the first time the row is drawn, then reused across epochs:
``R`` is re-evaluated at the current parameters for 3 passes per row per SGD step.
``scripts/profile_scorpio.py`` and ``scripts/profile_learner.py`` measure the ratios.

**Behind an input filter** (FGMF: SGAM in front of the encoder): the learner passes
``transform=SGAM.filter`` to :meth:`IterationSubspaces.penalty` and the policy with SGAM
bypassed, so ``R`` is the curvature of the encoder at what it sees, ``z = SGAM(x)`` (computed
once per drawn row and iteration, without a graph). That is the space a BPDA attacker steps in
(it differentiates the encoder at ``SGAM(x)``) and it keeps the saliency head, its quantile
and its sigmoid out of the double-backward graph, which had made SCOR-PIO inside FGMF cost
twice SCOR-PIO alone (issue 14).

Networks need smooth activations (SiLU, GELU): a ReLU network's input Hessian is zero except
through the softmax (NOTES-rllib.md, pitfall 7). Attention layers are evaluated with PyTorch's
math SDPA kernel wherever a double backward follows, because the fused CPU/GPU attention
kernels have no second derivative. ``torch.compile`` cannot be used on this loss (pitfall 9).

Example:
    >>> cfg = ScorpioConfig()
    >>> rows = obs[select_sub_batch(len(obs), cfg)]                      # once per iteration
    >>> subspace = compute_exploitable_subspace(policy, rows, cfg)
    >>> reg, info = scorpio_regularizer(policy, None, cfg, subspace)     # every SGD step
    >>> (ppo_loss + reg).backward()
    >>> reg, info = scorpio_regularizer(policy, obs, cfg)  # all in one: select, mask, R
    >>> rows = IterationSubspaces(cfg, salt=iteration)                   # in a learner
    >>> reg, info = rows.penalty(policy, minibatch_obs)  # every SGD step (R every reg_every-th)
"""
from marl_fgmf.scorpio.iteration import (IterationSubspaces, row_digests, row_keys,
                                         select_keyed_rows)
from marl_fgmf.scorpio.regularizer import (ExploitableSubspace, ScorpioConfig,
                                           compute_exploitable_subspace, double_backward_safe,
                                           exploitable_mask, hvp, scorpio_regularizer,
                                           select_sub_batch)

__all__ = [
    "ScorpioConfig", "ExploitableSubspace", "hvp", "exploitable_mask", "select_sub_batch",
    "compute_exploitable_subspace", "scorpio_regularizer", "double_backward_safe",
    "row_digests", "row_keys", "select_keyed_rows", "IterationSubspaces",
]
