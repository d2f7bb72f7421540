"""Ties of a collapsed embedding: settled by counting identical rows, with the pessimistic rule.

When most rows are identical (an embedding collapsed to a few points), every query ties with
thousands of references. The search then ranks from the distinct rows
(``search._search_distinct``) instead of re-scoring every tied pair; these tests check it
against plain definitions:

* the neighbours of :func:`knn`: a full sort of every reference by (exact score descending,
  index), written as a loop;
* the metrics of :func:`retrieval_metrics`: every reference sorted by (score descending,
  relevant last) — the pessimistic tie rule — and the metrics read from that ranking as the
  paper defines them;

on inputs with few distinct rows and many copies (hypothesis), and at a collapsed scale that
pair-by-pair settling could not reach quickly.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedkit.evaluation import search
from embedkit.evaluation.retrieval import retrieval_metrics
from embedkit.evaluation.search import exact_scores, knn

KS = (1, 2, 5)


def few_distinct_rows(seed: int, n: int, n_distinct: int, dim: int, n_labels: int):
    """``n`` rows drawn from ``n_distinct`` small-integer points (exact ties), and labels."""
    rng = np.random.default_rng(seed)
    points = rng.integers(-2, 3, size=(n_distinct, dim)).astype(np.float32)
    x = points[rng.integers(0, n_distinct, n)]
    y = rng.integers(0, n_labels, n)
    return x, y


def reference_ranking(x: np.ndarray, y: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Each query's other rows ranked pessimistically, and their relevance, by a plain loop.

    Scores are the library's exact scores (so that exact duplicates tie); order by score
    descending, then irrelevant before relevant, then index.
    """
    n = x.shape[0]
    t = torch.from_numpy(x)
    ranking, relevance = [], []
    for i in range(n):
        others = np.array([j for j in range(n) if j != i])
        score = exact_scores(t, t, np.full(others.size, i), others, metric=metric)
        relevant = y[others] == y[i]
        order = sorted(range(others.size), key=lambda j: (-score[j], relevant[j], others[j]))
        ranking.append(others[order])
        relevance.append(relevant[order])
    return np.array(ranking), np.array(relevance)


def pessimistic_metrics(relevance: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """The metrics of Musgrave et al. from full pessimistic rankings, query by query."""
    rows = [rel for rel in relevance if rel.any()]
    out: dict[str, list[float]] = {"precision@1": [], "r_precision": [], "map@r": []}
    for k in ks:
        out[f"recall@{k}"], out[f"precision@{k}"] = [], []
    for rel in rows:
        r = int(rel.sum())
        out["precision@1"].append(float(rel[0]))
        out["r_precision"].append(rel[:r].sum() / r)
        hits = np.cumsum(rel[:r])
        out["map@r"].append(sum(hits[i] / (i + 1) for i in range(r) if rel[i]) / r)
        for k in ks:
            out[f"recall@{k}"].append(float(rel[:k].any()))
            out[f"precision@{k}"].append(rel[:k].sum() / k)
    return {name: float(np.mean(values)) for name, values in out.items()}


def full_average_precision(relevance: np.ndarray) -> float:
    aps = []
    for rel in relevance:
        if rel.any():
            place = np.flatnonzero(rel) + 1
            aps.append(np.mean(np.arange(1, place.size + 1) / place))
    return float(np.mean(aps))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(20, 90),
    n_distinct=st.integers(1, 3),
    n_labels=st.integers(1, 6),
    metric=st.sampled_from(["cosine", "dot", "euclidean", "squared_euclidean"]),
)
def test_metrics_of_few_distinct_rows_are_the_pessimistic_ones(
    seed: int, n: int, n_distinct: int, n_labels: int, metric: str
) -> None:
    x, y = few_distinct_rows(seed, n, n_distinct, 4, n_labels)
    _, relevance = reference_ranking(x, y, metric)
    if not relevance.any(axis=1).any():
        return  # no query has a relevant reference: retrieval_metrics refuses (tested elsewhere)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = retrieval_metrics(x, y, ks=KS, metric=metric, backend="torch", compute_map=True)
    expected = pessimistic_metrics(relevance, KS)
    for name, value in expected.items():
        assert float(report[name]) == pytest.approx(value, abs=1e-12), name
    assert float(report["map"]) == pytest.approx(full_average_precision(relevance), abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(20, 90),
    n_distinct=st.integers(1, 3),
    k=st.integers(1, 19),
    exclude_self=st.booleans(),
    backend=st.sampled_from(["faiss", "torch"]),
)
def test_knn_of_few_distinct_rows_is_the_full_sort_by_score_then_index(
    seed: int, n: int, n_distinct: int, k: int, exclude_self: bool, backend: str
) -> None:
    x, _ = few_distinct_rows(seed, n, n_distinct, 4, 1)
    t = torch.from_numpy(x)
    scores, indices = knn(x, None, k, metric="dot", backend=backend, exclude_self=exclude_self)
    for i in range(n):
        others = np.array([j for j in range(n) if not (exclude_self and j == i)])
        score = exact_scores(t, t, np.full(others.size, i), others, metric="dot")
        order = sorted(range(others.size), key=lambda j: (-score[j], others[j]))[:k]
        np.testing.assert_array_equal(indices[i], others[order])
        np.testing.assert_array_equal(scores[i], score[order].astype(np.float32))


