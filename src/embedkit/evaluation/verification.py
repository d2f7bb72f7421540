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
from collections.abc import Sequence
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
from ..similarity import METRICS, Metric, l2_normalize, working_dtype
from ._inputs import as_embeddings, as_image_ids
from .report import Rate, Report

__all__ = [
    "DEFAULT_FAR_TARGETS",
    "best_threshold_accuracy",
    "equal_error_rate",
    "far_key",
    "kfold_accuracy",
    "make_pairs",
    "pair_scores",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "val_far_at_threshold",
    "verification_metrics",
]

DEFAULT_FAR_TARGETS: tuple[float, ...] = (1e-4, 1e-3, 1e-2)

# Elements gathered per chunk in pair_scores (two chunk × dim matrices of this size).
_PAIR_CHUNK_ELEMENTS = 1 << 22
# Cells of the boolean label-comparison block when enumerating all impostor pairs.
_ENUMERATION_BLOCK = 1 << 24
# Random pairs drawn per round of impostor rejection sampling (bounds its memory).
_MAX_DRAWS = 1 << 24


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
    2 · n_genuine · n_impostor, so int64 holds it for any pair set that fits in memory.
    """
    twice_area = int(np.dot(np.diff(roc.fps), roc.tps[1:] + roc.tps[:-1]))
    return twice_area / (2 * roc.n_genuine * roc.n_impostor)


def _eer(roc: _Roc) -> float:
    """FAR = FRR, interpolated linearly between the two ROC points that bracket the crossing."""
    far = roc.far
    frr = 1.0 - roc.tar
    gap = far - frr  # non-decreasing from -1 (threshold +inf) to +1 (accept all)
    j = int(np.searchsorted(gap, 0.0, side="left"))
    if gap[j] == 0.0:
        return float(far[j])
    w = -gap[j - 1] / (gap[j] - gap[j - 1])
    return float(far[j - 1] + w * (far[j] - far[j - 1]))


def _max_false_accepts(targets: np.ndarray, n_impostor: int) -> np.ndarray:
    """Largest k with ``k / n_impostor <= target`` (in floating point, like FAR itself)."""
    k = np.floor(targets * n_impostor).astype(np.int64)
    k = np.where((k + 1) / n_impostor <= targets, k + 1, k)
    return np.where(k / n_impostor > targets, k - 1, k)


def _tar_at_far(
    roc: _Roc, targets: tuple[float, ...]
) -> tuple[dict[str, float | Rate], dict[str, float], list[str]]:
    """TAR@FAR metrics, thresholds and notes for each target (NaN where unmeasurable)."""
    allowed = _max_false_accepts(np.asarray(targets, dtype=np.float64), roc.n_impostor)
    # Last ROC point whose false accepts stay within the allowance: the largest TAR there.
    idx = np.searchsorted(roc.fps, allowed, side="right") - 1
    metrics: dict[str, float | Rate] = {}
    thresholds: dict[str, float] = {}
    notes: list[str] = []
    for target, k, j in zip(targets, allowed, idx, strict=True):
        key = far_key(target)
        if k == 0:
            metrics[key] = math.nan
            thresholds[key.replace("tar@", "threshold@")] = math.nan
            notes.append(
                f"{key} cannot be measured: the target FAR {np.format_float_positional(target, trim='-')} "
                f"is finer than one false accept in {roc.n_impostor} impostor pairs "
                f"(1/{roc.n_impostor} = {1 / roc.n_impostor:.3g}); it needs at least "
                f"{math.ceil(1 / target)} impostor pairs. Reported as NaN, not interpolated."
            )
            continue
        metrics[key] = Rate(int(roc.tps[j]), roc.n_genuine, chance=target)
        thresholds[key.replace("tar@", "threshold@")] = float(roc.thresholds[j])
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
    most the target — no interpolation. A target finer than ``1 / n_impostor`` (not
    even one false accept allowed) cannot be measured: it is reported as NaN with a
    note saying how many impostor pairs it would need.

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
        the diagonal), or NaN; ``"threshold@far=<target>"``: the score threshold achieving
        it (accept ``score >= threshold``; ``+inf`` accepts nothing). Counts
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
        ``"tar@far=<target>"`` and ``"threshold@far=<target>"`` for each target (see
        :func:`tar_at_far`), ``"best_accuracy"`` (a Rate, chance = majority-class share)
        and ``"best_threshold"`` (see :func:`best_threshold_accuracy`).
        Counts: ``"genuine_pairs"``, ``"impostor_pairs"``. Curves for plots:
        ``"far"``, ``"tar"``, ``"thresholds"`` (see :func:`roc_curve`) and
        ``"far_targets"``. Notes: FAR targets too fine for the number of impostor pairs.

    Raises
    ------
    ValueError
        If there is no genuine or no impostor pair, or the inputs are malformed.
    """
    values, genuine = _check_pairs_input(scores, is_genuine)
    targets = check_rate_targets(far_targets, "far_targets")
    roc = _roc(values, genuine)
    tar_metrics, thresholds, notes = _tar_at_far(roc, targets)
    accuracy, threshold = _best_accuracy(roc)
    metrics: dict[str, float | Rate] = {"auc": _auc(roc), "eer": _eer(roc), **tar_metrics}
    metrics.update(thresholds)
    metrics.update({"best_accuracy": accuracy, "best_threshold": threshold})
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


