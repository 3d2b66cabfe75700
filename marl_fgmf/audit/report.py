"""What the gradient-masking audit reports: :class:`AuditCheck`, :class:`AuditReport` and their
text, Markdown and JSON forms."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from marl_fgmf.io import to_jsonable

__all__ = ["CHECK_NAMES", "CHECK_TITLES", "AuditCheck", "AuditReport", "eps_text"]

CHECK_NAMES = ("gradient_free_vs_white_box", "noise_vs_fgsm", "steps_and_restarts",
               "large_budget", "adaptive_attack")
CHECK_TITLES = {
    "gradient_free_vs_white_box": "1. gradient-free (Square) vs white-box",
    "noise_vs_fgsm": "2. random noise vs FGSM",
    "steps_and_restarts": "3. PGD steps and restarts",
    "large_budget": "4. success as eps grows",
    "adaptive_attack": "5. adaptive (BPDA/EOT) vs plain",
}


@dataclass
class AuditCheck:
    """One audit check.

    Attributes:
        name: one of :data:`CHECK_NAMES`.
        passed: False when the check found a symptom of gradient masking.
        numbers: the rates, differences, p-values and settings behind the verdict.
        message: one line stating the verdict and its key numbers.
        applicable: False when the check does not apply to this policy (it then passes).
    """

    name: str
    passed: bool
    numbers: dict[str, Any]
    message: str
    applicable: bool = True

    @property
    def title(self) -> str:
        return CHECK_TITLES.get(self.name, self.name)


@dataclass
class AuditReport:
    """The result of :func:`audit`.

    Attributes:
        flagged: True when any check failed (the policy shows gradient masking), or when the
            input-gradient probe found no gradient graph to obs at all (``no_grad``,
            ``detached``: no gradient attack can evaluate the policy).
        checks: the five :class:`AuditCheck` in order.
        eps: the audited budget (Linf, [0, 1] units).
        n_obs: number of observations audited.
        success: every attack's success rate, by attack label.
        settings: the audit settings (steps, restarts, margins, ...).
        policy: facts about the policy (input filter, stochastic, input gradient).
        seconds: wall time of the audit.
        cause: when flagged, the likeliest cause from the checks and the input-gradient probe
            (:func:`marl_fgmf.audit.checks.likely_cause`): ``{"cause": ..., "text": ...}``
            with ``cause`` one of ``no_grad``, ``detached``, ``zero_gradient``,
            ``quantized_input``, ``input_filter``, ``randomness``, ``useless_gradients``;
            None when not flagged.
    """

    flagged: bool
    checks: list[AuditCheck]
    eps: float
    n_obs: int
    success: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    cause: dict[str, str] | None = None

    @property
    def failed(self) -> list[AuditCheck]:
        """The checks that failed."""
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (``AuditReport.from_dict`` reads it back)."""
        return to_jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AuditReport":
        checks = [AuditCheck(**c) for c in data.get("checks", [])]
        return cls(flagged=bool(data["flagged"]), checks=checks, eps=float(data["eps"]),
                   n_obs=int(data["n_obs"]), success=dict(data.get("success", {})),
                   settings=dict(data.get("settings", {})), policy=dict(data.get("policy", {})),
                   seconds=float(data.get("seconds", 0.0)), cause=data.get("cause"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        """Plain-text listing: verdict, then each check with its numbers."""
        eps_txt = eps_text(self.eps)
        head = (f"gradient-masking audit: {'FLAGGED' if self.flagged else 'not flagged'} "
                f"(eps {eps_txt}, {self.n_obs} observations, {self.seconds:.1f}s)")
        lines = [head]
        for c in self.checks:
            verdict = "PASS" if c.passed else "FAIL"
            if not c.applicable:
                verdict = "n/a "
            lines.append(f"  [{verdict}] {c.title}: {c.message}")
            lines.append(f"         {_numbers_text(c.numbers)}")
        if self.flagged and self.failed:
            lines.append(f"FLAGGED: {len(self.failed)} check(s) failed: "
                         f"{', '.join(c.name for c in self.failed)}")
        elif self.flagged:
            lines.append("FLAGGED: the policy's logits have no gradient graph to obs, so no "
                         "gradient attack can evaluate it (whatever the checks say)")
        if self.cause:
            lines.append(f"likely cause ({self.cause['cause']}): {self.cause['text']}")
        return "\n".join(lines)

    def to_markdown(self, title: str | None = None) -> str:
        """A Markdown section: verdict line, a table of the checks, and the success rates."""
        lines = []
        if title:
            lines += [f"### {title}", ""]
        verdict = "**FLAGGED**" if self.flagged else "not flagged"
        lines += [f"Gradient-masking audit: {verdict} (eps {eps_text(self.eps)}, "
                  f"{self.n_obs} observations, McNemar one-sided p < "
                  f"{self.settings.get('alpha', 0.01)} and margin >= "
                  f"{self.settings.get('margin', 0.05)}).", ""]
        if self.cause:
            lines += [f"Likely cause (`{self.cause['cause']}`): {_md(self.cause['text'])}", ""]
        lines += ["| check | result | message | numbers |", "| --- | --- | --- | --- |"]
        for c in self.checks:
            res = "n/a" if not c.applicable else ("pass" if c.passed else "**FAIL**")
            lines.append(f"| {c.title} | {res} | {_md(c.message)} | {_md(_numbers_text(c.numbers))} |")
        if self.success:
            lines += ["", "| attack | success |", "| --- | --- |"]
            lines += [f"| {_md(k)} | {v:.3f} |" for k, v in self.success.items()]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_text()



def _numbers_text(numbers: dict[str, Any]) -> str:
    parts = []
    for k, v in numbers.items():
        if k in ("margin", "alpha", "n"):
            continue
        if isinstance(v, float):
            parts.append(f"{k}={v:.3g}")
        elif isinstance(v, dict):
            parts.append(f"{k}={{" + ", ".join(f"{a}: {b:.3f}" if isinstance(b, float) else
                                                f"{a}: {b}" for a, b in v.items()) + "}")
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")

def eps_text(e: float) -> str:
    k = e * 255
    if abs(k - round(k)) < 1e-6 and e < 1:
        return f"{int(round(k))}/255"
    return f"{e:g}"
