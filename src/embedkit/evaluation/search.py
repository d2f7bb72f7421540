"""k-nearest-neighbour search behind one interface: FAISS on the CPU, chunked torch anywhere.

:func:`knn` finds, for every query, the ``k`` most similar reference embeddings. Two
families of back-end give the same answer (ties aside):

* ``"faiss"`` — an exact flat FAISS index (``IndexFlatIP`` for cosine and dot,
  ``IndexFlatL2`` for the euclidean metrics), the fastest exact search on a CPU.
  ``"faiss-ivf"`` and ``"faiss-hnsw"`` are approximate indexes for very large
  galleries; they are used only when asked for by name.
* ``"torch"`` — a chunked matrix product and ``torch.topk``
  (:func:`embedkit.similarity.chunked_topk`): runs on whatever device the tensors are on
  (a CUDA GPU included) and when FAISS is not installed. Memory stays at one block of
  ``chunk_size × n_reference`` scores.

``backend="auto"`` picks ``"torch"`` when either input is a tensor on a non-CPU device or
FAISS cannot be imported, and ``"faiss"`` otherwise.

Score convention (the library's): a score is a *similarity*, higher is closer, equal to
:func:`embedkit.similarity.pairwise_similarity` — the cosine for ``"cosine"``, the inner
product for ``"dot"``, and the *negated* distance (``-‖q − r‖`` or ``-‖q − r‖²``) for
``"euclidean"`` and ``"squared_euclidean"``. Neighbours come best first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._checks import check_bool, check_choice, check_int, check_matching_dim
from ..similarity import METRICS, Metric, chunked_topk, l2_normalize, rows_per_block, similarity_blocks
from ._inputs import as_embeddings, progress_bar, to_numpy

__all__ = [
    "APPROXIMATE_BACKENDS",
    "BACKENDS",
    "Backend",
    "faiss_available",
    "knn",
    "recall_against_exact",
    "resolve_backend",
]

Backend = Literal["auto", "faiss", "faiss-ivf", "faiss-hnsw", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "faiss", "faiss-ivf", "faiss-hnsw", "torch")
APPROXIMATE_BACKENDS: tuple[str, ...] = ("faiss-ivf", "faiss-hnsw")

# Queries per FAISS call when a progress bar is shown (FAISS blocks internally anyway).
_FAISS_QUERY_BLOCK = 4096

# An approximate index left at its defaults is tuned to this recall of the exact top-k, on
# this many queries (a fixed, seeded sample): the cheapest nprobe / ef_search that reaches it.
TARGET_RECALL = 0.95
_CALIBRATION_QUERIES = 256


def default_nlist(n_reference: int) -> int:
    """Inverted lists of ``"faiss-ivf"`` for ``n_reference`` vectors.

    ``4·√n``, but at most ``n / 39``: FAISS's k-means wants 39 training points per list.
    """
    return max(1, min(int(4 * np.sqrt(n_reference)), n_reference // 39))


def default_ef_construction(hnsw_m: int) -> int:
    """Build-time breadth of ``"faiss-hnsw"``: FAISS's own default, 40.

    The measured table in the evaluation guide: 128 doubled the build time for a gain in
    recall that a larger ``ef_search`` buys more cheaply.
    """
    return 40


def faiss_available() -> bool:
    """Whether the ``faiss`` module can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, *tensors: Tensor) -> str:
    """The concrete back-end ``"auto"`` stands for, given the input tensors.

    Parameters
    ----------
    backend : {"auto", "faiss", "faiss-ivf", "faiss-hnsw", "torch"}
    *tensors : Tensor
        The inputs: a tensor on a non-CPU device makes ``"auto"`` choose ``"torch"``.

    Returns
    -------
    str
        ``backend`` itself unless it was ``"auto"``.
    """
    check_choice(backend, "backend", BACKENDS)
    if backend != "auto":
        if backend.startswith("faiss") and not faiss_available():
            raise ImportError(
                f"backend={backend!r} needs faiss, which is not installed; install faiss-cpu "
                "or use backend='torch'"
            )
        return backend
    if any(t.device.type != "cpu" for t in tensors) or not faiss_available():
        return "torch"
    return "faiss"


