"""Verification metrics against scikit-learn and against plain, slow definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from embedkit.evaluation.report import Rate
from embedkit.evaluation.verification import (
    best_threshold_accuracy,
    equal_error_rate,
    far_key,
    kfold_accuracy,
    make_pairs,
    pair_scores,
    read_pairs_file,
    roc_auc,
    roc_curve,
    tar_at_far,
    unmeasurable_target_note,
    val_far_at_threshold,
    verification_metrics,
)
from embedkit.similarity import pairwise_similarity

# ----------------------------------------------------------------------------- slow references


def brute_tar_at_far(scores: np.ndarray, genuine: np.ndarray, target: float) -> float:
    """Largest TAR over every threshold (each score and +inf) whose FAR is at most the target.

    A target finer than one false accept (1 / impostor pairs) leaves only FAR 0 points.
    """
    n_genuine, n_impostor = genuine.sum(), (~genuine).sum()
    best = -1.0
    for t in [math.inf, *np.unique(scores)]:
        accepted = scores >= t
        far = (accepted & ~genuine).sum() / n_impostor
        if far <= target:
            best = max(best, (accepted & genuine).sum() / n_genuine)
    return best


def brute_best_accuracy(scores: np.ndarray, genuine: np.ndarray) -> tuple[int, float]:
    """Most correct decisions over every threshold; the highest threshold among ties."""
    best_hits, best_t = -1, math.nan
    for t in sorted([math.inf, *np.unique(scores)], reverse=True):
        hits = int(((scores >= t) == genuine).sum())
        if hits > best_hits:
            best_hits, best_t = hits, t
    return best_hits, best_t


def eer_from_curve(far: np.ndarray, tar: np.ndarray) -> float:
    """FAR = FRR by linear interpolation between the two points where FAR - FRR changes sign."""
    frr = 1 - tar
    for k in range(len(far)):
        if far[k] - frr[k] >= 0:
            if far[k] == frr[k] or k == 0:
                return float(far[k])
            d0, d1 = far[k - 1] - frr[k - 1], far[k] - frr[k]
            w = -d0 / (d1 - d0)
            return float(far[k - 1] + w * (far[k] - far[k - 1]))
    raise AssertionError("no crossing")


def random_case(seed: int, n: int = 400, discrete: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scored pairs; odd seeds have genuine pairs in the majority, even seeds impostors."""
    rng = np.random.default_rng(seed)
    genuine = rng.random(n) < (0.7 if seed % 2 else 0.3)
    genuine[:2] = [True, False]
    if discrete:
        scores = rng.integers(0, 6, n) + genuine * rng.integers(0, 3, n)
        return scores.astype(np.float64), genuine
    return rng.normal(size=n) + 1.5 * genuine, genuine


CASES = [(seed, discrete) for seed in range(4) for discrete in (False, True)]


# ----------------------------------------------------------------------------- ROC, AUC, EER


