"""Evaluation reports: read-only mappings of metrics that keep counts and chance levels.

A :class:`Report` behaves like a dict of floats in a notebook (``report["map@r"]``),
while every accuracy-like entry is a :class:`Rate` that remembers how many hits out
of how many trials it came from and what chance would score — so "0.0%" is always
shown next to "0/25729, chance 0.19%". Reports render to dict, JSON and markdown.

JSON is strict (RFC 8259: no ``NaN`` or ``Infinity`` tokens, which strict parsers
reject). :func:`to_plain` writes a NaN — a value that could not be computed; the
report's notes say why — as ``null``, and ``+inf``/``-inf`` — thresholds that accept
nothing or everything — as the strings ``"Infinity"`` and ``"-Infinity"``, which
Python's ``float()`` and JavaScript's ``Number()`` both read back. :meth:`Report.from_dict`
and :func:`load_reports` undo both, so a report (curves included) can be re-plotted
from its file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Rate", "Report", "from_plain", "load_reports", "to_plain"]


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
        return {
            "value": to_plain(self.value),
            "hits": self.hits,
            "total": self.total,
            "chance": to_plain(self.chance),
        }


def format_percent(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{100 * x:.3g}%" if 0 < abs(x) < 0.001 else f"{100 * x:.2f}%"


def format_metric(value: float | int) -> str:
    """A metric for text and markdown: counts and class ids as integers, other values to 4 decimals."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(int(value))
    return f"{float(value):.4f}"


def to_plain(x: Any) -> Any:
    """Numpy scalars and arrays (nested in lists, tuples, dicts) to strict-JSON-ready values.

    Parameters
    ----------
    x : Any
        A :class:`Rate`, number, numpy scalar or array, or a list, tuple or dict of them.

    Returns
    -------
    Any
        Python ints, floats, bools, strings, lists and dicts (keys as str), so that
        ``json.dumps(to_plain(x), allow_nan=False)`` succeeds: NaN becomes ``None``, ``+inf``
        the string ``"Infinity"`` and ``-inf`` the string ``"-Infinity"``; a :class:`Rate`
        becomes ``{"value", "hits", "total", "chance"}``. :func:`from_plain` reverses the
        float mapping.
    """
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
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "Infinity" if x > 0 else "-Infinity"
        return x
    return x


def from_plain(x: Any) -> Any:
    """One JSON value written by :func:`to_plain` back to a float: ``None`` to NaN, ``"Infinity"``
    and ``"-Infinity"`` to ``±inf``; numbers are returned as they are.

    Raises
    ------
    TypeError
        For anything else (a list, a dict, another string).
    """
    if x is None:
        return math.nan
    if x == "Infinity":
        return math.inf
    if x == "-Infinity":
        return -math.inf
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"expected a number, null, 'Infinity' or '-Infinity'; got {x!r}")
    return x


