"""What a monitor concluded: a named failure with its evidence and a suggested fix.

A :class:`Diagnosis` is the unit every monitor returns. Its ``code`` names what went
wrong in the user's words (``class_collapse``, ``complete_collapse``, ...), its
``evidence`` holds the numbers that triggered it next to the threshold they crossed,
and ``docs`` links to the section of the guide "Reading the diagnoses" that explains
the threshold and cites the case study it comes from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .._checks import check_choice
from ..evaluation.report import to_plain

__all__ = ["CODES", "DOCS_URL", "SEVERITIES", "Diagnosis", "Severity", "docs_link", "non_finite"]

Severity = Literal["info", "warning", "error"]
SEVERITIES: tuple[str, ...] = get_args(Severity)

#: The guide every ``Diagnosis.docs`` link points into; the anchor is the code with
#: underscores written as hyphens (``class_collapse`` → ``#class-collapse``).
DOCS_URL = "https://embedkit.readthedocs.io/en/latest/guides/reading-the-diagnoses.html"


#: Every code embedkit's monitors emit; each has a section in the guide.
CODES: tuple[str, ...] = (
    "class_collapse",
    "at_chance",
    "below_chance",
    "overconfident",
    "complete_collapse",
    "dimensional_collapse",
    "mean_offset",
    "exploding_norms",
    "no_separation",
    "paired_shortcut",
    "loss_at_margin",
    "no_positive_pairs",
    "no_active_triplets",
    "loss_falling_at_chance",
    "non_finite",
)


def docs_link(code: str) -> str:
    """The guide section that explains diagnosis ``code``.

    Parameters
    ----------
    code : str
        A diagnosis code such as ``"class_collapse"``.

    Returns
    -------
    str
        ``DOCS_URL`` with the anchor ``#class-collapse``.
    """
    return f"{DOCS_URL}#{code.replace('_', '-')}"


def _shown(value: Any) -> str:
    """A compact human rendering of one evidence value."""
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


@dataclass(frozen=True)
class Diagnosis:
    """A named failure found by a monitor.

    Parameters
    ----------
    code : str
        What went wrong, e.g. ``"class_collapse"``; stable, suitable for filtering.
    severity : {"info", "warning", "error"}
        ``"error"``: training is broken and the metric being watched cannot be trusted;
        ``"warning"``: a likely problem to look at; ``"info"``: context worth knowing.
    message : str
        One sentence with the key numbers, e.g. "every prediction is class 223".
    evidence : dict of str to object
        The statistics behind the message and the thresholds they crossed.
    suggestion : str
        What to try first.
    docs : str, optional
        Link to the guide section (defaults to :func:`docs_link` of ``code``).
    """

    code: str
    severity: Severity
    message: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    suggestion: str = ""
    docs: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.code, str) or not self.code:
            raise ValueError(f"code must be a non-empty string; got {self.code!r}")
        check_choice(self.severity, "severity", SEVERITIES)
        if not isinstance(self.evidence, Mapping):
            raise TypeError(
                f"evidence must be a mapping of name to value; got {type(self.evidence).__name__}"
            )
        if not self.docs:
            object.__setattr__(self, "docs", docs_link(self.code))

    def to_dict(self) -> dict[str, Any]:
        """The diagnosis as JSON-ready Python values."""
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "evidence": to_plain(dict(self.evidence)),
            "suggestion": self.suggestion,
            "docs": self.docs,
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        """A markdown block: a heading line, the message, the evidence and the suggestion."""
        lines = [f"**{self.severity.upper()} `{self.code}`** — {self.message}", ""]
        lines += [f"- {key}: {_shown(value)}" for key, value in self.evidence.items()]
        if self.suggestion:
            lines += ["", f"*Try:* {self.suggestion}"]
        lines += ["", f"[What this means]({self.docs})"]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        lines = [f"[{self.severity}] {self.code}: {self.message}"]
        if self.evidence:
            lines.append("    evidence: " + ", ".join(f"{k}={_shown(v)}" for k, v in self.evidence.items()))
        if self.suggestion:
            lines.append(f"    try: {self.suggestion}")
        lines.append(f"    see: {self.docs}")
        return "\n".join(lines)


def non_finite(bad: int, total: int, what: str) -> Diagnosis:
    """The ``non_finite`` diagnosis, shared by every monitor.

    Parameters
    ----------
    bad : int
        How many of them held NaN or inf.
    total : int
        How many were seen.
    what : str
        What they are, plural: ``"logit rows"``, ``"embeddings"``, ``"loss values"``.
    """
    return Diagnosis(
        "non_finite",
        "error",
        f"{bad} of {total} {what} held NaN or inf; they were left out of every other statistic",
        evidence={"non_finite": bad, "total": total},
        suggestion="Find the first step that produced them: a diverged learning rate, fp16 overflow "
        "(compute the loss in float32), or a division by a zero norm.",
    )
