"""k-nearest-neighbour search behind one interface: FAISS on the CPU, chunked torch anywhere.

:func:`knn` finds, for every query, the ``k`` most similar reference embeddings. Two
families of back-end give the same answer, ties included:

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

Ties. Neighbours with equal scores come by ascending reference index, whatever the back-end
and ``k``: the first ``k`` neighbours are always the first ``k`` of a deeper search. Scores are
equal when :func:`exact_scores` makes them equal — one elementwise formula, pair by pair in
float64, rounded to the working dtype (float32, float64 for float64 inputs) — so exact
duplicates tie even where a search's BLAS blocks rounded their scores an ulp apart. Only the
results closer to each other than the search's rounding (:func:`score_tolerance`) are
re-scored; an exact search looks four results beyond ``k``, and a query whose tie at the
``k``-th result reaches past them is scored against the whole reference set to settle it
(:func:`settle_ties`). The approximate back-ends order ties among the results they found.

A collapsed embedding ties every query with nearly every reference, and that scan would cost
``n_queries × n_reference`` exact scores. When most rows are identical, the exact back-ends
skip the search: each distinct query row is scored once against each distinct reference row,
and each query's neighbours are filled from the ranked groups of identical rows, counting the
tied references by label rather than listing them (:func:`_search_distinct`). Nearly identical
rows (distinct, with scores within rounding) still take the quadratic scan, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import numpy as np
import torch
from torch import Tensor

from .._checks import check_bool, check_choice, check_int, check_matching_dim
from ..similarity import (
    METRICS,
    ZERO_NORM,
    Metric,
    chunked_topk,
    l2_normalize,
    rows_per_block,
    similarity_blocks,
    working_dtype,
)
from ._inputs import as_embeddings, progress_bar, to_numpy

__all__ = [
    "APPROXIMATE_BACKENDS",
    "BACKENDS",
    "Backend",
    "LabelTieOrder",
    "exact_scores",
    "faiss_available",
    "knn",
    "recall_against_exact",
    "resolve_backend",
    "score_tolerance",
    "settle_ties",
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
        Where neighbours were within rounding of each other, the exact scores (see the module
        notes), so tied neighbours show equal scores.
    indices : ndarray or Tensor of shape (n_queries, k) and dtype int64
        Row indices into ``reference``; tied neighbours in ascending index order.

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
    tie_order: TieOrder | None = None,
) -> tuple[Tensor | np.ndarray, Tensor | np.ndarray]:
    """:func:`knn` on inputs that were already validated (tensors from :mod:`._inputs`).

    For the evaluation modules, which validate their inputs once themselves. Returns
    torch tensors on the queries' device from the torch back-end and numpy arrays from
    FAISS. ``tie_order`` (see :func:`settle_ties`) puts some tied references before
    others; by default tied references come by index.

    When the rows repeat so much that scoring every distinct query row against every distinct
    reference row is far cheaper than the search (a collapsed embedding), the exact back-ends
    rank from those scores instead (:func:`_search_distinct`): same neighbours, exact scores.
    This needs ``tie_order`` to be ``None`` or a :class:`LabelTieOrder`.
    """
    ref = queries if reference is None else reference
    resolved = resolve_backend(backend, queries, ref)
    if resolved not in APPROXIMATE_BACKENDS and (tie_order is None or isinstance(tie_order, LabelTieOrder)):
        # Mostly identical rows (a collapsed embedding): ranked from the distinct rows, no search.
        score_dtype = torch.float32
        if resolved == "torch":
            score_dtype = working_dtype(torch.promote_types(queries.dtype, ref.dtype))
        distinct = _search_distinct(
            queries, reference, k, metric=metric, exclude_self=exclude_self, tie_order=tie_order,
            score_dtype=score_dtype,
        )  # fmt: skip
        if distinct is not None:
            if resolved == "torch":
                return torch.from_numpy(distinct[0]).to(queries.device), torch.from_numpy(distinct[1]).to(
                    queries.device
                )
            return distinct
    # An exact search also finds a few results beyond k: a tie across the cut-off then shows
    # (see settle_ties), and the queries where it reaches past them are settled by a scan.
    available = ref.shape[0] - int(exclude_self)
    extra = min(_BEYOND, available - k) if resolved not in APPROXIMATE_BACKENDS else 0
    beyond: tuple[np.ndarray, np.ndarray] | None = None
    with progress_bar(queries.shape[0], "k-NN search", progress) as update:
        if resolved == "torch":
            found_scores, found_indices = chunked_topk(
                queries,
                reference,
                k + extra,
                metric=metric,
                exclude_self=exclude_self,
                chunk_size=chunk_size,
                callback=update,
            )
            search_dtype = found_scores.dtype
            scores = np.ascontiguousarray(to_numpy(found_scores[:, :k]))
            indices = np.ascontiguousarray(to_numpy(found_indices[:, :k]))
            if extra:
                beyond = (
                    np.ascontiguousarray(to_numpy(found_scores[:, k:])),
                    np.ascontiguousarray(to_numpy(found_indices[:, k:])),
                )
        else:
            scores, indices, beyond = _faiss_search(
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
                extra=extra,
            )
            search_dtype = torch.float32
    settle_ties(
        queries,
        reference,
        scores,
        indices,
        beyond,
        metric=metric,
        search_dtype=search_dtype,
        exclude_self=exclude_self,
        tie_order=tie_order,
        chunk_size=chunk_size,
    )
    if resolved == "torch":
        return torch.from_numpy(scores).to(queries.device), torch.from_numpy(indices).to(queries.device)
    return scores, indices


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
    extra: int = 0,
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """The exact or approximate FAISS search; with ``extra``, also that many results beyond ``k``."""
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
    # FAISS writes straight into the final arrays (no per-block results to concatenate) unless
    # the results need trimming: then each block goes through one block-sized buffer, one column
    # deeper for the excluded self and ``extra`` more for the results beyond k (kept apart, in
    # ``beyond``, so that a tie across the cut-off can be seen).
    scores = np.empty((n_q, k), dtype=np.float32)
    indices = np.empty((n_q, k), dtype=np.int64)
    beyond = (
        (np.empty((n_q, extra), dtype=np.float32), np.empty((n_q, extra), dtype=np.int64)) if extra else None
    )
    buffered = exclude_self or extra > 0
    searched = depth + extra
    step = min(max(n_q, 1), _FAISS_QUERY_BLOCK) if buffered or callback is not None else max(n_q, 1)
    if buffered:
        block_scores = np.empty((step, searched), dtype=np.float32)
        block_indices = np.empty((step, searched), dtype=np.int64)
    missing = 0
    for start in range(0, n_q, step):
        stop = min(start + step, n_q)
        if buffered:
            s, i = block_scores[: stop - start], block_indices[: stop - start]
        else:
            s, i = scores[start:stop], indices[start:stop]
        index.search(q_np[start:stop], searched, D=s, I=i)
        missing += int((i < 0).any(axis=1).sum())
        if exclude_self and not extra:
            _drop_self(s, i, np.arange(start, stop), out=(scores[start:stop], indices[start:stop]))
        elif exclude_self:
            # into the same buffer: _drop_self copies what it keeps before writing it
            _drop_self(s, i, np.arange(start, stop), out=(s[:, : k + extra], i[:, : k + extra]))
            s, i = s[:, : k + extra], i[:, : k + extra]
        if beyond is not None:
            scores[start:stop], indices[start:stop] = s[:, :k], i[:, :k]
            beyond[0][start:stop], beyond[1][start:stop] = s[:, k:], i[:, k:]
        if callback is not None:
            callback(stop - start)
    if missing:
        raise ValueError(
            f"the {index_kind!r} index found fewer than {depth} neighbours for {missing} queries; "
            "raise nprobe / ef_search, or use the exact backend='faiss'"
        )
    for values in (scores,) if beyond is None else (scores, beyond[0]):
        if not inner_product:  # FAISS gives squared distances; the library's scores are similarities
            if metric == "euclidean":
                np.sqrt(np.maximum(values, 0.0, out=values), out=values)
            np.negative(values, out=values)
    return scores, indices, beyond


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


# --- Ties: one deterministic order, whatever the back-end and the depth ------------------------

#: ``tie_order(rows, cols)``: for query rows ``rows`` and reference indices ``cols`` (equal
#: shapes), a boolean array; among references with equal scores, False comes before True.
TieOrder = Callable[[np.ndarray, np.ndarray], np.ndarray]

ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)


@dataclass(frozen=True, eq=False)
class LabelTieOrder:
    """The tie order of the retrieval metrics: tied references with the query's label come last.

    A :data:`TieOrder` — ``tie_order(rows, cols)`` is ``reference_labels[cols] ==
    query_labels[rows]`` — whose rule :func:`search_checked` can read: where a tie holds
    thousands of identical references (a collapsed embedding), it counts the references of
    each label in the tie instead of listing them.

    Parameters
    ----------
    query_labels : ndarray of shape (n_queries,) and integer dtype
    reference_labels : ndarray of shape (n_reference,) and integer dtype
    """

    query_labels: np.ndarray
    reference_labels: np.ndarray

    def __call__(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self.reference_labels[cols] == self.query_labels[rows]


# Results an exact search finds beyond k: a tie across the cut-off with fewer members beyond it
# is settled from them; a longer one needs a scan of the whole reference set.
_BEYOND = 4

# Bytes of one float64 temporary when looking for near-ties in search results, block by block.
_TIE_SCAN_BYTES = 2**20

# Pairs of embeddings re-scored per block (float64 gathers of both rows and a product).
_PAIR_BYTES_PER_DIM = 40

# The search from distinct rows (_search_distinct) is taken when scoring every distinct query row
# against every distinct reference row costs at most this many pair-dimensions (about a second)
# and is this many times fewer pairs than the search.
_DISTINCT_PAIR_DIMS = 2**26
_DISTINCT_GAIN = 64

# Rows, evenly spread, whose repeats decide whether a set is worth grouping: more than half of
# them distinct and the set is searched as it is.
_GROUP_SAMPLE = 4096

# Candidate (query, reference) pairs ordered at a time by _search_distinct (about 100 MB).
_DISTINCT_CANDIDATES = 2**21

# Pairs of one block of _settle_cut: the block's window is listed pair by pair (indices, exact
# scores and their order: about 60 bytes a pair), so its rows are capped at 2**27 / 64 pairs.
_CUT_BYTES_PER_PAIR = 64


def exact_scores(
    queries: Tensor, reference: Tensor, rows: np.ndarray, cols: np.ndarray, *, metric: str
) -> np.ndarray:
    """The tie-deciding score of the pairs ``(queries[rows], reference[cols])``.

    One fixed elementwise formula in float64, pair by pair (never a matrix product, whose
    blocking can give identical columns different roundings), rounded to the working dtype
    (float32, or float64 for float64 inputs): exact duplicates always get the same score. The
    cosine is ``q·r / (‖q‖ ‖r‖)`` (0 when a norm is at most ``ZERO_NORM``); the euclidean
    metrics use the differences ``q - r`` themselves, not the expansion of the searches.
    Scores follow the library's convention (similarities; euclidean distances negated).

    Parameters
    ----------
    queries : Tensor of shape (n_queries, d)
    reference : Tensor of shape (n_reference, d)
    rows, cols : ndarray of shape (n_pairs,) and dtype int64
        Row of ``queries`` and row of ``reference`` of each pair.
    metric : {"cosine", "dot", "euclidean", "squared_euclidean"}

    Returns
    -------
    ndarray of shape (n_pairs,) and dtype float64
        Values representable in the working dtype.
    """
    out = np.empty(rows.size, dtype=np.float64)
    if rows.size == 0:
        return out
    rounding = _numpy_dtype(working_dtype(torch.promote_types(queries.dtype, reference.dtype)))
    step = max(1, rows_per_block(queries.shape[1], bytes_per_entry=_PAIR_BYTES_PER_DIM))
    on_cpu = queries.device.type == "cpu" and reference.device.type == "cpu"
    # numpy on the CPU: single-threaded, where torch's thread pool costs more than these small
    # blocks of arithmetic on a busy machine (measured: 0.1 ms against 26 ms per block)
    q_np, ref_np = (to_numpy(queries), to_numpy(reference)) if on_cpu else (None, None)
    for start in range(0, rows.size, step):
        part = slice(start, start + step)
        if q_np is not None and ref_np is not None:
            a = q_np[rows[part]].astype(np.float64)
            b = ref_np[cols[part]].astype(np.float64)
        else:
            a = to_numpy(queries[torch.from_numpy(rows[part]).to(queries.device)].double())
            b = to_numpy(reference[torch.from_numpy(cols[part]).to(reference.device)].double())
        if metric in ("cosine", "dot"):
            value = (a * b).sum(axis=1)
            if metric == "cosine":  # a zero row (norm <= ZERO_NORM) has cosine 0 to everything
                norm_a, norm_b = np.sqrt((a * a).sum(axis=1)), np.sqrt((b * b).sum(axis=1))
                nonzero = (norm_a > ZERO_NORM) & (norm_b > ZERO_NORM)
                value = np.where(nonzero, value / np.where(nonzero, norm_a * norm_b, 1.0), 0.0)
        else:
            value = ((a - b) ** 2).sum(axis=1)
            value = -(np.sqrt(value) if metric == "euclidean" else value)
        out[part] = value.astype(rounding)
    return out


def _numpy_dtype(dtype: torch.dtype) -> type[np.floating[Any]]:
    return np.float64 if dtype == torch.float64 else np.float32


def score_tolerance(
    queries: Tensor, reference: Tensor, *, metric: str, search_dtype: torch.dtype
) -> np.ndarray:
    """Per query, a bound on how far a searched ranking key can lie from the exact one.

    Returns an ndarray of shape (n_queries,) and dtype float64.

    The key is the score for cosine and dot and minus the squared distance for the euclidean
    metrics. The bound is ``(4·√d + 16)`` units in the last place of the search's dtype,
    times the largest key magnitude the query can meet: 1 for cosine, ``‖q‖·max‖r‖`` for dot,
    ``‖q‖² + max‖r‖²`` for the euclidean metrics. On clustered data the largest error measured
    between FAISS (float32 BLAS) and the exact scores was 0.9·√d units at d = 128 and
    1.7·√d at d = 12, so the bound holds with a margin of four or more; two keys closer
    than twice the bound are re-scored exactly before they are ordered.
    """
    d = queries.shape[1]
    unit = float(torch.finfo(working_dtype(search_dtype)).eps) / 2
    factor = (4.0 * np.sqrt(d) + 16.0) * unit
    if metric == "cosine":
        return np.full(queries.shape[0], factor)
    q_norm = to_numpy(torch.linalg.vector_norm(queries, dim=1, dtype=torch.float64))
    r_max = float(torch.linalg.vector_norm(reference, dim=1, dtype=torch.float64).max())
    if metric == "dot":
        return factor * q_norm * r_max
    return factor * (q_norm**2 + r_max**2)


def ranking_key(scores: ArrayT, metric: str) -> ArrayT:
    """Keys that order like ``scores`` and on which :func:`score_tolerance` bounds the error.

    The scores themselves, except for ``"euclidean"``: minus the squared distance, which is
    what the searches round (a square root magnifies the error of small distances).
    """
    return -(scores**2) if metric == "euclidean" else scores


#: Above this many (query, reference) pairs re-scored for ties past the search depth, warn: a
#: tie that long means a collapsed embedding, and unless its rows are identical (then
#: :func:`_search_distinct` counts them) settling it is quadratic.
_SLOW_CUT_PAIRS = 20_000_000


def settle_ties(
    queries: Tensor,
    reference: Tensor | None,
    scores: np.ndarray,
    indices: np.ndarray,
    beyond: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    metric: str,
    search_dtype: torch.dtype,
    exclude_self: bool = False,
    tie_order: TieOrder | None = None,
    chunk_size: int | None = None,
) -> None:
    """Put tied references of a search's top ``k`` in one deterministic order, in place.

    Two references are *tied* when :func:`exact_scores` gives them the same score. Tied
    references come in ascending index order, after any that ``tie_order`` puts first. Where
    the search's scores of neighbouring results are closer than twice
    :func:`score_tolerance` (rounding could have swapped them), those results are re-scored
    exactly and re-ordered; elsewhere the search's order stands (it is the exact order).

    Parameters
    ----------
    queries, reference : Tensor
        The searched embeddings (``reference=None``: the queries themselves).
    scores, indices : ndarray of shape (n_queries, k)
        The search's results, best first; rewritten in place, re-scored scores included.
    beyond : (ndarray, ndarray) of shape (n_queries, m), optional
        Scores and indices of the next ``m`` results beyond ``k`` (exact searches). Where all
        of them may be tied with the ``k``-th result the tie may reach past the search: the
        query is then scored against every reference (by blocks) and its tie at the cut-off
        settled among all of them.
    search_dtype : torch.dtype
        The dtype the search computed in (FAISS: float32).
    """
    ref = queries if reference is None else reference
    k = indices.shape[1]
    tol = score_tolerance(queries, ref, metric=metric, search_dtype=search_dtype)
    cut: list[tuple[np.ndarray, ...]] = []  # (rows, start, low, high) of ties across the cut-off
    width = k + (0 if beyond is None else beyond[1].shape[1])
    step = rows_per_block(width, bytes_per_entry=8, budget=_TIE_SCAN_BYTES)
    for block_start in range(0, scores.shape[0], step):
        part = slice(block_start, block_start + step)
        key = ranking_key(scores[part].astype(np.float64), metric)
        if beyond is not None:
            key = np.concatenate([key, ranking_key(beyond[0][part].astype(np.float64), metric)], axis=1)
        near = key[:, :-1] - key[:, 1:] <= 2.0 * tol[part, None]  # result j + 1 may tie with j
        found = np.flatnonzero(near.any(axis=1))
        if found.size:
            cut.append(
                _settle_rows(
                    queries,
                    ref,
                    scores,
                    indices,
                    beyond,
                    block_start + found,
                    near[found],
                    key[found],
                    tol,
                    metric=metric,
                    tie_order=tie_order,
                )
            )
    if beyond is None or not cut:
        return
    rows, start, low, high = (np.concatenate(parts) for parts in zip(*cut, strict=True))
    n_reference = queries.shape[0] if reference is None else reference.shape[0]
    if rows.size * n_reference > _SLOW_CUT_PAIRS:
        # Correct but quadratic: say why a call on a collapsed embedding takes so long.
        warnings.warn(
            f"{rows.size} queries tie at their last neighbour with references beyond the searched "
            f"depth; each is re-scored exactly against all {n_reference} references, which is slow "
            "(time grows as queries x references). Rows identical to the last bit are settled by "
            "counting instead, but these are near-ties within rounding, or too many distinct rows. "
            "Many ties usually mean a collapsed embedding (check it with "
            "EmbeddingHealthMonitor or `embedkit doctor`).",
            stacklevel=3,
        )
    if rows.size:
        _settle_cut(
            queries,
            reference,
            rows,
            start,
            low=low,
            high=high,
            out=(scores, indices),
            metric=metric,
            exclude_self=exclude_self,
            tie_order=tie_order,
            chunk_size=chunk_size,
        )


def _settle_rows(
    queries: Tensor,
    ref: Tensor,
    scores: np.ndarray,
    indices: np.ndarray,
    beyond: tuple[np.ndarray, np.ndarray] | None,
    rows: np.ndarray,
    near: np.ndarray,
    key: np.ndarray,
    tol: np.ndarray,
    *,
    metric: str,
    tie_order: TieOrder | None,
) -> tuple[np.ndarray, ...]:
    """Re-score and re-order the near-ties within the results of ``rows``, in place.

    ``near[i, j]``: result ``j + 1`` of query ``rows[i]`` may tie with result ``j``; ``key``
    holds the ranking keys of those results (and of the one beyond ``k``, when given). Returns
    ``(rows, start, low, high)`` for the queries whose tie reaches past the search: the first
    result of that tie and the key range it may span.
    """
    k = indices.shape[1]
    width = near.shape[1] + 1
    group = np.zeros((rows.size, width), dtype=np.int64)
    np.cumsum(~near, axis=1, out=group[:, 1:])
    in_group = np.zeros((rows.size, width), dtype=bool)
    in_group[:, :-1] |= near
    in_group[:, 1:] |= near
    # Only the results inside a tie move, and only among the places their tie holds: sorted
    # by (row, tie, exact score, tie_order, index), they fill the same places in row order.
    rr, cc = np.nonzero(in_group)
    found = rows[rr]
    inside = cc < k
    cols = np.empty(rr.size, dtype=np.int64)
    cols[inside] = indices[found[inside], cc[inside]]
    if beyond is not None:
        cols[~inside] = beyond[1][found[~inside], cc[~inside] - k]
    value = exact_scores(queries, ref, found, cols, metric=metric)
    first = np.zeros(rr.size, dtype=bool) if tie_order is None else tie_order(found, cols)
    order = np.lexsort((cols, first, -value, group[rr, cc], rr))
    indices[found[inside], cc[inside]] = cols[order][inside]
    scores[found[inside], cc[inside]] = value[order][inside]
    if beyond is None:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0), np.empty(0)
    straddle = np.flatnonzero(near[:, k - 1 :].all(axis=1))  # every result beyond k may tie with the k-th
    start = np.argmax(group[straddle] == group[straddle, -1:], axis=1)  # first result of that tie
    margin = 2.0 * tol[rows[straddle]]
    return rows[straddle], start, key[straddle, -1] - margin, key[straddle, start] + margin


def _tie_rule_order(
    wr: np.ndarray, wc: np.ndarray, value: np.ndarray, first: np.ndarray, need: np.ndarray
) -> np.ndarray:
    """Indices of the window entries kept, in the tie rule's order within each row.

    The order is by row, then score (descending), then ``first`` (``False`` before ``True``),
    then reference index; ``wr``/``wc`` come row-major, columns ascending. A row whose
    top-scoring entries alone fill its ``need`` keeps only the first ``need`` of them, picked by
    counting (the common case of a collapsed embedding, where sorting every tied reference
    would dominate); the other rows keep every entry, fully sorted.
    """
    c = need.size
    if wr.size == 0:
        return np.empty(0, dtype=np.int64)
    counts = np.bincount(wr, minlength=c)
    starts = np.cumsum(counts) - counts
    filled = counts > 0
    row_max = np.full(c, -np.inf)
    row_max[filled] = np.maximum.reduceat(value, starts[filled])
    top = value == row_max[wr]
    easy = np.bincount(wr[top], minlength=c) >= need
    # Easy rows: the first ``need`` of the top group by (first, index), counted in one pass.
    chosen = top & easy[wr]
    plain, flagged = chosen & ~first, chosen & first
    plain_rank = _rank_within_rows(plain, wr, starts)
    flagged_rank = _rank_within_rows(flagged, wr, starts)
    plain_count = np.bincount(wr[plain], minlength=c)
    keep = (plain & (plain_rank < need[wr])) | (flagged & (plain_count[wr] + flagged_rank < need[wr]))
    in_easy = np.flatnonzero(keep)
    in_hard = np.flatnonzero(~easy[wr])
    order = np.concatenate([in_easy, in_hard])
    order = order[np.lexsort((wc[order], first[order], -value[order], wr[order]))]
    return order


def _rank_within_rows(selected: np.ndarray, wr: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """For each entry, how many selected entries of its row come before it (``wr`` sorted)."""
    before = np.cumsum(selected) - selected
    return before - before[starts[wr]]


def _settle_cut(
    queries: Tensor,
    reference: Tensor | None,
    rows: np.ndarray,
    start: np.ndarray,
    *,
    low: np.ndarray,
    high: np.ndarray,
    out: tuple[np.ndarray, np.ndarray],
    metric: str,
    exclude_self: bool,
    tie_order: TieOrder | None,
    chunk_size: int | None,
) -> None:
    """Refill results ``start[i]:k`` of query ``rows[i]`` from every reference in its tie.

    The results before ``start`` are certain (they score clearly above the tie). Every other
    reference whose key lies in ``[low, high]`` may belong to the tie: they are found by
    scoring the query against the whole reference set, re-scored exactly, ordered by the tie
    rule, and the first ``k - start`` are kept.
    """
    ref = queries if reference is None else reference
    out_scores, out_indices = out
    k = out_indices.shape[1]
    device = queries.device
    rows_t = torch.from_numpy(rows).to(device)
    duplicates = _identical_groups(ref)
    # every pair of a block may be in the window (nearly collapsed rows): bound its listing
    most_rows = rows_per_block(ref.shape[0], bytes_per_entry=_CUT_BYTES_PER_PAIR)
    chunk_size = most_rows if chunk_size is None else min(chunk_size, most_rows)
    blocks = similarity_blocks(queries[rows_t], ref, metric=cast(Metric, metric), chunk_size=chunk_size)
    for offset, block in blocks:
        c = block.shape[0]
        part = slice(offset, offset + c)
        block_rows = rows[part]
        if exclude_self:
            block[torch.arange(c, device=device), rows_t[part]] = -torch.inf
        block_key = -block.pow(2) if metric == "euclidean" else block
        low_t = torch.from_numpy(low[part]).to(device=device, dtype=block.dtype)
        high_t = torch.from_numpy(high[part]).to(device=device, dtype=block.dtype)
        window = (block_key >= low_t[:, None]) & (block_key <= high_t[:, None])
        certain = np.arange(k)[None, :] < start[part, None]  # results above the tie stay
        above_r, above_c = np.nonzero(certain)
        window[
            torch.from_numpy(above_r).to(device),
            torch.from_numpy(out_indices[block_rows[above_r], above_c]).to(device),
        ] = False
        wr_t, wc_t = torch.nonzero(window, as_tuple=True)  # row-major: columns ascend in each row
        wr, wc = to_numpy(wr_t), to_numpy(wc_t)
        need = k - start[part]
        if duplicates is not None and c * duplicates[1].size <= wr.size:
            # Many identical references (a collapsed embedding): score each distinct row once.
            inverse, representatives = duplicates
            grid = exact_scores(
                queries, ref, np.repeat(block_rows, representatives.size), np.tile(representatives, c),
                metric=metric,
            ).reshape(c, representatives.size)  # fmt: skip
            value = grid[wr, inverse[wc]]
        else:
            value = exact_scores(queries, ref, block_rows[wr], wc, metric=metric)
        first = np.zeros(wr.size, dtype=bool) if tie_order is None else tie_order(block_rows[wr], wc)
        order = _tie_rule_order(wr, wc, value, first, need)
        wr, wc, value = wr[order], wc[order], value[order]
        counts = np.bincount(wr, minlength=c)
        rank = np.arange(wr.size) - np.repeat(np.cumsum(counts) - counts, counts)
        keep = rank < need[wr]
        complete = counts >= need  # always, unless rounding broke the bound: keep the search's then
        keep &= complete[wr]
        target_rows = block_rows[wr[keep]]
        target_cols = start[part][wr[keep]] + rank[keep]
        out_indices[target_rows, target_cols] = wc[keep]
        out_scores[target_rows, target_cols] = value[keep]


def _identical_groups(x: Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """``(inverse, first)`` of the identical rows of ``x`` when they repeat, else ``None``.

    ``inverse[j]`` is row ``j``'s group and ``first[g]`` the lowest row of group ``g``. Rows are
    grouped by a hash of their bits, then checked equal to their group's first row. ``None`` when
    more than half of :data:`_GROUP_SAMPLE` evenly spread rows are distinct (nothing to gain;
    this costs a hash of those rows only) or, never seen, when two different rows share a hash.
    """
    n = x.shape[0]
    if n < 2:
        return None

    def host_bits(rows: Tensor) -> tuple[np.ndarray, np.ndarray]:
        values = to_numpy(rows if rows.dtype in (torch.float32, torch.float64) else rows.float())
        return values, values.view(np.uint64 if values.dtype == np.float64 else np.uint32)

    multipliers = np.random.default_rng(0).integers(0, 2**62, size=x.shape[1], dtype=np.uint64) * 2 + 1
    sample = np.unique(np.linspace(0, n - 1, min(n, _GROUP_SAMPLE)).astype(np.int64))
    # Only the sample crosses to the host (and is converted) unless it repeats.
    _, sample_bits = host_bits(x[torch.from_numpy(sample).to(x.device)])
    if np.unique(_row_hashes(sample_bits, np.arange(sample.size), multipliers)).size > sample.size // 2:
        return None
    values, bits = host_bits(x)
    hashes = _row_hashes(bits, np.arange(n), multipliers)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64, copy=False)
    first = first.astype(np.int64, copy=False)
    step = rows_per_block(values.shape[1], bytes_per_entry=16)
    for start in range(0, n, step):
        part = slice(start, start + step)
        if not (values[part] == values[first[inverse[part]]]).all():
            return None
    return inverse, first


def _row_hashes(bits: np.ndarray, rows: np.ndarray, multipliers: np.ndarray) -> np.ndarray:
    """A 64-bit hash of the bits of each row ``rows`` of ``bits``, block by block."""
    out = np.empty(rows.size, dtype=np.uint64)
    step = rows_per_block(bits.shape[1], bytes_per_entry=24)
    for start in range(0, rows.size, step):
        part = slice(start, start + step)
        out[part] = (bits[rows[part]].astype(np.uint64) * multipliers).sum(axis=1, dtype=np.uint64)
    return out


def _search_distinct(
    queries: Tensor,
    reference: Tensor | None,
    k: int,
    *,
    metric: str,
    exclude_self: bool,
    tie_order: LabelTieOrder | None,
    score_dtype: torch.dtype,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The exact search from the distinct rows when rows repeat enough; ``None`` otherwise.

    For a collapsed embedding, where every query ties with nearly every reference: settling
    those ties pair by pair costs ``n_queries × n_reference`` exact scores, this costs one per
    pair of *distinct* rows plus ``O(k)`` per query. Identical rows have identical exact scores,
    so every distinct query row is scored exactly against every distinct reference row, and the
    reference groups are ranked by that score. A query's ``k`` neighbours then lie in its best
    groups, up to the end of the score level that holds the ``k``-th reference (``k + 1`` with
    ``exclude_self``); the groups of the levels above it hold fewer than ``k + 1`` references and
    are listed whole. Of a group in the last level, only its first ``k + 1 + c`` references by
    index can be among the neighbours, ``c`` being its references with the query's label when
    ``tie_order`` puts those last (counted by label, from a table of (group, label) counts): with
    fewer than ``k + 1`` references of the other labels, the group holds at most ``k + 1 + c``
    references and is listed whole. The listed candidates are ordered by the tie rule (score,
    ``tie_order``, index) and the first ``k`` kept, so the result is the search's exactly, with
    exact scores throughout.

    Taken when the distinct pairs cost at most :data:`_DISTINCT_PAIR_DIMS` pair-dimensions
    and are :data:`_DISTINCT_GAIN` times fewer than all pairs.
    """
    ref = queries if reference is None else reference
    n_q, n_r, d = queries.shape[0], ref.shape[0], queries.shape[1]
    ref_groups = _identical_groups(ref)
    if ref_groups is None:
        return None
    inv_r, first_r = ref_groups
    q_groups = ref_groups if reference is None else _identical_groups(queries)
    inv_q, first_q = q_groups if q_groups is not None else (np.arange(n_q), np.arange(n_q))
    g_q, g_r = first_q.size, first_r.size
    if g_q * g_r * d > _DISTINCT_PAIR_DIMS or _DISTINCT_GAIN * g_q * g_r > n_q * n_r:
        return None
    pair_rows, pair_cols = np.repeat(first_q, g_r), np.tile(first_r, g_q)
    score = exact_scores(queries, ref, pair_rows, pair_cols, metric=metric).reshape(g_q, g_r)
    size = np.bincount(inv_r, minlength=g_r)
    members = np.argsort(inv_r, kind="stable")  # each group's rows, ascending
    member_start = np.cumsum(size) - size
    rank = np.argsort(-score, axis=1, kind="stable")  # per query group: reference groups, best first
    ranked = np.take_along_axis(score, rank, axis=1)
    level = np.zeros((g_q, g_r), dtype=np.int64)  # groups of equal exact score share a level
    np.cumsum(ranked[:, 1:] < ranked[:, :-1], axis=1, out=level[:, 1:])
    need = k + int(exclude_self)
    held = np.cumsum(size[rank], axis=1)
    cut = np.argmax(held >= need, axis=1)  # the group holding the need-th reference
    used = (level <= level[np.arange(g_q), cut][:, None]).sum(axis=1)  # groups to the end of its level
    in_used = np.arange(g_r)[None, :] < used[:, None]
    bound = np.where(in_used, np.minimum(size[rank], need), 0).sum(axis=1)[inv_q]  # candidates per query
    labelled = None
    if tie_order is not None:
        _, codes = np.unique(
            np.concatenate([tie_order.query_labels, tie_order.reference_labels]), return_inverse=True
        )
        codes = codes.reshape(-1)
        q_codes, r_codes = codes[: tie_order.query_labels.size], codes[tie_order.query_labels.size :]
        n_labels = int(codes.max()) + 1
        keys, key_counts = np.unique(inv_r * n_labels + r_codes, return_counts=True)  # (group, label)
        labelled = (q_codes, n_labels, keys, key_counts)
        bound = bound + np.bincount(r_codes, minlength=n_labels)[q_codes]
    _warn_if_collapsed(exclude_self, inv_q, inv_r, rank, used, held, k, n_r)

    scores = np.empty((n_q, k), dtype=_numpy_dtype(score_dtype))
    indices = np.empty((n_q, k), dtype=np.int64)
    total = np.cumsum(bound)
    start = 0
    while start < n_q:
        done = int(total[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(total, done + _DISTINCT_CANDIDATES, side="right")))
        rows = np.arange(start, min(stop, n_q))
        # one entry per (query, used group), then per candidate reference of that group
        per_query = used[inv_q[rows]]
        pr = np.repeat(rows, per_query)
        pj = np.arange(pr.size) - np.repeat(np.cumsum(per_query) - per_query, per_query)
        pa = inv_q[pr]
        pg = rank[pa, pj]
        take = np.minimum(size[pg], need)
        if labelled is not None:
            q_codes, n_labels, keys, key_counts = labelled
            key = pg * n_labels + q_codes[pr]
            at = np.minimum(np.searchsorted(keys, key), keys.size - 1)
            take = np.minimum(size[pg], need + np.where(keys[at] == key, key_counts[at], 0))
        entry = np.repeat(np.arange(pr.size), take)
        within = np.arange(entry.size) - np.repeat(np.cumsum(take) - take, take)
        cr = pr[entry]
        cc = members[member_start[pg[entry]] + within]
        if exclude_self:
            keep = cc != cr
            entry, cr, cc = entry[keep], cr[keep], cc[keep]
        later = np.zeros(cr.size, dtype=bool) if tie_order is None else tie_order(cr, cc)
        order = np.lexsort((cc, later, level[pa[entry], pj[entry]], cr))
        cr, cc, value = cr[order], cc[order], ranked[pa[entry], pj[entry]][order]
        counts = np.bincount(cr - rows[0], minlength=rows.size)
        place = np.arange(cr.size) - np.repeat(np.cumsum(counts) - counts, counts)
        kept = place < k
        indices[cr[kept], place[kept]] = cc[kept]
        scores[cr[kept], place[kept]] = value[kept]
        start = int(rows[-1]) + 1
    return scores, indices


