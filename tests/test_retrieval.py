"""Retrieval metrics against pytorch-metric-learning, scikit-learn and a plain slow reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.metrics import average_precision_score

from embedkit.evaluation.report import Rate
from embedkit.evaluation.retrieval import hit_chance, retrieval_metrics
from embedkit.evaluation.search import knn

PML_KEYS = {
    "precision@1": "precision_at_1",
    "r_precision": "r_precision",
    "map@r": "mean_average_precision_at_r",
    "map": "mean_average_precision",
}


def normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pml(queries, query_labels, reference=None, reference_labels=None) -> dict[str, float]:
    calculator = AccuracyCalculator(include=tuple(PML_KEYS.values()), k=None, device=torch.device("cpu"))
    args = [torch.from_numpy(normalised(queries)), torch.from_numpy(query_labels)]
    if reference is not None:
        args += [torch.from_numpy(normalised(reference)), torch.from_numpy(reference_labels)]
    return calculator.get_accuracy(*args)


def exact_scores(queries: np.ndarray, reference: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Every (query, reference) score, pair by pair in float64, rounded to float32.

    Elementwise (no matrix product, whose blocking can round exact duplicates differently), so
    identical references get identical scores: the library's definition of a tie.
    """
    q, r = queries.astype(np.float64), reference.astype(np.float64)
    if metric == "cosine":
        q, r = normalised(q), normalised(r)
    if metric in ("cosine", "dot"):
        scores = (q[:, None, :] * r[None, :, :]).sum(axis=2)
    else:
        scores = -np.sqrt(((q[:, None, :] - r[None, :, :]) ** 2).sum(axis=2))
    return scores.astype(np.float32)


def slow_reference(queries, query_labels, reference, reference_labels, self_mode, ks, metric="cosine"):
    """Musgrave et al.'s definitions, one query at a time, from a full sort.

    Ties pessimistically: among references with equal scores, irrelevant ones rank first.
    "map" is the average precision of that ranking over all references.
    """
    all_scores = exact_scores(queries, reference, metric)
    results: dict[str, list[float]] = {}
    for i in range(len(queries)):
        keep = np.ones(len(reference), bool)
        if self_mode:
            keep[i] = False
        scores = all_scores[i, keep]
        is_relevant = reference_labels[keep] == query_labels[i]
        order = np.lexsort((is_relevant, -scores))  # by score, irrelevant first among equals
        relevant = is_relevant[order]
        big_r = int(relevant.sum())
        if big_r == 0:
            continue
        first_r = relevant[:big_r]
        precisions = np.cumsum(first_r) / np.arange(1, big_r + 1)
        everywhere = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
        row = {
            "precision@1": float(relevant[0]),
            "r_precision": first_r.sum() / big_r,
            "map@r": (precisions * first_r).sum() / big_r,
            "map": (everywhere * relevant).sum() / big_r,
        }
        for k in ks:
            row[f"recall@{k}"] = float(relevant[:k].any())
            row[f"precision@{k}"] = relevant[:k].sum() / k
        for key, value in row.items():
            results.setdefault(key, []).append(value)
    return {key: float(np.mean(values)) for key, values in results.items()}


@pytest.fixture
def random_set() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((360, 8)).astype(np.float32), rng.integers(0, 15, 360)


def test_equals_accuracy_calculator_query_is_reference(random_set) -> None:
    x, y = random_set
    ours = retrieval_metrics(x, y, compute_map=True)
    theirs = pml(x, y)
    for key, pml_key in PML_KEYS.items():
        assert ours[key] == pytest.approx(theirs[pml_key], abs=1e-9), key


def test_equals_accuracy_calculator_split(random_set) -> None:
    x, y = random_set
    ours = retrieval_metrics(x[:120], y[:120], x[120:], y[120:], compute_map=True)
    theirs = pml(x[:120], y[:120], x[120:], y[120:])
    for key, pml_key in PML_KEYS.items():
        assert ours[key] == pytest.approx(theirs[pml_key], abs=1e-9), key


@pytest.mark.parametrize("self_mode", [True, False])
def test_equals_slow_reference(random_set, self_mode: bool) -> None:
    x, y = random_set
    ks = (1, 3, 10, 40)
    if self_mode:
        ours = retrieval_metrics(x, y, ks=ks, backend="torch", compute_map=True)
        want = slow_reference(x, y, x, y, True, ks)
    else:
        ours = retrieval_metrics(x[:100], y[:100], x[100:], y[100:], ks=ks, compute_map=True)
        want = slow_reference(x[:100], y[:100], x[100:], y[100:], False, ks)
    for key, value in want.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    assert ours["recall@1"] == ours["precision@1"]
    np.testing.assert_allclose(ours.curves["cmc"][[0, 2, 9, 39]], [want[f"recall@{k}"] for k in ks])


