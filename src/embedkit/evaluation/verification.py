"""Verification metrics: is this pair of images the same identity?

Every metric here is computed exactly from the sorted scores — the approach of
scikit-learn's ``_binary_clf_curve`` — never on a grid of thresholds and never by
interpolating the ROC (except the EER, whose crossing is interpolated and says so).

Conventions
-----------
* A *score* is higher for pairs more likely to be genuine (a cosine similarity).
  A pair is **accepted** at threshold ``t`` when ``score >= t``. Distances (lower =
  genuine, FaceNet) are accepted when ``distance <= t``; only
  :func:`val_far_at_threshold` takes distances directly (``score_kind="distance"``),
  elsewhere pass ``-distances``.
* *Genuine* pairs (same identity, "mated") and *impostor* pairs (different
  identities, "non-mated") are told apart by ``is_genuine``.
* FAR (false accept rate) = accepted impostor pairs / impostor pairs;
  TAR (true accept rate, FaceNet's VAL) = accepted genuine pairs / genuine pairs;
  FRR (false reject rate) = 1 - TAR.
* The ROC has one point per distinct score (ties are one threshold: all pairs
  with that score are accepted together), plus the point (FAR, TAR) = (0, 0) at
  threshold ``+inf``.

Inputs may be numpy arrays, sequences or torch tensors on any device; they are
converted to numpy once, at the boundary. A set of pairs without a genuine or
without an impostor pair raises a ``ValueError`` rather than returning NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._checks import (
    as_bool_array,
    as_float_array,
    as_label_array,
    check_choice,
    check_int,
    check_rate_targets,
    check_real,
)
from ..similarity import METRICS, Metric, l2_normalize, similarity_blocks, working_dtype
from ._inputs import as_embeddings, as_image_ids, progress_bar
from .report import Rate, Report

__all__ = [
    "DEFAULT_FAR_TARGETS",
    "HISTOGRAM_BINS",
    "PairsFile",
    "all_pairs_verification",
    "best_threshold_accuracy",
    "equal_error_rate",
    "far_key",
    "kfold_accuracy",
    "make_pairs",
    "pair_scores",
    "read_pairs_file",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "unmeasurable_target_note",
    "val_far_at_threshold",
    "verification_metrics",
]

DEFAULT_FAR_TARGETS: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
# Bins of the genuine and impostor score histograms stored in verification reports.
HISTOGRAM_BINS = 50

# Elements gathered per chunk in pair_scores (two chunk × dim matrices of this size).
_PAIR_CHUNK_ELEMENTS = 1 << 22
# Cells of the boolean label-comparison block when enumerating all impostor pairs.
_ENUMERATION_BLOCK = 1 << 24
# Random pairs drawn per round of impostor rejection sampling (bounds its memory).
_MAX_DRAWS = 1 << 24
# Scores per block in all_pairs_verification: 64 MiB in float32. Above glibc's largest mmap
# threshold (32 MiB), so every block is mapped and unmapped whole; blocks just under it were
# served from the heap, whose fragments grew the process by 2.3 GB over 1e9 pairs.
_STREAM_BLOCK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------- inputs


def _check_pairs_input(
    scores: Any, is_genuine: Any, scores_name: str = "scores"
) -> tuple[np.ndarray, np.ndarray]:
    """Validate scores and ``is_genuine`` (both classes present) and convert them to numpy once."""
    values = as_float_array(scores, scores_name)
    genuine = as_bool_array(is_genuine, "is_genuine", length=values.shape[0], length_name=scores_name)
    n_genuine = int(np.count_nonzero(genuine))
    if n_genuine == 0 or n_genuine == genuine.shape[0]:
        missing, present = ("genuine", "impostor") if n_genuine == 0 else ("impostor", "genuine")
        raise ValueError(
            f"is_genuine has no {missing} pairs (all {genuine.shape[0]} pairs are {present}); "
            "verification metrics need at least one genuine (True) and one impostor (False) pair"
        )
    return values, genuine


def far_key(far: float) -> str:
    """The report key of TAR at a FAR target, with the FAR written as a plain decimal.

    Parameters
    ----------
    far : float
        A FAR target, e.g. ``1e-3``.

    Returns
    -------
    str
        e.g. ``"tar@far=0.001"``; the threshold achieving it is under
        ``"threshold@far=0.001"``.
    """
    return f"tar@far={np.format_float_positional(far, trim='-')}"


# --------------------------------------------------------------------------- exact ROC


@dataclass(frozen=True)
class _Roc:
    """Cumulative counts at each distinct threshold, in decreasing threshold order.

    ``fps[0] = tps[0] = 0`` at ``thresholds[0] = +inf``; the last point accepts every pair.
    """

    fps: np.ndarray  # int64, accepted impostor pairs
    tps: np.ndarray  # int64, accepted genuine pairs
    thresholds: np.ndarray  # float64, decreasing
    n_genuine: int
    n_impostor: int

    @cached_property
    def far(self) -> np.ndarray:
        return self.fps / self.n_impostor

    @cached_property
    def tar(self) -> np.ndarray:
        return self.tps / self.n_genuine


def _sort_descending(scores: np.ndarray, genuine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores in decreasing order and the genuine flags that go with them.

    Genuine and impostor scores are sorted separately with numpy's (SIMD) quicksort,
    then merged: the smaller sorted set finds its places in the larger one by binary
    search, and both are written into those places. This is several times faster than
    one argsort of all scores (and than scikit-learn's merge sort). The order inside a
    group of tied scores is irrelevant: a tie is one threshold.
    """
    pos = np.sort(scores[genuine])
    neg = np.sort(scores[~genuine])
    small, large = (pos, neg) if pos.shape[0] <= neg.shape[0] else (neg, pos)
    # Ascending merged index of each element of ``small``: the larger set's elements not
    # above it come first, then the smaller set's own predecessors.
    at = np.searchsorted(large, small, side="right") + np.arange(small.shape[0])
    in_small = np.zeros(scores.shape[0], dtype=bool)
    in_small[at] = True
    merged = np.empty_like(scores)
    merged[in_small] = small
    merged[~in_small] = large
    genuine_ascending = in_small if small is pos else ~in_small
    return merged[::-1], genuine_ascending[::-1]


def _roc_from_sorted(scores_desc: np.ndarray, genuine_desc: np.ndarray) -> _Roc:
    """Exact ROC counts from (non-empty) scores sorted in decreasing order.

    Ties are one threshold: the counts are read at the last index of each run of equal
    scores. Outputs are written in place, to keep temporaries of the input's size few.
    """
    n = scores_desc.shape[0]
    last_of_value = np.empty(n, dtype=bool)
    np.not_equal(scores_desc[1:], scores_desc[:-1], out=last_of_value[:-1])
    last_of_value[-1] = True
    ends = np.flatnonzero(last_of_value)
    tps = np.zeros(ends.shape[0] + 1, dtype=np.int64)
    np.take(np.cumsum(genuine_desc, dtype=np.int64), ends, out=tps[1:])
    fps = np.zeros_like(tps)
    np.add(ends, 1, out=fps[1:])
    fps[1:] -= tps[1:]
    thresholds = np.empty(tps.shape[0], dtype=np.float64)
    thresholds[0] = np.inf
    thresholds[1:] = scores_desc[ends]
    return _Roc(fps=fps, tps=tps, thresholds=thresholds, n_genuine=int(tps[-1]), n_impostor=int(fps[-1]))


def _roc(scores: np.ndarray, genuine: np.ndarray) -> _Roc:
    return _roc_from_sorted(*_sort_descending(scores, genuine))