def knn(
    queries: Any,
    reference: Any = None,
    k: int = 1,
    *,
    metric: Metric = "cosine",
    backend: Backend = "auto",
    exclude_self: bool = False,
    chunk_size: int | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_construction: int | None = None,
    ef_search: int | None = None,
    progress: bool = False,
) -> tuple[Any, Any]:
    """The ``k`` nearest reference embeddings of every query.

    Parameters
    ----------
    queries : ndarray or Tensor of shape (n_queries, d)
        Floating-point embeddings, on any device.
    reference : ndarray or Tensor of shape (n_reference, d), or None
        The set searched; ``None`` searches ``queries`` themselves.
    k : int
        Neighbours per query: ``1 <= k <= n_reference`` (``n_reference - 1`` with
        ``exclude_self``).
    metric : {"cosine", "dot", "euclidean", "squared_euclidean"}
        ``"euclidean"`` is the L2 distance. Scores follow the library's convention:
        similarities, higher is closer, euclidean distances negated.
    backend : {"auto", "faiss", "faiss-ivf", "faiss-hnsw", "torch"}
        See the module documentation. ``"faiss"`` is exact; ``"faiss-ivf"`` and
        ``"faiss-hnsw"`` are approximate. FAISS back-ends copy CUDA inputs to the CPU.
    exclude_self : bool
        Query ``i`` is reference ``i`` (``reference`` is ``None`` or has as many rows):
        never return reference ``i`` for query ``i``. The query's own *index* is removed,
        so an exact duplicate of it elsewhere in the set is still found.
    chunk_size : int, optional
        Query rows per block on the torch path (default: as many as fit in 128 MiB of
        scores). FAISS manages its own blocks.
    nlist, nprobe : int, optional
        ``"faiss-ivf"`` only: inverted lists (default ``4·√n_reference``, at most
        ``n_reference / 39``) and lists visited per query (default: calibrated, see below).
    hnsw_m, ef_construction, ef_search : int, optional
        ``"faiss-hnsw"`` only: graph degree (default 32), build breadth (default 40) and
        search breadth (default: calibrated).

        A calibrated default is the cheapest value among ``1, 2, 4, ...`` (``nprobe``) or
        ``max(16, k), 2·max(16, k), ...`` (``ef_search``) whose recall of the exact top-``k``
        reaches :data:`TARGET_RECALL` (0.95) on a seeded sample of 256 queries, measured
        against a brute-force search; the table behind this choice is in the evaluation
        guide. Recall on other queries can be lower; :func:`recall_against_exact` measures it.
    progress : bool
        Show a progress bar (tqdm when installed, otherwise plain lines on stderr).

    Returns
    -------
    scores : ndarray or Tensor of shape (n_queries, k)
        Similarities, best first: float32 (float64 on the torch path for float64 input).
    indices : ndarray or Tensor of shape (n_queries, k) and dtype int64
        Row indices into ``reference``.

    Both outputs are torch tensors on the queries' device when ``queries`` is a tensor,
    numpy arrays otherwise.

    Raises
    ------
    ValueError
        For a bad ``k``, mismatched dimensions, ``exclude_self`` between sets of different
        sizes, or an approximate index that found fewer than ``k`` neighbours for a query.
    """
    q = as_embeddings(queries, "queries")
    ref = q if reference is None else as_embeddings(reference, "reference")
    check_matching_dim(q, ref, "queries", "reference")
    check_choice(metric, "metric", METRICS)
    exclude_self = check_bool(exclude_self, "exclude_self")
    if exclude_self and ref.shape[0] != q.shape[0]:
        raise ValueError(
            "exclude_self=True means query i is reference i, so both need the same number of rows; "
            f"got {q.shape[0]} queries and {ref.shape[0]} references"
        )
    if exclude_self and ref.shape[0] < 2:
        raise ValueError(
            f"exclude_self=True leaves no neighbour to return: the set has {ref.shape[0]} embedding(s), "
            "and each query may not find itself; at least two are needed"
        )
    # The checked values (plain ints) are used from here on: numpy integers from a config
    # or an array would otherwise reach FAISS and torch as they came.
    k = check_int(k, "k", low=1, high=ref.shape[0] - int(exclude_self))
    chunk_size = None if chunk_size is None else check_int(chunk_size, "chunk_size", low=1)
    nlist = None if nlist is None else check_int(nlist, "nlist", low=1, high=ref.shape[0])
    nprobe = None if nprobe is None else check_int(nprobe, "nprobe", low=1)
    hnsw_m = check_int(hnsw_m, "hnsw_m", low=2)
    ef_construction = (
        None if ef_construction is None else check_int(ef_construction, "ef_construction", low=1)
    )
    ef_search = None if ef_search is None else check_int(ef_search, "ef_search", low=k + 1)
    scores, indices = search_checked(
        q,
        None if reference is None else ref,
        k,
        metric=metric,
        backend=backend,
        exclude_self=exclude_self,
        chunk_size=chunk_size,
        nlist=nlist,
        nprobe=nprobe,
        hnsw_m=hnsw_m,
        ef_construction=ef_construction,
        ef_search=ef_search,
        progress=progress,
    )
    if isinstance(queries, Tensor):
        return torch.as_tensor(scores).to(queries.device), torch.as_tensor(indices).to(queries.device)
    return _as_numpy(scores), _as_numpy(indices)