def test_map_with_ties_is_the_pessimistic_average_precision() -> None:
    rng = np.random.default_rng(3)
    # small-integer embeddings and the dot product: many exactly tied scores (exact in float32),
    # between relevant and irrelevant references alike
    x = rng.integers(-2, 3, size=(150, 3)).astype(np.float32)
    y = rng.integers(0, 4, 150)
    want = slow_reference(x, y, x, y, True, (1, 5), metric="dot")
    for backend in ("faiss", "torch"):
        report = retrieval_metrics(
            x, y, ks=(1, 5), metric="dot", backend=backend, chunk_size=7, compute_map=True
        )
        for key, value in want.items():
            assert report[key] == pytest.approx(value, abs=1e-12), (backend, key)
    # scikit-learn counts tied relevant references at the end of their tie all together, which
    # can score above every ordering of the tie; the pessimistic value is never above it
    scores = x.astype(np.float64) @ x.astype(np.float64).T
    keep = ~np.eye(150, dtype=bool)
    sklearn_map = np.mean(
        [average_precision_score(y[keep[i]] == y[i], scores[i, keep[i]]) for i in range(150)]
    )
    assert want["map"] < sklearn_map


def test_map_is_exact_beyond_the_search_depth(random_set) -> None:
    # mAP uses every relevant item, even those ranked below depth max(R): compare with sklearn
    x, y = random_set
    q, r = normalised(x[:50].astype(np.float64)), normalised(x[50:].astype(np.float64))
    expected = [average_precision_score(y[50:] == y[i], r @ q[i]) for i in range(50)]
    report = retrieval_metrics(x[:50], y[:50], x[50:], y[50:], ks=(1,), compute_map=True)
    assert report["map"] == pytest.approx(np.mean(expected), abs=1e-9)
    assert report.counts["search_depth"] < 310


def test_backends_agree(random_set) -> None:
    x, y = random_set
    a = retrieval_metrics(x, y, backend="faiss", compute_map=True)
    b = retrieval_metrics(
        torch.from_numpy(x), torch.from_numpy(y), backend="torch", chunk_size=50, compute_map=True
    )
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-9), key


def test_rates_have_counts_and_chance(random_set) -> None:
    x, y = random_set
    report = retrieval_metrics(x, y, ks=(1, 5), compute_map=True)
    p1 = report.rate("precision@1")
    assert isinstance(p1, Rate) and p1.total == 360
    sizes = np.bincount(y)
    assert p1.chance == pytest.approx(np.mean((sizes[y] - 1) / 359))
    r5 = report.rate("recall@5")
    assert r5 is not None and r5.chance == pytest.approx(np.mean(hit_chance(sizes[y] - 1, 359, 5)))
    p5 = report.rate("precision@5")
    assert p5 is not None and p5.total == 5 * 360
    assert report.rate("r_precision") is None
    # precision@k at k = 1 is precision@1 itself: one key, not two
    assert list(report) == [
        "precision@1",
        "r_precision",
        "map@r",
        "recall@1",
        "recall@5",
        "precision@5",
        "map",
    ]
    assert "map@r" in report.to_json() and "| precision@1 |" in report.to_markdown()


def test_hit_chance_is_the_exact_hypergeometric() -> None:
    for n, r, k in [(10, 3, 1), (10, 3, 4), (10, 8, 3), (50, 1, 10), (7, 7, 2), (20, 0, 5), (5, 2, 9)]:
        want = 1.0 - math.comb(n - r, min(k, n)) / math.comb(n, min(k, n))
        assert hit_chance(np.array([r]), n, k)[0] == pytest.approx(want, abs=1e-12)
    rng = np.random.default_rng(0)
    draws = np.array([(rng.permutation(30)[:4] < 6).any() for _ in range(20000)])
    assert hit_chance(np.array([6]), 30, 4)[0] == pytest.approx(draws.mean(), abs=0.01)