@pytest.mark.parametrize(("seed", "discrete"), CASES)
def test_roc_curve_matches_sklearn(seed: int, discrete: bool) -> None:
    scores, genuine = random_case(seed, discrete=discrete)
    far, tar, thresholds = roc_curve(scores, genuine)
    sk_far, sk_tar, sk_thresholds = sklearn_roc_curve(genuine, scores, drop_intermediate=False)
    np.testing.assert_allclose(far, sk_far, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tar, sk_tar, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(thresholds, sk_thresholds)
    if discrete:  # ties collapse to one threshold per distinct value
        assert len(thresholds) == len(np.unique(scores)) + 1


@pytest.mark.parametrize(("seed", "discrete"), CASES)
def test_auc_and_eer_match_sklearn(seed: int, discrete: bool) -> None:
    scores, genuine = random_case(seed, discrete=discrete)
    assert roc_auc(scores, genuine) == pytest.approx(roc_auc_score(genuine, scores), abs=1e-14)
    sk_far, sk_tar, _ = sklearn_roc_curve(genuine, scores, drop_intermediate=False)
    assert equal_error_rate(scores, genuine) == pytest.approx(eer_from_curve(sk_far, sk_tar), abs=1e-14)
    # sklearn's default curve drops collinear points; the interpolated crossing does not move.
    sk_far, sk_tar, _ = sklearn_roc_curve(genuine, scores)
    assert equal_error_rate(scores, genuine) == pytest.approx(eer_from_curve(sk_far, sk_tar), abs=1e-12)


def test_eer_hand_made() -> None:
    genuine = np.array([True, True, False, False])
    assert equal_error_rate([0.9, 0.8, 0.2, 0.1], genuine) == 0.0  # perfectly separated
    assert equal_error_rate([0.1, 0.2, 0.8, 0.9], genuine) == 1.0  # perfectly inverted
    assert equal_error_rate([0.5, 0.5, 0.5, 0.5], genuine) == 0.5  # no information
    # (FAR, FRR): (0,1) (0,.5) (.5,.5) (.5,0) (1,0): the crossing is the ROC point (.5, .5) itself.
    assert equal_error_rate([0.9, 0.6, 0.7, 0.1], genuine) == 0.5
    # A flat FAR stretch: (FAR, FRR) = (0,1) (0,.5) (.25,.5) (.25,0) (.5,0) (.75,0) (1,0); the sign
    # of FAR - FRR changes between (.25,.5) and (.25,0), so the EER is .25, not a midpoint.
    genuine6 = np.array([True, True, False, False, False, False])
    assert equal_error_rate([3.0, 1.0, 2.0, 0.0, -1.0, -2.0], genuine6) == 0.25
    # A genuine and an impostor pair tied at 1: (0,1) (0,.5) (.25,0). FAR - FRR goes -.5 -> .25
    # along the last segment, so w = 2/3 and EER = 2/3 * .25 = 1/6 (FRR = .5 - 2/3 * .5 = 1/6 too).
    assert equal_error_rate([2.0, 1.0, 1.0, 0.0, 0.0, 0.0], genuine6) == pytest.approx(1 / 6, abs=1e-15)


def test_inputs_as_tensors_float32_and_int_labels() -> None:
    scores, genuine = random_case(7)
    expected = roc_curve(scores.astype(np.float32), genuine)
    for got in (
        roc_curve(torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(genuine)),
        roc_curve(list(scores.astype(np.float32)), genuine.astype(np.int64)),
        roc_curve(torch.from_numpy(scores).to(torch.bfloat16).float(), genuine.astype(np.uint8)),
    ):
        assert len(got[0]) > 10
    got = roc_curve(torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(genuine.astype(np.int32)))
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- TAR@FAR


@pytest.mark.parametrize(("seed", "discrete"), CASES)
def test_tar_at_far_matches_brute_force(seed: int, discrete: bool) -> None:
    scores, genuine = random_case(seed, discrete=discrete)
    targets = (0.004, 0.01, 0.05, 0.1, 0.29, 0.5, 1.0)
    report = tar_at_far(scores, genuine, far_targets=targets)
    for target in targets:
        key = far_key(target)
        np.testing.assert_equal(report[key], brute_tar_at_far(scores, genuine, target), err_msg=key)
        if 1 / (~genuine).sum() > target:
            assert any(note.startswith(f"{key} cannot be measured") for note in report.notes)
        rate = report.rate(key)
        assert rate is not None and rate.chance == target and rate.total == genuine.sum()
        # The reported threshold achieves exactly that TAR, within the FAR target, and is the
        # strictest that does: the FAR reported is the one it achieves, the lowest for that TAR.
        t = report[key.replace("tar@", "threshold@")]
        false_accepts = ((scores >= t) & ~genuine).sum()
        assert ((scores >= t) & genuine).sum() == rate.hits
        assert false_accepts / (~genuine).sum() <= target
        assert report.rate(key.replace("tar@", "far@")) == Rate(int(false_accepts), int((~genuine).sum()))
        stricter = np.unique(scores[scores > t])
        assert stricter.size == 0 or ((scores >= stricter[0]) & genuine).sum() < rate.hits


def test_far_target_finer_than_impostor_pairs_is_reported_at_far_zero_with_note() -> None:
    scores, genuine = random_case(0, n=300)
    n_impostor = int((~genuine).sum())
    report = verification_metrics(scores, genuine, far_targets=(1e-4, 1 / n_impostor, 0.5))
    # The one rule (shared with DIR@FPIR): the value at the strictest measured point, FAR 0.
    above_every_impostor = scores[genuine] > scores[~genuine].max()
    assert report.rate("tar@far=0.0001") == Rate(int(above_every_impostor.sum()), int(genuine.sum()), 1e-4)
    assert report.rate("far@far=0.0001") == Rate(0, n_impostor)
    assert report["threshold@far=0.0001"] == scores[genuine][above_every_impostor].min()
    assert len(report.notes) == 1
    assert report.notes[0] == unmeasurable_target_note(
        "tar@far=0.0001", 1e-4, n_impostor, "impostor pairs", "far@far=0.0001"
    )
    assert "tar@far=0.0001 cannot be measured" in report.notes[0] and str(n_impostor) in report.notes[0]
    assert "10000 impostor pairs" in report.notes[0] and f"far@far=0.0001 = 0/{n_impostor}" in report.notes[0]
    # Exactly one false accept allowed: measurable.
    assert report[far_key(1 / n_impostor)] == brute_tar_at_far(scores, genuine, 1 / n_impostor)
    assert report["tar@far=0.5"] == brute_tar_at_far(scores, genuine, 0.5)


def test_far_target_at_an_exact_ratio_despite_rounding() -> None:
    # 0.29 * 100 = 28.999999999999996 in floating point, yet FAR 29/100 == 0.29 meets the target.
    impostors = np.arange(100, dtype=np.float64)
    genuine_scores = impostors[::-1][:29] - 0.5  # a genuine pair just below each of the top 29 impostors
    scores = np.r_[genuine_scores, impostors]
    genuine = np.r_[np.ones(29, dtype=bool), np.zeros(100, dtype=bool)]
    for target, expected_hits in ((0.29, 29), (0.28, 28)):
        report = tar_at_far(scores, genuine, far_targets=(target,))
        assert report.rate(far_key(target)) == Rate(expected_hits, 29, chance=target)
        assert report[far_key(target)] == brute_tar_at_far(scores, genuine, target)


def test_far_key_is_a_plain_decimal() -> None:
    assert far_key(1e-4) == "tar@far=0.0001"
    assert far_key(1e-3) == "tar@far=0.001"
    assert far_key(0.01) == "tar@far=0.01"
    assert far_key(1.0) == "tar@far=1"


# ----------------------------------------------------------------------------- verification_metrics


def test_verification_metrics_report() -> None:
    scores, genuine = random_case(2, n=2000)
    report = verification_metrics(torch.from_numpy(scores), torch.from_numpy(genuine))
    for key in (
        "auc",
        "eer",
        "tar@far=0.0001",
        "tar@far=0.001",
        "tar@far=0.01",
        "best_accuracy",
        "best_threshold",
    ):
        assert key in report
    assert report["auc"] == pytest.approx(roc_auc_score(genuine, scores), abs=1e-14)
    assert report["eer"] == equal_error_rate(scores, genuine)
    accuracy, threshold = best_threshold_accuracy(scores, genuine)
    assert report.rate("best_accuracy") == accuracy and report["best_threshold"] == threshold
    assert report.counts == {"genuine_pairs": int(genuine.sum()), "impostor_pairs": int((~genuine).sum())}
    far, tar, thresholds = roc_curve(scores, genuine)
    np.testing.assert_array_equal(report.curves["far"], far)
    np.testing.assert_array_equal(report.curves["tar"], tar)
    np.testing.assert_array_equal(report.curves["thresholds"], thresholds)
    np.testing.assert_array_equal(report.curves["far_targets"], [1e-4, 1e-3, 1e-2])
    # 1e-4 is finer than 1/1400-ish impostor pairs: measured at FAR 0, with a note
    assert report["far@far=0.0001"] == 0 and len(report.notes) == 1
    assert report["tar@far=0.0001"] == brute_tar_at_far(scores, genuine, 1e-4)
    assert report["tar@far=0.01"] == brute_tar_at_far(scores, genuine, 0.01)
    report.to_json()  # serialisable with NaN and inf


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(("seed", "discrete"), CASES)
def test_best_accuracy_matches_brute_force(seed: int, discrete: bool) -> None:
    scores, genuine = random_case(seed, n=150, discrete=discrete)
    accuracy, threshold = best_threshold_accuracy(scores, genuine)
    hits, brute_threshold = brute_best_accuracy(scores, genuine)
    assert (accuracy.hits, accuracy.total) == (hits, len(scores))
    assert threshold == brute_threshold
    assert accuracy.chance == max(genuine.sum(), (~genuine).sum()) / len(scores)


def test_best_accuracy_rejecting_everything() -> None:
    # Useless scores, impostors the majority: rejecting every pair is best (threshold +inf).
    accuracy, threshold = best_threshold_accuracy(
        [0.0, 1.0, 0.0, 1.0, 0.5], [True, False, False, False, True]
    )
    assert threshold == math.inf
    assert (accuracy.hits, accuracy.total) == (3, 5) and accuracy.chance == 0.6


def test_val_far_hand_built() -> None:
    distances = np.array([0.2, 0.5, 0.9, 1.1, 0.4, 1.0, 1.5, 2.0])
    same = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    report = val_far_at_threshold(distances, same, 1.0)
    # Accepted (d <= 1.0): same 0.2 0.5 0.9 (3 of 4); different 0.4 1.0 (2 of 4) - the bound is inclusive.
    assert report.rate("val") == Rate(3, 4, chance=5 / 8)
    assert report.rate("far") == Rate(2, 4, chance=5 / 8)
    assert report.rate("accuracy") == Rate(5, 8, chance=0.5)
    assert report["threshold"] == 1.0
    assert report.counts == {"genuine_pairs": 4, "impostor_pairs": 4, "accepted_pairs": 5}
    # The same pairs as similarities (higher = same) at the mirrored threshold give the same rates.
    mirrored = val_far_at_threshold(-distances, same, -1.0, score_kind="similarity")
    assert mirrored.rate("val") == report.rate("val") and mirrored.rate("far") == report.rate("far")
    with pytest.raises(ValueError, match="score_kind"):
        val_far_at_threshold(distances, same, 1.0, score_kind="distances")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- k-fold


def test_kfold_leave_one_out_matches_brute_force() -> None:
    # With one pair per fold the folds do not depend on the seed: check the protocol itself.
    scores, genuine = random_case(5, n=40, discrete=True)
    report = kfold_accuracy(scores, genuine, n_folds=40, seed=3)
    hits = 0
    for k in range(40):
        rest = np.arange(40) != k
        _, t = brute_best_accuracy(scores[rest], genuine[rest])
        # Applied halfway to the next lower training score (every threshold between decides alike).
        lower = scores[rest][scores[rest] < t]
        t = -math.inf if lower.size == 0 else (t if t == math.inf else (t + lower.max()) / 2)
        hits += int((scores[k] >= t) == genuine[k])
    pooled = report.rate("pooled_accuracy")
    assert pooled is not None and (pooled.hits, pooled.total) == (hits, 40)
    assert report["accuracy"] == pytest.approx(hits / 40)


def test_kfold_midpoint_between_adjacent_float32_scores() -> None:
    # Impostors at a, genuine pairs at the next float32 above a: the midpoint threshold must not
    # be rounded to float32 (onto a), which would accept every held-out impostor.
    a = np.float32(0.1)
    if a.view(np.int32) % 2:  # make the halfway point round (ties-to-even) down onto a in float32
        a = np.nextafter(a, np.float32(1))
    b = np.nextafter(a, np.float32(1))
    assert np.float32((float(a) + float(b)) / 2) == a
    scores = np.array([a] * 10 + [b] * 10, dtype=np.float32)
    genuine = np.r_[np.zeros(10, dtype=bool), np.ones(10, dtype=bool)]
    report = kfold_accuracy(scores, genuine, n_folds=5)
    assert report["accuracy"] == 1.0
    assert (report.curves["fold_threshold"] > float(a)).all()
    assert (
        val_far_at_threshold(scores, genuine, (float(a) + float(b)) / 2, score_kind="similarity")["far"] == 0
    )


def test_kfold_reproducible_stratified_and_sane() -> None:
    scores, genuine = random_case(1, n=600)
    a = kfold_accuracy(scores, genuine, n_folds=10, seed=7)
    b = kfold_accuracy(scores, genuine, n_folds=10, seed=7)
    c = kfold_accuracy(scores, genuine, n_folds=10, seed=8)
    assert a.to_dict() == b.to_dict()
    np.testing.assert_array_equal(a.curves["fold_threshold"], b.curves["fold_threshold"])
    assert not np.array_equal(a.curves["fold_accuracy"], c.curves["fold_accuracy"])
    assert a.counts["folds"] == 10 and len(a.curves["fold_accuracy"]) == 10
    assert a["accuracy_std"] == pytest.approx(np.std(a.curves["fold_accuracy"]))
    # Held-out accuracy cannot beat the in-sample optimum by much, and must beat chance here.
    best, _ = best_threshold_accuracy(scores, genuine)
    assert best.chance is not None and best.chance + 0.05 < a["accuracy"] <= best.value + 0.02
    # Perfectly separated scores: every fold is perfect.
    separated = kfold_accuracy(genuine + 0.1 * np.arange(600) / 600, genuine, n_folds=5)
    assert separated["accuracy"] == 1.0 and separated["accuracy_std"] == 0.0
    # Stratified and balanced: every fold holds 60 pairs and its share of genuine pairs, up to one.
    fold = a.curves["fold_of_pair"]
    np.testing.assert_array_equal(np.bincount(fold, minlength=10), np.full(10, 60))
    per_fold = np.bincount(fold[genuine], minlength=10)
    assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == genuine.sum()
    assert not np.array_equal(fold, c.curves["fold_of_pair"])
    # The held-out accuracies are what the recorded thresholds give on the recorded folds.
    for f in range(10):
        held = fold == f
        expected = ((scores[held] >= a.curves["fold_threshold"][f]) == genuine[held]).mean()
        assert a.curves["fold_accuracy"][f] == expected


# ----------------------------------------------------------------------------- invariances (hypothesis)


pair_sets = st.integers(min_value=4, max_value=60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(-20, 20), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n).filter(lambda g: 0 < sum(g) < len(g)),
        st.randoms(use_true_random=False),
    )
)


