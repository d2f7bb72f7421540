"""Figures for evaluation reports (ROC, DET, score histograms, CMC and DIR–FPIR curves), training
histories with the steps where a diagnosis fired, and grids of retrieved matches.

matplotlib is an optional dependency (``pip install embedkit[plot]``); it is imported
only when a plot function is called. Every function draws on ``ax`` when given (or on
a new figure from ``matplotlib.pyplot.subplots``), returns the ``Axes``, and never calls
``plt.show()`` — so they work the same in a notebook, a script with the Agg backend and
a test. Save with ``ax.figure.savefig("roc.png")``. The one exception is
:func:`plot_matches`, which draws a grid of images and so returns its ``Figure``.

Reference lines (chance, FAR = FRR) are computed as curves on the scale of the axes they
are drawn on — densely sampled on a logarithmic axis — so that a line drawn at TAR = FAR
passes through (1e-4, 1e-4) on a log FAR axis, not through a straight chord. Every
report figure reads only the report's metrics and curves, so a report read back from
``report.json`` (:func:`embedkit.evaluation.report.load_reports`) re-plots the same.

Example
-------
>>> from embedkit.evaluation.verification import verification_metrics
>>> from embedkit.plotting import plot_roc
>>> report = verification_metrics(scores, is_genuine)          # doctest: +SKIP
>>> plot_roc(report).figure.savefig("roc.png")                 # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import _to_numpy, as_bool_array, as_float_array, check_int, check_real, describe
from .evaluation.report import Report
from .evaluation.verification import far_key
from .monitors.history import TrainingHistory

__all__ = [
    "chance_curve",
    "plot_cmc",
    "plot_det",
    "plot_dir_fpir",
    "plot_history",
    "plot_matches",
    "plot_roc",
    "plot_score_distributions",
    "plot_score_histograms",
]

# Probabilities that may be labelled on the normal-deviate axes of a DET plot, in order of
# preference: decades first, then the halves and fifths between them.
_DET_TICKS = (1e-4, 1e-3, 1e-2, 0.1, 0.5, 0.9, 0.99, 1e-5, 1e-6, 0.05, 0.2, 0.02, 0.005, 5e-4, 0.3, 0.8, 0.95)
# Labelled DET ticks stay apart by this share of the axis per character of label (a 10 pt
# character is about 7 px, 2% of a 3.5-inch axis at 100 dpi), plus a gap.
_DET_CHAR_SHARE = 0.022
_DET_TICK_PAD = 0.03
# Samples per decade of a reference line on a logarithmic axis.
_PER_DECADE = 64


def _pyplot() -> Any:
    """``matplotlib.pyplot``; a clear ImportError without matplotlib."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "embedkit's plots need matplotlib, which is not installed: pip install embedkit[plot]"
        ) from exc
    return plt