def test_queries_without_relevant_are_counted_not_dropped() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((43, 6)).astype(np.float32)
    y = np.concatenate([[100, 101, 102], np.repeat(np.arange(10), 4)])  # three singletons first
    report = retrieval_metrics(x, y, compute_map=True)
    assert report.counts["queries_without_relevant"] == 3
    assert report.counts["evaluated_queries"] == 40
    assert report.rate("precision@1").total == 40
    assert any("3 of 43 queries have no relevant reference" in n and "100" in n for n in report.notes)
    split = retrieval_metrics(x[:20], y[:20], x[20:], y[20:], compute_map=True)
    absent = int(np.isin(y[:20], y[20:], invert=True).sum())  # singletons and classes only in the queries
    assert absent > 3 and split.counts["queries_without_relevant"] == absent
    assert split.rate("precision@1").total == 20 - absent
    with pytest.raises(ValueError, match="none of the"):
        retrieval_metrics(x[:4], np.arange(4), x[4:8], np.arange(10, 14))


def test_large_label_values_never_collide() -> None:
    # 2**24 and 2**24 + 1 are the same float32: a float cast would merge the two classes
    x = np.array([[1, 0], [1, 0.01], [0, 1], [0.01, 1]], dtype=np.float32)
    y = np.array([2**24, 2**24 + 1, 2**24, 2**24 + 1], dtype=np.int64)
    report = retrieval_metrics(x, y, compute_map=True)
    assert report["precision@1"] == 0.0  # nearest neighbour always has the other label
    assert retrieval_metrics(x, y + 2**40)["precision@1"] == 0.0
    with pytest.raises(TypeError, match="query_labels"):
        retrieval_metrics(x, y.astype(np.float64))


def test_bad_arguments(random_set) -> None:
    x, y = random_set
    with pytest.raises(ValueError, match="same object"):
        retrieval_metrics(x, y, x, y)
    with pytest.raises(ValueError, match="reference_labels"):
        retrieval_metrics(x, y, x.copy())
    with pytest.raises(ValueError, match="without reference"):
        retrieval_metrics(x, y, None, y)
    with pytest.raises(ValueError, match="query_labels has 10 entries"):
        retrieval_metrics(x, y[:10])
    with pytest.raises(ValueError, match="ks must lie in"):
        retrieval_metrics(x, y, ks=(0, 1))
    with pytest.raises(TypeError, match="ks"):
        retrieval_metrics(x, y, ks="5")
    with pytest.raises(ValueError, match="embedding_dim"):
        retrieval_metrics(x, y, x[:, :3], y)


def test_map_is_computed_only_when_asked_for(random_set) -> None:
    x, y = random_set
    report = retrieval_metrics(x, y)  # the default costs one search: no full-ranking mAP
    assert "map" not in report and "map@r" in report
    assert "map" in retrieval_metrics(x, y, compute_map=True)


# --- properties ------------------------------------------------------------------------------


@st.composite
def labelled_sets(draw):
    n_classes = draw(st.integers(2, 6))
    per_class = draw(st.lists(st.integers(2, 6), min_size=n_classes, max_size=n_classes))
    labels = np.repeat(np.arange(n_classes), per_class)
    seed = draw(st.integers(0, 2**31 - 1))
    return labels, seed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labelled_sets(), st.booleans())
def test_perfect_embeddings_score_one(case, duplicated: bool) -> None:
    labels, seed = case
    rng = np.random.default_rng(seed)
    n_classes = labels.max() + 1
    centres = np.eye(n_classes, 8, dtype=np.float32)
    noise = 0.0 if duplicated else 0.01  # exact duplicates within a class, or tight clusters
    x = centres[labels] + noise * rng.standard_normal((labels.size, 8)).astype(np.float32)
    order = rng.permutation(labels.size)
    report = retrieval_metrics(x[order], labels[order], ks=(1, 2), compute_map=True)
    for key in ("precision@1", "r_precision", "map@r", "map", "recall@1", "recall@2"):
        assert report[key] == pytest.approx(1.0), key
    # precision@k divides by k: a class of two (R = 1) scores 1/2 at k = 2, even when perfect
    r = np.bincount(labels)[labels] - 1
    assert report["precision@2"] == pytest.approx(np.mean(np.minimum(r, 2) / 2))


@settings(max_examples=20, deadline=None)
@given(labelled_sets(), st.integers(0, 2**62))
def test_relabelling_changes_nothing(case, offset: int) -> None:
    labels, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((labels.size, 5)).astype(np.float32)
    permuted = rng.permutation(labels.max() + 1)[labels].astype(np.int64) * 7919 + offset % (2**62)
    a = retrieval_metrics(x, labels, compute_map=True)
    b = retrieval_metrics(x, permuted, compute_map=True)
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-12), key


