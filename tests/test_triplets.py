"""Offline triplet construction: pool rules, counts, random and semi-hard negatives, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import embedkit.samplers.triplets as triplets_module
from embedkit.samplers import build_triplets, count_triplets
from embedkit.similarity import pairwise_distance


def case_study_04_layout(seed: int = 0) -> np.ndarray:
    """4,307 images of 1,436 identities with 2, 3 or 4 images each (479, 479 and 478 identities)."""
    sizes = np.repeat([2, 3, 4], [479, 479, 478])
    labels = np.repeat(np.arange(sizes.size), sizes)
    return np.random.default_rng(seed).permutation(labels)


def check_triplets(indices: np.ndarray, labels: np.ndarray) -> None:
    assert indices.dtype == np.int64 and indices.ndim == 2 and indices.shape[1] == 3
    a, p, n = indices.T
    assert (labels[a] == labels[p]).all()
    assert (a != p).all()
    assert (labels[a] != labels[n]).all()


def slow_pairs_one_removed(labels: np.ndarray) -> int:
    """The fixed rule as a plain loop: draw anchor and positive, remove only the anchor."""
    total = 0
    for cls in np.unique(labels):
        pool = list(np.flatnonzero(labels == cls))
        while len(pool) >= 2:
            pool.pop(0)  # the anchor leaves; the positive (pool[0] now) stays for the next pair
            total += 1
    return total


def slow_pairs_both_removed(labels: np.ndarray) -> int:
    """The old rule of case study 04 as a plain loop: anchor and positive both leave the pool."""
    total = 0
    for cls in np.unique(labels):
        pool = list(np.flatnonzero(labels == cls))
        while len(pool) >= 2:
            pool.pop(0)
            pool.pop(0)
            total += 1
    return total


def test_case_study_04_the_fixed_rule_yields_more_triplets() -> None:
    labels = case_study_04_layout()
    assert labels.size == 4307
    old = build_triplets(labels, rule="both_removed", seed=0)
    new = build_triplets(labels, rule="one_removed", seed=0)
    # 479·1 + 479·1 + 478·2 = 1914 pairs under the old rule; 479·1 + 479·2 + 478·3 = 2871 now.
    assert (old.num_triplets, new.num_triplets) == (1914, 2871)
    assert old.num_triplets == count_triplets(labels, "both_removed") == slow_pairs_both_removed(labels)
    assert new.num_triplets == count_triplets(labels, "one_removed") == slow_pairs_one_removed(labels)
    assert old.num_triplets / new.num_triplets == pytest.approx(2 / 3, abs=1e-3)  # a third was lost
    check_triplets(old.indices, labels)
    check_triplets(new.indices, labels)


def test_one_removed_chains_every_class() -> None:
    labels = np.array([5, 5, 5, 5, 9, 9, 9, 1, 2, 2])
    result = build_triplets(labels, seed=3)
    check_triplets(result.indices, labels)
    assert result.num_triplets == 3 + 2 + 0 + 1
    assert (result.num_paired_classes, result.num_unpaired) == (3, 1)
    pairs = {tuple(row) for row in result.indices[:, :2].tolist()}
    assert len(pairs) == result.num_triplets  # distinct (anchor, positive) pairs
    a, p = result.indices[:, 0], result.indices[:, 1]
    assert np.unique(a).size == a.size and np.unique(p).size == p.size  # each image anchors once
    # Every image of a class with two or more images is used.
    assert set(np.concatenate([a, p]).tolist()) == set(np.flatnonzero(labels != 1).tolist())


def test_both_removed_uses_each_image_at_most_once() -> None:
    labels = np.array([5, 5, 5, 5, 9, 9, 9, 1, 2, 2])
    result = build_triplets(labels, rule="both_removed", seed=3)
    check_triplets(result.indices, labels)
    assert result.num_triplets == 2 + 1 + 0 + 1
    used = result.indices[:, :2].ravel()
    assert np.unique(used).size == used.size


def test_random_negatives_are_seeded_and_cover_other_classes() -> None:
    labels = np.repeat(np.arange(4), 50)
    a = build_triplets(labels, seed=1)
    b = build_triplets(torch.from_numpy(labels), seed=1)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, build_triplets(labels, seed=2).indices)
    check_triplets(a.indices, labels)
    negatives = a.indices[:, 2]
    # Every sample of another class can be drawn: 196 triplets draw from 150 candidates each.
    assert np.unique(labels[negatives]).size == 4
    assert np.unique(negatives).size > 100
    assert a.num_semi_hard == 0 and a.negatives == "random"


def brute_semi_hard(
    embeddings: torch.Tensor, labels: np.ndarray, triplets: np.ndarray, margin: float, metric: str
) -> int:
    """Check every chosen negative against the definition, one triplet at a time; count band hits."""
    distance = pairwise_distance(embeddings, metric=metric).numpy()  # type: ignore[arg-type]
    in_band_total = 0
    for a, p, n in triplets.tolist():
        d_ap = distance[a, p]
        negatives = np.flatnonzero(labels != labels[a])
        d = distance[a, negatives]
        band = negatives[(d > d_ap) & (d < d_ap + margin)]
        farther = negatives[d > d_ap]
        if band.size:
            assert n in band.tolist()
            in_band_total += 1
        elif farther.size:
            assert distance[a, n] == distance[a, farther].min()
        else:
            assert distance[a, n] == d.max()
    return in_band_total


@pytest.mark.parametrize(("metric", "margin"), [("euclidean", 0.5), ("cosine", 0.02)])
def test_semi_hard_negatives_follow_the_definition(
    metric: str, margin: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = torch.Generator().manual_seed(0)
    labels = np.repeat(np.arange(12), 5)
    embeddings = torch.randn(labels.size, 8, generator=generator)
    embeddings += 2.0 * torch.randn(12, 8, generator=generator)[torch.from_numpy(labels)]
    # Small blocks force several chunks through the distance computation.
    monkeypatch.setattr(triplets_module, "_BLOCK_ELEMENTS", 7 * labels.size)
    result = build_triplets(
        labels, negatives="semi_hard", embeddings=embeddings, margin=margin, metric=metric
    )
    check_triplets(result.indices, labels)
    assert result.num_semi_hard == brute_semi_hard(embeddings, labels, result.indices, margin, metric)
    assert 0 < result.num_semi_hard < result.num_triplets  # both branches are exercised
    # Anchor/positive pairs do not depend on how negatives are chosen.
    random = build_triplets(labels, seed=0)
    np.testing.assert_array_equal(random.indices[:, :2], result.indices[:, :2])
    # NumPy embeddings work the same way.
    again = build_triplets(
        labels, negatives="semi_hard", embeddings=embeddings.numpy(), margin=margin, metric=metric
    )
    np.testing.assert_array_equal(again.indices, result.indices)
    flipped = build_triplets(  # a strided (negative-stride) array view is accepted too
        labels, negatives="semi_hard", embeddings=embeddings.numpy()[:, ::-1], margin=margin, metric=metric
    )
    check_triplets(flipped.indices, labels)


def test_semi_hard_falls_back_to_the_farthest_negative_when_all_are_closer() -> None:
    # Class 0 at x = -5 and 5 (d(a, p) = 10); every negative lies within 6 of either end.
    embeddings = torch.tensor([[-5.0], [5.0], [0.5], [-0.5], [1.0], [-1.0]])
    labels = np.array([0, 0, 1, 1, 2, 2])
    for seed in range(4):  # both orientations of the class-0 pair
        result = build_triplets(labels, negatives="semi_hard", embeddings=embeddings, margin=0.2, seed=seed)
        (row,) = result.indices[labels[result.indices[:, 0]] == 0]
        expected = 5 if row[0] == 1 else 4  # from x=5 the farthest is x=-1, from x=-5 it is x=1
        assert row[2] == expected
        brute_semi_hard(embeddings, labels, result.indices, 0.2, "euclidean")


def reference_semi_hard(
    embeddings: torch.Tensor, labels: np.ndarray, pairs: np.ndarray, margin: float, metric: str, seed: int
) -> np.ndarray:
    """The negatives of the semi-hard rule as a plain loop, with the keys the fast code draws.

    One uniform key per (pair, sample) entry, drawn row after row from a generator seeded
    with ``seed``; the band member with the largest key wins (first on ties), else the
    nearest negative farther than the positive, else the farthest negative.
    """
    distance = pairwise_distance(embeddings, metric=metric)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    keys = torch.rand((pairs.shape[0], labels.size), generator=generator, dtype=distance.dtype)
    chosen = []
    for i, (a, p) in enumerate(pairs.tolist()):
        d_ap = float(distance[a, p])
        best, best_key = -1, -1.0
        nearest, nearest_d = -1, float("inf")
        farthest, farthest_d = -1, -float("inf")
        for j in range(labels.size):
            if labels[j] == labels[a]:
                continue
            d = float(distance[a, j])
            if d_ap < d < d_ap + margin and float(keys[i, j]) > best_key:
                best, best_key = j, float(keys[i, j])
            if d > d_ap and d < nearest_d:
                nearest, nearest_d = j, d
            if d > farthest_d:
                farthest, farthest_d = j, d
        chosen.append(best if best >= 0 else nearest if nearest >= 0 else farthest)
    return np.array(chosen)


@pytest.mark.parametrize(
    ("metric", "margin", "block"),
    [("euclidean", 0.5, 1 << 22), ("euclidean", 0.5, 3 * 90), ("cosine", 0.05, 1), ("dot", 2.0, 17 * 90)],
)
def test_semi_hard_matches_a_plain_loop_exactly(
    metric: str, margin: float, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The blocked, vectorised construction gives exactly the triplets of the definition
    # written as a loop, whatever the block size (the keys do not depend on it).
    generator = torch.Generator().manual_seed(1)
    labels = np.random.default_rng(1).integers(0, 15, 90)
    embeddings = torch.randn(labels.size, 6, generator=generator)
    embeddings += 1.5 * torch.randn(15, 6, generator=generator)[torch.from_numpy(labels)]
    monkeypatch.setattr(triplets_module, "_BLOCK_ELEMENTS", block)
    result = build_triplets(
        labels, negatives="semi_hard", embeddings=embeddings, margin=margin, metric=metric, seed=4
    )
    expected = reference_semi_hard(embeddings, labels, result.indices[:, :2], margin, metric, seed=4)
    np.testing.assert_array_equal(result.indices[:, 2], expected)
    assert 0 < result.num_semi_hard < result.num_triplets


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=30).filter(lambda s: max(s) >= 2),
    seed=st.integers(0, 2**16),
    rule=st.sampled_from(["one_removed", "both_removed"]),
)
def test_counts_match_the_slow_pool_loops(sizes: list[int], seed: int, rule: str) -> None:
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(sizes)), sizes))
    result = build_triplets(labels, rule=rule, seed=seed)  # type: ignore[arg-type]
    check_triplets(result.indices, labels)
    slow = slow_pairs_one_removed(labels) if rule == "one_removed" else slow_pairs_both_removed(labels)
    assert result.num_triplets == count_triplets(labels, rule) == slow  # type: ignore[arg-type]
    assert count_triplets(labels, "one_removed") >= count_triplets(labels, "both_removed")


@pytest.mark.parametrize(
    ("labels", "kwargs", "error", "pattern"),
    [
        ([1, 1, 1], {}, ValueError, r"single class \(1\)"),
        ([1, 2, 3], {}, ValueError, "every one of the 3 classes in labels has a single sample"),
        ([1, 1, 2], {"rule": "pairs"}, ValueError, "rule must be one of"),
        ([1, 1, 2], {"negatives": "hard"}, ValueError, "negatives must be one of"),
        ([1, 1, 2], {"negatives": "semi_hard"}, ValueError, "negatives='semi_hard' needs embeddings"),
        ([1, 1, 2], {"embeddings": torch.zeros(3, 2)}, ValueError, "only used with negatives='semi_hard'"),
        (
            [1, 1, 2],
            {"negatives": "semi_hard", "embeddings": torch.zeros(4, 2)},
            ValueError,
            "embeddings has 4 rows but labels has 3",
        ),
        (
            [1, 1, 2],
            {"negatives": "semi_hard", "embeddings": torch.zeros(3, 2, dtype=torch.int64)},
            TypeError,
            "embeddings must have a floating-point dtype",
        ),
        (
            [1, 1, 2],
            {"negatives": "semi_hard", "embeddings": torch.tensor([[0.0], [float("nan")], [1.0]])},
            ValueError,
            "non-finite",
        ),
        ([1, 1, 2], {"margin": 0.0}, ValueError, r"margin must lie in \(0, inf\)"),
        ([1, 1, 2], {"metric": "manhattan"}, ValueError, "metric must be one of"),
        ([1.0, 1.0, 2.0], {}, TypeError, "labels must hold integers"),
        ([[1, 1, 2]], {}, ValueError, "labels must be 1-D"),
    ],
)
def test_bad_input_is_named(labels: object, kwargs: dict, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        build_triplets(labels, **kwargs)


def test_count_triplets_checks_its_input() -> None:
    with pytest.raises(TypeError, match="labels must hold integers"):
        count_triplets([1.0, 2.0])
    with pytest.raises(ValueError, match="rule must be one of"):
        count_triplets([1, 1, 2], "pairs")  # type: ignore[arg-type]
    assert count_triplets([4, 4, 4, 4, 4]) == 4 and count_triplets([4, 4, 4, 4, 4], "both_removed") == 2