def roc_curve(scores: Any, is_genuine: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact ROC: FAR and TAR at every distinct score.

    Parameters
    ----------
    scores : array-like or Tensor of shape (n_pairs,)
        Finite scores, higher for pairs more likely genuine.
    is_genuine : array-like or Tensor of shape (n_pairs,)
        True (or 1) for genuine pairs, False (or 0) for impostor pairs; both must occur.

    Returns
    -------
    far : ndarray of shape (n_thresholds + 1,)
        False accept rate (over impostor pairs) when accepting ``score >= thresholds[i]``.
    tar : ndarray of shape (n_thresholds + 1,)
        True accept rate (over genuine pairs) at the same thresholds.
    thresholds : ndarray of shape (n_thresholds + 1,)
        ``+inf`` (accept nothing), then the distinct scores in decreasing order.

    Notes
    -----
    The same curve as ``sklearn.metrics.roc_curve(is_genuine, scores, drop_intermediate=False)``
    (which it is tested against), several times faster on large inputs.
    """
    roc = _roc(*_check_pairs_input(scores, is_genuine))
    return roc.far, roc.tar, roc.thresholds


# --------------------------------------------------------------------------- metrics on the ROC


def _auc(roc: _Roc) -> float:
    """Trapezoid area under (FAR, TAR), summed exactly in integer counts, divided once.

    Twice the area in units of pairs is sum(ΔFA · (TA_k + TA_(k+1))), an integer below
    2 · n_genuine · n_impostor: int64 holds it up to 2**62, Python integers beyond
    (all-pairs verification of large galleries reaches 1e18).
    """
    steps, heights = np.diff(roc.fps), roc.tps[1:] + roc.tps[:-1]
    if 2 * roc.n_genuine * roc.n_impostor < 2**62:
        twice_area = int(np.dot(steps, heights))
    else:
        twice_area = sum(a * b for a, b in zip(steps.tolist(), heights.tolist(), strict=True))
    return twice_area / (2 * roc.n_genuine * roc.n_impostor)


def _eer(roc: _Roc) -> float:
    """FAR = FRR, interpolated linearly between the two ROC points that bracket the crossing.

    On a horizontal segment (FRR constant) the crossing is that FRR, and on a vertical one
    (FAR constant) that FAR, exactly: the answer then does not depend on which collinear
    points of the segment are kept, so a ROC with its collinear points dropped (the
    streaming one of :func:`all_pairs_verification`) gives the same number.
    """
    far = roc.far
    frr = 1.0 - roc.tar
    gap = far - frr  # non-decreasing from -1 (threshold +inf) to +1 (accept all)
    j = int(np.searchsorted(gap, 0.0, side="left"))
    if gap[j] == 0.0:
        return float(far[j])
    if roc.tps[j] == roc.tps[j - 1]:
        return float(frr[j])
    if roc.fps[j] == roc.fps[j - 1]:
        return float(far[j])
    w = -gap[j - 1] / (gap[j] - gap[j - 1])
    return float(far[j - 1] + w * (far[j] - far[j - 1]))


def _max_false_accepts(targets: np.ndarray, n_impostor: int) -> np.ndarray:
    """Largest k with ``k / n_impostor <= target`` (in floating point, like FAR itself)."""
    k = np.floor(targets * n_impostor).astype(np.int64)
    k = np.where((k + 1) / n_impostor <= targets, k + 1, k)
    return np.where(k / n_impostor > targets, k - 1, k)


def unmeasurable_target_note(
    key: str, target: float, n_negative: int, negatives: str, measured_key: str
) -> str:
    """The note for an operating-point target finer than one error in ``n_negative`` trials.

    One rule serves TAR@FAR (impostor pairs) and DIR@FPIR (non-mated probes): such a
    target allows no error at all, so the value reported is the one at the strictest
    measured operating point, where the measured rate is 0 — a lower bound on the value
    at the target, never an interpolation — and this note says so.

    Parameters
    ----------
    key : str
        The metric's report key, e.g. ``"tar@far=0.0001"``.
    target : float
        The target rate, e.g. ``1e-4``.
    n_negative : int
        The trials the rate is counted over (impostor pairs, non-mated probes).
    negatives : str
        What they are, in the plural (``"impostor pairs"``, ``"non-mated probes"``).
    measured_key : str
        The key of the rate actually measured (``"far@far=0.0001"``).

    Returns
    -------
    str
    """
    shown = np.format_float_positional(target, trim="-")
    return (
        f"{key} cannot be measured: the target {shown} is finer than one error in {n_negative} "
        f"{negatives} (1/{n_negative} = {1 / n_negative:.3g}); reported at the strictest measured "
        f"operating point instead ({measured_key} = 0/{n_negative}), a lower bound on the value at the "
        f"target, not an interpolation. Measuring it needs at least {math.ceil(1 / target)} {negatives}."
    )


def _tar_at_far(
    roc: _Roc, targets: tuple[float, ...]
) -> tuple[dict[str, float | Rate], dict[str, float], list[str]]:
    """TAR@FAR, the FAR achieved, thresholds and notes for each target.

    The TAR is the largest among ROC points whose false accepts stay within the target;
    the threshold is the strictest one giving that TAR (so its FAR is the lowest such),
    and ``"far@far=<target>"`` is the FAR it achieves.
    """
    allowed = _max_false_accepts(np.asarray(targets, dtype=np.float64), roc.n_impostor)
    # Last ROC point whose false accepts stay within the allowance: the largest TAR there.
    idx = np.searchsorted(roc.fps, allowed, side="right") - 1
    # First (strictest) point with that TAR: a higher threshold adds no genuine accept.
    strictest = np.searchsorted(roc.tps, roc.tps[idx], side="left")
    metrics: dict[str, float | Rate] = {}
    thresholds: dict[str, float] = {}
    notes: list[str] = []
    for target, k, j, first in zip(targets, allowed, idx, strictest, strict=True):
        key = far_key(target)
        achieved_key = key.replace("tar@", "far@")
        metrics[key] = Rate(int(roc.tps[j]), roc.n_genuine, chance=target)
        metrics[achieved_key] = Rate(int(roc.fps[first]), roc.n_impostor)
        thresholds[key.replace("tar@", "threshold@")] = float(roc.thresholds[first])
        if k == 0:
            notes.append(
                unmeasurable_target_note(key, target, roc.n_impostor, "impostor pairs", achieved_key)
            )
    return metrics, thresholds, notes


def _best_accuracy_index(roc: _Roc) -> tuple[int, int]:
    """ROC index of the best accuracy (the highest threshold among ties) and its correct decisions."""
    correct = roc.tps + (roc.n_impostor - roc.fps)
    j = int(np.argmax(correct))
    return j, int(correct[j])


def _best_accuracy(roc: _Roc) -> tuple[Rate, float]:
    """Accuracy (TA + TR) / pairs at the best threshold, and that threshold."""
    j, correct = _best_accuracy_index(roc)
    total = roc.n_genuine + roc.n_impostor
    return Rate(correct, total, chance=max(roc.n_genuine, roc.n_impostor) / total), float(roc.thresholds[j])


def roc_auc(scores: Any, is_genuine: Any) -> float:
    """Area under the exact ROC (trapezoid rule); equals ``sklearn.metrics.roc_auc_score``.

    Parameters
    ----------
    scores : array-like or Tensor of shape (n_pairs,)
        Finite scores, higher for pairs more likely genuine.
    is_genuine : array-like or Tensor of shape (n_pairs,)
        True (or 1) for genuine pairs, False (or 0) for impostor pairs; both must occur.

    Returns
    -------
    float
        In [0, 1]; 0.5 for uninformative scores. Equals the probability that a random
        genuine pair outscores a random impostor pair, ties counting one half.
    """
    return _auc(_roc(*_check_pairs_input(scores, is_genuine)))


def equal_error_rate(scores: Any, is_genuine: Any) -> float:
    """The equal error rate: where FAR = FRR on the exact ROC.

    The ROC is a step curve, so FAR rarely equals FRR at an observed threshold. The
    EER is found on the segment between the two consecutive ROC points that bracket
    the crossing (FAR - FRR changes sign), by linear interpolation along it; at an
    exact crossing it is that point's FAR. (torchmetrics' ``BinaryEER`` takes the
    nearest point instead.)

    Parameters
    ----------
    scores : array-like or Tensor of shape (n_pairs,)
        Finite scores, higher for pairs more likely genuine.
    is_genuine : array-like or Tensor of shape (n_pairs,)
        True (or 1) for genuine pairs, False (or 0) for impostor pairs; both must occur.

    Returns
    -------
    float
        In [0, 1]; 0.5 for uninformative scores, 0 for perfectly separated ones.
    """
    return _eer(_roc(*_check_pairs_input(scores, is_genuine)))


def tar_at_far(scores: Any, is_genuine: Any, *, far_targets: Sequence[float] = DEFAULT_FAR_TARGETS) -> Report:
    """True accept rate at fixed false accept rates, exactly, from the sorted scores.

    For each target the result is the largest TAR among ROC points whose FAR is at
    most the target — no interpolation. The threshold reported with it is the
    strictest one reaching that TAR, and the FAR it achieves is reported beside it.
    A target finer than ``1 / n_impostor`` allows no false accept at all: the largest
    TAR with FAR <= target is then the one at FAR 0 (every impostor pair rejected), a
    lower bound on the value at the target; it is reported with a note saying how many
    impostor pairs the target needs — the same rule as DIR@FPIR in
    :meth:`embedkit.evaluation.Gallery.dir_at_fpir`.

    Parameters
    ----------
    scores : array-like or Tensor of shape (n_pairs,)
        Finite scores, higher for pairs more likely genuine.
    is_genuine : array-like or Tensor of shape (n_pairs,)
        True (or 1) for genuine pairs, False (or 0) for impostor pairs; both must occur.
    far_targets : sequence of float
        FAR targets in (0, 1].

    Returns
    -------
    Report
        ``"tar@far=<target>"`` (the target as a plain decimal, e.g. ``"tar@far=0.001"``):
        a :class:`~embedkit.evaluation.report.Rate` of accepted genuine pairs out of all
        genuine pairs, whose chance level is the target itself (a random score's ROC is
        the diagonal); ``"far@far=<target>"``: the FAR achieved there, a Rate of accepted
        impostor pairs (at most the target, or 0 for an unmeasurable target);
        ``"threshold@far=<target>"``: the strictest score threshold achieving that TAR
        (accept ``score >= threshold``; ``+inf`` accepts nothing). Counts
        ``"genuine_pairs"`` and ``"impostor_pairs"``; notes for unmeasurable targets.
    """
    values, genuine = _check_pairs_input(scores, is_genuine)
    targets = check_rate_targets(far_targets, "far_targets")
    roc = _roc(values, genuine)
    metrics, thresholds, notes = _tar_at_far(roc, targets)
    return Report(
        title="tar@far",
        metrics={**metrics, **thresholds},
        counts={"genuine_pairs": roc.n_genuine, "impostor_pairs": roc.n_impostor},
        notes=notes,
    )


def best_threshold_accuracy(scores: Any, is_genuine: Any) -> tuple[Rate, float]:
    """The best verification accuracy over all thresholds, and the threshold achieving it.

    Accuracy at threshold ``t`` is (true accepts + true rejects) / pairs, accepting
    ``score >= t``. Every distinct score (and ``+inf``, rejecting everything) is tried
    exactly; among equally good thresholds the highest (strictest) is returned.

    Parameters
    ----------
    scores : array-like or Tensor of shape (n_pairs,)
        Finite scores, higher for pairs more likely genuine.
    is_genuine : array-like or Tensor of shape (n_pairs,)
        True (or 1) for genuine pairs, False (or 0) for impostor pairs; both must occur.

    Returns
    -------
    accuracy : Rate
        Correct decisions out of all pairs; its chance level is the majority-class
        share (always answering the more frequent label), the score to beat.
    threshold : float
        A score value; ``+inf`` when rejecting every pair is best.
    """
    return _best_accuracy(_roc(*_check_pairs_input(scores, is_genuine)))


def verification_metrics(
    scores: Any, is_genuine: Any, *, far_targets: Sequence[float] = DEFAULT_FAR_TARGETS
) -> Report:
    """All verification metrics of a set of scored pairs, from one exact ROC.

    Parameters
    ----------
    scores : array-like or Tensor of shape (n_pairs,)
        Finite scores, higher for pairs more likely genuine (e.g. cosine similarity;
        pass ``-distances`` for distances).
    is_genuine : array-like or Tensor of shape (n_pairs,)
        True (or 1) for genuine pairs, False (or 0) for impostor pairs; both must occur.
    far_targets : sequence of float
        FAR targets in (0, 1] at which to report the TAR.

    Returns
    -------
    Report
        Metrics: ``"auc"`` (see :func:`roc_auc`), ``"eer"`` (see :func:`equal_error_rate`),
        ``"tar@far=<target>"``, ``"far@far=<target>"`` and ``"threshold@far=<target>"``
        for each target (see :func:`tar_at_far`), ``"best_accuracy"`` (a Rate, chance =
        majority-class share), ``"best_threshold"`` (see :func:`best_threshold_accuracy`),
        ``"mean_genuine_score"`` and ``"mean_impostor_score"`` (same-identity and
        different-identity similarity, to compare with a paired similarity).
        Counts: ``"genuine_pairs"``, ``"impostor_pairs"``. Curves for plots:
        ``"far"``, ``"tar"``, ``"thresholds"`` (see :func:`roc_curve`),
        ``"far_targets"``, and ``"score_bin_edges"`` (51 edges over the score range, as
        ``numpy.histogram_bin_edges(scores, 50)``) with ``"genuine_histogram"`` and
        ``"impostor_histogram"`` (pair counts per bin, as ``numpy.histogram``).
        Notes: FAR targets too fine for the number of impostor pairs.

    Raises
    ------
    ValueError
        If there is no genuine or no impostor pair, or the inputs are malformed.
    """
    values, genuine = _check_pairs_input(scores, is_genuine)
    targets = check_rate_targets(far_targets, "far_targets")
    edges = np.histogram_bin_edges(values, bins=HISTOGRAM_BINS)
    histograms = {
        "score_bin_edges": edges,
        "genuine_histogram": np.histogram(values[genuine], bins=edges)[0],
        "impostor_histogram": np.histogram(values[~genuine], bins=edges)[0],
    }
    means = (
        float(np.mean(values[genuine], dtype=np.float64)),
        float(np.mean(values[~genuine], dtype=np.float64)),
    )
    return _verification_report(_roc(values, genuine), targets, histograms, means)


def _verification_report(
    roc: _Roc, targets: tuple[float, ...], curves: dict[str, np.ndarray], means: tuple[float, float]
) -> Report:
    """The report of :func:`verification_metrics` from an exact ROC, extra curves and the
    mean genuine and impostor scores."""
    tar_metrics, thresholds, notes = _tar_at_far(roc, targets)
    accuracy, threshold = _best_accuracy(roc)
    metrics: dict[str, float | Rate] = {"auc": _auc(roc), "eer": _eer(roc), **tar_metrics}
    metrics.update(thresholds)
    metrics.update({"best_accuracy": accuracy, "best_threshold": threshold})
    metrics.update({"mean_genuine_score": means[0], "mean_impostor_score": means[1]})
    return Report(
        title="verification",
        metrics=metrics,
        counts={"genuine_pairs": roc.n_genuine, "impostor_pairs": roc.n_impostor},
        notes=notes,
        curves={
            "far": roc.far,
            "tar": roc.tar,
            "thresholds": roc.thresholds,
            "far_targets": np.asarray(targets, dtype=np.float64),
            **curves,
        },
    )


# --------------------------------------------------------------------------- FaceNet VAL / FAR


def val_far_at_threshold(
    values: Any,
    is_genuine: Any,
    threshold: float,
    *,
    score_kind: Literal["distance", "similarity"] = "distance",
) -> Report:
    """FaceNet's validation rate and false accept rate at one threshold.

    With ``score_kind="distance"`` (FaceNet, Schroff et al. 2015) a pair is accepted
    when ``distance <= threshold``; with ``"similarity"`` when ``score >= threshold``.
    Then VAL = true accepts / same-identity pairs and FAR = false accepts /
    different-identity pairs.

    Parameters
    ----------
    values : array-like or Tensor of shape (n_pairs,)
        Finite distances (lower = same identity) or similarities (higher = same identity).
    is_genuine : array-like or Tensor of shape (n_pairs,)
        True (or 1) for same-identity pairs, False (or 0) otherwise; both must occur.
    threshold : float
        The decision threshold, in the units of ``values``.
    score_kind : {"distance", "similarity"}
        Whether lower (``"distance"``) or higher (``"similarity"``) values mean genuine.

    Returns
    -------
    Report
        ``"val"`` (a Rate: true accepts / same pairs), ``"far"`` (a Rate: false accepts /
        different pairs) — both with chance level the share of all pairs accepted, which
        is what a coin accepting as often would score on either — ``"accuracy"`` (a Rate,
        chance = majority-class share) and ``"threshold"``. Counts ``"genuine_pairs"``,
        ``"impostor_pairs"``, ``"accepted_pairs"``.
    """
    check_choice(score_kind, "score_kind", ("distance", "similarity"))
    scores, genuine = _check_pairs_input(values, is_genuine, "values")
    threshold = check_real(threshold, "threshold")
    # Compared in float64: a float32 array would otherwise round the threshold to float32.
    scores = scores.astype(np.float64, copy=False)
    accepted = scores <= threshold if score_kind == "distance" else scores >= threshold
    n = genuine.shape[0]
    n_genuine = int(np.count_nonzero(genuine))
    true_accepts = int(np.count_nonzero(accepted & genuine))
    false_accepts = int(np.count_nonzero(accepted & ~genuine))
    n_accepted = true_accepts + false_accepts
    accept_share = n_accepted / n
    true_rejects = (n - n_genuine) - false_accepts
    return Report(
        title=f"val/far at {score_kind} threshold {threshold:g}",
        metrics={
            "val": Rate(true_accepts, n_genuine, chance=accept_share),
            "far": Rate(false_accepts, n - n_genuine, chance=accept_share),
            "accuracy": Rate(true_accepts + true_rejects, n, chance=max(n_genuine, n - n_genuine) / n),
            "threshold": threshold,
        },
        counts={"genuine_pairs": n_genuine, "impostor_pairs": n - n_genuine, "accepted_pairs": n_accepted},
    )


# --------------------------------------------------------------------------- k-fold protocol


def _midpoint_threshold(roc: _Roc) -> float:
    """A best-accuracy threshold for unseen pairs: the middle of the interval that gives it.

    Every threshold in ``(next lower score, best threshold]`` makes the same decisions on
    these pairs; the middle keeps the widest margin to both. ``-inf`` when accepting
    everything is best, ``+inf`` when rejecting everything is.
    """
    j, _ = _best_accuracy_index(roc)
    high = float(roc.thresholds[j])
    if j + 1 == roc.thresholds.shape[0]:
        return -math.inf
    low = float(roc.thresholds[j + 1])
    return high if math.isinf(high) else low + (high - low) / 2


def kfold_accuracy(
    scores: Any,
    is_genuine: Any,
    *,
    n_folds: int | None = None,
    seed: int = 0,
    folds: Any = None,
) -> Report:
    """LFW-style k-fold verification accuracy: threshold from k - 1 folds, accuracy on the last.

    By default pairs are split into ``n_folds`` folds (10), stratified (genuine and
    impostor pairs are dealt round-robin in a seeded random order, so every fold has the
    same share of each, up to one pair). A published protocol's own folds — LFW's ten
    splits, in file order, as :func:`read_pairs_file` returns them — are passed as
    ``folds`` instead, which reproduces its figures exactly. For each fold, the
    best-accuracy threshold (:func:`best_threshold_accuracy`) is chosen on the other folds
    and applied to the held-out one — placed in the middle of the interval between that
    score and the next lower training score, where every threshold makes the same
    training decisions, so that a held-out pair scoring just below the lowest accepted
    training pair is not rejected by construction. Scores are sorted once for all folds.

    Parameters
    ----------
    scores : array-like or Tensor of shape (n_pairs,)
        Finite scores, higher for pairs more likely genuine.
    is_genuine : array-like or Tensor of shape (n_pairs,)
        True (or 1) for genuine pairs, False (or 0) for impostor pairs; both must occur.
    n_folds : int, optional
        Number of random folds, in [2, n_pairs]; 10 when omitted (LFW). With ``folds``
        it may be omitted, or must equal the number of distinct fold ids.
    seed : int
        Seed of the random fold assignment; the same seed gives the same folds. Unused
        with ``folds``.
    folds : array-like or Tensor of shape (n_pairs,) and integer dtype, optional
        The fold of each pair (any integer ids, e.g. 0..9); at least two distinct ids.
        Folds are taken in increasing id order.

    Returns
    -------
    Report
        ``"accuracy"``: mean of the held-out fold accuracies (the LFW figure);
        ``"accuracy_std"``: their standard deviation (``ddof=0``, like insightface and
        facenet); ``"pooled_accuracy"``: a Rate of correct held-out decisions over all
        pairs, chance = majority-class share. Counts ``"folds"``, ``"genuine_pairs"``,
        ``"impostor_pairs"``; curves ``"fold_accuracy"`` and ``"fold_threshold"`` (the
        threshold applied to each held-out fold: accept ``score >= threshold``), both of
        shape (n_folds,), ``"fold_id"`` (the id of each fold, shape (n_folds,)) and
        ``"fold_of_pair"`` of shape (n_pairs,): each pair's fold, as a position in
        ``"fold_id"``.
    """
    values, genuine = _check_pairs_input(scores, is_genuine)
    # float64, so that a midpoint threshold between two float32 scores is not rounded onto one.
    values = values.astype(np.float64, copy=False)
    n = genuine.shape[0]
    seed = check_int(seed, "seed", low=0)
    if folds is None:
        n_folds = check_int(10 if n_folds is None else n_folds, "n_folds", low=2, high=n)
        rng = np.random.default_rng(seed)
        genuine_idx = np.flatnonzero(genuine)
        impostor_idx = np.flatnonzero(~genuine)
        fold = np.empty(n, dtype=np.int64)
        fold[rng.permutation(genuine_idx)] = np.arange(genuine_idx.shape[0]) % n_folds
        fold[rng.permutation(impostor_idx)] = (
            np.arange(impostor_idx.shape[0]) + genuine_idx.shape[0]
        ) % n_folds
        fold_id = np.arange(n_folds)
    else:
        given = as_label_array(folds, "folds")
        if given.shape[0] != n:
            raise ValueError(
                f"folds has {given.shape[0]} entries but scores has {n}; expected one fold per pair"
            )
        fold_id, fold = np.unique(given, return_inverse=True)
        fold = fold.reshape(-1).astype(np.int64)
        if fold_id.shape[0] < 2:
            raise ValueError(f"folds holds a single fold id ({fold_id[0]}); expected at least 2 folds")
        if n_folds is not None and check_int(n_folds, "n_folds", low=2) != fold_id.shape[0]:
            raise ValueError(
                f"n_folds is {n_folds} but folds holds {fold_id.shape[0]} distinct fold ids; pass one or "
                "the other"
            )
        n_folds = int(fold_id.shape[0])
    n_genuine = int(np.count_nonzero(genuine))

    # One sort for all folds: the training pairs of a fold, taken in this order, stay sorted.
    order = np.argsort(values)[::-1]
    scores_desc, genuine_desc, fold_desc = values[order], genuine[order], fold[order]
    fold_accuracy = np.empty(n_folds, dtype=np.float64)
    fold_threshold = np.empty(n_folds, dtype=np.float64)
    correct = 0
    for f in range(n_folds):
        train = fold_desc != f
        threshold = _midpoint_threshold(_roc_from_sorted(scores_desc[train], genuine_desc[train]))
        held_out = ~train
        hits = int(np.count_nonzero((scores_desc[held_out] >= threshold) == genuine_desc[held_out]))
        correct += hits
        fold_accuracy[f] = hits / int(np.count_nonzero(held_out))
        fold_threshold[f] = threshold
    return Report(
        title=f"{n_folds}-fold verification accuracy",
        metrics={
            "accuracy": float(fold_accuracy.mean()),
            "accuracy_std": float(fold_accuracy.std()),
            "pooled_accuracy": Rate(correct, n, chance=max(n_genuine, n - n_genuine) / n),
        },
        counts={"folds": n_folds, "genuine_pairs": n_genuine, "impostor_pairs": n - n_genuine},
        curves={
            "fold_accuracy": fold_accuracy,
            "fold_threshold": fold_threshold,
            "fold_id": fold_id,
            "fold_of_pair": fold,
        },
    )


# --------------------------------------------------------------------------- protocol pairs files


@dataclass(frozen=True)
class PairsFile:
    """The pairs of an LFW-style protocol file, in file order, with their folds.

    Attributes
    ----------
    first_name, second_name : ndarray of shape (n_pairs,) and dtype str
        The identity (person) of each side; equal for genuine pairs.
    first_index, second_index : ndarray of shape (n_pairs,) and dtype int64
        The image number of each side within its identity (LFW counts from 1).
    is_genuine : ndarray of shape (n_pairs,) and dtype bool
        True for same-identity pairs.
    folds : ndarray of shape (n_pairs,) and dtype int64
        The fold (set) of each pair, 0 to ``n_sets - 1`` in file order: pass it to
        :func:`kfold_accuracy` as ``folds=``.
    """

    first_name: np.ndarray
    first_index: np.ndarray
    second_name: np.ndarray
    second_index: np.ndarray
    is_genuine: np.ndarray
    folds: np.ndarray

    def __len__(self) -> int:
        return int(self.is_genuine.shape[0])

    def image_names(self, pattern: str = "{name}/{name}_{index:04d}.jpg") -> tuple[list[str], list[str]]:
        """The file name of each side, from ``pattern`` (LFW's layout by default).

        Parameters
        ----------
        pattern : str
            A ``str.format`` pattern with the fields ``name`` and ``index``.

        Returns
        -------
        first, second : list of str
            One name per pair, e.g. ``"Abel_Pacheco/Abel_Pacheco_0001.jpg"``.
        """
        first = [
            pattern.format(name=n, index=int(i))
            for n, i in zip(self.first_name, self.first_index, strict=True)
        ]
        second = [
            pattern.format(name=n, index=int(i))
            for n, i in zip(self.second_name, self.second_index, strict=True)
        ]
        return first, second


def read_pairs_file(path: str | Any) -> PairsFile:
    """Read an LFW-style ``pairs.txt``: its pairs, in file order, and its folds.

    The format (LFW's ``pairs.txt``, and the ``pairsDevTrain/Test.txt`` of its view 1):
    a header ``"<n_sets> <n_per_class>"`` (``"10 300"``), or ``"<n_per_class>"`` for a
    single set; then, set after set, ``n_per_class`` genuine lines ``name i j`` followed
    by ``n_per_class`` impostor lines ``name1 i name2 j``. Fields are separated by
    whitespace (tabs in LFW's files); blank lines are skipped.

    Parameters
    ----------
    path : str or Path
        The pairs file.

    Returns
    -------
    PairsFile
        Pairs in file order and ``folds`` (the set of each pair), so that
        ``kfold_accuracy(scores, pairs.is_genuine, folds=pairs.folds)`` follows the
        protocol exactly.

    Raises
    ------
    ValueError
        Naming the file and line, when the header or a line does not follow the format or
        a set has the wrong number of genuine or impostor lines.
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    text = path.read_text(encoding="utf-8").splitlines()
    lines = [(k, line.split()) for k, line in enumerate(text, 1) if line.split()]
    if not lines:
        raise ValueError(f"{path} is empty; expected a header such as '10 300' and pair lines")
    header_line, header = lines[0]
    try:
        numbers = [int(f) for f in header]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers) < 1:
        raise ValueError(
            f"{path}, line {header_line}: expected a header '<n_sets> <n_per_class>' (e.g. '10 300') or "
            f"'<n_per_class>'; got {' '.join(header)!r}"
        )
    n_sets, per_class = (1, numbers[0]) if len(numbers) == 1 else (numbers[0], numbers[1])
    body = lines[1:]
    if len(body) != 2 * n_sets * per_class:
        raise ValueError(
            f"{path}: the header {' '.join(header)!r} announces {n_sets} set(s) of {per_class} genuine "
            f"and {per_class} impostor pairs ({2 * n_sets * per_class} lines); the file has "
            f"{len(body)} pair lines"
        )
    names1, index1, names2, index2 = [], [], [], []
    for position, (k, fields) in enumerate(body):
        genuine_expected = position % (2 * per_class) < per_class
        where = f"line {position % (2 * per_class) + 1} of set {position // (2 * per_class) + 1}"
        if genuine_expected and len(fields) != 3:
            raise ValueError(
                f"{path}, line {k}: expected a genuine pair 'name i j' ({where}); got {' '.join(fields)!r}"
            )
        if not genuine_expected and len(fields) != 4:
            raise ValueError(
                f"{path}, line {k}: expected an impostor pair 'name1 i name2 j' ({where}); "
                f"got {' '.join(fields)!r}"
            )
        name_a, i, name_b, j = (fields[0], fields[1], fields[0], fields[2]) if genuine_expected else fields
        try:
            index1.append(int(i))
            index2.append(int(j))
        except ValueError:
            raise ValueError(
                f"{path}, line {k}: image numbers must be integers; got {' '.join(fields)!r}"
            ) from None
        names1.append(name_a)
        names2.append(name_b)
    line_of_pair = np.arange(len(body))
    return PairsFile(
        first_name=np.array(names1, dtype=str),
        first_index=np.array(index1, dtype=np.int64),
        second_name=np.array(names2, dtype=str),
        second_index=np.array(index2, dtype=np.int64),
        is_genuine=line_of_pair % (2 * per_class) < per_class,
        folds=(line_of_pair // (2 * per_class)).astype(np.int64),
    )


# --------------------------------------------------------------------------- pairs from labels


def _pairs_within_groups(keys: np.ndarray) -> int:
    """Number of unordered pairs of items sharing a key."""
    _, sizes = np.unique(keys, return_counts=True, axis=0)
    sizes = sizes.astype(np.int64)
    return int((sizes * (sizes - 1) // 2).sum())


def _genuine_pairs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j), i < j, with ``labels[i] == labels[j]``, without an N × N matrix."""
    n = labels.shape[0]
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    sizes = np.diff(np.r_[starts, n])
    # Position p in the sorted order pairs with every later position of its group.
    partners = np.repeat(starts + sizes, sizes) - np.arange(n) - 1
    first = np.repeat(np.arange(n), partners)
    run_start = np.repeat(np.cumsum(partners) - partners, partners)
    second = first + 1 + (np.arange(first.shape[0]) - run_start)
    a, b = order[first], order[second]
    return np.minimum(a, b), np.maximum(a, b)


def _all_impostor_pairs(labels: np.ndarray, image_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j), i < j, with different labels (and image ids), in blocks of rows."""
    n = labels.shape[0]
    rows_per_block = max(1, _ENUMERATION_BLOCK // max(n, 1))
    columns = np.arange(n)
    firsts, seconds = [], []
    for start in range(0, n, rows_per_block):
        rows = np.arange(start, min(start + rows_per_block, n))
        keep = (labels[rows, None] != labels[None, :]) & (columns[None, :] > rows[:, None])
        if image_ids is not None:
            keep &= image_ids[rows, None] != image_ids[None, :]
        r, c = np.nonzero(keep)
        firsts.append(rows[r])
        seconds.append(c)
    return np.concatenate(firsts), np.concatenate(seconds)


def _sample_impostor_pairs(
    labels: np.ndarray, image_ids: np.ndarray | None, count: int, n_impostor: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` distinct impostor pairs, uniformly without replacement, by rejection.

    Independent uniform (i, j) draws are uniform over unordered pairs once i == j is
    rejected; same-label (and same-image) draws are rejected and duplicates merged,
    until enough distinct pairs are collected. A uniformly random subset of exactly
    ``count`` of them is then kept, which is uniform by symmetry. Memory is O(count).
    """
    n = labels.shape[0]
    accept_probability = 2.0 * n_impostor / (float(n) * n)
    codes = np.empty(0, dtype=np.int64)
    while codes.shape[0] < count:
        draws = min(int(1.25 * (count - codes.shape[0]) / accept_probability) + 64, _MAX_DRAWS)
        i = rng.integers(0, n, size=draws)
        j = rng.integers(0, n, size=draws)
        keep = labels[i] != labels[j]
        if image_ids is not None:
            keep &= image_ids[i] != image_ids[j]
        a, b = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])
        codes = np.union1d(codes, a * n + b)
    if codes.shape[0] > count:
        codes = np.sort(rng.choice(codes, size=count, replace=False))
    return codes // n, codes % n


def make_pairs(
    labels: Any,
    *,
    max_impostors: int | None = None,
    seed: int = 0,
    image_ids: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Verification pairs from labelled items: all genuine pairs and (sampled) impostor pairs.

    Parameters
    ----------
    labels : array-like or Tensor of shape (n_items,)
        Integer identity of each item (image).
    max_impostors : int, optional
        Keep at most this many impostor pairs, drawn uniformly without replacement
        (seeded; no N × N matrix is built). ``None`` keeps every impostor pair, which is
        O(N²) pairs.
    seed : int
        Seed of the impostor sampling; the same seed gives the same pairs.
    image_ids : array-like or Tensor of shape (n_items,), optional
        The source image of each item (integers or strings such as file names). Two
        items sharing an image id (e.g. a super-resolved probe and its own
        high-resolution original, or two crops of one photo) are never paired: such a
        "genuine" pair measures the copy, not the identity.

    Returns
    -------
    first, second : ndarray of shape (n_pairs,) and dtype int64
        Item indices with ``first < second``: never an item with itself, never a pair twice.
        Genuine pairs come first, then impostor pairs, each sorted by (first, second).
    is_genuine : ndarray of shape (n_pairs,) and dtype bool
        ``labels[first] == labels[second]``.
    """
    labels = as_label_array(labels, "labels")
    n = labels.shape[0]
    if n < 2:
        raise ValueError(f"labels has {n} item; expected at least 2 to form a pair")
    if image_ids is not None:
        # Integer codes, so that file names and integer ids follow one path.
        _, image_ids = np.unique(as_image_ids(image_ids, n, rows_name="labels"), return_inverse=True)
    if max_impostors is not None:
        max_impostors = check_int(max_impostors, "max_impostors", low=0)
    seed = check_int(seed, "seed", low=0)

    first, second = _genuine_pairs(labels)
    if image_ids is not None:
        keep = image_ids[first] != image_ids[second]
        first, second = first[keep], second[keep]
    order = np.lexsort((second, first))
    first, second = first[order], second[order]

    # Impostor pairs = all pairs - same-label pairs - different-label pairs sharing an image.
    n_impostor = n * (n - 1) // 2 - _pairs_within_groups(labels)
    if image_ids is not None:
        n_impostor -= _pairs_within_groups(image_ids) - _pairs_within_groups(
            np.stack([image_ids, labels], axis=1)
        )
    if max_impostors is None or 2 * max_impostors >= n_impostor:
        imp_first, imp_second = _all_impostor_pairs(labels, image_ids)
        if max_impostors is not None and max_impostors < n_impostor:
            rng = np.random.default_rng(seed)
            chosen = np.sort(rng.choice(n_impostor, size=max_impostors, replace=False))
            imp_first, imp_second = imp_first[chosen], imp_second[chosen]
    else:
        imp_first, imp_second = _sample_impostor_pairs(
            labels, image_ids, max_impostors, n_impostor, np.random.default_rng(seed)
        )
    is_genuine = np.r_[np.ones(first.shape[0], dtype=bool), np.zeros(imp_first.shape[0], dtype=bool)]
    return np.r_[first, imp_first].astype(np.int64), np.r_[second, imp_second].astype(np.int64), is_genuine


# --------------------------------------------------------------------------- scores of pairs


def _pair_indices(pairs: Any, n_items: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(first, second[, is_genuine])`` or an array of shape (n_pairs, 2) as index tensors."""
    if isinstance(pairs, (tuple, list)) and len(pairs) in (2, 3):
        first = as_label_array(pairs[0], "pairs[0]", allow_empty=True)
        second = as_label_array(pairs[1], "pairs[1]", allow_empty=True)
        if first.shape != second.shape:
            raise ValueError(
                f"pairs[0] has {first.shape[0]} entries but pairs[1] has {second.shape[0]}; "
                "expected equal lengths"
            )
    else:
        array = pairs.detach().cpu().numpy() if isinstance(pairs, Tensor) else np.asarray(pairs)
        if array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(
                "pairs must be a tuple (first, second[, is_genuine]) as returned by make_pairs, or an "
                f"integer array of shape (n_pairs, 2); got shape {array.shape}"
            )
        first = as_label_array(array[:, 0], "pairs[:, 0]", allow_empty=True)
        second = as_label_array(array[:, 1], "pairs[:, 1]", allow_empty=True)
    for name, index in (("first", first), ("second", second)):
        if index.size and (index.min() < 0 or index.max() >= n_items):
            bad = int(index.min()) if index.min() < 0 else int(index.max())
            raise ValueError(
                f"pairs ({name} items) holds index {bad}; expected indices in [0, {n_items}) "
                f"for {n_items} embeddings"
            )
    return torch.from_numpy(first).to(device), torch.from_numpy(second).to(device)


def pair_scores(embeddings: Any, pairs: Any, *, metric: Metric = "cosine") -> np.ndarray:
    """Similarity of each given pair of embeddings, in chunks (no N × N matrix).

    Parameters
    ----------
    embeddings : ndarray or Tensor of shape (n_items, dim)
        Floating-point embeddings, on any device (computed there).
    pairs : tuple of arrays, or array of shape (n_pairs, 2)
        ``(first, second)`` or ``(first, second, is_genuine)`` as returned by
        :func:`make_pairs`, or an integer array whose rows are index pairs.
    metric : {"cosine", "dot", "euclidean", "squared_euclidean"}
        As in :func:`embedkit.similarity.pairwise_similarity`: higher is always closer,
        so euclidean distances come back negated (``-d``, ``-d**2``) and the result can
        be passed straight to :func:`verification_metrics`.

    Returns
    -------
    ndarray of shape (n_pairs,)
        float32, or float64 when the embeddings are float64.
    """
    check_choice(metric, "metric", METRICS)
    x = as_embeddings(embeddings)
    x = x.to(working_dtype(x.dtype))
    if metric == "cosine":
        x = l2_normalize(x)
    first, second = _pair_indices(pairs, x.shape[0], x.device)
    out = torch.empty(first.shape[0], dtype=x.dtype, device=x.device)
    chunk = max(1, _PAIR_CHUNK_ELEMENTS // x.shape[1])
    with torch.no_grad():
        for start in range(0, first.shape[0], chunk):
            a = x[first[start : start + chunk]]
            b = x[second[start : start + chunk]]
            if metric in ("cosine", "dot"):
                out[start : start + chunk] = (a * b).sum(dim=1)
            else:
                squared = (a - b).square().sum(dim=1)
                out[start : start + chunk] = -(squared if metric == "squared_euclidean" else squared.sqrt())
    return out.cpu().numpy()


# --------------------------------------------------------------------------- all pairs, bounded memory


def _roc_corners(roc: _Roc) -> _Roc:
    """The same ROC without the interior points of straight horizontal or vertical runs.

    The curve drawn, its area, EER, TAR@FAR and best accuracy are unchanged (every one is
    read at a corner, or on a straight run whose ends are kept); what goes is the
    points that only repeat a TAR (FAR) already reached — most of a large ROC.
    """
    dfa, dta = np.diff(roc.fps), np.diff(roc.tps)
    # An interior point is dropped when both its segments are horizontal, or both vertical.
    interior = ((dta[:-1] == 0) & (dta[1:] == 0)) | ((dfa[:-1] == 0) & (dfa[1:] == 0))
    keep = np.r_[True, ~interior, True]
    return _Roc(
        fps=roc.fps[keep],
        tps=roc.tps[keep],
        thresholds=roc.thresholds[keep],
        n_genuine=roc.n_genuine,
        n_impostor=roc.n_impostor,
    )


def _cells_by_identity(entry_identity: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries grouped by identity code: (entries in code order, first position, count) per code."""
    order = np.argsort(entry_identity, kind="stable")
    n_codes = int(entry_identity.max()) + 1 if entry_identity.size else 0
    count = np.bincount(entry_identity, minlength=n_codes)
    first = np.r_[0, np.cumsum(count)[:-1]]
    return order, first, count


def _genuine_cells(
    probe_identity: np.ndarray, order: np.ndarray, first: np.ndarray, count: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every genuine cell of a block: a probe against its identity's entries."""
    mated = np.flatnonzero(probe_identity >= 0)
    per_row = count[probe_identity[mated]]
    rows = np.repeat(mated, per_row)
    # Position of each cell within its row's run of entries.
    offset = np.arange(rows.shape[0]) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    columns = order[np.repeat(first[probe_identity[mated]], per_row) + offset]
    return rows, columns


def _sorted_block(block: Tensor, rows: np.ndarray, columns: np.ndarray) -> Tensor | np.ndarray:
    """The block's impostor scores, sorted ascending, with its genuine cells set to ``+inf``.

    Sorted with numpy's SIMD sort on the CPU (several times faster there than torch's), with
    torch where the block lives on an accelerator.
    """
    block[torch.from_numpy(rows).to(block.device), torch.from_numpy(columns).to(block.device)] = torch.inf
    if block.device.type == "cpu":
        # Sorted in place (the block is a fresh product, ours to overwrite): a second block-sized
        # buffer per block would only churn the allocator, whose freed blocks it may not return.
        flat = block.contiguous().numpy().reshape(-1)
        flat.sort()
        return flat
    return torch.sort(block.flatten()).values


def _count_at_least(sorted_block: Tensor | np.ndarray, values: np.ndarray, *, strictly: bool) -> np.ndarray:
    """How many elements of an ascending block are ``>= values`` (``> values`` when strictly)."""
    side: Literal["left", "right"] = "right" if strictly else "left"
    n = sorted_block.shape[0]
    if isinstance(sorted_block, np.ndarray):
        return n - np.searchsorted(sorted_block, values, side=side)
    found = torch.searchsorted(sorted_block, torch.from_numpy(values).to(sorted_block.device), side=side)
    return n - found.cpu().numpy()


def _sum64(values: Tensor | np.ndarray) -> float:
    """Sum in float64, of a tensor or an array."""
    if isinstance(values, Tensor):
        return float(values.sum(dtype=torch.float64))
    return float(values.sum(dtype=np.float64))


def _round_up_to(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Each value as the smallest ``dtype`` number not below it.

    For scores ``s`` of that dtype, ``s >= edge`` then holds exactly when it holds for the
    rounded edge, so counts against float64 edges can be taken on the scores' own dtype.
    """
    rounded = values.astype(dtype)
    low = rounded.astype(np.float64) < values
    rounded[low] = np.nextafter(rounded[low], dtype.type(np.inf))
    return rounded


def all_pairs_verification(
    probes: Any,
    probe_labels: Any,
    references: Any,
    reference_labels: Any,
    *,
    metric: Metric = "cosine",
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Report:
    """Verification metrics of every probe × reference pair, exactly, in bounded memory.

    A pair is genuine when probe and reference share a label. The result equals
    ``verification_metrics(scores.ravel(), is_genuine.ravel())`` on the full
    ``n_probes × n_references`` score matrix — AUC, EER, TAR@FAR, FAR achieved,
    thresholds and best accuracy all identical, heavily tied scores included — but
    that matrix is never held: memory is one block of scores plus the genuine scores,
    whatever the number of impostor pairs.

    How: the ROC changes TAR only at genuine scores, and between two consecutive genuine
    scores it is a horizontal run. It is therefore fixed exactly by the genuine scores
    and, at each distinct genuine score ``g``, the number of impostor pairs scoring
    ``>= g`` and ``> g``. A first pass over the score blocks collects the genuine scores
    (and the score range, for the histograms); a second recomputes each block, sorts its
    impostor scores and counts them at those values. Both passes compute the same blocks
    (the same matrix products), so genuine and impostor scores are the ones a single pass
    would hold; the price is computing the scores twice.

    Parameters
    ----------
    probes : ndarray or Tensor of shape (n_probes, dim)
        Probe embeddings, on any device (scores are computed on the references' device).
    probe_labels : ndarray, Tensor or sequence of int, of shape (n_probes,)
        Identity of each probe; a probe whose identity has no reference has impostor pairs
        only.
    references : ndarray or Tensor of shape (n_references, dim)
        Reference (gallery) embeddings.
    reference_labels : ndarray, Tensor or sequence of int, of shape (n_references,)
        Identity of each reference.
    metric : {"cosine", "dot", "euclidean", "squared_euclidean"}
        As in :func:`embedkit.similarity.pairwise_similarity` (higher = closer).
    far_targets : sequence of float
        FAR targets in (0, 1], as in :func:`verification_metrics`.
    chunk_size : int, optional
        Probes per block; by default blocks of at least 2**24 scores (64 MiB in float32).
    progress : bool
        Show a progress bar over both passes (tqdm when installed).

    Returns
    -------
    Report
        The metrics and counts of :func:`verification_metrics`, in the same keys. Curves:
        ``"far"``, ``"tar"``, ``"thresholds"`` — the exact ROC with the interior points of
        its straight horizontal and vertical runs left out (the same curve; a threshold
        that is not a genuine score is given as the next representable score above the
        genuine score below it, which makes the same decisions) — ``"far_targets"``,
        ``"genuine_scores"`` of shape (n_genuine,) in the scores' dtype (float64 for float64
        embeddings), and ``"score_bin_edges"``, ``"genuine_histogram"``,
        ``"impostor_histogram"`` as in :func:`verification_metrics`. ``"mean_impostor_score"``
        is summed block by block in float64, so it equals the in-memory mean up to the
        rounding of the summation order (about 1e-12), not bit for bit.

    Raises
    ------
    ValueError
        If there is no genuine or no impostor pair, or the inputs are malformed.
    """
    check_choice(metric, "metric", METRICS)
    p = as_embeddings(probes, "probes")
    r = as_embeddings(references, "references")
    if p.shape[1] != r.shape[1]:
        raise ValueError(
            f"probes have dimension {p.shape[1]} but references have {r.shape[1]}; expected equal dimensions"
        )
    p_labels = as_label_array(probe_labels, "probe_labels")
    r_labels = as_label_array(reference_labels, "reference_labels")
    for name, labels, rows, rows_name in (
        ("probe_labels", p_labels, p.shape[0], "probes"),
        ("reference_labels", r_labels, r.shape[0], "references"),
    ):
        if labels.shape[0] != rows:
            raise ValueError(f"{name} has {labels.shape[0]} labels but {rows_name} has {rows} rows")
    identities, reference_identity = np.unique(r_labels, return_inverse=True)
    position = np.minimum(np.searchsorted(identities, p_labels), identities.size - 1)
    probe_identity = np.where(identities[position] == p_labels, position, -1)
    return _all_pairs_report(
        p,
        probe_identity.astype(np.int64),
        r,
        reference_identity.reshape(-1).astype(np.int64),
        metric=metric,
        far_targets=far_targets,
        chunk_size=chunk_size,
        progress=progress,
    )


def _all_pairs_report(
    probes: Tensor,
    probe_identity: np.ndarray,
    references: Tensor,
    reference_identity: np.ndarray,
    *,
    metric: Metric,
    far_targets: Sequence[float],
    chunk_size: int | None,
    progress: bool,
) -> Report:
    """:func:`all_pairs_verification` on identity codes (-1: a probe with no reference).

    ``probe_identity[i] == reference_identity[j]`` marks the genuine pairs. Used as is by
    :meth:`embedkit.evaluation.Gallery.verify`, whose entries are already coded.
    """
    targets = check_rate_targets(far_targets, "far_targets")
    n_probes, n_refs = probes.shape[0], references.shape[0]
    order, first, count = _cells_by_identity(reference_identity)
    mated = probe_identity >= 0
    n_genuine = int(count[probe_identity[mated]].sum())
    n_impostor = n_probes * n_refs - n_genuine
    if n_genuine == 0 or n_impostor == 0:
        missing, present = ("genuine", "impostor") if n_genuine == 0 else ("impostor", "genuine")
        raise ValueError(
            f"the {n_probes} probes × {n_refs} references give no {missing} pairs (all {n_probes * n_refs} "
            f"are {present}); verification metrics need at least one genuine pair (shared label) and "
            "one impostor pair"
        )
    if chunk_size is None:
        chunk_size = max(1, -(-_STREAM_BLOCK_ELEMENTS // max(n_refs, 1)))  # at least the budget
    chunk_size = check_int(chunk_size, "chunk_size", low=1)
    probes = probes.to(references.device)

    def blocks() -> Iterator[tuple[int, Tensor]]:
        yield from similarity_blocks(probes, references, metric=metric, chunk_size=chunk_size)

    with progress_bar(2 * n_probes, "verification (2 passes)", progress) as update:
        # Pass 1: the genuine scores, and the range of all scores for the histograms.
        genuine_parts: list[np.ndarray] = []
        low, high = math.inf, -math.inf
        dtype: np.dtype = np.dtype(np.float32)
        with torch.no_grad():
            for start, block in blocks():
                c = block.shape[0]
                rows, columns = _genuine_cells(probe_identity[start : start + c], order, first, count)
                picked = block[
                    torch.from_numpy(rows).to(block.device), torch.from_numpy(columns).to(block.device)
                ]
                genuine_parts.append(picked.cpu().numpy())
                extremes = torch.aminmax(block)
                low, high = min(low, float(extremes.min)), max(high, float(extremes.max))
                dtype = genuine_parts[-1].dtype
                if update is not None:
                    update(c)
        genuine_scores = np.concatenate(genuine_parts)
        values = np.unique(genuine_scores)  # ascending distinct genuine scores: the ROC's corners
        edges = np.histogram_bin_edges(np.array([low, high], dtype=dtype), bins=HISTOGRAM_BINS)
        edges_in_dtype = _round_up_to(edges.astype(np.float64), dtype)
        # Pass 2: impostors >= and > each genuine value, and >= each histogram edge.
        at_least = np.zeros(values.shape[0], dtype=np.int64)
        above = np.zeros(values.shape[0], dtype=np.int64)
        at_least_edge = np.zeros(edges.shape[0], dtype=np.int64)
        above_last_edge = 0
        lowest_impostor = math.inf
        impostor_sum = 0.0
        masked = 0
        with torch.no_grad():
            for start, block in blocks():
                c = block.shape[0]
                rows, columns = _genuine_cells(probe_identity[start : start + c], order, first, count)
                sorted_block = _sorted_block(block, rows, columns)
                masked += rows.shape[0]
                at_least += _count_at_least(sorted_block, values, strictly=False)
                above += _count_at_least(sorted_block, values, strictly=True)
                at_least_edge += _count_at_least(sorted_block, edges_in_dtype, strictly=False)
                above_last_edge += int(_count_at_least(sorted_block, edges_in_dtype[-1:], strictly=True)[0])
                lowest_impostor = min(lowest_impostor, float(sorted_block[0]))
                # The genuine cells (+inf) sort last: the impostor scores are the rest.
                impostor_sum += _sum64(sorted_block[: sorted_block.shape[0] - rows.shape[0]])
                if update is not None:
                    update(c)
    # The genuine cells were set to +inf: each was counted at every (finite) value.
    at_least -= masked
    above -= masked
    at_least_edge -= masked
    above_last_edge -= masked

    # Genuine pairs >= and > each distinct genuine value.
    genuine_sorted = np.sort(genuine_scores)
    genuine_at_least = n_genuine - np.searchsorted(genuine_sorted, values, side="left")
    genuine_above = n_genuine - np.searchsorted(genuine_sorted, values, side="right")
    # ROC points in decreasing threshold: (0, 0) at +inf; then for each genuine value g, from the
    # highest, the point just above g (counts > g) and the point at g (counts >= g); finally
    # every pair accepted at the lowest impostor score, when that adds impostors.
    descending = slice(None, None, -1)
    next_above = np.nextafter(values, dtype.type(np.inf)).astype(np.float64)
    fps = np.r_[0, np.stack([above[descending], at_least[descending]], axis=1).ravel(), n_impostor]
    tps = np.r_[
        0, np.stack([genuine_above[descending], genuine_at_least[descending]], axis=1).ravel(), n_genuine
    ]
    thresholds = np.r_[
        np.inf,
        np.stack([next_above[descending], values[descending].astype(np.float64)], axis=1).ravel(),
        lowest_impostor,
    ]
    # Drop repeats of the previous point (no impostor between two genuine values, no tie at g).
    new = np.r_[True, (np.diff(fps) != 0) | (np.diff(tps) != 0)]
    roc = _Roc(
        fps=fps[new].astype(np.int64),
        tps=tps[new].astype(np.int64),
        thresholds=thresholds[new],
        n_genuine=n_genuine,
        n_impostor=n_impostor,
    )
    genuine_histogram = np.histogram(genuine_scores, bins=edges)[0]
    impostor_histogram = np.r_[-np.diff(at_least_edge[:-1]), at_least_edge[-2] - above_last_edge]
    report = _verification_report(
        roc,
        targets,
        {
            "genuine_scores": genuine_scores,
            "score_bin_edges": edges,
            "genuine_histogram": genuine_histogram,
            "impostor_histogram": impostor_histogram,
        },
        # Summed block by block: the in-memory mean up to the rounding of the summation order.
        (float(np.mean(genuine_scores, dtype=np.float64)), impostor_sum / n_impostor),
    )
    corners = _roc_corners(roc)
    return Report(
        title=report.title,
        metrics=report.metrics,
        counts={**report.counts, "probes": n_probes, "references": n_refs},
        notes=report.notes,
        curves={**report.curves, "far": corners.far, "tar": corners.tar, "thresholds": corners.thresholds},
    )