def test_k_beyond_the_reference_set_divides_by_k() -> None:
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], dtype=np.float32)
    y = np.array([1, 1, 2, 2])
    report = retrieval_metrics(x, y, ks=(1, 5), compute_map=True)  # 3 references available per query
    assert report["recall@5"] == 1.0
    assert report.rate("precision@5").hits == 4 and report["precision@5"] == pytest.approx(4 / 20)
    assert report.rate("recall@5").chance == 1.0  # three draws from three always include the one relevant
    assert any("fewer than k=5" in note for note in report.notes)


# --- same-source protection, approximate search, argument types --------------------------------


def test_equals_accuracy_calculator_default_distance_with_euclidean(random_set) -> None:
    # PML's AccuracyCalculator ranks by L2 distance on the raw vectors by default: that is
    # embedkit's metric="euclidean"; embedkit's default (cosine) equals it on normalised vectors.
    x, y = random_set
    x = x * np.random.default_rng(5).uniform(0.5, 2.0, (len(x), 1)).astype(np.float32)  # unequal norms
    calculator = AccuracyCalculator(include=tuple(PML_KEYS.values())[:3], k=None, device=torch.device("cpu"))
    theirs = calculator.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    ours = retrieval_metrics(x, y, metric="euclidean", compute_map=False)
    for key, pml_key in list(PML_KEYS.items())[:3]:
        assert ours[key] == pytest.approx(theirs[pml_key], abs=1e-9), key
    cosine = retrieval_metrics(x, y, compute_map=False)
    assert any(
        cosine[key] != pytest.approx(theirs[pml_key], abs=1e-9)
        for key, pml_key in PML_KEYS.items()
        if key != "map"
    )


def test_image_ids_guard_against_the_same_image_on_both_sides(random_set) -> None:
    x, y = random_set
    q_ids = [f"img{i}.png" for i in range(100)]
    r_ids = [f"img{i}.png" for i in range(100, 360)]
    report = retrieval_metrics(x[:100], y[:100], x[100:], y[100:], image_ids=q_ids, reference_image_ids=r_ids)
    assert not any("image ids" in note for note in report.notes)
    with pytest.raises(ValueError, match=r"1 image id\(s\) are both queries and references: 'img5.png'"):
        retrieval_metrics(
            x[:100], y[:100], x[100:], y[100:], image_ids=q_ids, reference_image_ids=["img5.png", *r_ids[1:]]
        )
    # integers and their decimal strings are different images
    retrieval_metrics(
        x[:100],
        y[:100],
        x[100:],
        y[100:],
        image_ids=np.arange(100),
        reference_image_ids=[str(i) for i in range(260)],
    )
    unchecked = retrieval_metrics(x[:100], y[:100], x[100:], y[100:], image_ids=q_ids)
    assert any("image ids not given for both sides" in note for note in unchecked.notes)
    retrieval_metrics(x, y, image_ids=np.arange(360))  # self mode: unique ids are fine
    with pytest.raises(ValueError, match="more than once"):
        retrieval_metrics(x, y, image_ids=np.arange(360) % 359)
    with pytest.raises(ValueError, match="without reference"):
        retrieval_metrics(x, y, reference_image_ids=np.arange(360))


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean", "squared_euclidean"])
def test_near_duplicate_queries_are_counted(random_set, metric: str) -> None:
    # The CLI's mistake: probes that are the gallery images themselves give precision@1 = 1.
    x, y = random_set
    # unit vectors and one large one, which tops most "dot" rankings without being anyone's
    # duplicate: the check must look past the top result (a duplicate ranks second there)
    x = normalised(x)
    x[0] *= 40.0
    report = retrieval_metrics(x[:100].copy(), y[:100], x, y, metric=metric, compute_map=False)
    assert report.counts["near_duplicate_queries"] == 100
    assert any("memorisation" in note for note in report.notes)
    clean = retrieval_metrics(x[:100], y[:100], x[100:], y[100:], metric=metric, compute_map=False)
    assert clean.counts["near_duplicate_queries"] == 0
    assert retrieval_metrics(x, y, metric=metric, compute_map=False).counts["near_duplicate_queries"] == 0


def test_approximate_backends_report_their_recall(random_set) -> None:
    x, y = random_set
    exact = retrieval_metrics(x, y, compute_map=False)
    assert "search_recall" not in exact
    for backend in ("faiss-ivf", "faiss-hnsw"):
        report = retrieval_metrics(x, y, backend=backend, compute_map=False)  # type: ignore[arg-type]
        assert 0.0 < report["search_recall"] <= 1.0
        assert any("approximate" in note and "search_recall" in note for note in report.notes)