@settings(max_examples=40, deadline=None)
@given(pair_sets, st.sampled_from(["affine", "cube", "exp"]))
def test_metrics_invariant_to_increasing_transforms_and_permutation(data: tuple, transform: str) -> None:
    raw, flags, random = data
    scores = np.array(raw, dtype=np.float64)
    genuine = np.array(flags)
    transformed = {"affine": 3.0 * scores - 7.0, "cube": scores**3, "exp": np.exp(scores / 4.0)}[transform]
    perm = np.array(random.sample(range(len(scores)), len(scores)))
    base = verification_metrics(scores, genuine, far_targets=(0.1, 0.25, 0.5))
    for other in (
        verification_metrics(transformed, genuine, far_targets=(0.1, 0.25, 0.5)),
        verification_metrics(scores[perm], genuine[perm], far_targets=(0.1, 0.25, 0.5)),
    ):
        for key in ("auc", "eer", "tar@far=0.1", "tar@far=0.25", "tar@far=0.5", "best_accuracy"):
            np.testing.assert_allclose(other[key], base[key], rtol=1e-12, atol=1e-15, err_msg=key)
        np.testing.assert_array_equal(other.curves["far"], base.curves["far"])
        np.testing.assert_array_equal(other.curves["tar"], base.curves["tar"])


