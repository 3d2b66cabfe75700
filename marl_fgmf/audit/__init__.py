"""Gradient-masking audit: does a defence resist attacks, or only hide its gradients?

DESIGN.md section 4. A defence can look robust because its input gradients are useless (zero,
shattered, random) rather than because no small perturbation changes its actions: "obfuscated
gradients give a false sense of security" (Athalye, Carlini and Wagner, ICML 2018,
https://arxiv.org/abs/1802.00420). :func:`audit` runs the symptoms of that failure from their
checklist and from Carlini et al., "On Evaluating Adversarial Robustness" (2019,
https://arxiv.org/abs/1902.06705, sections 4-5 and the appendix checklist) on a batch of
observations, and flags the policy when any check fails.

Success of an attack on an observation (DESIGN.md section 3): the greedy action of the perturbed
observation differs from the clean greedy action. Every rate below is a fraction of the ``B``
observations. All attacks attack the same observations, so two attacks are compared sample by
sample with an exact one-sided **McNemar (sign) test** on the discordant pairs; a comparison
"fails" only when BOTH the difference of rates is at least ``margin`` (an effect size: 5
percentage points by default) AND the p-value is below ``alpha`` (0.01 by default; about ten
comparisons are made, so a clean policy is flagged by chance with probability below ~0.1 even
in the worst case, and in practice far less because the margin must also be met). With
``B = 64`` a failure needs at least 7 more successes on one side than the other.

The five checks (names as in :attr:`AuditCheck.name`):

1. ``gradient_free_vs_white_box``: Square (gradient-free, Andriushchenko et al. 2020) must not
   succeed more often than the white-box attacks, taken per sample as the union of FGSM, every
   PGD run and APGD ("black-box attacks better than white-box" is Athalye et al.'s first
   symptom).
2. ``noise_vs_fgsm``: random sign noise of the same budget (one draw, one query like FGSM's one
   gradient) must not succeed more often than FGSM.
3. ``steps_and_restarts``: more PGD steps (``steps``, e.g. 1, 10, 50) and more restarts
   (``restarts``, e.g. 1 vs 5) must not LOWER success, an iterative attack must not be weaker
   than single-step FGSM ("iterative attacks perform worse than single-step"), and gradient
   ascent must make progress: the attacker's loss after PGD without a random start must exceed
   the clean loss on at least ``min_progress`` of the samples whose action some attack at
   ``large_eps`` can change (an action no input changes has a flat loss without any masking,
   so those samples do not count). Success that stays flat is NOT by
   itself a failure: a genuinely robust policy is flat (near 0) too. What distinguishes it from a
   masked one is that its gradient still raises the loss; a zero or useless gradient does not
   move the iterate at all. (PGD keeps its best iterate, so success is reported for every
   setting; a plateau below 100% is normal for a robust policy.)
4. ``large_budget``: success of gradient PGD (no random start, so only the gradient can move
   it) as eps grows from ``eps`` to ``large_eps`` (1.0: every observation in [0, 1] is
   reachable) must not fall, and at ``large_eps`` it must reach ``large_success`` (0.9) unless
   nothing reaches it: the check compares it with what ANY attack at ``large_eps`` achieves
   (PGD, several random-noise draws and Square: "reachable"). A policy whose action no input
   can change (input-insensitive) is not flagged; one whose action random noise changes but
   gradient PGD cannot is.
5. ``adaptive_attack``: when the policy has a non-identity ``input_filter`` (SGAM, a quantizer)
   BPDA through it (Athalye et al. 2018, section 4.1), and when the policy is stochastic (two
   forward passes differ) EOT, must not beat the plain PGD of the same budget by a margin. Not
   applicable (passes) for a deterministic policy without an input filter.

The gradient attacks use the Carlini-Wagner margin loss ``max_{j != a} z_j - z_a`` by default
(``objective="margin"``): unlike cross-entropy it does not saturate on the very confident
policies RL produces, so a vanishing gradient is not mistaken for a masked one (Carlini et
al. 2019, section 5.2). ``objective="ce"`` is available.

The package: :mod:`~marl_fgmf.audit.run` (:func:`audit`: settings, the attacks, the eps ladder),
:mod:`~marl_fgmf.audit.checks` (the five checks), :mod:`~marl_fgmf.audit.report`
(:class:`AuditReport` and its text, Markdown and JSON) and :mod:`~marl_fgmf.audit.load`
(observations from a policy's env, checkpoints: :func:`audit_checkpoint`, :func:`audit_policies`).

Example::

    >>> report = audit(policy, obs, eps=8/255)
    >>> print(report.to_text())
    >>> report.flagged, [c.name for c in report.checks if not c.passed]
"""
from __future__ import annotations

from marl_fgmf.audit.load import (audit_checkpoint, audit_policies, collect_observations,
                                  load_audit_target)
from marl_fgmf.audit.report import CHECK_NAMES, CHECK_TITLES, AuditCheck, AuditReport
from marl_fgmf.audit.run import audit, has_input_filter, is_stochastic
from marl_fgmf.stats import mcnemar_greater

__all__ = ["AuditCheck", "AuditReport", "audit", "audit_checkpoint", "audit_policies",
           "collect_observations", "load_audit_target",
           "mcnemar_greater", "is_stochastic", "has_input_filter", "CHECK_NAMES", "CHECK_TITLES"]