def _curve_from_plain(values: Any, name: str) -> np.ndarray:
    """A curve list from JSON as an int64 array (all ints) or a float64 one (NaN, ±inf restored)."""
    if not isinstance(values, list):
        raise TypeError(f"curves[{name!r}] must be a list; got {type(values).__name__}")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values) and values:
        return np.asarray(values, dtype=np.int64)
    return np.asarray([from_plain(v) for v in values], dtype=np.float64)


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

    def to_dict(self, *, curves: bool | Collection[str] = False) -> dict[str, Any]:
        """The report as strict-JSON-ready Python values (see :func:`to_plain`).

        Parameters
        ----------
        curves : bool or collection of str
            Include the curves (under ``"curves"``, each as a list): all of them with
            ``True``, those named with a collection, none with ``False``.

        Returns
        -------
        dict
            ``"title"``, ``"metrics"`` (a :class:`Rate` as ``{"value", "hits", "total",
            "chance"}``), ``"counts"``, ``"notes"`` and, when asked for, ``"curves"``.
            :meth:`from_dict` reads it back.
        """
        out: dict[str, Any] = {
            "title": self.title,
            "metrics": {k: to_plain(v) for k, v in self.metrics.items()},
            "counts": {k: to_plain(v) for k, v in self.counts.items()},
            "notes": list(self.notes),
        }
        if curves is not False:
            if isinstance(curves, str) or not isinstance(curves, (bool, Collection)):
                raise TypeError(f"curves must be True, False or a collection of curve names; got {curves!r}")
            wanted: Collection[str] = self.curves.keys() if curves is True else curves  # type: ignore[assignment]
            out["curves"] = {k: to_plain(np.asarray(self.curves[k])) for k in wanted if k in self.curves}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """The report written by :meth:`to_dict` (e.g. read back from ``report.json``).

        Parameters
        ----------
        data : mapping
            With ``"title"`` and ``"metrics"``, optionally ``"counts"``, ``"notes"`` and
            ``"curves"``.

        Returns
        -------
        Report
            Rates come back as :class:`Rate`, ``null`` as NaN, ``"Infinity"`` as ``inf``;
            curves as numpy arrays (int64 when every entry is an integer, else float64).
        """
        if not isinstance(data, Mapping) or "title" not in data or "metrics" not in data:
            shown = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"a report needs 'title' and 'metrics'; got {shown}")
        metrics: dict[str, float | Rate] = {}
        for key, value in data["metrics"].items():
            if isinstance(value, Mapping):
                chance = value.get("chance")
                metrics[key] = Rate(
                    int(value["hits"]), int(value["total"]), None if chance is None else from_plain(chance)
                )
            else:
                metrics[key] = float(from_plain(value))
        return cls(
            title=str(data["title"]),
            metrics=metrics,
            counts={k: int(v) for k, v in data.get("counts", {}).items()},
            notes=[str(n) for n in data.get("notes", [])],
            curves={k: _curve_from_plain(v, k) for k, v in data.get("curves", {}).items()},
        )

    def to_json(self, path: str | Path | None = None, *, indent: int = 2, curves: bool = False) -> str:
        """Serialise :meth:`to_dict` as strict JSON; also write it to ``path`` when given."""
        text = json.dumps(self.to_dict(curves=curves), indent=indent, allow_nan=False)
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
                lines.append(f"| {key} | {format_metric(value)} | | |")
        if self.counts:
            lines += ["", ", ".join(f"{k}: {v}" for k, v in self.counts.items())]
        lines += [f"\n> {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        width = max((len(k) for k in self.metrics), default=0)
        lines = [self.title]
        for key, value in self.metrics.items():
            shown = str(value) if isinstance(value, Rate) else format_metric(value)
            lines.append(f"  {key:<{width}}  {shown}")
        if self.counts:
            lines.append("  " + ", ".join(f"{k}: {v}" for k, v in self.counts.items()))
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:  # Jupyter
        return self.to_markdown()


def load_reports(path: str | Path) -> dict[str, Report]:
    """Read the reports of a JSON file: ``embedkit evaluate``'s ``report.json`` or one report.

    Parameters
    ----------
    path : str or Path
        A file written by ``embedkit evaluate --out`` (``{name: report, ..., "run": {...}}``)
        or by :meth:`Report.to_json`.

    Returns
    -------
    dict of str to Report
        By name (``"identification"``, ``"open_set"``, ``"verification"``, ``"retrieval"``),
        or ``{title: report}`` for a single report; entries that are not reports (``"run"``)
        are left out. Curves, when the file has them, can be re-plotted with
        :mod:`embedkit.plotting`.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; expected an object of reports")
    if "title" in data and "metrics" in data:
        return {str(data["title"]): Report.from_dict(data)}
    reports = {
        name: Report.from_dict(value)
        for name, value in data.items()
        if isinstance(value, dict) and "title" in value and "metrics" in value
    }
    if not reports:
        raise ValueError(f"{path} holds no report (objects with 'title' and 'metrics'); keys {sorted(data)}")
    return reports
