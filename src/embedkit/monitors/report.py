"""The result of a monitor's ``compute()``: statistics as a mapping, plus diagnoses.

:class:`MonitorReport` is an evaluation :class:`~embedkit.evaluation.report.Report`
(a read-only mapping of statistic name to float, whose accuracy-like entries are
:class:`~embedkit.evaluation.report.Rate` objects with counts and chance) that also
carries the list of :class:`~embedkit.monitors.diagnosis.Diagnosis` the monitor
found. It renders to text (``str(report)``), markdown and JSON.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ..evaluation.report import Report
from .diagnosis import SEVERITIES, Diagnosis

__all__ = ["MonitorReport"]


@dataclass(frozen=True)
class MonitorReport(Report):
    """Statistics of one monitor and the diagnoses they led to.

    Parameters
    ----------
    title : str
        The monitor, e.g. ``"class collapse"``.
    metrics : dict of str to float or Rate
        The statistics; ``report["effective_rank"]`` is a float, and
        ``report.rate("top1_accuracy")`` the counts and chance behind an accuracy.
    counts : dict of str to int
        Sample sizes behind the statistics.
    notes : list of str
        Caveats (e.g. fewer samples than dimensions).
    curves : dict of str to ndarray
        Not used by monitors; kept for the :class:`Report` interface.
    diagnoses : tuple of Diagnosis
        What the monitor found, most severe first. Empty when nothing is wrong.
    """

    diagnoses: tuple[Diagnosis, ...] = ()

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        rank = {severity: i for i, severity in enumerate(reversed(SEVERITIES))}
        ordered = tuple(sorted(self.diagnoses, key=lambda d: rank[d.severity]))
        object.__setattr__(self, "diagnoses", ordered)

    @property
    def codes(self) -> list[str]:
        """The codes of the diagnoses, most severe first."""
        return [d.code for d in self.diagnoses]

    def diagnosis(self, code: str) -> Diagnosis | None:
        """The diagnosis with ``code``, or ``None`` when it did not fire."""
        return next((d for d in self.diagnoses if d.code == code), None)

    @property
    def ok(self) -> bool:
        """True when no diagnosis of severity ``"warning"`` or ``"error"`` fired."""
        return all(d.severity == "info" for d in self.diagnoses)

    def to_dict(self, *, curves: bool | Collection[str] = False) -> dict[str, Any]:
        """Statistics, counts, notes (curves when asked for) and diagnoses as JSON-ready values."""
        return {**super().to_dict(curves=curves), "diagnoses": [d.to_dict() for d in self.diagnoses]}

    def to_markdown(self) -> str:
        """The statistics table, then one block per diagnosis (or "no problem found")."""
        lines = [super().to_markdown(), "#### Diagnoses", ""]
        if not self.diagnoses:
            lines.append("No problem found.\n")
        lines += [d.to_markdown() for d in self.diagnoses]
        return "\n".join(lines)

    def __str__(self) -> str:
        lines = [super().__str__(), "  diagnoses:" if self.diagnoses else "  diagnoses: none"]
        lines += ["  " + str(d).replace("\n", "\n  ") for d in self.diagnoses]
        return "\n".join(lines)
