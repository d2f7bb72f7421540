"""Figures for evaluation reports: ROC, DET, score histograms and CMC curves.

matplotlib is an optional dependency (``pip install embedkit[plot]``); it is imported
only when a plot function is called. Every function draws on ``ax`` when given (or on
a new figure from ``matplotlib.pyplot.subplots``), returns the ``Axes``, and never calls
``plt.show()`` — so they work the same in a notebook, a script with the Agg backend and
a test. Save with ``ax.figure.savefig("roc.png")``.

Example
-------
>>> from embedkit.evaluation.verification import verification_metrics
>>> from embedkit.plotting import plot_roc
>>> report = verification_metrics(scores, is_genuine)          # doctest: +SKIP
>>> plot_roc(report).figure.savefig("roc.png")                 # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import as_bool_array, as_float_array
from .evaluation.report import Report
from .evaluation.verification import far_key

__all__ = ["plot_cmc", "plot_det", "plot_roc", "plot_score_histograms"]

# Probabilities labelled on the normal-deviate axes of a DET plot.
_DET_TICKS = (1e-4, 1e-3, 1e-2, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99)


def _axes(ax: Any) -> Any:
    """``ax``, or the axes of a new pyplot figure; a clear ImportError without matplotlib."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "embedkit's plots need matplotlib, which is not installed: pip install embedkit[plot]"
        ) from exc
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
    low = float(far.min()) if far.size else 1e-4
    ax.plot([low, 1.0], [low, 1.0], color="grey", linestyle="--", linewidth=1, label="chance (TAR = FAR)")
    targets = [float(t) for t in report.curves.get("far_targets", [])]
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
        Its ticks are labelled in percent; the data coordinates are
        ``scipy.stats.norm.ppf`` of the rates. Draws the DET curve, the FAR = FRR
        diagonal and the EER point.
    """
    from scipy.stats import norm

    ax = _axes(ax)
    far, tar = _roc_curves(report, "plot_det")
    frr = 1.0 - tar
    shown = (far > 0) & (far < 1) & (frr > 0) & (frr < 1)
    ax.plot(norm.ppf(far[shown]), norm.ppf(frr[shown]), color="C0", label="DET")
    rates = np.r_[far[shown], frr[shown]]
    low = min(float(rates.min()) if rates.size else 1e-3, 1e-2)
    ticks = np.array([t for t in _DET_TICKS if low / 2 <= t <= 0.99])
    edge = norm.ppf([low / 2, 0.99])
    ax.plot(edge, edge, color="grey", linestyle="--", linewidth=1, label="FAR = FRR")
    if "eer" in report and 0 < report["eer"] < 1:
        point = norm.ppf(report["eer"])
        ax.plot([point], [point], "s", color="C3", label=f"EER {report['eer']:.4f}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_ticks(norm.ppf(ticks))
        axis.set_ticklabels([_percent_label(t) for t in ticks])
    ax.set_xlim(*edge)
    ax.set_ylim(*edge)
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("FRR (false reject rate)")
    if not shown.any():
        ax.set_title("no errors: the DET curve is empty")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
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
