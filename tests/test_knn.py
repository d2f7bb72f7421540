"""k-NN search: every back-end against a brute-force sort, and against each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedkit.evaluation import search as knn_module
from embedkit.evaluation.search import knn, resolve_backend
from embedkit.similarity import chunked_topk, pairwise_similarity

METRICS = ["cosine", "dot", "euclidean", "squared_euclidean"]


def brute_force(queries: np.ndarray, reference: np.ndarray, k: int, metric: str, exclude_self: bool):
    """The obvious definition: score everything, mask self, sort descending."""
    scores = pairwise_similarity(
        torch.from_numpy(queries).double(), torch.from_numpy(reference).double(), metric=metric
    ).numpy()
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.fixture
def data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((300, 12)).astype(np.float32)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_matches_brute_force(data: np.ndarray, metric: str, exclude_self: bool, backend: str) -> None:
    reference = None if exclude_self else data[100:]
    queries = data if exclude_self else data[:100]
    scores, indices = knn(
        queries, reference, 9, metric=metric, backend=backend, exclude_self=exclude_self, chunk_size=17
    )
    want_scores, want_indices = brute_force(
        queries, data if exclude_self else data[100:], 9, metric, exclude_self
    )
    assert isinstance(scores, np.ndarray) and isinstance(indices, np.ndarray)
    assert scores.shape == indices.shape == (queries.shape[0], 9)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)


def test_faiss_and_torch_agree_on_larger_set() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    s_f, i_f = knn(x, None, 20, backend="faiss", exclude_self=True)
    s_t, i_t = knn(x, None, 20, backend="torch", exclude_self=True)
    # ties aside: where consecutive scores are distinct the neighbours must be identical
    distinct = np.abs(np.diff(s_t, axis=1, append=-np.inf)) > 1e-5
    distinct &= np.abs(np.diff(s_t, axis=1, prepend=np.inf)) > 1e-5
    assert (i_f[distinct] == i_t[distinct]).mean() > 0.999
    np.testing.assert_allclose(s_f, s_t, atol=1e-5)


def test_exclude_self_drops_own_index_not_duplicates() -> None:
    rng = np.random.default_rng(2)
    base = rng.standard_normal((20, 8)).astype(np.float32)
    x = np.concatenate([base, base, base])  # every point three times
    for backend in ("faiss", "torch"):
        scores, indices = knn(x, None, 2, backend=backend, exclude_self=True)
        own = np.arange(60)[:, None]
        assert not (indices == own).any(), backend
        # the two other copies are found first, with cosine 1
        np.testing.assert_allclose(scores, 1.0, atol=1e-5)
        assert ((indices % 20) == (own % 20)).all(), backend


def test_exclude_self_with_many_ties_still_returns_k_others() -> None:
    x = np.ones((10, 4), dtype=np.float32)  # all identical: the query's own index may not be returned
    for backend in ("faiss", "torch"):
        _, indices = knn(x, None, 9, backend=backend, exclude_self=True)
        assert not (indices == np.arange(10)[:, None]).any()
        assert all(len(set(row)) == 9 for row in indices.tolist())


def test_torch_in_torch_out_and_input_untouched(data: np.ndarray) -> None:
    copy = data.copy()
    scores, indices = knn(torch.from_numpy(data), None, 3, backend="faiss", exclude_self=True)
    assert isinstance(scores, torch.Tensor) and isinstance(indices, torch.Tensor)
    assert indices.dtype == torch.int64
    _, indices_t = knn(torch.from_numpy(data), None, 3, backend="torch", exclude_self=True)
    assert torch.equal(indices, indices_t)
    np.testing.assert_array_equal(data, copy)  # cosine normalisation never happens in place


def test_half_precision_and_float64(data: np.ndarray) -> None:
    _, want = knn(data, None, 5, backend="torch", exclude_self=True)
    scores, got = knn(torch.from_numpy(data).double(), None, 5, backend="torch", exclude_self=True)
    assert scores.dtype == torch.float64
    assert (got.numpy() == want).mean() > 0.99
    scores_h, _ = knn(torch.from_numpy(data).half(), None, 5, backend="torch", exclude_self=True)
    assert scores_h.dtype == torch.float32


def test_chunk_size_does_not_change_results(data: np.ndarray) -> None:
    a = chunked_topk(torch.from_numpy(data), None, 7, exclude_self=True, chunk_size=1)
    b = chunked_topk(torch.from_numpy(data), None, 7, exclude_self=True)
    assert torch.equal(a[1], b[1])


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_approximate_indexes_recover_exact_neighbours(data: np.ndarray, metric: str) -> None:
    _, exact = knn(data, None, 5, metric=metric, backend="faiss", exclude_self=True)
    _, ivf = knn(data, None, 5, metric=metric, backend="faiss-ivf", nlist=8, nprobe=8, exclude_self=True)
    np.testing.assert_array_equal(ivf, exact)  # every list probed: exhaustive
    _, hnsw = knn(data, None, 5, metric=metric, backend="faiss-hnsw", ef_search=300, exclude_self=True)
    assert (hnsw == exact).mean() > 0.95


def test_approximate_index_that_finds_too_few_raises(data: np.ndarray) -> None:
    with pytest.raises(ValueError, match="fewer than"):
        knn(data, None, 250, backend="faiss-ivf", nlist=64, nprobe=1)


def test_auto_backend(monkeypatch: pytest.MonkeyPatch, data: np.ndarray) -> None:
    t = torch.from_numpy(data)
    assert resolve_backend("auto", t) == "faiss"
    assert resolve_backend("torch", t) == "torch"
    assert resolve_backend("auto", t.to("meta")) == "torch"
    monkeypatch.setattr(knn_module, "faiss_available", lambda: False)
    assert resolve_backend("auto", t) == "torch"
    with pytest.raises(ImportError, match="faiss"):
        resolve_backend("faiss", t)
    _, indices = knn(data, None, 3, exclude_self=True)  # falls back to torch
    assert indices.shape == (300, 3)


def test_bad_inputs(data: np.ndarray) -> None:
    with pytest.raises(ValueError, match="k must lie in"):
        knn(data, None, 300, exclude_self=True)
    with pytest.raises(ValueError, match="k must lie in"):
        knn(data, None, 0)
    with pytest.raises(ValueError, match="embedding_dim"):
        knn(data, data[:, :5], 3)
    with pytest.raises(ValueError, match="same number of rows"):
        knn(data[:10], data, 3, exclude_self=True)
    with pytest.raises(ValueError, match="backend"):
        knn(data, None, 3, backend="annoy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metric"):
        knn(data, None, 3, metric="manhattan")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="queries"):
        knn(np.arange(10).reshape(5, 2), None, 1)
    with pytest.raises(TypeError, match="queries"):
        knn([[0.0, 1.0]], None, 1)
    bad = data.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        knn(bad, None, 3)


def test_reference_defaults_to_the_queries(data: np.ndarray) -> None:
    scores, indices = knn(data, k=3, exclude_self=True)  # reference=None as documented
    want_scores, want_indices = knn(data, None, 3, exclude_self=True)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(scores, want_scores)
    _, own = knn(data, k=1)  # without exclude_self every query finds itself
    np.testing.assert_array_equal(own[:, 0], np.arange(len(data)))


def test_one_sample_with_exclude_self_says_why(data: np.ndarray) -> None:
    with pytest.raises(ValueError, match="at least two are needed"):
        knn(data[:1], k=1, exclude_self=True)


@pytest.mark.parametrize("backend", ["faiss", "faiss-ivf", "faiss-hnsw", "torch"])
def test_numpy_integer_arguments_work_on_every_backend(data: np.ndarray, backend: str) -> None:
    extra = {
        "faiss-ivf": {"nlist": np.int64(8), "nprobe": np.int32(8)},
        "faiss-hnsw": {"hnsw_m": np.int64(16), "ef_construction": np.int16(80), "ef_search": np.int64(300)},
        "torch": {"chunk_size": np.int64(17)},
    }.get(backend, {})
    scores, indices = knn(data, data[:50], np.int64(5), backend=backend, **extra)  # type: ignore[arg-type]
    _, want = knn(data, data[:50], 5, backend="torch")
    assert scores.shape == indices.shape == (300, 5)
    assert (indices == want).mean() > 0.95
    with pytest.raises(TypeError, match="k must be an integer"):
        knn(data, None, np.float64(5.0), backend=backend)  # type: ignore[arg-type]


@pytest.mark.parametrize("metric", METRICS)
def test_faiss_blocks_and_self_exclusion_across_block_edges(
    monkeypatch: pytest.MonkeyPatch, data: np.ndarray, metric: str
) -> None:
    # Results are written block by block into the final arrays: blocks of 7 queries (with and
    # without a progress callback) must give the same answer as one block and as brute force.
    monkeypatch.setattr(knn_module, "_FAISS_QUERY_BLOCK", 7)
    for progress in (False, True):
        scores, indices = knn(
            data, None, 6, metric=metric, backend="faiss", exclude_self=True, progress=progress
        )
        want_scores, want_indices = brute_force(data, data, 6, metric, True)
        np.testing.assert_array_equal(indices, want_indices)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)
        assert scores.dtype == np.float32 and scores.flags.c_contiguous and indices.flags.c_contiguous


def test_faiss_search_holds_the_results_once() -> None:
    # The results are the largest arrays of a self-retrieval; they used to be held three times
    # (per-block parts, their concatenation, the self-excluded copy). numpy's allocations are
    # traced by tracemalloc (FAISS's own are not): the peak must stay near one copy of the output.
    import tracemalloc

    x = np.random.default_rng(3).standard_normal((20_000, 8)).astype(np.float32)
    k = 60
    output_bytes = x.shape[0] * k * (4 + 8)
    knn(x, None, k, backend="faiss", exclude_self=True)  # warm-up: imports and FAISS buffers
    tracemalloc.start()
    knn(x, None, k, backend="faiss", exclude_self=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1.5 * output_bytes + 2 * x.nbytes, (peak, output_bytes)


def test_recall_against_exact() -> None:
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_normal((500, 16)).astype(np.float32))
    _, exact = knn(x, None, 10, backend="faiss", exclude_self=True)
    recall, checked = knn_module.recall_against_exact(x, None, exact, sample=100)
    assert (recall, checked) == (1.0, 100)
    damaged = exact.clone()
    damaged[:, -1] = (damaged[:, -1] + 1) % 500  # one of ten neighbours replaced (almost surely wrong)
    recall, _ = knn_module.recall_against_exact(x, None, damaged, sample=1000)
    assert recall == pytest.approx(0.9, abs=0.01)
    _, ivf = knn(x[:50], x, 10, backend="faiss-ivf", nlist=16, nprobe=1)
    recall, checked = knn_module.recall_against_exact(x[:50], x, ivf, sample=1000)
    assert checked == 50 and 0.0 < recall < 1.0


# --- ties: one order, by index, whatever the back-end and the depth ------------------------------


def duplicated_set(seed: int, n_base: int, dim: int, copies: int) -> np.ndarray:
    """``n_base`` random vectors, each present ``copies`` times, shuffled (ties everywhere)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_base, dim)).astype(np.float32)
    return np.repeat(base, copies, axis=0)[rng.permutation(n_base * copies)]


