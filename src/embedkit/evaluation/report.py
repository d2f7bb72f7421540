"""Evaluation reports: read-only mappings of metrics that keep counts and chance levels.

A :class:`Report` behaves like a dict of floats in a notebook (``report["map@r"]``),
while every accuracy-like entry is a :class:`Rate` that remembers how many hits out
of how many trials it came from and what chance would score — so "0.0%" is always
shown next to "0/25729, chance 0.19%". Reports render to dict, JSON and markdown.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Rate", "Report"]


@dataclass(frozen=True)
class Rate:
    """An accuracy-like value with its counts and its chance level.

    Parameters
    ----------
    hits : int
        Successes (e.g. probes identified at rank 1).
    total : int
        Trials (e.g. probes).
    chance : float, optional
        What a random guess would score in expectation (e.g. ``1 / num_classes``).
    """

    hits: int
    total: int
    chance: float | None = None

    def __post_init__(self) -> None:
        if self.total < 0 or self.hits < 0 or self.hits > self.total:
            raise ValueError(f"a Rate needs 0 <= hits <= total; got hits={self.hits}, total={self.total}")

    @property
    def value(self) -> float:
        """``hits / total``; NaN when there were no trials."""
        return self.hits / self.total if self.total else math.nan

    def __float__(self) -> float:
        return self.value

    def __str__(self) -> str:
        text = f"{self.hits}/{self.total} = {format_percent(self.value)}"
        if self.chance is not None:
            text += f" (chance {format_percent(self.chance)})"
        return text

    def to_dict(self) -> dict[str, Any]:
        """``{"value", "hits", "total", "chance"}`` as plain Python numbers."""
        return {"value": to_plain(self.value), "hits": self.hits, "total": self.total, "chance": self.chance}


def format_percent(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{100 * x:.3g}%" if 0 < abs(x) < 0.001 else f"{100 * x:.2f}%"


def to_plain(x: Any) -> Any:
    """Numpy scalars and arrays to JSON-ready Python values (NaN to None)."""
    if isinstance(x, Rate):
        return x.to_dict()
    if isinstance(x, np.ndarray):
        return [to_plain(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): to_plain(v) for k, v in x.items()}
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return None if math.isnan(x) else x
    return x


@dataclass(frozen=True)
class Report(Mapping[str, float]):
    """A read-only mapping of metric name to float, with counts, notes and curves.

    Parameters
    ----------
    title : str
        What was evaluated (e.g. ``"retrieval"``, ``"verification"``).
    metrics : dict of str to float or Rate
        The headline metrics. ``report[key]`` is always a float; a :class:`Rate`'s
        counts are available through :meth:`rate`.
    counts : dict of str to int
        Sizes that qualify the metrics (queries, references, pairs, skipped queries).
    notes : list of str
        Caveats a reader must see (e.g. a FAR target finer than the impostor pairs
        allow, queries without any relevant reference).
    curves : dict of str to ndarray
        Arrays behind the metrics (ROC, CMC) for plots; not part of the mapping.
    """

    title: str
    metrics: Mapping[str, float | Rate]
    counts: Mapping[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] | list[str] = ()
    curves: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, key: str) -> float:
        return float(self._metric(key))

    def _metric(self, key: str) -> float | Rate:
        try:
            return self.metrics[key]
        except KeyError:
            known = ", ".join(repr(k) for k in self.metrics)
            raise KeyError(f"{key!r} is not in this {self.title} report; it has {known}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def rate(self, key: str) -> Rate | None:
        """The :class:`Rate` behind ``key`` (counts and chance), or ``None`` for plain values."""
        value = self._metric(key)
        return value if isinstance(value, Rate) else None

    def to_dict(self) -> dict[str, Any]:
        """Everything but the curves, as JSON-ready Python values."""
        return {
            "title": self.title,
            "metrics": {k: to_plain(v) for k, v in self.metrics.items()},
            "counts": {k: to_plain(v) for k, v in self.counts.items()},
            "notes": list(self.notes),
        }

    def to_json(self, path: str | Path | None = None, *, indent: int = 2) -> str:
        """Serialise :meth:`to_dict` as JSON; also write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    def to_markdown(self) -> str:
        """A markdown table of the metrics (with counts and chance), then counts and notes."""
        lines = [f"### {self.title}", "", "| metric | value | counts | chance |", "| --- | --- | --- | --- |"]
        for key, value in self.metrics.items():
            if isinstance(value, Rate):
                chance = "" if value.chance is None else format_percent(value.chance)
                lines.append(f"| {key} | {value.value:.4f} | {value.hits}/{value.total} | {chance} |")
            else:
                lines.append(f"| {key} | {float(value):.4f} | | |")
        if self.counts:
            lines += ["", ", ".join(f"{k}: {v}" for k, v in self.counts.items())]
        lines += [f"\n> {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        width = max((len(k) for k in self.metrics), default=0)
        lines = [self.title]
        for key, value in self.metrics.items():
            shown = str(value) if isinstance(value, Rate) else f"{float(value):.4f}"
            lines.append(f"  {key:<{width}}  {shown}")
        if self.counts:
            lines.append("  " + ", ".join(f"{k}: {v}" for k, v in self.counts.items()))
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:  # Jupyter
        return self.to_markdown()