def _axes(ax: Any) -> Any:
    """``ax``, or the axes of a new pyplot figure; a clear ImportError without matplotlib."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 4.5))
    return ax


def _roc_curves(report: Report, function: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(report, Report) or "far" not in report.curves or "tar" not in report.curves:
        raise ValueError(
            f"{function} needs the report of embedkit.evaluation.verification.verification_metrics "
            f"(with curves 'far' and 'tar'); got {type(report).__name__}"
            + (f" with curves {sorted(report.curves)}" if isinstance(report, Report) else "")
        )
    return np.asarray(report.curves["far"], dtype=np.float64), np.asarray(
        report.curves["tar"], dtype=np.float64
    )


def _percent_label(p: float) -> str:
    return f"{100 * p:g}%"


def chance_curve(low: float, high: float = 1.0, *, log: bool = True) -> np.ndarray:
    """Abscissae for a reference line drawn between ``low`` and ``high``.

    On a linear axis a straight line needs its two ends. On a logarithmic axis matplotlib
    joins points by straight chords *in display space*, so ``y = x`` drawn from two points
    is a wrong curve; the line is sampled instead at 64 points per decade, plus every
    power of ten in range, so the drawn chords stay within 0.1% of the formula and pass
    through each decade exactly.

    Parameters
    ----------
    low, high : float
        The range, ``0 < low < high`` on a log axis.
    log : bool
        Whether the axis is logarithmic.

    Returns
    -------
    ndarray of shape (n,)
        Increasing abscissae from ``low`` to ``high``; evaluate the formula on them.
    """
    low, high = check_real(low, "low"), check_real(high, "high")
    if not low < high or (log and low <= 0):
        raise ValueError(
            f"chance_curve needs 0 < low < high on a log axis (low < high otherwise); got {low}, {high}"
        )
    if not log:
        return np.array([low, high])
    a, b = np.log10(low), np.log10(high)
    n = max(2, int(np.ceil((b - a) * _PER_DECADE)) + 1)
    decades = 10.0 ** np.arange(np.ceil(a), np.floor(b) + 1)
    return np.unique(np.r_[10.0 ** np.linspace(a, b, n), decades, low, high])


def plot_roc(report: Report, ax: Any = None, *, log_far: bool = True) -> Any:
    """The ROC curve (TAR against FAR) of a verification report.

    Draws the exact ROC, the chance diagonal (TAR = FAR), a dotted vertical line and a
    marker at each measurable FAR target of the report, and the EER point.

    Parameters
    ----------
    report : Report
        From :func:`embedkit.evaluation.verification.verification_metrics` (uses the
        curves ``"far"``, ``"tar"``, ``"far_targets"`` and the metrics ``"eer"``,
        ``"auc"`` and ``"tar@far=..."``).
    ax : matplotlib Axes, optional
        Where to draw; a new figure when omitted.
    log_far : bool
        Logarithmic FAR axis (where the operating points of face verification lie).
        FAR = 0 points cannot be shown on it and are left out.

    Returns
    -------
    matplotlib Axes
    """
    ax = _axes(ax)
    far, tar = _roc_curves(report, "plot_roc")
    if log_far:
        shown = far > 0
        far, tar = far[shown], tar[shown]
        ax.set_xscale("log")
    label = f"ROC (AUC {report['auc']:.4f})" if "auc" in report else "ROC"
    ax.plot(far, tar, color="C0", label=label)
    targets = [float(t) for t in report.curves.get("far_targets", [])]
    # The chance line reaches the finest FAR shown or asked for; on a log axis it is a curve.
    low = min([float(far.min()) if far.size else 1e-4, *targets]) if log_far else 0.0
    x = chance_curve(low, 1.0, log=log_far)
    ax.plot(x, x, color="grey", linestyle="--", linewidth=1, label="chance (TAR = FAR)")
    measured = [
        (t, report[key]) for t in targets if (key := far_key(t)) in report and np.isfinite(report[key])
    ]
    for target, _ in measured:
        ax.axvline(target, color="C2", linestyle=":", linewidth=1)
    if measured:
        ax.plot(*zip(*measured, strict=True), "o", color="C2", label="TAR @ FAR targets")
    if "eer" in report and (report["eer"] > 0 or not log_far):
        ax.plot([report["eer"]], [1 - report["eer"]], "s", color="C3", label=f"EER {report['eer']:.4f}")
    ax.set_xlabel("FAR (false accept rate)" + (", log scale" if log_far else ""))
    ax.set_ylabel("TAR (true accept rate)")
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return ax


def _det_ticks(low: float, high: float) -> np.ndarray:
    """Probabilities to label on a DET axis spanning ``[low, high]``, decades first.

    Two labels are kept apart by at least their mean length times ``_DET_CHAR_SHARE`` of
    the axis, plus ``_DET_TICK_PAD``: on an axis 3.5 inches or wider (the default figures)
    their texts never touch, however many decades the axis spans.
    """
    from scipy.stats import norm

    span = float(norm.ppf(high) - norm.ppf(low))
    chosen: list[float] = []
    for t in _DET_TICKS:
        if not low <= t <= high:
            continue
        width = len(_percent_label(t))
        if all(
            abs(norm.ppf(t) - norm.ppf(c))
            >= span * (_DET_CHAR_SHARE * (width + len(_percent_label(c))) / 2 + _DET_TICK_PAD)
            for c in chosen
        ):
            chosen.append(t)
    return np.sort(np.asarray(chosen))


def plot_det(report: Report, ax: Any = None) -> Any:
    """The DET curve: FRR against FAR on normal-deviate (probit) axes.

    On these axes, normally distributed genuine and impostor scores give a straight
    line, which makes the tails (low FAR) readable. Points with FAR or FRR equal to 0
    or 1 have no normal deviate and are left out.

    Parameters
    ----------
    report : Report
        From :func:`embedkit.evaluation.verification.verification_metrics` (uses the
        curves ``"far"``, ``"tar"`` and the metric ``"eer"``).
    ax : matplotlib Axes, optional
        Where to draw; a new figure when omitted.

    Returns
    -------
    matplotlib Axes
        Its ticks are labelled in percent, chosen so that labels never run into each
        other (decades first); the data coordinates are ``scipy.stats.norm.ppf`` of the
        rates. Draws the DET curve, the chance line (a random score: FRR = 1 - FAR), the
        FAR = FRR diagonal and the EER point.
    """
    from scipy.stats import norm

    ax = _axes(ax)
    far, tar = _roc_curves(report, "plot_det")
    frr = 1.0 - tar
    shown = (far > 0) & (far < 1) & (frr > 0) & (frr < 1)
    ax.plot(norm.ppf(far[shown]), norm.ppf(frr[shown]), color="C0", label="DET")
    rates = np.r_[far[shown], frr[shown]]
    low = min(float(rates.min()) if rates.size else 1e-3, 1e-2)
    edge = norm.ppf([low / 2, 0.99])
    # Reference lines sampled on the probabilities they stand for (straight on these axes).
    p = np.linspace(low / 2, 0.99, 256)
    chance = (p >= 0.01) & (p <= 1 - low / 2)
    ax.plot(
        norm.ppf(p[chance]),
        norm.ppf(1 - p[chance]),
        color="grey",
        linestyle="--",
        linewidth=1,
        label="chance (FRR = 1 - FAR)",
    )
    ax.plot(norm.ppf(p), norm.ppf(p), color="grey", linestyle=":", linewidth=1, label="FAR = FRR")
    if "eer" in report and 0 < report["eer"] < 1:
        point = norm.ppf(report["eer"])
        ax.plot([point], [point], "s", color="C3", label=f"EER {report['eer']:.4f}")
    ticks = _det_ticks(low / 2, 0.99)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_ticks(norm.ppf(ticks))
        axis.set_ticklabels([_percent_label(t) for t in ticks])
        axis.set_ticks([], minor=True)
    ax.set_xlim(*edge)
    ax.set_ylim(*edge)
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("FRR (false reject rate)")
    if not shown.any():
        ax.set_title("no errors: the DET curve is empty")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    return ax


def plot_dir_fpir(report: Report, ax: Any = None) -> Any:
    """Open-set identification: DIR against FPIR (log scale), with the chance level.

    Parameters
    ----------
    report : Report
        The ``"open_set"`` report of :meth:`embedkit.evaluation.Gallery.evaluate` or
        :meth:`~embedkit.evaluation.Gallery.dir_at_fpir` (uses the curves ``"fpir"`` and
        ``"dir"``, the count ``"identities"`` and the metrics ``"dir@fpir=<f>"`` with
        ``"fpir@fpir=<f>"``).
    ax : matplotlib Axes, optional
        Where to draw; a new figure when omitted.

    Returns
    -------
    matplotlib Axes
        The DIR–FPIR curve (points at FPIR 0 cannot be shown on the log axis and are left
        out); the chance line ``DIR = FPIR / C`` for ``C`` enrolled identities — what a
        scorer that ignores identity reaches — drawn as a curve on the log axis; a marker
        at each reported operating point, placed at the FPIR it achieves.
    """
    if not isinstance(report, Report) or "fpir" not in report.curves or "dir" not in report.curves:
        raise ValueError(
            "plot_dir_fpir needs the open-set report of Gallery.dir_at_fpir or Gallery.evaluate (with "
            f"curves 'fpir' and 'dir'); got {type(report).__name__}"
            + (f" with curves {sorted(report.curves)}" if isinstance(report, Report) else "")
        )
    fpir = np.asarray(report.curves["fpir"], dtype=np.float64)
    dir_ = np.asarray(report.curves["dir"], dtype=np.float64)
    order = np.argsort(fpir, kind="stable")
    fpir, dir_ = fpir[order], dir_[order]
    shown = fpir > 0
    ax = _axes(ax)
    ax.set_xscale("log")
    ax.plot(fpir[shown], dir_[shown], color="C0", drawstyle="steps-post", label="DIR")
    points = []
    for key in report:
        if key.startswith("dir@fpir="):
            achieved = key.replace("dir@", "fpir@", 1)
            if achieved in report and report[achieved] > 0:
                points.append((report[achieved], report[key]))
    low = min([float(fpir[shown].min()) if shown.any() else 1e-3, *(x for x, _ in points)])
    identities = report.counts.get("identities")
    if identities:
        x = chance_curve(low, 1.0)
        ax.plot(
            x,
            x / identities,
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"chance (FPIR / {identities})",
        )
    if points:
        ax.plot(*zip(*points, strict=True), "o", color="C2", label="DIR @ FPIR targets (achieved FPIR)")
    ax.set_xlabel("FPIR (false positive identification rate), log scale")
    ax.set_ylabel("DIR (detection and identification rate)")
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return ax


def plot_score_distributions(report: Report, ax: Any = None, *, threshold: float | None = None) -> Any:
    """Genuine and impostor score densities from a verification report's histograms.

    Uses the curves ``"score_bin_edges"``, ``"genuine_histogram"`` and
    ``"impostor_histogram"`` that :func:`~embedkit.evaluation.verification.verification_metrics`
    and :func:`~embedkit.evaluation.verification.all_pairs_verification` store (exact
    counts over all pairs, however many impostor pairs there were), so it also draws a
    report read back from ``report.json``.

    Parameters
    ----------
    report : Report
        A verification report.
    ax : matplotlib Axes, optional
        Where to draw; a new figure when omitted.
    threshold : float, optional
        A decision threshold to mark; the report's ``"best_threshold"`` when omitted.

    Returns
    -------
    matplotlib Axes
        One filled step patch per class (density: count / (pairs × bin width)) and a line at
        the threshold.
    """
    needed = ("score_bin_edges", "genuine_histogram", "impostor_histogram")
    if not isinstance(report, Report) or any(k not in report.curves for k in needed):
        raise ValueError(
            f"plot_score_distributions needs a verification report with curves {list(needed)}; got "
            f"{type(report).__name__}"
            + (f" with curves {sorted(report.curves)}" if isinstance(report, Report) else "")
        )
    edges = np.asarray(report.curves["score_bin_edges"], dtype=np.float64)
    widths = np.diff(edges)
    ax = _axes(ax)
    for key, name, color in (
        ("genuine_histogram", "genuine", "C0"),
        ("impostor_histogram", "impostor", "C1"),
    ):
        counts = np.asarray(report.curves[key], dtype=np.float64)
        total = counts.sum()
        if total > 0:
            ax.stairs(
                counts / (total * widths),
                edges,
                fill=True,
                alpha=0.45,
                color=color,
                label=f"{name} (n={int(total)})",
            )
    if threshold is None and "best_threshold" in report and np.isfinite(report["best_threshold"]):
        threshold = report["best_threshold"]
    if threshold is not None:
        ax.axvline(
            float(threshold), color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:.4g}"
        )
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.legend()
    return ax


def plot_score_histograms(
    scores: Any, is_genuine: Any, ax: Any = None, *, threshold: float | None = None, bins: int = 50
) -> Any:
    """Histograms of genuine and impostor scores on shared bins (densities).

    Parameters
    ----------
    scores : array-like or Tensor of shape (n_pairs,)
        Finite scores (or distances).
    is_genuine : array-like or Tensor of shape (n_pairs,)
        True (or 1) for genuine pairs, False (or 0) for impostor pairs.
    ax : matplotlib Axes, optional
        Where to draw; a new figure when omitted.
    threshold : float, optional
        Draw a vertical line at this decision threshold (e.g. ``report["best_threshold"]``).
    bins : int
        Number of shared bins.

    Returns
    -------
    matplotlib Axes
        One filled patch per class present, plus a line at the threshold.
    """
    values = as_float_array(scores, "scores")
    genuine = as_bool_array(is_genuine, "is_genuine", length=values.shape[0], length_name="scores")
    ax = _axes(ax)
    edges = np.histogram_bin_edges(values, bins=bins)
    for mask, name, color in ((genuine, "genuine", "C0"), (~genuine, "impostor", "C1")):
        if mask.any():
            ax.hist(
                values[mask],
                bins=edges,
                density=True,
                histtype="stepfilled",
                alpha=0.45,
                color=color,
                label=f"{name} (n={int(mask.sum())})",
            )
    if threshold is not None:
        ax.axvline(float(threshold), color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.legend()
    return ax


def plot_cmc(cmc_values_or_report: Any, ax: Any = None, *, chance: Any = None, label: str = "CMC") -> Any:
    """The CMC curve: identification rate against rank, with the chance level.

    Parameters
    ----------
    cmc_values_or_report : array-like of shape (max_rank,), or Report
        Identification rate at ranks 1..max_rank, or a report whose
        ``curves["cmc"]`` holds them (and, optionally, ``curves["cmc_chance"]``).
    ax : matplotlib Axes, optional
        Where to draw; a new figure when omitted.
    chance : float or array-like of shape (max_rank,), optional
        The chance level: a float is the rank-1 chance (``1 / gallery identities``), and
        rank ``k`` then has chance ``min(1, k * chance)``; an array gives it per rank.
        Taken from the report's ``curves["cmc_chance"]`` when omitted.
    label : str
        Legend entry of the curve; call again on the same ``ax`` with another label to
        compare runs (each curve takes the next colour of the cycle).

    Returns
    -------
    matplotlib Axes
        The CMC line, plus the chance line when a chance level is known.
    """
    if isinstance(cmc_values_or_report, Report):
        if "cmc" not in cmc_values_or_report.curves:
            raise ValueError(
                "cmc_values_or_report is a Report without curves['cmc']; it has curves "
                f"{sorted(cmc_values_or_report.curves)}"
            )
        values = as_float_array(cmc_values_or_report.curves["cmc"], "curves['cmc']")
        if chance is None:
            chance = cmc_values_or_report.curves.get("cmc_chance")
    else:
        values = as_float_array(cmc_values_or_report, "cmc_values_or_report")
    if values.min() < 0 or values.max() > 1:
        raise ValueError(
            f"CMC values must be rates in [0, 1]; got values in [{values.min():g}, {values.max():g}]"
        )
    ranks = np.arange(1, values.shape[0] + 1)
    if chance is not None:
        if np.ndim(chance) == 0:
            chance_values = np.minimum(1.0, ranks * float(chance))
        else:
            chance_values = as_float_array(chance, "chance")
            if chance_values.shape != values.shape:
                raise ValueError(
                    f"chance has {chance_values.shape[0]} values but there are {values.shape[0]} ranks; "
                    "expected a float or one chance level per rank"
                )
    ax = _axes(ax)
    ax.plot(ranks, values, marker="o" if values.shape[0] <= 30 else None, label=label)
    if chance is not None:
        ax.plot(ranks, chance_values, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlim(0.5, values.shape[0] + 0.5)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return ax


# A line with at most this many points gets a marker on every point.
_FEW_POINTS = 30
_CORRECT_COLOR = "tab:green"
_WRONG_COLOR = "tab:red"
_EVENT_COLOR = "red"


def _history_keys(keys: Any) -> list[str]:
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, Sequence) or len(keys) == 0:
        raise TypeError(f"keys must be a str or a non-empty sequence of str; got {describe(keys)}")
    for k, key in enumerate(keys):
        if not isinstance(key, str):
            raise TypeError(f"keys[{k}] must be a str (a recorded name); got {describe(key)}")
    return list(keys)


def _history_series(history: Any, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The steps and values of ``key`` in a TrainingHistory or a mapping of key to (steps, values)."""
    if isinstance(history, TrainingHistory):
        if key not in history.keys:
            known = ", ".join(repr(k) for k in history.keys) or "nothing recorded yet"
            raise ValueError(f"keys: {key!r} is not in the history; it has {known}")
        return history.series(key)
    if not isinstance(history, Mapping):
        raise TypeError(
            "history must be a TrainingHistory or a mapping of key to (steps, values); "
            f"got {describe(history)}"
        )
    if key not in history:
        known = ", ".join(repr(k) for k in history) or "no keys"
        raise ValueError(f"keys: {key!r} is not in the history; it has {known}")
    entry = history[key]
    if (
        isinstance(entry, (str, bytes))
        or not isinstance(entry, (Sequence, np.ndarray, Tensor))
        or len(entry) != 2
    ):
        raise TypeError(f"history[{key!r}] must be a (steps, values) pair; got {describe(entry)}")
    steps = as_float_array(entry[0], f"history[{key!r}] steps", allow_empty=True)
    values = _to_numpy(entry[1], f"history[{key!r}] values", "a 1-D array, tensor or sequence of numbers")
    if values.dtype == np.bool_ or values.dtype.kind not in "iuf":
        raise TypeError(f"history[{key!r}] values must hold real numbers; got {describe(values)}")
    if values.ndim != 1 or values.shape[0] != steps.shape[0]:
        raise ValueError(
            f"history[{key!r}] has {steps.shape[0]} steps but values of shape {values.shape}; "
            "expected one value per step"
        )
    return steps, values.astype(np.float64)