def assert_ties_by_index(scores: np.ndarray, indices: np.ndarray) -> None:
    tied = scores[:, 1:] == scores[:, :-1]
    assert not (tied & (indices[:, 1:] < indices[:, :-1])).any()


def test_faiss_gives_duplicates_unequal_scores_that_knn_ties() -> None:
    # FAISS's BLAS blocks give exact duplicates scores one ulp apart at d = 128 (measured: about
    # 6% of the queries here); knn re-scores such near-ties exactly, so duplicates tie.
    x = duplicated_set(0, 500, 128, 2)
    twin = np.array([np.flatnonzero((x == row).all(axis=1)) for row in x])  # (1000, 2): both copies
    for backend in ("faiss", "torch"):
        scores, indices = knn(x, None, 2, backend=backend)
        assert (scores[:, 0] == scores[:, 1]).all(), backend
        np.testing.assert_array_equal(indices, twin)  # both copies, lower index first


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_tied_neighbours_come_by_index_on_every_backend_and_depth(metric: str, exclude_self: bool) -> None:
    x = duplicated_set(1, 40, 6, 4)
    queries, reference = (x, None) if exclude_self else (x[:60], x[60:])
    deepest = 100
    found = {
        (backend, k): knn(queries, reference, k, metric=metric, backend=backend, exclude_self=exclude_self)
        for backend in ("faiss", "torch")
        for k in (1, 2, 3, 7, deepest)
    }
    for (backend, k), (scores, indices) in found.items():
        assert_ties_by_index(scores, indices)
        # the same neighbours whatever the back-end, and the first k of a deeper search
        np.testing.assert_array_equal(indices, found[("torch", k)][1], err_msg=f"{backend} k={k}")
        np.testing.assert_array_equal(
            indices, found[(backend, deepest)][1][:, :k], err_msg=f"{backend} k={k}"
        )