def test_the_distinct_row_path_agrees_with_the_search_on_mixed_data(monkeypatch) -> None:
    # Six points repeated among 30 spread-out rows, labels of few classes: with the distinct-row
    # path switched off, the search and its pair-by-pair tie settling give the same neighbours.
    x, y = few_distinct_rows(7, 1200, 6, 5, 4)
    x[::40] = np.random.default_rng(7).standard_normal((30, 5)).astype(np.float32)
    t = torch.from_numpy(x)
    later = search.LabelTieOrder(y, y)
    for metric in ("cosine", "euclidean"):
        arguments = {"metric": metric, "exclude_self": True, "tie_order": later}
        assert search._search_distinct(t, None, 30, score_dtype=torch.float32, **arguments) is not None
        fast = search.search_checked(t, None, 30, backend="torch", **arguments)
        with monkeypatch.context() as patched, warnings.catch_warnings():
            patched.setattr(search, "_search_distinct", lambda *args, **kwargs: None)
            warnings.simplefilter("ignore")
            slow = search.search_checked(t, None, 30, backend="torch", **arguments)
        np.testing.assert_array_equal(np.asarray(fast[1]), np.asarray(slow[1]), err_msg=metric)
        # the search's own scores where no tie was near, exact ones here: an ulp apart at most
        np.testing.assert_allclose(np.asarray(fast[0]), np.asarray(slow[0]), rtol=3e-7, atol=1e-6)


def test_queries_against_a_collapsed_reference_set() -> None:
    # Separate sets: distinct queries, a reference set of two points; ties by label, then index.
    rng = np.random.default_rng(3)
    reference = np.repeat(np.eye(2, 6, dtype=np.float32), [700, 500], axis=0)[rng.permutation(1200)]
    reference_labels = rng.integers(0, 3, 1200)
    queries = rng.standard_normal((50, 6)).astype(np.float32)
    query_labels = rng.integers(0, 3, 50)
    later = search.LabelTieOrder(query_labels, reference_labels)
    _, indices = search.search_checked(
        torch.from_numpy(queries), torch.from_numpy(reference), 40, metric="cosine", tie_order=later
    )
    q, r = torch.from_numpy(queries), torch.from_numpy(reference)
    for i in range(50):
        score = exact_scores(q, r, np.full(1200, i), np.arange(1200), metric="cosine")
        relevant = reference_labels == query_labels[i]
        order = sorted(range(1200), key=lambda j: (-score[j], relevant[j], j))[:40]
        np.testing.assert_array_equal(np.asarray(indices)[i], order)


def test_a_collapsed_embedding_of_20000_rows_is_settled_by_counting() -> None:
    # Every query ties with every other row: pair by pair, 4e8 pairs (minutes, gigabytes);
    # the warning says the counting path ran (its speed is measured by bench_evaluation --collapsed).
    n, n_labels = 20_000, 200
    rng = np.random.default_rng(0)
    x = np.full((n, 16), 0.25, dtype=np.float32)
    y = rng.integers(0, n_labels, n)
    with pytest.warns(UserWarning, match="settled by counting identical rows"):
        report = retrieval_metrics(x, y, ks=(1, 10, 1000))
    # With every reference tied, the pessimistic ranking puts each query's n - 1 - R irrelevant
    # references before its R relevant ones: no hit within the first n - 1 - R ranks.
    size = np.bincount(y, minlength=n_labels)[y] - 1
    assert float(report["precision@1"]) == 0.0
    assert float(report["r_precision"]) == 0.0
    assert float(report["map@r"]) == 0.0
    assert float(report["recall@1000"]) == 0.0
    assert report.counts["search_depth"] == max(int(size.max()), 1000)


def test_the_neighbours_of_a_collapsed_embedding_come_irrelevant_first_then_by_index() -> None:
    n = 5000
    rng = np.random.default_rng(1)
    x = torch.ones(n, 8)
    y = rng.integers(0, 40, n)
    later = search.LabelTieOrder(y, y)
    with pytest.warns(UserWarning, match="settled by counting"):
        scores, indices = search.search_checked(
            x, None, 300, backend="faiss", exclude_self=True, tie_order=later
        )
    scores, indices = np.asarray(scores), np.asarray(indices)
    assert (scores == 1.0).all()
    for i in rng.choice(n, 25, replace=False):
        others = np.delete(np.arange(n), i)
        expected = np.concatenate([others[y[others] != y[i]], others[y[others] == y[i]]])[:300]
        np.testing.assert_array_equal(indices[i], expected)