def _history_events(events: Any) -> list[tuple[float, str]]:
    """``events`` as (step, text) pairs, the texts of events at the same step joined."""
    if events is None:
        return []
    if isinstance(events, (str, bytes)) or not isinstance(events, Sequence):
        raise TypeError(
            "events must be a sequence of (step, text) pairs such as [(1200, 'class_collapse')]; "
            f"got {describe(events)}"
        )
    merged: dict[float, list[str]] = {}
    for k, event in enumerate(events):
        if isinstance(event, (str, bytes)) or not isinstance(event, Sequence) or len(event) != 2:
            raise TypeError(
                f"events[{k}] must be a (step, text) pair such as (1200, 'class_collapse'); "
                f"got {describe(event)}"
            )
        step = check_real(event[0], f"events[{k}] step")
        if not isinstance(event[1], str):
            raise TypeError(
                f"events[{k}] text must be a str such as 'class_collapse'; got {describe(event[1])}"
            )
        merged.setdefault(step, []).append(event[1])
    return [(step, ", ".join(texts)) for step, texts in merged.items()]


def plot_history(
    history: TrainingHistory | Mapping[str, Any],
    keys: str | Sequence[str],
    ax: Any = None,
    *,
    events: Sequence[tuple[float, str]] | None = None,
    labels: Mapping[str, str] | None = None,
    chance: float | None = None,
    ylabel: str | None = None,
    logy: bool = False,
) -> Any:
    """Recorded statistics against the training step, with the steps where diagnoses fired.

    Parameters
    ----------
    history : TrainingHistory or mapping of str to (steps, values)
        A :class:`~embedkit.monitors.history.TrainingHistory` (Rates are drawn as their
        values), or ``{key: (steps, values)}`` with 1-D array-likes or tensors of the
        same length ``n``.
    keys : str or sequence of str
        The names to draw, one line each (with a marker on every point when a line has
        at most 30 points). NaN and infinite values are left as gaps in the line.
    ax : matplotlib Axes, optional
        Where to draw; a new figure when omitted.
    events : sequence of (float, str), optional
        ``(step, text)`` pairs, e.g. ``[(1200, "class_collapse")]`` for the step at which
        a monitor's diagnosis first fired. Each is a dotted red vertical line with its
        text written upwards near the top of the axes; the legend has one entry
        "diagnosis first fired" for all of them. Texts of events at the same step are
        joined with ", ".
    labels : mapping of str to str, optional
        Legend label of a key (default: the key itself); keys not drawn are ignored.
    chance : float, optional
        Draw the chance level of the statistic as a grey dashed horizontal line.
    ylabel : str, optional
        The y axis label (the x axis is labelled "step").
    logy : bool
        Logarithmic y axis (for losses); values <= 0 cannot be shown on it.

    Returns
    -------
    matplotlib Axes
        One line per key in the order given, then the chance line, then one vertical
        line per event step.

    Examples
    --------
    >>> ax = plot_history(history, "top1", chance=1 / 1000, ylabel="top-1 accuracy",
    ...                   events=[(1200, "class_collapse")])           # doctest: +SKIP
    """
    names = _history_keys(keys)
    series = [_history_series(history, key) for key in names]
    if labels is not None and not isinstance(labels, Mapping):
        raise TypeError(f"labels must be a mapping of key to legend label; got {describe(labels)}")
    legend = {key: key for key in names}
    for key in names:
        if labels is not None and key in labels:
            if not isinstance(labels[key], str):
                raise TypeError(f"labels[{key!r}] must be a str; got {describe(labels[key])}")
            legend[key] = labels[key]
    level = None if chance is None else check_real(chance, "chance")
    marks = _history_events(events)
    if ylabel is not None and not isinstance(ylabel, str):
        raise TypeError(f"ylabel must be a str; got {describe(ylabel)}")
    if not isinstance(logy, (bool, np.bool_)):
        raise TypeError(f"logy must be True or False; got {describe(logy)}")

    ax = _axes(ax)
    for key, (steps, values) in zip(names, series, strict=True):
        ax.plot(steps, values, marker="o" if steps.shape[0] <= _FEW_POINTS else None, label=legend[key])
    if level is not None:
        ax.axhline(level, color="grey", linestyle="--", linewidth=1, label="chance")
    # x in data coordinates, y in axes coordinates: the texts stay near the top whatever the y range.
    top = ax.get_xaxis_transform()
    for k, (step, text) in enumerate(marks):
        ax.axvline(
            step,
            color=_EVENT_COLOR,
            linestyle=":",
            linewidth=1.5,
            label="diagnosis first fired" if k == 0 else "_nolegend_",
        )
        ax.text(
            step, 0.98, text, transform=top, rotation=90, ha="right", va="top", fontsize=8, color=_EVENT_COLOR
        )
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.grid(True, which="both" if logy else "major", alpha=0.3)
    ax.legend()
    return ax