def _warn_if_collapsed(
    exclude_self: bool,
    inv_q: np.ndarray,
    inv_r: np.ndarray,
    rank: np.ndarray,
    used: np.ndarray,
    held: np.ndarray,
    k: int,
    n_reference: int,
) -> None:
    """The warning of :func:`settle_ties` for the ties :func:`_search_distinct` settled.

    Under the same condition — the queries whose tie at the ``k``-th neighbour reaches past the
    searched depth, times the references, above :data:`_SLOW_CUT_PAIRS` — but counted, not slow.
    """
    tied = held[inv_q, used[inv_q] - 1]  # references at or above the k-th neighbour's score
    if exclude_self:
        where = np.empty_like(rank)
        np.put_along_axis(where, rank, np.broadcast_to(np.arange(rank.shape[1]), rank.shape), axis=1)
        tied = tied - (where[inv_q, inv_r] < used[inv_q])  # query i is reference i
    spilled = int(np.count_nonzero(tied > k))
    if spilled * n_reference > _SLOW_CUT_PAIRS:
        warnings.warn(
            f"{spilled} queries tie at their last neighbour with references beyond the searched depth; "
            f"the {n_reference} references hold only {rank.shape[1]} distinct rows, so the ties were "
            "settled by counting identical rows (fast). Many exact ties usually mean a collapsed "
            "embedding (check it with EmbeddingHealthMonitor or `embedkit doctor`).",
            stacklevel=4,
        )