# ----------------------------------------------------------------------------- pairs


def test_make_pairs_all_pairs() -> None:
    labels = np.array([3, 1, 3, 3, 2, 1, 7])
    first, second, genuine = make_pairs(labels)
    pairs = set(zip(first.tolist(), second.tolist(), strict=True))
    expected = {(i, j) for i in range(7) for j in range(i + 1, 7)}
    assert pairs == expected and len(first) == len(expected)
    np.testing.assert_array_equal(genuine, labels[first] == labels[second])
    assert genuine.sum() == 3 + 1  # {0,2,3} and {1,5}
    assert genuine[: genuine.sum()].all()  # genuine pairs first


@pytest.mark.parametrize("max_impostors", [0, 1, 50, 400, 10**6])
def test_make_pairs_sampled_impostors(max_impostors: int) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, 60)
    first, second, genuine = make_pairs(torch.from_numpy(labels), max_impostors=max_impostors, seed=4)
    assert (first < second).all()  # never an item with itself, one orientation
    codes = first * 60 + second
    assert len(np.unique(codes)) == len(codes)  # no pair twice
    np.testing.assert_array_equal(genuine, labels[first] == labels[second])
    all_genuine = {(i, j) for i in range(60) for j in range(i + 1, 60) if labels[i] == labels[j]}
    assert set(zip(first[genuine].tolist(), second[genuine].tolist(), strict=True)) == all_genuine
    n_impostor_total = 60 * 59 // 2 - len(all_genuine)
    assert (~genuine).sum() == min(max_impostors, n_impostor_total)
    again = make_pairs(labels, max_impostors=max_impostors, seed=4)
    for a, b in zip(again, (first, second, genuine), strict=True):
        np.testing.assert_array_equal(a, b)