def _as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return to_numpy(x) if isinstance(x, Tensor) else x


def search_checked(
    queries: Tensor,
    reference: Tensor | None,
    k: int,
    *,
    metric: Metric = "cosine",
    backend: Backend = "auto",
    exclude_self: bool = False,
    chunk_size: int | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_construction: int | None = None,
    ef_search: int | None = None,
    progress: bool = False,
) -> tuple[Tensor | np.ndarray, Tensor | np.ndarray]:
    """:func:`knn` on inputs that were already validated (tensors from :mod:`._inputs`).

    For the evaluation modules, which validate their inputs once themselves. Returns
    torch tensors on the queries' device from the torch back-end and numpy arrays from
    FAISS, without converting either.
    """
    ref = queries if reference is None else reference
    resolved = resolve_backend(backend, queries, ref)
    with progress_bar(queries.shape[0], "k-NN search", progress) as update:
        if resolved == "torch":
            return chunked_topk(
                queries,
                reference,
                k,
                metric=metric,
                exclude_self=exclude_self,
                chunk_size=chunk_size,
                callback=update,
            )
        return _faiss_search(
            queries,
            ref,
            k,
            metric=metric,
            index_kind=resolved,
            exclude_self=exclude_self,
            same=reference is None,
            nlist=nlist,
            nprobe=nprobe,
            hnsw_m=hnsw_m,
            ef_construction=ef_construction,
            ef_search=ef_search,
            callback=update,
        )


def _faiss_array(x: Tensor, metric: str) -> np.ndarray:
    """float32, C-contiguous, on the CPU — normalised for cosine — converted once.

    Cosine rows are normalised into one new array, a block of rows at a time, so the caller's
    memory is never changed and the temporaries stay at one block.
    """
    x = x.detach().to(device="cpu", dtype=torch.float32)
    if metric != "cosine":
        return np.ascontiguousarray(to_numpy(x))
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    step = rows_per_block(x.shape[1])
    for start in range(0, x.shape[0], step):
        out[start : start + step] = l2_normalize(x[start : start + step])
    return to_numpy(out)


