"""The gradient-masking audit (DESIGN.md section 4); see :mod:`marl_fgmf.audit.run`."""
from marl_fgmf.audit.run import (CHECK_NAMES, AuditCheck, AuditReport, audit, audit_checkpoint,
                                 audit_policies, collect_observations, has_input_filter,
                                 is_stochastic, load_audit_target, mcnemar_greater)

__all__ = ["AuditCheck", "AuditReport", "audit", "audit_checkpoint", "audit_policies",
           "collect_observations", "load_audit_target",
           "mcnemar_greater", "is_stochastic", "has_input_filter", "CHECK_NAMES"]