def test_make_pairs_sampling_is_seeded_and_uniform() -> None:
    labels = np.arange(40) % 8  # 780 pairs, 140 genuine, 640 impostor
    a = make_pairs(labels, max_impostors=100, seed=0)
    b = make_pairs(labels, max_impostors=100, seed=1)
    assert not np.array_equal(a[0], b[0]) or not np.array_equal(a[1], b[1])
    # Uniform: each impostor pair is chosen with probability 100/640 over seeds; items are
    # hit equally often (each item is in 35 impostor pairs, so 2*100/40 = 5 per draw).
    counts = np.zeros(40)
    for seed in range(60):
        first, second, genuine = make_pairs(labels, max_impostors=100, seed=seed)
        np.add.at(counts, first[~genuine], 1)
        np.add.at(counts, second[~genuine], 1)
    assert counts.sum() == 60 * 200
    assert np.abs(counts / 60 - 5).max() < 1.5


def test_make_pairs_image_ids_exclude_same_source() -> None:
    # Items 0/1 are one photo and its copy, 2/3 another: never paired with each other.
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    image_ids = np.array([10, 10, 11, 11, 12, 13, 14])
    file_names = np.array(["a.jpg", "a.jpg", "b.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"])
    expected = make_pairs(labels, image_ids=image_ids)
    for ids in (file_names, torch.from_numpy(image_ids)):
        for got, want in zip(make_pairs(labels, image_ids=ids), expected, strict=True):
            np.testing.assert_array_equal(got, want)
    n_impostor = 7 * 6 // 2 - 6 - 1  # every different-label pair: 14
    # None: all; 3: rejection sampling; 10: enumeration then a random subset.
    for max_impostors in (None, 3, 10, 14):
        first, second, genuine = make_pairs(labels, image_ids=image_ids, max_impostors=max_impostors)
        assert not (image_ids[first] == image_ids[second]).any()
        assert genuine.sum() == 4 + 1  # {0,1}x{2,3} and (4,5)
        assert (~genuine).sum() == min(n_impostor, max_impostors or n_impostor)
        assert (labels[first[~genuine]] != labels[second[~genuine]]).all()