def test_a_tie_across_the_cut_off_is_settled_among_all_references() -> None:
    # 30 copies of one vector scattered among other vectors: a query equal to it ties with all
    # 30, far more than k; the k copies with the lowest indices are returned, in index order.
    rng = np.random.default_rng(2)
    reference = rng.standard_normal((400, 16)).astype(np.float32)
    copies = np.sort(rng.choice(400, 30, replace=False))
    reference[copies] = reference[copies[-1]]
    query = reference[copies[:1]] * 3.0  # cosine 1 to every copy
    for backend in ("faiss", "torch"):
        for k in (1, 5, 29):
            scores, indices = knn(query, reference, k, backend=backend)
            np.testing.assert_array_equal(indices[0], copies[:k], err_msg=f"{backend} k={k}")
            assert (scores == scores[0, 0]).all()


def test_tie_order_of_search_checked_puts_flagged_references_last() -> None:
    x = torch.from_numpy(duplicated_set(3, 20, 5, 3))
    last = np.zeros(60, dtype=bool)
    last[::2] = True  # even indices go after odd ones among equal scores
    for backend in ("faiss", "torch"):
        scores, indices = knn_module.search_checked(
            x, None, 4, backend=backend, exclude_self=True, tie_order=lambda rows, cols: last[cols]
        )
        scores, indices = np.asarray(scores), np.asarray(indices)
        tied = scores[:, 1:] == scores[:, :-1]
        key = last[indices].astype(np.int64) * 1000 + indices  # flagged after, then by index
        assert not (tied & (key[:, 1:] < key[:, :-1])).any(), backend


def test_a_collapsed_embedding_settles_its_ties_by_index_and_says_why_it_is_slow(monkeypatch) -> None:
    import embedkit.evaluation.search as search

    monkeypatch.setattr(search, "_SLOW_CUT_PAIRS", 0)
    x = torch.ones(300, 8)
    x[::7] = 2.0  # a few distinct rows: identical rows are scored once per distinct row
    for backend in ("faiss", "torch"):
        with pytest.warns(UserWarning, match="collapsed embedding"):
            scores, indices = search.knn(x, x, k=4, exclude_self=True, backend=backend)
        expected = torch.stack([torch.tensor([j for j in range(300) if j != i][:4]) for i in range(300)])
        assert torch.equal(indices.cpu(), expected)
        assert torch.all(scores == scores[:, :1])
