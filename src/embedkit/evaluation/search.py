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

from .._checks import check_choice, check_int, check_matching_dim
from ..similarity import METRICS, Metric, chunked_topk, l2_normalize, rows_per_block
from ._inputs import as_embeddings, progress_bar, to_numpy

__all__ = ["BACKENDS", "Backend", "faiss_available", "knn", "resolve_backend"]

Backend = Literal["auto", "faiss", "faiss-ivf", "faiss-hnsw", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "faiss", "faiss-ivf", "faiss-hnsw", "torch")

# Queries per FAISS call when a progress bar is shown (FAISS blocks internally anyway).
_FAISS_QUERY_BLOCK = 4096


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
    reference: Any,
    k: int,
    *,
    metric: Metric = "cosine",
    backend: Backend = "auto",
    exclude_self: bool = False,
    chunk_size: int | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
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
        ``"faiss-ivf"`` only: inverted lists (default ``4·√n_reference``) and lists visited
        per query (default ``max(1, nlist // 8)``).
    hnsw_m, ef_search : int, optional
        ``"faiss-hnsw"`` only: graph degree (default 32) and search breadth (default
        ``max(64, 2k)``).
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
    if exclude_self and ref.shape[0] != q.shape[0]:
        raise ValueError(
            "exclude_self=True means query i is reference i, so both need the same number of rows; "
            f"got {q.shape[0]} queries and {ref.shape[0]} references"
        )
    check_int(k, "k", low=1, high=ref.shape[0] - int(exclude_self))
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
    ef_search: int | None,
    callback: Callable[[int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    ref_np = _faiss_array(ref, metric)
    q_np = ref_np if same else _faiss_array(q, metric)
    n_ref, d = ref_np.shape
    inner_product = metric in ("cosine", "dot")
    faiss_metric = faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2
    index: Any
    if index_kind == "faiss":
        index = faiss.IndexFlatIP(d) if inner_product else faiss.IndexFlatL2(d)
    elif index_kind == "faiss-ivf":
        lists = check_int(
            nlist if nlist is not None else max(1, int(4 * np.sqrt(n_ref))), "nlist", low=1, high=n_ref
        )
        quantizer = faiss.IndexFlatIP(d) if inner_product else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, lists, faiss_metric)
        index.train(ref_np)
        index.nprobe = check_int(
            nprobe if nprobe is not None else max(1, lists // 8), "nprobe", low=1, high=lists
        )
    else:
        index = faiss.IndexHNSWFlat(d, check_int(hnsw_m, "hnsw_m", low=2), faiss_metric)
        index.hnsw.efSearch = check_int(
            ef_search if ef_search is not None else max(64, 2 * k), "ef_search", low=k + 1
        )
    index.add(ref_np)
    del ref_np  # the index holds its own copy; ours (normalised) is freed unless it is q_np
    depth = k + int(exclude_self)
    step = q_np.shape[0] if callback is None else _FAISS_QUERY_BLOCK
    parts = []
    for start in range(0, q_np.shape[0], step):
        parts.append(index.search(q_np[start : start + step], depth))
        if callback is not None:
            callback(min(step, q_np.shape[0] - start))
    scores = np.concatenate([p[0] for p in parts])
    indices = np.concatenate([p[1] for p in parts]).astype(np.int64, copy=False)
    missing = int((indices < 0).any(axis=1).sum())
    if missing:
        raise ValueError(
            f"the {index_kind!r} index found fewer than {depth} neighbours for {missing} queries; "
            "raise nprobe / ef_search, or use the exact backend='faiss'"
        )
    if exclude_self:
        scores, indices = _drop_self(scores, indices)
    if not inner_product:
        scores = -(np.sqrt(np.maximum(scores, 0.0)) if metric == "euclidean" else scores)
    return np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(indices)


def _drop_self(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own index from a search one deeper than asked.

    Where the query's index is absent (many exact duplicates tied ahead of it), the last
    result goes instead: the remaining ``k`` are still a correct top-``k`` of the others.
    """
    n, depth = indices.shape
    is_self = indices == np.arange(n)[:, None]
    is_self[~is_self.any(axis=1), depth - 1] = True
    # Several hits of the same index cannot happen in one row; keep the first k survivors.
    keep = ~is_self
    return scores[keep].reshape(n, depth - 1), indices[keep].reshape(n, depth - 1)