def kfold_accuracy(scores: Any, is_genuine: Any, *, n_folds: int = 10, seed: int = 0) -> Report:
    """LFW-style k-fold verification accuracy: threshold from k - 1 folds, accuracy on the last.

    Pairs are split into ``n_folds`` folds, stratified (genuine and impostor pairs are
    dealt round-robin in a seeded random order, so every fold has the same share of
    each, up to one pair). For each fold, the best-accuracy threshold
    (:func:`best_threshold_accuracy`) is chosen on the other folds and applied to the
    held-out one — placed in the middle of the interval between that score and the next
    lower training score, where every threshold makes the same training decisions,
    so that a held-out pair scoring just below the lowest accepted training pair is not
    rejected by construction. Scores are sorted once for all folds.

    Parameters
    ----------
    scores : array-like or Tensor of shape (n_pairs,)
        Finite scores, higher for pairs more likely genuine.
    is_genuine : array-like or Tensor of shape (n_pairs,)
        True (or 1) for genuine pairs, False (or 0) for impostor pairs; both must occur.
    n_folds : int
        Number of folds, in [2, n_pairs] (LFW: 10).
    seed : int
        Seed of the fold assignment; the same seed gives the same folds.

    Returns
    -------
    Report
        ``"accuracy"``: mean of the held-out fold accuracies (the LFW figure);
        ``"accuracy_std"``: their standard deviation (``ddof=0``, like insightface and
        facenet); ``"pooled_accuracy"``: a Rate of correct held-out decisions over all
        pairs, chance = majority-class share. Counts ``"folds"``, ``"genuine_pairs"``,
        ``"impostor_pairs"``; curves ``"fold_accuracy"`` and ``"fold_threshold"`` (the
        threshold applied to each held-out fold: accept ``score >= threshold``), both of
        shape (n_folds,), and ``"fold_of_pair"`` of shape (n_pairs,): each pair's fold.
    """
    values, genuine = _check_pairs_input(scores, is_genuine)
    # float64, so that a midpoint threshold between two float32 scores is not rounded onto one.
    values = values.astype(np.float64, copy=False)
    n = genuine.shape[0]
    n_folds = check_int(n_folds, "n_folds", low=2, high=n)
    seed = check_int(seed, "seed", low=0)
    rng = np.random.default_rng(seed)
    genuine_idx = np.flatnonzero(genuine)
    impostor_idx = np.flatnonzero(~genuine)
    fold = np.empty(n, dtype=np.int64)
    fold[rng.permutation(genuine_idx)] = np.arange(genuine_idx.shape[0]) % n_folds
    fold[rng.permutation(impostor_idx)] = (np.arange(impostor_idx.shape[0]) + genuine_idx.shape[0]) % n_folds

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
    n_genuine = genuine_idx.shape[0]
    return Report(
        title=f"{n_folds}-fold verification accuracy",
        metrics={
            "accuracy": float(fold_accuracy.mean()),
            "accuracy_std": float(fold_accuracy.std()),
            "pooled_accuracy": Rate(correct, n, chance=max(n_genuine, n - n_genuine) / n),
        },
        counts={"folds": n_folds, "genuine_pairs": n_genuine, "impostor_pairs": n - n_genuine},
        curves={"fold_accuracy": fold_accuracy, "fold_threshold": fold_threshold, "fold_of_pair": fold},
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