def test_make_pairs_large_n_never_builds_n_squared() -> None:
    # 100k items: an N x N matrix would need 1e10 cells; sampling needs memory for the pairs only.
    labels = np.repeat(np.arange(20_000), 5)
    first, second, genuine = make_pairs(labels, max_impostors=100_000, seed=0)
    assert genuine.sum() == 20_000 * 10 and (~genuine).sum() == 100_000
    assert (labels[first[~genuine]] != labels[second[~genuine]]).all()
    assert (first < second).all() and len(np.unique(first * 100_000 + second)) == len(first)


def test_pair_scores_in_several_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import embedkit.evaluation.verification as verification

    rng = np.random.default_rng(1)
    emb = torch.from_numpy(rng.normal(size=(50, 4)))
    first, second = rng.integers(0, 50, 1001), rng.integers(0, 50, 1001)
    expected = pair_scores(emb, (first, second))
    monkeypatch.setattr(verification, "_PAIR_CHUNK_ELEMENTS", 4 * 7)  # 7 pairs per chunk
    np.testing.assert_array_equal(pair_scores(emb, (first, second)), expected)
    full = pairwise_similarity(emb).numpy()
    np.testing.assert_allclose(expected, full[first, second], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean", "squared_euclidean"])
def test_pair_scores_match_pairwise_similarity(metric: str) -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 5)).astype(np.float32)
    emb[3] = 0.0  # a zero vector has cosine 0, not NaN
    first, second, genuine = make_pairs(rng.integers(0, 4, 30))
    full = pairwise_similarity(torch.from_numpy(emb), metric=metric).numpy()  # type: ignore[arg-type]
    expected = full[first, second]
    for pairs in ((first, second, genuine), np.stack([first, second], axis=1)):
        got = pair_scores(emb, pairs, metric=metric)  # type: ignore[arg-type]
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    got64 = pair_scores(torch.from_numpy(emb).double(), (first, second), metric=metric)  # type: ignore[arg-type]
    assert got64.dtype == np.float64
    np.testing.assert_allclose(got64, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("scores", "is_genuine", "error", "match"),
    [
        ([0.1, math.nan, 0.3], [1, 0, 1], ValueError, "scores contains 1 non-finite"),
        ([0.1, math.inf, 0.3], [1, 0, 1], ValueError, "non-finite"),
        (np.zeros((2, 2)), [1, 0], ValueError, "scores must be 1-D"),
        ([0.1, 0.2, 0.3], [1, 0], ValueError, "is_genuine has 2 entries but scores has 3"),
        ([0.1, 0.2], [0.0, 1.0], TypeError, "is_genuine must hold booleans"),
        ([0.1, 0.2], [2, 1], ValueError, "is_genuine must hold only 0/1"),
        ([0.1, 0.2], [True, True], ValueError, "is_genuine has no impostor pairs"),
        ([0.1, 0.2], [0, 0], ValueError, "is_genuine has no genuine pairs"),
        ([True, False], [1, 0], TypeError, "scores must hold real numbers"),
        ("0.1 0.2", [1, 0], TypeError, "scores must be"),
        ([], [], ValueError, "scores is empty"),
    ],
)
def test_bad_pairs_are_named(scores: object, is_genuine: object, error: type, match: str) -> None:
    for fn in (roc_curve, roc_auc, equal_error_rate, verification_metrics, best_threshold_accuracy):
        with pytest.raises(error, match=match):
            fn(scores, is_genuine)