def _faiss_search(
    q: Tensor,
    ref: Tensor,
    k: int,
    *,
    metric: str,
    index_kind: str,
    exclude_self: bool,
    same: bool,
    nlist: int | None,
    nprobe: int | None,
    hnsw_m: int,
    ef_construction: int | None,
    ef_search: int | None,
    callback: Callable[[int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    ref_np = _faiss_array(ref, metric)
    q_np = ref_np if same else _faiss_array(q, metric)
    n_ref, d = ref_np.shape
    inner_product = metric in ("cosine", "dot")
    faiss_metric = faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2
    depth = k + int(exclude_self)
    index: Any
    tune: tuple[Callable[[int], None], list[int]] | None = None  # (setter, candidates) to calibrate
    if index_kind == "faiss":
        index = faiss.IndexFlatIP(d) if inner_product else faiss.IndexFlatL2(d)
    elif index_kind == "faiss-ivf":
        lists = check_int(nlist if nlist is not None else default_nlist(n_ref), "nlist", low=1, high=n_ref)
        quantizer = faiss.IndexFlatIP(d) if inner_product else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, lists, faiss_metric)
        index.train(ref_np)
        if nprobe is not None:
            index.nprobe = check_int(nprobe, "nprobe", low=1, high=lists)
        else:
            tune = (lambda v: setattr(index, "nprobe", v), _doublings(1, lists))
    else:
        index = faiss.IndexHNSWFlat(d, check_int(hnsw_m, "hnsw_m", low=2), faiss_metric)
        index.hnsw.efConstruction = check_int(
            ef_construction if ef_construction is not None else default_ef_construction(hnsw_m),
            "ef_construction",
            low=1,
        )
        if ef_search is not None:
            index.hnsw.efSearch = check_int(ef_search, "ef_search", low=k + 1)
        else:
            tune = (
                lambda v: setattr(index.hnsw, "efSearch", v),
                _doublings(max(16, depth), max(4096, 4 * depth)),
            )
    index.add(ref_np)
    if tune is not None:
        _calibrate(index, *tune, q_np, ref_np, depth, faiss_metric, same and exclude_self)
    del ref_np  # the index holds its own copy; ours (normalised) is freed unless it is q_np
    n_q = q_np.shape[0]
    # FAISS writes straight into the final arrays (no per-block results to concatenate);
    # with exclude_self each block goes through one block-sized buffer one column deeper.
    scores = np.empty((n_q, k), dtype=np.float32)
    indices = np.empty((n_q, k), dtype=np.int64)
    step = min(max(n_q, 1), _FAISS_QUERY_BLOCK) if exclude_self or callback is not None else max(n_q, 1)
    if exclude_self:
        block_scores = np.empty((step, depth), dtype=np.float32)
        block_indices = np.empty((step, depth), dtype=np.int64)
    missing = 0
    for start in range(0, n_q, step):
        stop = min(start + step, n_q)
        if exclude_self:
            s, i = block_scores[: stop - start], block_indices[: stop - start]
        else:
            s, i = scores[start:stop], indices[start:stop]
        index.search(q_np[start:stop], depth, D=s, I=i)
        missing += int((i < 0).any(axis=1).sum())
        if exclude_self:
            _drop_self(s, i, np.arange(start, stop), out=(scores[start:stop], indices[start:stop]))
        if callback is not None:
            callback(stop - start)
    if missing:
        raise ValueError(
            f"the {index_kind!r} index found fewer than {depth} neighbours for {missing} queries; "
            "raise nprobe / ef_search, or use the exact backend='faiss'"
        )
    if not inner_product:  # FAISS gives squared distances; the library's scores are similarities
        if metric == "euclidean":
            np.sqrt(np.maximum(scores, 0.0, out=scores), out=scores)
        np.negative(scores, out=scores)
    return scores, indices


def _drop_self(
    scores: np.ndarray, indices: np.ndarray, own: np.ndarray, *, out: tuple[np.ndarray, np.ndarray]
) -> None:
    """Remove each query's own index from a search one deeper than asked, into ``out``.

    ``own[r]`` is the index of row ``r``'s query in the reference set. Where it is absent
    (many exact duplicates tied ahead of it), the last result goes instead: the remaining
    ``k`` are still a correct top-``k`` of the others.
    """
    n, depth = indices.shape
    is_self = indices == own[:, None]
    is_self[~is_self.any(axis=1), depth - 1] = True
    # One index cannot appear twice in a row, so every row keeps exactly depth - 1 results.
    keep = ~is_self
    out[0][...] = scores[keep].reshape(n, depth - 1)
    out[1][...] = indices[keep].reshape(n, depth - 1)


def _doublings(low: int, high: int) -> list[int]:
    """``low, 2·low, 4·low, ...`` below ``high``, then ``high`` itself."""
    values = [low]
    while values[-1] * 2 < high:
        values.append(values[-1] * 2)
    return [*values, high] if high > low else values[:1]


def _calibrate(
    index: Any,
    set_value: Callable[[int], None],
    candidates: list[int],
    q_np: np.ndarray,
    ref_np: np.ndarray,
    depth: int,
    faiss_metric: int,
    exclude_self: bool,
) -> int:
    """Set the cheapest candidate whose recall of the exact top-``depth`` reaches TARGET_RECALL.

    Measured on a seeded sample of queries against ``faiss.knn`` (brute force); the last
    candidate is kept when none reaches it. With ``exclude_self`` the sampled query's own
    index is removed from both result lists before they are compared.
    """
    import faiss

    n_q = q_np.shape[0]
    rows = np.sort(np.random.default_rng(0).permutation(n_q)[: min(n_q, _CALIBRATION_QUERIES)])
    sample = np.ascontiguousarray(q_np[rows])
    exact_scores, exact = faiss.knn(sample, ref_np, depth, metric=faiss_metric)
    k = depth - int(exclude_self)
    if exclude_self:
        trimmed = (np.empty((rows.size, k), np.float32), np.empty((rows.size, k), np.int64))
        _drop_self(exact_scores, exact, rows, out=trimmed)
        exact = trimmed[1]
    for value in candidates:
        set_value(value)
        found_scores, found = index.search(sample, depth)
        if (found < 0).any():
            continue  # too few neighbours found: never good enough
        if exclude_self:
            trimmed = (np.empty((rows.size, k), np.float32), np.empty((rows.size, k), np.int64))
            _drop_self(found_scores, found, rows, out=trimmed)
            found = trimmed[1]
        if _overlap(found, exact) >= TARGET_RECALL:
            return value
    return candidates[-1]


def _overlap(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row of ``exact`` that the same row of ``found`` holds."""
    hits = sum(np.intersect1d(a, b, assume_unique=True).size for a, b in zip(found, exact, strict=True))
    return hits / exact.size


def recall_against_exact(
    queries: Tensor,
    reference: Tensor | None,
    indices: Tensor | np.ndarray,
    *,
    metric: Metric = "cosine",
    sample: int = 1000,
    seed: int = 0,
    chunk_size: int | None = None,
) -> tuple[float, int]:
    """How much of the exact top-``k`` an approximate search returned, on a sample of queries.

    The exact neighbours of up to ``sample`` queries (drawn without replacement with
    ``seed``) are found with the chunked torch search; the recall is the share of them
    that ``indices`` holds, averaged over the sampled queries. Neighbours tied in score
    with the ``k``-th may be swapped by either search, so a recall just below 1 can be a
    tie rather than a miss.

    Parameters
    ----------
    queries : Tensor of shape (n_queries, d)
    reference : Tensor of shape (n_reference, d), or None
        ``None``: the queries searched among themselves, each excluded from its own results.
    indices : ndarray or Tensor of shape (n_queries, k)
        The approximate search's neighbours of every query.
    metric : {"cosine", "dot", "euclidean", "squared_euclidean"}
    sample : int
        Queries checked (all of them when there are fewer).
    seed : int
        Seed of the sample.
    chunk_size : int, optional
        Query rows per block of the exact search.

    Returns
    -------
    recall : float
        Mean over the sampled queries of ``|approximate ∩ exact| / k``.
    checked : int
        Number of queries sampled.
    """
    found = to_numpy(indices) if isinstance(indices, Tensor) else np.asarray(indices)
    n, k = found.shape
    rows = np.sort(np.random.default_rng(seed).permutation(n)[: min(n, check_int(sample, "sample", low=1))])
    rows_t = torch.from_numpy(rows).to(queries.device)
    ref = queries if reference is None else reference
    q = queries[rows_t]
    exact_parts = []
    for start, block in similarity_blocks(q, ref, metric=metric, chunk_size=chunk_size):
        if reference is None:  # each sampled query is excluded from its own results
            own = rows_t[start : start + block.shape[0]]
            block[torch.arange(block.shape[0], device=block.device), own] = -torch.inf
        exact_parts.append(to_numpy(torch.topk(block, k, dim=1).indices))
    exact = np.concatenate(exact_parts)
    approx = found[rows]
    hits = (
        (approx[:, :, None] == exact[:, None, :]).any(axis=2).sum()
        if k <= 64
        else sum(np.intersect1d(a, b).size for a, b in zip(approx, exact, strict=True))
    )
    return float(hits / (rows.size * k)), int(rows.size)