def _image_stack(images: Any, name: str) -> tuple[Any, bool]:
    """``images`` as a tensor or array of images, and whether its channels come first."""
    expected = "(n, 3, H, W), (n, H, W, 3) or (n, H, W)"
    if isinstance(images, Tensor):
        floating = images.is_floating_point() or images.dtype == torch.uint8
    else:
        if not isinstance(images, np.ndarray):
            if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
                raise TypeError(
                    f"{name} must be an array or tensor of shape {expected}; got {describe(images)}"
                )
            images = np.asarray(images)
        floating = images.dtype.kind == "f" or images.dtype == np.uint8
    if not floating:
        raise TypeError(f"{name} must hold floats in [0, 1] (or uint8 in [0, 255]); got {describe(images)}")
    shape = tuple(images.shape)
    if len(shape) == 4 and shape[1] in (1, 3):
        channels_first = True
    elif len(shape) == 4 and shape[3] in (1, 3):
        channels_first = False
    elif len(shape) == 3:
        channels_first = False  # grayscale
    else:
        raise ValueError(f"{name} must have shape {expected} (1 channel also works); got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {shape}); expected at least one image")
    return images, channels_first


def _image_rows(images: Any, channels_first: bool, rows: np.ndarray, name: str) -> np.ndarray:
    """Rows ``rows`` of ``images`` as float64 (m, H, W, 3) or (m, H, W), clipped to [0, 1]."""
    if isinstance(images, Tensor):
        picked = _to_numpy(images[torch.as_tensor(rows, device=images.device)], name, "")
    else:
        picked = images[rows]
    array = picked / 255.0 if picked.dtype == np.uint8 else picked.astype(np.float64)
    finite = np.isfinite(array).reshape(array.shape[0], -1).all(axis=1)
    if not finite.all():
        bad = rows[~finite].tolist()
        raise ValueError(
            f"{name} holds NaN or inf in the image(s) at row(s) {bad[:5]}; expected finite pixel values"
        )
    if channels_first:
        array = np.moveaxis(array, 1, -1)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    return np.clip(array, 0.0, 1.0)