def test_bad_arguments_are_named() -> None:
    scores, genuine = random_case(0, n=50)
    with pytest.raises(ValueError, match=r"far_targets\[0\] must lie in \(0, 1\]"):
        verification_metrics(scores, genuine, far_targets=(0.0,))
    with pytest.raises(ValueError, match=r"far_targets\[1\]"):
        tar_at_far(scores, genuine, far_targets=(0.1, 1.5))
    with pytest.raises(ValueError, match="far_targets is empty"):
        tar_at_far(scores, genuine, far_targets=())
    with pytest.raises(ValueError, match="n_folds must lie in"):
        kfold_accuracy(scores, genuine, n_folds=1)
    with pytest.raises(ValueError, match="values contains"):
        val_far_at_threshold([0.1, math.nan], [1, 0], 0.5)
    with pytest.raises(TypeError, match="labels must hold integers"):
        make_pairs([0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="at least 2"):
        make_pairs([4])
    with pytest.raises(ValueError, match=r"image_ids must have shape \(3,\)"):
        make_pairs([0, 1, 1], image_ids=[0, 1])
    with pytest.raises(ValueError, match="max_impostors must lie in"):
        make_pairs([0, 1, 1], max_impostors=-1)
    emb = np.ones((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"holds index 4; expected indices in \[0, 4\)"):
        pair_scores(emb, ([0, 1], [2, 4]))
    with pytest.raises(ValueError, match="shape"):
        pair_scores(emb, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="metric must be one of"):
        pair_scores(emb, ([0], [1]), metric="manhattan")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="embeddings must be a floating-point array"):
        pair_scores(np.ones((4, 3), dtype=np.int64), ([0], [1]))


# ----------------------------------------------------------------------------- protocol folds


def write_pairs_file(path, n_sets: int = 10, per_class: int = 2) -> None:
    """A small LFW-style pairs.txt: sets of genuine 'name i j' then impostor 'name1 i name2 j' lines."""
    lines = [f"{n_sets}\t{per_class}"]
    for s in range(n_sets):
        lines += [f"Person_{s}_{k}\t1\t2" for k in range(per_class)]
        lines += [f"Person_{s}_{k}\t1\tOther_{s}_{k}\t3" for k in range(per_class)]
    path.write_text("\n".join(lines) + "\n")


def test_read_pairs_file_gives_pairs_and_folds_in_file_order(tmp_path) -> None:
    path = tmp_path / "pairs.txt"
    write_pairs_file(path)
    pairs = read_pairs_file(path)
    assert len(pairs) == 40
    np.testing.assert_array_equal(pairs.folds, np.repeat(np.arange(10), 4))
    np.testing.assert_array_equal(pairs.is_genuine, np.tile([True, True, False, False], 10))
    assert pairs.first_name[0] == pairs.second_name[0] == "Person_0_0"
    assert (pairs.first_index[0], pairs.second_index[0]) == (1, 2)
    assert (pairs.first_name[2], pairs.first_index[2], pairs.second_name[2], pairs.second_index[2]) == (
        "Person_0_0",
        1,
        "Other_0_0",
        3,
    )
    first, second = pairs.image_names()
    assert first[2] == "Person_0_0/Person_0_0_0001.jpg" and second[2] == "Other_0_0/Other_0_0_0003.jpg"


def test_fixed_folds_reproduce_a_hand_computed_ten_fold_accuracy(tmp_path) -> None:
    path = tmp_path / "pairs.txt"
    write_pairs_file(path)
    pairs = read_pairs_file(path)
    # Genuine pairs score 0.9, impostors 0.1, except both impostors of set 3, which score 0.95.
    scores = np.where(pairs.is_genuine, 0.9, 0.1)
    scores[(pairs.folds == 3) & ~pairs.is_genuine] = 0.95
    # By hand. Held-out set 3: the other sets separate perfectly, every threshold in (0.1, 0.9]
    # is best, the midpoint 0.5 is applied: both 0.95 impostors are accepted, 2/4 correct.
    # Held-out set f != 3: training has the two 0.95 impostors; accepting >= 0.9 makes 2 errors
    # (rejecting all makes 18), so the threshold is again midway to the next lower score 0.1,
    # 0.5, and set f is all correct. Mean: (9 * 1 + 0.5) / 10.
    report = kfold_accuracy(scores, pairs.is_genuine, folds=pairs.folds)
    assert report["accuracy"] == pytest.approx(0.95)
    np.testing.assert_allclose(report.curves["fold_accuracy"], [1, 1, 1, 0.5, 1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(report.curves["fold_threshold"], np.full(10, 0.5))
    np.testing.assert_array_equal(report.curves["fold_of_pair"], pairs.folds)
    np.testing.assert_array_equal(report.curves["fold_id"], np.arange(10))
    assert report.rate("pooled_accuracy") == Rate(38, 40, chance=0.5)
    assert report["accuracy_std"] == pytest.approx(np.std([1] * 9 + [0.5]))
    assert report.counts["folds"] == 10
    # The same protocol with n_folds stated, or fold ids that are not 0..9, gives the same.
    assert (
        kfold_accuracy(scores, pairs.is_genuine, folds=pairs.folds, n_folds=10)["accuracy"]
        == report["accuracy"]
    )
    relabelled = kfold_accuracy(scores, pairs.is_genuine, folds=pairs.folds * 7 + 100)
    np.testing.assert_array_equal(relabelled.curves["fold_accuracy"], report.curves["fold_accuracy"])


def test_random_folds_stay_the_default() -> None:
    scores, genuine = random_case(1, n=200)
    default = kfold_accuracy(scores, genuine)
    assert default.counts["folds"] == 10
    assert default["accuracy"] == kfold_accuracy(scores, genuine, n_folds=10, seed=0)["accuracy"]
    given = kfold_accuracy(scores, genuine, folds=default.curves["fold_of_pair"])
    np.testing.assert_array_equal(given.curves["fold_accuracy"], default.curves["fold_accuracy"])


def test_bad_folds_and_pairs_files_are_named(tmp_path) -> None:
    scores, genuine = random_case(0, n=20)
    with pytest.raises(ValueError, match="folds has 19 entries but scores has 20"):
        kfold_accuracy(scores, genuine, folds=np.zeros(19, dtype=int))
    with pytest.raises(ValueError, match="single fold id"):
        kfold_accuracy(scores, genuine, folds=np.zeros(20, dtype=int))
    with pytest.raises(ValueError, match="n_folds is 5 but folds holds 2"):
        kfold_accuracy(scores, genuine, folds=np.arange(20) % 2, n_folds=5)
    with pytest.raises(TypeError, match="folds"):
        kfold_accuracy(scores, genuine, folds=np.full(20, 0.5))
    bad = tmp_path / "pairs.txt"
    bad.write_text("ten 300\n")
    with pytest.raises(ValueError, match=r"pairs.txt, line 1: expected a header"):
        read_pairs_file(bad)
    bad.write_text("1 1\nA 1 2\nA 1 2\n")
    with pytest.raises(
        ValueError, match=r"line 3: expected an impostor pair 'name1 i name2 j' \(line 2 of set 1\)"
    ):
        read_pairs_file(bad)
    bad.write_text("2 1\nA 1 2\nA 1 B 2\n")
    with pytest.raises(ValueError, match="announces 2 set"):
        read_pairs_file(bad)
    bad.write_text("1 1\nA 1 x\nA 1 B 2\n")
    with pytest.raises(ValueError, match="line 2: image numbers must be integers"):
        read_pairs_file(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_pairs_file(tmp_path / "missing.txt")