def test_numpy_integer_arguments(random_set) -> None:
    x, y = random_set
    a = retrieval_metrics(x, y, ks=(1, 5), chunk_size=50, backend="torch")
    b = retrieval_metrics(x, y, ks=np.array([1, 5]), chunk_size=np.int64(50), backend="torch")
    c = retrieval_metrics(x, y, ks=(np.int8(1), np.uint64(5)), backend="torch")
    assert dict(a) == dict(b) == dict(c)
    with pytest.raises(TypeError, match="chunk_size"):
        retrieval_metrics(x, y, chunk_size=50.0)


def test_string_labels_give_the_metrics_of_their_integer_codes() -> None:
    gen = np.random.default_rng(3)
    x = gen.normal(size=(60, 8)).astype(np.float32)
    ref = gen.normal(size=(40, 8)).astype(np.float32)
    y, ry = np.arange(60) % 6, np.arange(40) % 8
    names = [f"person_{c}" for c in y]
    ref_names = np.array([f"person_{c}" for c in ry], dtype=object)
    by_codes = retrieval_metrics(x, y, ks=(1, 5))
    by_names = retrieval_metrics(x, names, ks=(1, 5))
    assert by_names.metrics == by_codes.metrics
    against_codes = retrieval_metrics(x, y, ref, ry, ks=(1, 5))
    against_names = retrieval_metrics(x, names, ref, ref_names, ks=(1, 5))
    assert against_names.metrics == against_codes.metrics
    # An integer and its string are different labels: nothing is relevant across the types.
    with pytest.raises(ValueError, match="none of the 60 queries has a relevant reference"):
        retrieval_metrics(x, y, ref, [str(c) for c in ry])


# --- ties: one pessimistic rule for every metric, back-end and depth -----------------------------