def _match_table(values: Any, name: str, shape: tuple[int, ...] | None) -> np.ndarray:
    """A 2-D (n_probes, k) array, of ``shape`` when given."""
    array = _to_numpy(values, name, "a 2-D array or tensor of shape (n_probes, k)")
    if shape is None:
        if array.ndim != 2 or 0 in array.shape:
            raise ValueError(
                f"{name} must be 2-D and non-empty, of shape (n_probes, k); got shape {array.shape}"
            )
    elif array.shape != shape:
        raise ValueError(
            f"{name} has shape {array.shape} but indices has shape {shape}; expected one entry per match"
        )
    return array


def _show_image(ax: Any, image: np.ndarray, title: str, color: str | None) -> None:
    if image.ndim == 2:
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8, color=color or "black")
    if color is not None:
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(3)


def plot_matches(
    probe_images: Any,
    gallery_images: Any,
    indices: Any,
    is_correct: Any,
    *,
    scores: Any = None,
    max_probes: int = 8,
    fig: Any = None,
) -> Any:
    """A grid of probes and their top-k gallery matches, framed green (correct) or red.

    Row ``i`` shows ``probe_images[i]`` (titled "probe") followed by the gallery images
    ``gallery_images[indices[i, 0]], gallery_images[indices[i, 1]], ...`` in rank order,
    each titled with its rank and score (``"#1 0.831"``) and framed in green when
    ``is_correct[i, j]`` is true, red otherwise.

    Parameters
    ----------
    probe_images : ndarray or Tensor of shape (n, 3, H, W), (n, H, W, 3) or (n, H, W)
        Channels first (as torch models take them), channels last, or grayscale; floats
        in [0, 1] (values outside are clipped) or uint8 in [0, 255]. Tensors may be on
        any device. Needs at least as many images as rows drawn.
    gallery_images : ndarray or Tensor of shape (n_gallery, ...)
        The gallery, in any of the layouts ``probe_images`` may have. Only the images
        drawn are copied to the host and checked to be finite (as are the probes).
    indices : array-like or Tensor of shape (n_probes, k) and integer dtype
        Row ``i``: the gallery rows of the top-k matches of probe ``i``, best first,
        each in ``[0, n_gallery)``.
    is_correct : array-like or Tensor of shape (n_probes, k)
        Booleans (or 0/1): whether each match has the probe's identity.
    scores : array-like or Tensor of shape (n_probes, k), optional
        The score (or distance) of each match, shown after its rank.
    max_probes : int
        Draw the first ``min(max_probes, n_probes)`` probes only.
    fig : matplotlib Figure, optional
        An empty figure (or subfigure) to draw into; a new one sized to the grid when
        omitted.

    Returns
    -------
    matplotlib Figure
        Not an Axes, since this is a grid: ``fig.axes`` holds
        ``min(max_probes, n_probes) * (k + 1)`` axes, row by row, each without ticks.
        Save with ``fig.savefig("matches.png")``.
    """
    probes, probes_first = _image_stack(probe_images, "probe_images")
    gallery, gallery_first = _image_stack(gallery_images, "gallery_images")
    index = _match_table(indices, "indices", None)
    if index.dtype.kind not in "iu":
        raise TypeError(f"indices must hold integer gallery rows; got {describe(index)}")
    correct = _match_table(is_correct, "is_correct", index.shape)
    if correct.dtype != np.bool_:
        if correct.dtype.kind not in "iu":
            raise TypeError(f"is_correct must hold booleans (or integers 0/1); got {describe(correct)}")
        if not np.isin(correct, (0, 1)).all():
            raise ValueError("is_correct must hold only booleans or 0/1; found other values")
        correct = correct.astype(bool)
    score = None
    if scores is not None:
        score = _match_table(scores, "scores", index.shape)
        if score.dtype == np.bool_ or score.dtype.kind not in "iuf":
            raise TypeError(f"scores must hold real numbers; got {describe(score)}")
    max_probes = check_int(max_probes, "max_probes", low=1)
    n_gallery = int(gallery.shape[0])
    if index.min() < 0 or index.max() >= n_gallery:
        bad = int(index.min()) if index.min() < 0 else int(index.max())
        raise ValueError(
            f"indices must be gallery rows in [0, {n_gallery}) (gallery_images has {n_gallery} images); "
            f"found {bad}"
        )
    n_rows, k = min(max_probes, index.shape[0]), index.shape[1]
    if probes.shape[0] < n_rows:
        raise ValueError(
            f"probe_images has {probes.shape[0]} images but {n_rows} probe rows are drawn (indices has "
            f"{index.shape[0]} rows, max_probes={max_probes}); row i of indices belongs to probe_images[i]"
        )
    if fig is not None:
        from matplotlib.figure import FigureBase

        if not isinstance(fig, FigureBase):
            raise TypeError(f"fig must be a matplotlib Figure; got {describe(fig)}")
    plt = _pyplot()

    probe_rows = _image_rows(probes, probes_first, np.arange(n_rows), "probe_images")
    wanted = np.unique(index[:n_rows])
    gallery_rows = _image_rows(gallery, gallery_first, wanted, "gallery_images")
    if fig is None:
        fig = plt.figure(figsize=(1.5 * (k + 1), 1.7 * n_rows))
    axes = fig.subplots(n_rows, k + 1, squeeze=False)
    for i in range(n_rows):
        _show_image(axes[i, 0], probe_rows[i], "probe", None)
        for j in range(k):
            title = f"#{j + 1}" if score is None else f"#{j + 1} {float(score[i, j]):.3g}"
            image = gallery_rows[np.searchsorted(wanted, index[i, j])]
            _show_image(axes[i, j + 1], image, title, _CORRECT_COLOR if correct[i, j] else _WRONG_COLOR)
    if fig.get_layout_engine() is None:  # leave a constrained or tight layout to itself
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.92, wspace=0.1, hspace=0.35)
    return fig