def duplicates_under_other_labels(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """90 random vectors in 6 dimensions, 60 of them present two or three times, each copy with
    a label of its own (often not the original's): ties between relevant and irrelevant."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((90, 6)).astype(np.float32)
    x = np.concatenate([base, base[:60], base[30:60]])
    y = rng.integers(0, 5, len(x))
    order = rng.permutation(len(x))
    return x[order], y[order]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("self_mode", [True, False])
def test_exact_duplicates_under_other_labels_count_against_the_model(metric: str, self_mode: bool) -> None:
    # Every metric equals the slow pessimistic reference, on FAISS and torch, for every ks.
    x, y = duplicates_under_other_labels(4)
    split = (x, y, None, None) if self_mode else (x[:70], y[:70], x[70:], y[70:])
    reference = (x, y) if self_mode else (x[70:], y[70:])
    want = slow_reference(split[0], split[1], *reference, self_mode, (1, 2, 5, 100), metric=metric)
    for backend in ("faiss", "torch"):
        for ks in ((1,), (2,), (1, 100), (1, 2, 5, 100)):
            report = retrieval_metrics(*split, ks=ks, metric=metric, backend=backend, compute_map=True)
            assert set(report) == {"precision@1", "r_precision", "map@r", "map"} | {
                f"{name}@{k}" for name in ("recall", "precision") for k in ks
            }
            for key in report:
                assert report[key] == pytest.approx(want[key], abs=1e-12), (backend, ks, key)
    # the set holds what the test is about: queries whose best score is shared by a relevant
    # and an irrelevant reference
    scores = exact_scores(split[0], reference[0], metric)
    if self_mode:
        np.fill_diagonal(scores, -np.inf)
    top = scores == scores.max(axis=1, keepdims=True)
    same = reference[1][None, :] == split[1][:, None]
    assert ((top & same).any(axis=1) & (top & ~same).any(axis=1)).sum() >= 5


def test_a_relevant_reference_tied_with_irrelevant_ones_beyond_the_search_depth() -> None:
    # One query, R = 1: the search depth is max(R, k) = 1. Its relevant reference (index 0)
    # has five exact duplicates with other labels at higher indices, beyond that depth. By
    # index order the relevant one would come first; pessimistically it comes sixth.
    far = np.random.default_rng(5).standard_normal((20, 4)).astype(np.float32) - 10.0
    reference = np.concatenate([np.tile([[1.0, 0.2, 0.0, 0.0]], (6, 1)).astype(np.float32), far])
    labels = np.array([7, 1, 2, 3, 1, 2, *range(20, 40)])
    query = np.array([[1.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    for backend in ("faiss", "torch"):
        for ks in ((1,), (1, 5, 6)):
            report = retrieval_metrics(
                query, [7], reference, labels, ks=ks, backend=backend, compute_map=True
            )
            assert report.counts["search_depth"] == max(ks)
            assert report["precision@1"] == report["r_precision"] == report["map@r"] == 0.0, backend
            assert report["map"] == pytest.approx(1 / 6)
            if 6 in ks:
                assert (report["recall@5"], report["recall@6"]) == (0.0, 1.0)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_precision_at_1_is_the_hit_rate_of_knn(backend: str) -> None:
    # The acceptance test of the tie rule. knn(k=1) breaks a tie by index, so its hit rate is
    # the pessimistic precision@1 only when, in every mixed tie, the irrelevant reference has
    # the lower index: (a) such a set, compared directly; (b) any set, where a knn(k=1) hit counts
    # only if no irrelevant reference ties the top score (read from the full knn ranking, whose
    # tied scores are exactly equal).
    rng = np.random.default_rng(6)
    base = rng.standard_normal((60, 8)).astype(np.float32)
    labels = rng.integers(0, 4, 60)
    # (a) copies first, each under a label of its own (irrelevant to every query), the
    # originals after them: every copy ties with its original and comes first by index
    x = np.concatenate([base[:25], base])
    y = np.concatenate([100 + np.arange(25), labels])
    _, top = knn(x, None, 1, backend=backend, exclude_self=True)
    hits = y[top[:, 0]] == y
    report = retrieval_metrics(x, y, ks=(1,), backend=backend)
    has_relevant = np.bincount(y)[y] > 1  # the copies have no relevant reference: not evaluated
    assert report.rate("precision@1").hits == int(hits[has_relevant].sum())
    assert report["precision@1"] == pytest.approx(hits[has_relevant].mean())
    # (b) shuffled: knn(k=1) alone would sometimes pick the relevant copy of a mixed tie
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    scores, ranked = knn(x, None, len(x) - 1, backend=backend, exclude_self=True)
    tied_with_top = scores == scores[:, :1]
    clean_hit = np.where(tied_with_top, y[ranked] == y[:, None], True).all(axis=1)
    report = retrieval_metrics(x, y, ks=(1,), backend=backend)
    assert report["precision@1"] == pytest.approx(clean_hit[has_relevant[order]].mean())
    _, top = knn(x, None, 1, backend=backend, exclude_self=True)
    assert report["precision@1"] < (y[top[:, 0]] == y)[has_relevant[order]].mean()  # ties were there


def test_equals_accuracy_calculator_with_cosine_similarity(random_set) -> None:
    # Without ties, the metrics are PML's on the same metric: AccuracyCalculator with its
    # CosineSimilarity distance, on raw vectors of unequal norms.
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    x, y = random_set
    x = x * np.random.default_rng(7).uniform(0.5, 2.0, (len(x), 1)).astype(np.float32)
    calculator = AccuracyCalculator(
        include=tuple(PML_KEYS.values()),
        k=None,
        knn_func=CustomKNN(CosineSimilarity()),
        device=torch.device("cpu"),
    )
    for split in (slice(None), slice(0, 120)):
        args = [torch.from_numpy(x[split]), torch.from_numpy(y[split])]
        if split != slice(None):
            args += [torch.from_numpy(x[120:]), torch.from_numpy(y[120:])]
        theirs = calculator.get_accuracy(*args)
        ours = retrieval_metrics(*[a.numpy() for a in args], compute_map=True)
        for key, pml_key in PML_KEYS.items():
            assert ours[key] == pytest.approx(theirs[pml_key], abs=1e-9), key


def test_duplicates_tie_in_every_metric_where_blas_rounds_them_apart() -> None:
    # At d = 128 FAISS's BLAS gives some exact duplicates scores an ulp apart (see test_knn);
    # the search and the mAP pass re-score such near-ties exactly, so every metric, mAP
    # included, is the slow pessimistic reference's.
    rng = np.random.default_rng(8)
    base = rng.standard_normal((120, 128)).astype(np.float32)
    x = np.concatenate([base, base[:80]])
    y = rng.integers(0, 6, len(x))
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    want = slow_reference(x, y, x, y, True, (1, 3))
    for backend in ("faiss", "torch"):
        report = retrieval_metrics(x, y, ks=(1, 3), backend=backend, chunk_size=64, compute_map=True)
        for key, value in want.items():
            assert report[key] == pytest.approx(value, abs=1e-12), (backend, key)
