"""Sharded evaluation under ``torch.distributed``: each process holds a shard of the references.

A gallery too large for one device — or simply already spread over the processes of a
data-parallel run, each having embedded its own share of the images — is searched where it
lies:

1. the queries of every process are all-gathered (``Q × d`` values);
2. each process runs the ordinary exact search (:func:`~embedkit.evaluation.knn`'s, any
   exact back-end) of *all* queries against its own shard, keeping ``k`` candidates with
   their *global* indices (the shard's offset added), and re-scores them with
   :func:`~embedkit.evaluation.search.exact_scores`, the pair-by-pair formula that decides
   ties in one process — so a score does not depend on which shard's matrix product found it;
3. the candidate lists are all-gathered (``P × Q × k`` scores and indices) and each process
   merges its own queries' lists (:func:`embedkit.distributed.merge_topk`): score
   descending, then global index ascending — the order :func:`~embedkit.evaluation.knn`
   gives one process holding every shard, ties included (for retrieval metrics, the tie
   rule of :func:`~embedkit.evaluation.retrieval_metrics`: among tied references the
   irrelevant ones first). An item of the global top ``k`` is in its own shard's top ``k``
   under that order, so the merge is exact.

Global indices number the references of process 0, then process 1, ... — the
concatenation of the shards in rank order.

Queries: each process passes its own queries and gets the results for them; with
``queries=None`` the queries are the process's reference shard itself (a set evaluated
against itself, each row excluded from its own results with ``exclude_self=True``).
:func:`sharded_retrieval_metrics` evaluates *every* process's queries and returns the same
report on every process: the report :func:`~embedkit.evaluation.retrieval_metrics` gives for
the concatenated queries and references.

:class:`ShardedGallery` is the same for gallery-probe identification: a
:class:`~embedkit.evaluation.Gallery` enrolled shard by shard, whose reports are those of one
``Gallery`` holding every shard and every process's probes (see its notes for what is
communicated per probe).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# The module, not its names: embedkit.distributed imports the losses, which import the monitors,
# which import this package; its names are read at call time.
from .. import distributed
from .._checks import check_bool, check_choice, check_embeddings, check_int, check_ks, check_labels
from ..labels import encode_labels
from ..monitors._distributed import gather_same_shape, max_across, process_count, process_index, sum_across
from ..similarity import METRICS, Metric, l2_normalize, working_dtype
from ._inputs import as_image_ids, progress_bar, repeated_ids, to_numpy
from .gallery import Gallery, Template, _encode, _nearest_image_ratio, _Scan
from .report import Report
from .retrieval import (
    _near_duplicate_queries,
    _neighbour_sums,
    closing_notes,
    hit_chance,
    rank_metrics,
    too_few_references_note,
)
from .search import Backend, LabelTieOrder, exact_scores, resolve_backend, score_tolerance, search_checked

__all__ = ["ShardedGallery", "sharded_knn", "sharded_retrieval_metrics"]

EXACT_BACKENDS = ("auto", "faiss", "torch")


def _as_rows(embeddings: Any, name: str) -> Tensor:
    """A 2-D floating tensor (numpy wrapped without a copy); a process may hold none."""
    if isinstance(embeddings, np.ndarray):
        embeddings = torch.from_numpy(np.ascontiguousarray(embeddings))
    if isinstance(embeddings, Tensor) and embeddings.ndim == 2 and embeddings.shape[0] == 0:
        if not embeddings.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype; got {embeddings.dtype}")
        return embeddings.detach()
    return check_embeddings(embeddings.detach() if isinstance(embeddings, Tensor) else embeddings, name)


def _rows_everywhere(rows: int, dim: int, device: torch.device, group: Any) -> Tensor:
    """``[rows, dim]`` of every process, shape (P, 2); raises alike everywhere on a dimension mismatch."""
    everyone = gather_same_shape(torch.tensor([rows, dim], dtype=torch.int64, device=device), group)
    if bool((everyone[:, 1] != everyone[0, 1]).any()):
        dims = ", ".join(f"process {r}: {d}" for r, d in enumerate(everyone[:, 1].tolist()))
        raise ValueError(f"the processes' embeddings have different dimensions ({dims})")
    return everyone


def _search(
    queries: Tensor | None,
    shard: Tensor,
    k: int,
    *,
    metric: Metric,
    backend: Backend,
    exclude_self: bool,
    chunk_size: int | None,
    group: Any,
    relevant_later: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Scores and global indices of this process's queries; and the number of references in all.

    ``relevant_later = (class of every query of every process, class of every reference)``
    applies retrieval's tie rule (among tied references, irrelevant ones first) instead of
    the index order alone.
    """
    own = shard if queries is None else queries
    world = process_count(group)
    if world > 1:
        ref_rows = _rows_everywhere(shard.shape[0], shard.shape[1], shard.device, group)[:, 0].tolist()
        query_rows = (
            ref_rows
            if queries is None
            else _rows_everywhere(own.shape[0], own.shape[1], own.device, group)[:, 0].tolist()
        )
    else:
        ref_rows, query_rows = [shard.shape[0]], [own.shape[0]]
    total = sum(ref_rows)
    k = check_int(k, "k", low=1, high=total - int(exclude_self))
    rank = process_index(group)
    ref_offset = sum(ref_rows[:rank])
    all_queries = distributed._padded_gather(own, query_rows, group) if world > 1 else own
    query_offset = sum(query_rows[:rank])
    n_all = all_queries.shape[0]
    local_k = min(k + int(exclude_self), shard.shape[0])
    device = own.device
    # The dtype knn returns: float64 from the torch path for float64 input, float32 otherwise.
    on_torch = resolve_backend(backend, own, shard) == "torch"
    dtype = torch.float64 if on_torch and own.dtype == torch.float64 else torch.float32
    tie_order = None
    if relevant_later is not None:
        # A LabelTieOrder (not a plain callable) lets a collapsed shard be settled by counting.
        query_classes, reference_classes = relevant_later
        tie_order = LabelTieOrder(query_classes, reference_classes[ref_offset : ref_offset + shard.shape[0]])

    if local_k > 0 and n_all > 0:
        _, found = search_checked(
            all_queries,
            shard,
            local_k,
            metric=metric,
            backend=backend,
            chunk_size=chunk_size,
            tie_order=tie_order,
        )
        local = found.cpu().numpy() if isinstance(found, Tensor) else np.asarray(found)
        # Every candidate re-scored by the exact pair-by-pair formula that decides ties in one
        # process: a score then does not depend on which shard (which matrix product) found it.
        exact = exact_scores(
            all_queries, shard, np.repeat(np.arange(n_all), local_k), local.ravel(), metric=metric
        ).reshape(n_all, local_k)
        scores = torch.from_numpy(exact).to(device=device, dtype=dtype)
        indices = torch.from_numpy(local).to(device) + ref_offset
        if exclude_self:
            # Query j (of all) is reference j: drop it where this shard returned it.
            itself = indices == torch.arange(n_all, device=device)[:, None]
            scores = scores.masked_fill(itself, -torch.inf)
            indices = indices.masked_fill(itself, total)
    else:
        scores = torch.empty(n_all, 0, device=device, dtype=dtype)
        indices = torch.empty(n_all, 0, dtype=torch.int64, device=device)
    width = k + int(exclude_self)
    pad = width - scores.shape[1]  # padding never wins: -inf, and an index past every reference
    scores = torch.cat([scores, scores.new_full((n_all, pad), -torch.inf)], dim=1)
    indices = torch.cat([indices, indices.new_full((n_all, pad), total)], dim=1)
    if world > 1:
        scores = gather_same_shape(scores.contiguous(), group).permute(1, 0, 2).flatten(1)
        indices = gather_same_shape(indices.contiguous(), group).permute(1, 0, 2).flatten(1)
    mine = slice(query_offset, query_offset + own.shape[0])
    scores, indices = scores[mine], indices[mine]
    later = None
    if relevant_later is not None:
        query_classes, reference_classes = relevant_later
        padded = np.append(reference_classes, -1)  # index ``total`` is padding: never relevant
        flags = padded[indices.cpu().numpy()] == query_classes[mine][:, None]
        later = torch.from_numpy(flags).to(device)
    top_scores, top_indices = distributed.merge_topk(scores, indices, k, tie_later=later)
    return top_scores, top_indices, total


def sharded_knn(
    queries: Any,
    reference_shard: Any,
    k: int = 1,
    *,
    metric: Metric = "cosine",
    backend: Backend = "auto",
    exclude_self: bool = False,
    chunk_size: int | None = None,
    process_group: Any = None,
) -> tuple[Any, Any]:
    """The ``k`` nearest references of this process's queries, over every process's shard. A collective.

    Parameters
    ----------
    queries : ndarray or Tensor of shape (n_queries, d), or None
        This process's queries (processes may hold different numbers, even none).
        ``None``: the queries are ``reference_shard`` itself.
    reference_shard : ndarray or Tensor of shape (n_shard, d)
        This process's references; the reference set is the concatenation of every
        process's shard in rank order (shards may differ in size, even be empty).
    k : int
        ``1 <= k <= total references`` (minus one with ``exclude_self``).
    metric : {"cosine", "dot", "euclidean", "squared_euclidean"}
        As for :func:`~embedkit.evaluation.knn`.
    backend : {"auto", "faiss", "torch"}
        The exact back-end of each shard's search (approximate indexes would make the
        merge inexact, and are refused).
    exclude_self : bool
        Query ``i`` of the set is reference ``i`` (only with ``queries=None``).
    chunk_size : int, optional
        Query rows per block on the torch path.
    process_group : optional
        The ``torch.distributed`` group (default: all processes).

    Returns
    -------
    scores : ndarray or Tensor of shape (n_queries, k)
        Similarities, best first.
    indices : ndarray or Tensor of shape (n_queries, k) and dtype int64
        Global reference indices. Equal to :func:`~embedkit.evaluation.knn` of the
        concatenated queries against the concatenated shards (this process's rows),
        tied references in index order. The scores are the exact pair-by-pair scores
        (:func:`~embedkit.evaluation.search.exact_scores`), which may differ from a search's
        in the last place.

    Both are tensors on the queries' device when the inputs are tensors, numpy arrays
    otherwise. Outside ``torch.distributed`` this is :func:`~embedkit.evaluation.knn`.
    """
    check_choice(backend, "backend", EXACT_BACKENDS)
    check_choice(metric, "metric", METRICS)
    exclude_self = check_bool(exclude_self, "exclude_self")
    if exclude_self and queries is not None:
        raise ValueError(
            "exclude_self=True means query i is reference i: pass queries=None to search the "
            "reference shards themselves"
        )
    shard = _as_rows(reference_shard, "reference_shard")
    q = None if queries is None else _as_rows(queries, "queries")
    scores, indices, _ = _search(
        q,
        shard,
        k,
        metric=metric,
        backend=backend,
        exclude_self=exclude_self,
        chunk_size=chunk_size,
        group=process_group,
    )
    given = reference_shard if queries is None else queries
    if isinstance(given, Tensor):
        return scores, indices
    return scores.cpu().numpy(), indices.cpu().numpy()


def _gather_labels(labels: Any, rows: int, name: str, device: torch.device, group: Any) -> Tensor:
    """Every process's integer labels, concatenated (any number of rows per process)."""
    local = check_labels(labels, rows, name, device=device)
    if process_count(group) == 1:
        return local
    counts = gather_same_shape(torch.tensor([rows], device=device), group)[:, 0].tolist()
    return distributed._padded_gather(local, counts, group)


def sharded_retrieval_metrics(
    queries: Any,
    query_labels: Any,
    reference_shard: Any = None,
    reference_labels: Any = None,
    *,
    ks: Any = (1, 5, 10),
    metric: Metric = "cosine",
    backend: Backend = "auto",
    chunk_size: int | None = None,
    process_group: Any = None,
) -> Report:
    """:func:`~embedkit.evaluation.retrieval_metrics` over every process's queries and shards. A collective.

    Parameters
    ----------
    queries : ndarray or Tensor of shape (n_queries, d)
        This process's queries. Without ``reference_shard`` they are also this process's
        shard of the reference set (a set evaluated against itself, each query excluded
        from its own results).
    query_labels : Tensor, ndarray or sequence of int, of shape (n_queries,)
        Integer labels (the same class numbering on every process).
    reference_shard : ndarray or Tensor of shape (n_shard, d), optional
        This process's references.
    reference_labels : Tensor, ndarray or sequence of int, of shape (n_shard,)
        Required with ``reference_shard``.
    ks, metric, chunk_size :
        As for :func:`~embedkit.evaluation.retrieval_metrics`. ``metric="dot"`` is not
        supported (its near-duplicate check needs the returned reference vectors).
    backend : {"auto", "faiss", "torch"}
        Exact back-ends only: see :func:`sharded_knn`.
    process_group : optional
        The ``torch.distributed`` group (default: all processes).

    Returns
    -------
    Report
        The same on every process: the keys and counts of
        :func:`~embedkit.evaluation.retrieval_metrics` called on the concatenated queries
        (and references) of every process (without ``"map"``, ``image_ids`` and the
        approximate back-ends). ``recall@k`` is the closed-set identification rate at rank
        ``k`` against an image-level gallery (CMC), ``report.curves["cmc"]`` the curve.
    """
    check_choice(metric, "metric", METRICS)
    if metric == "dot":
        raise ValueError(
            "metric='dot' is not supported by sharded_retrieval_metrics (its near-duplicate check "
            "needs the returned reference vectors); normalise the embeddings and use 'cosine'"
        )
    check_choice(backend, "backend", EXACT_BACKENDS)
    ks = check_ks(ks)
    self_mode = reference_shard is None
    if self_mode and reference_labels is not None:
        raise ValueError("reference_labels were given without reference_shard; pass both or neither")
    if not self_mode and reference_labels is None:
        raise ValueError("reference_shard was given without reference_labels; pass both")
    group = process_group
    q = _as_rows(queries, "queries")
    shard = q if self_mode else _as_rows(reference_shard, "reference_shard")
    if shard.shape[1] != q.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but reference_shard has {shard.shape[1]}")
    device = q.device
    local_query_labels = check_labels(query_labels, q.shape[0], "query_labels", device=device)
    all_query_labels = _gather_labels(local_query_labels, q.shape[0], "query_labels", device, group)
    ref_labels = (
        all_query_labels
        if self_mode
        else _gather_labels(reference_labels, shard.shape[0], "reference_labels", device, group)
    )
    # Class codes shared by queries and references, the same on every process.
    classes, codes = np.unique(
        np.concatenate([all_query_labels.cpu().numpy(), ref_labels.cpu().numpy()]), return_inverse=True
    )
    all_q_ids = codes[: all_query_labels.shape[0]]
    r_ids = codes[all_query_labels.shape[0] :]
    class_sizes = np.bincount(r_ids, minlength=classes.size)
    all_relevant = class_sizes[all_q_ids] - int(self_mode)
    available = r_ids.size - int(self_mode)
    if not (all_relevant > 0).any():
        raise ValueError(
            f"none of the {all_q_ids.size} queries has a relevant reference (a reference with the same label"
            f"{', other than itself' if self_mode else ''}); retrieval metrics are undefined"
        )
    depth = min(available, max(int(all_relevant.max()), ks[-1]))

    scores, indices, _ = _search(
        None if self_mode else q,
        shard,
        depth,
        metric=metric,
        backend=backend,
        exclude_self=self_mode,
        chunk_size=chunk_size,
        group=group,
        relevant_later=(all_q_ids, r_ids),
    )
    # This process's queries, among everyone's.
    counts = (
        gather_same_shape(torch.tensor([q.shape[0]], device=device), group)[:, 0].tolist()
        if process_count(group) > 1
        else [q.shape[0]]
    )
    start = sum(counts[: process_index(group)])
    q_ids = all_q_ids[start : start + q.shape[0]]
    relevant = all_relevant[start : start + q.shape[0]]
    evaluated = np.flatnonzero(relevant > 0)
    index_array = indices.cpu().numpy()
    near = _near_duplicate_queries(q, q, scores[:, 0].cpu().numpy(), index_array, metric) if q.shape[0] else 0
    r_eval = relevant[evaluated]
    if evaluated.size:
        sums = _neighbour_sums(index_array, evaluated, q_ids, r_ids, r_eval, ks, depth)
    else:  # this process has no query to evaluate; it still joins the sums
        sums = {"r_precision": 0.0, "map_at_r": 0.0, **{f"hits@{k}": 0 for k in ks}}
        sums["first_hit_at"] = np.zeros(0, dtype=np.int64)
    first_hit = sums["first_hit_at"]
    p_random = r_eval / available
    # Everything the report needs, summed over the processes in one all_reduce each.
    float_sums = torch.tensor(
        [
            sums["r_precision"],
            sums["map_at_r"],
            float(p_random.sum()),
            *[float(hit_chance(r_eval, available, k).sum()) for k in ks],
        ],
        dtype=torch.float64,
        device=device,
    )
    int_sums = torch.tensor(
        [
            evaluated.size,
            near,
            *[sums[f"hits@{k}"] for k in ks],
            *np.bincount(np.minimum(first_hit, depth), minlength=depth + 1)[:depth].tolist(),
        ],
        dtype=torch.int64,
        device=device,
    )
    if process_count(group) > 1:
        float_sums, int_sums = sum_across([float_sums, int_sums], group)
    n_eval, near_duplicates = int(int_sums[0]), int(int_sums[1])
    hits_at = dict(zip(ks, int_sums[2 : 2 + len(ks)].tolist(), strict=True))
    cmc_hits = int_sums[2 + len(ks) :].cumsum(0).cpu().numpy()
    r_precision, map_at_r, p_random_sum = (float(v) for v in float_sums[:3])
    chance_at = dict(zip(ks, float_sums[3:].tolist(), strict=True))
    metrics = rank_metrics(
        ks,
        depth,
        n_eval,
        cmc_hits,
        hits_at={k: int(v) for k, v in hits_at.items()},
        r_precision=r_precision / n_eval,
        map_at_r=map_at_r / n_eval,
        p_random=p_random_sum / n_eval,
        recall_chance={k: chance_at[k] / n_eval for k in ks},
    )
    n_queries = all_q_ids.size
    report_counts = {
        "queries": int(n_queries),
        "references": int(r_ids.size),
        "evaluated_queries": n_eval,
        "queries_without_relevant": int(n_queries - n_eval),
        "classes": int(np.count_nonzero(np.bincount(all_q_ids))),
        "search_depth": int(depth),
        "near_duplicate_queries": near_duplicates,
    }
    notes = [f"sharded over {process_count(group)} processes: queries and references of every process"]
    notes += too_few_references_note(ks, available)
    if near_duplicates:
        notes.append(
            f"{near_duplicates} queries have a near-identical reference among their results: probably the "
            "same image on both sides, which measures memorisation, not retrieval"
        )
    notes += closing_notes(
        report_counts["queries_without_relevant"],
        int(n_queries),
        classes[np.unique(all_q_ids[all_relevant <= 0])],
        p_random_sum / n_eval,
        self_mode=self_mode,
    )
    return Report(
        title="retrieval",
        metrics=metrics,
        counts=report_counts,
        notes=notes,
        curves={"cmc": cmc_hits / n_eval},
    )


# -- sharded gallery-probe identification ------------------------------------------------------------


def _exchange(local: dict[str, Any], error: Exception | None, group: Any) -> list[dict[str, Any]]:
    """Every process's ``local`` (one ``all_gather_object``), or the same error raised on all of them.

    Arguments are checked on each process before anything else is exchanged; a process whose
    check failed sends its error instead of stopping, so that no process is left waiting in
    a collective, and every process raises it (naming the process).
    """
    world = process_count(group)
    if world == 1:
        if error is not None:
            raise error
        return [local]
    payload = {**local, "error": None if error is None else (type(error).__name__, str(error))}
    everyone: list[Any] = [None] * world
    torch.distributed.all_gather_object(everyone, payload, group=group)
    failed = [(rank, e["error"]) for rank, e in enumerate(everyone) if e["error"] is not None]
    if failed:
        rank, (kind, message) = failed[0]
        others = f" (and {len(failed) - 1} other process(es))" if len(failed) > 1 else ""
        raise (TypeError if kind == "TypeError" else ValueError)(f"process {rank}{others}: {message}")
    return everyone


def _same_everywhere(everyone: list[dict[str, Any]], key: str, what: str) -> None:
    """Raise (alike on every process) unless every process sent the same ``key``."""
    values = [e[key] for e in everyone]
    if any(v != values[0] for v in values[1:]):
        shown = ", ".join(f"process {rank}: {v}" for rank, v in enumerate(values))
        raise ValueError(f"every process must pass the same {what}; got {shown}")


def _all_or_none(everyone: list[dict[str, Any]], key: str, name: str) -> bool:
    """Whether every process gave ``name``; raise (alike everywhere) when only some did."""
    given = [e[key] is not None for e in everyone]
    if any(given) and not all(given):
        shown = ", ".join(str(rank) for rank, g in enumerate(given) if g)
        raise ValueError(f"{name} were given on process(es) {shown} only; pass them on every process or none")
    return all(given)


def _local_values(values: Any, n_rows: int, name: str, rows_name: str) -> np.ndarray:
    """Labels or template ids of any hashable type, checked (one per row) and returned as an array."""
    codes, classes = _encode(values, n_rows, name, rows_name=rows_name, allow_empty=True)
    return classes[codes]


def _concatenated(parts: list[np.ndarray]) -> np.ndarray:
    """The processes' labels or ids in rank order, their types kept (as ``encode_label_sets`` does)."""
    kinds = {p.dtype.kind for p in parts if p.size}
    if kinds <= set("iu") or kinds <= set("US"):
        return np.concatenate([p for p in parts if p.size] or parts[:1])
    return np.concatenate([p.astype(object) for p in parts])


class ShardedGallery(Gallery):
    """A :class:`~embedkit.evaluation.Gallery` whose images are spread over the processes. Collectives.

    Each process enrols its own shard of the gallery images and passes its own share of the
    probes (rows in rank order make the whole gallery and the whole probe set, as for
    :func:`sharded_retrieval_metrics`); :meth:`identify`, :meth:`dir_at_fpir` and
    :meth:`evaluate` then return, on every process, the report of a single
    :class:`~embedkit.evaluation.Gallery` that enrolled the concatenated shards and was given
    the concatenated probes. It is a ``Gallery`` with the same methods and arguments, so code
    written for one process runs sharded by changing the constructor; every method is a
    collective (every process calls it, with the same options). :meth:`verify` is not
    available: its exact thresholds sort every probe × gallery score.

    An identity's images may lie on several processes. With ``template="none"`` its score
    is the best over its images, a maximum that is combined exactly across processes; with
    ``template="mean"`` its template is summed along the processes in rank order (the
    summation order of one process) and kept by the last process holding its images.

    Parameters
    ----------
    metric : {"cosine", "dot", "euclidean", "squared_euclidean"}
        As for :class:`~embedkit.evaluation.Gallery`.
    chunk_size : int, optional
        Probes per block of scores on each process (default: a 128 MiB block).
    process_group : optional
        The ``torch.distributed`` group (default: all processes). Outside
        ``torch.distributed`` this is a ``Gallery`` without :meth:`verify`.

    Notes
    -----
    Each process scores *every* probe against its shard, block by block, and keeps per probe
    the numbers the ranks need; then (``P`` processes, ``d``-dimensional probes):

    1. the probes are all-gathered (``d`` values per probe), with their labels, image ids
       and template ids;
    2. the exact score of each probe's true identity
       (:func:`~embedkit.evaluation.search.exact_scores`, the best over the identity's
       images on every process) is reduced with a maximum: 8 bytes per probe;
    3. each process counts its identities scoring at least that much — surely above it
       from the block scores, by exact scores within rounding of it, Gallery's tie rule —
       and finds its best exact score; one maximum (best score, nearest-image closeness:
       16 bytes per probe) and one sum (the count: 8 bytes per probe) combine them. The
       identities whose images lie on several processes are counted once: a flag per
       (probe, such identity) is reduced with a maximum, 1 byte each.

    So ranks (rank-k, CMC) and the tie rule are exactly those of one process: exact
    duplicates enrolled under different identities tie wherever they lie. The scores the
    reports quote (``mean_genuine_score``, the open-set thresholds) are the exact pair-by-pair
    scores, which may differ from a single ``Gallery``'s matrix-product scores in the last
    place; so may a DIR or FPIR count when a probe's score lies within that rounding of a
    threshold. Enrolment gathers the labels (and image ids) of every image; with
    ``template="mean"``, the identities split between processes cost ``P - 1`` broadcasts
    of their partial sums (``d`` values each).

    Examples
    --------
    >>> gallery = ShardedGallery().enrol(my_gallery_rows, my_gallery_labels)   # on every process
    >>> report = gallery.identify(my_probe_rows, my_probe_labels)            # the same everywhere
    """

    def __init__(
        self, *, metric: Metric = "cosine", chunk_size: int | None = None, process_group: Any = None
    ) -> None:
        super().__init__(metric=metric, chunk_size=chunk_size)
        self.process_group = process_group
        self._shard: Gallery | None = None  # this process's identities (None: it holds none)
        self._shard_images: Tensor | None = None  # mean templates: this process's images, metric space
        self._enrolled_labels: np.ndarray | None = None
        self._total_entries = 0
        self._split = np.empty(0, dtype=np.int64)  # identities with images on several processes
        self._dim = 0
        self._dtype = torch.float32
        self._device = torch.device("cpu")

    def __repr__(self) -> str:
        if self._enrolled_labels is None:
            return f"ShardedGallery(metric={self.metric!r}, empty)"
        return (
            f"ShardedGallery(metric={self.metric!r}, template={self.template!r}, "
            f"identities={self.num_identities}, entries={self.num_entries}, dim={self._dim}, "
            f"processes={process_count(self.process_group)}, "
            f"entries here={0 if self._shard is None else self._shard.num_entries})"
        )

    @property
    def num_entries(self) -> int:
        """Number of gallery entries over every process: images (``template="none"``) or templates."""
        return self._total_entries

    @property
    def labels(self) -> np.ndarray:
        """The identity label of each gallery entry over every process, as :attr:`Gallery.labels`.

        ``template="none"``: the concatenated shards' labels in rank and enrolment order.
        """
        if self._enrolled_labels is None:
            return np.empty(0, dtype=np.int64)
        return self.identities.copy() if self.template == "mean" else self._enrolled_labels.copy()

    def enrol(
        self, embeddings: Any, labels: Any, *, template: Template = "none", image_ids: Any = None
    ) -> ShardedGallery:
        """Enrol this process's shard of the gallery, replacing any earlier enrolment. A collective.

        Parameters
        ----------
        embeddings : ndarray or Tensor of shape (n_shard, d)
            This process's gallery images (shards may differ in size, even be empty); the same
            ``d`` and dtype on every process.
        labels : array-like of shape (n_shard,)
            Identity of each image, as for :meth:`Gallery.enrol`; an identity may have images
            on several processes.
        template : {"none", "mean"}
            As for :meth:`Gallery.enrol`; the same on every process.
        image_ids : sequence of shape (n_shard,), optional
            As for :meth:`Gallery.enrol` (unique over every process); on every process or none.

        Returns
        -------
        ShardedGallery
            ``self``.
        """
        group = self.process_group
        local: dict[str, Any] = {"metric": self.metric, "template": template}
        error: Exception | None = None
        try:
            emb = _as_rows(embeddings, "embeddings")
            values = _local_values(labels, emb.shape[0], "labels", "embeddings")
            template = check_choice(template, "template", ("none", "mean"))  # type: ignore[assignment]
            ids = None if image_ids is None else as_image_ids(image_ids, emb.shape[0], rows_name="embeddings")
            emb = emb.to(working_dtype(emb.dtype))
            local.update(
                rows=emb.shape[0],
                dim=emb.shape[1],
                dtype=str(emb.dtype),
                labels=values,
                ids=ids,
                template=template,
            )
        except (TypeError, ValueError) as caught:
            error = caught
        everyone = _exchange(local, error, group)
        _same_everywhere(everyone, "metric", "metric")
        _same_everywhere(everyone, "template", "template")
        _same_everywhere(everyone, "dim", "embedding dimension")
        _same_everywhere(everyone, "dtype", "embedding dtype")
        rows = [int(e["rows"]) for e in everyone]
        if sum(rows) == 0:
            raise ValueError("every process's shard of the gallery is empty; enrol at least one image")
        all_labels = _concatenated([e["labels"] for e in everyone])
        codes, identities = encode_labels(all_labels, "labels")
        ids_all = None
        if _all_or_none(everyone, "ids", "image_ids"):
            ids_all = _concatenated([e["ids"] for e in everyone])
            repeats = repeated_ids(ids_all)
            if repeats:
                raise ValueError(f"image_ids must be unique within the gallery; {repeats[:5]} repeat")
        rank = process_index(group)
        start = sum(rows[:rank])
        mine = codes[start : start + rows[rank]]
        # Identities with images on several processes.
        holders = np.zeros(identities.size, dtype=np.int64)
        last_holder = np.zeros(identities.size, dtype=np.int64)
        for r, begin in enumerate(np.cumsum([0, *rows[:-1]])):
            held = np.unique(codes[begin : begin + rows[r]])
            holders[held] += 1
            last_holder[held] = r
        split = np.flatnonzero(holders > 1)
        self._shard, self._shard_images = None, None
        if template == "mean":
            self._enrol_means(emb, mine, codes, split, last_holder)
            split = np.empty(0, dtype=np.int64)  # each template lies on one process
        elif emb.shape[0]:
            self._shard = Gallery(metric=self.metric, chunk_size=self.chunk_size).enrol(emb, mine)
        self.template = template
        self.identities = identities
        self._image_ids = ids_all
        self._enrolled_labels = all_labels
        self._total_entries = identities.size if template == "mean" else int(sum(rows))
        self._split = split
        self._dim, self._dtype, self._device = int(emb.shape[1]), emb.dtype, emb.device
        return self

    def _enrol_means(
        self, emb: Tensor, mine: np.ndarray, codes: np.ndarray, split: np.ndarray, last_holder: np.ndarray
    ) -> None:
        """Mean templates, each kept by the last process holding its images.

        Sums run along the processes in rank order, every process adding its rows to the sums
        it received (``index_add_``, row by row as :class:`Gallery` sums them), then dividing
        by the identity's image count over every process: the template of one process.
        """
        group = self.process_group
        rank, world = process_index(group), process_count(group)
        if self.metric == "cosine":
            emb = l2_normalize(emb)
        held = np.unique(mine)
        sums = torch.zeros(held.size, emb.shape[1], dtype=emb.dtype, device=emb.device)
        index = torch.from_numpy(np.searchsorted(held, mine)).to(emb.device)
        carried = torch.zeros(split.size, emb.shape[1], dtype=emb.dtype, device=emb.device)
        at = np.searchsorted(split, held)
        is_split = np.zeros(held.size, dtype=bool)
        if split.size:
            is_split = split[np.minimum(at, split.size - 1)] == held
        for r in range(world):
            if r == rank:
                local_split = torch.from_numpy(np.flatnonzero(is_split)).to(emb.device)
                carried_rows = torch.from_numpy(at[is_split]).to(emb.device)
                sums[local_split] = carried[carried_rows]
                sums.index_add_(0, index, emb)
                carried[carried_rows] = sums[local_split]
            if split.size and r < world - 1:
                source = r if group is None else torch.distributed.get_global_rank(group, r)
                torch.distributed.broadcast(carried, src=source, group=group)
        counts = torch.from_numpy(np.bincount(codes, minlength=int(codes.max()) + 1)[held]).to(emb.device)
        owned = np.flatnonzero(last_holder[held] == rank)
        if emb.shape[0]:
            self._shard_images = emb
        if owned.size:
            owned_t = torch.from_numpy(owned).to(emb.device)
            means = sums[owned_t] / counts[owned_t].to(emb.dtype)[:, None]
            self._shard = Gallery(metric=self.metric, chunk_size=self.chunk_size).enrol(means, held[owned])

    def verify(self, *args: Any, **kwargs: Any) -> Report:
        """Not available on a sharded gallery: exact verification thresholds sort every score."""
        raise NotImplementedError(
            "ShardedGallery does not verify: exact thresholds need every probe x gallery score in one "
            "place; use Gallery.verify, or all_pairs_verification on the pairs"
        )

    def evaluate(
        self,
        probes: Any,
        labels: Any,
        *,
        ranks: Sequence[int] = (1, 5, 10),
        fpir_targets: Sequence[float] = (0.001, 0.01, 0.1),
        far_targets: Sequence[float] = (1e-4, 1e-3, 1e-2),
        image_ids: Any = None,
        template_ids: Any = None,
        identification: bool = True,
        open_set: bool | None = None,
        verification: bool = False,
        progress: bool = False,
    ) -> dict[str, Report]:
        """:meth:`Gallery.evaluate` over every process's probes and shards. A collective.

        Parameters
        ----------
        probes : ndarray or Tensor of shape (n_probes, d)
            This process's probes (processes may hold different numbers, even none): the
            probes are those of every process, in rank order.
        labels, image_ids, template_ids : array-like of shape (n_probes,)
            This process's share, as in :meth:`Gallery.identify` (ids on every process or
            none; a probe template's rows may lie on several processes).
        ranks, fpir_targets, identification, open_set, progress
            As in :meth:`Gallery.evaluate`; the same on every process.
        far_targets, verification
            Verification is not available (``verification=True`` raises).

        Returns
        -------
        dict of str to Report
            ``"identification"`` and ``"open_set"``, those computed: the same on every process.
        """
        group = self.process_group
        local: dict[str, Any] = {}
        error: Exception | None = None
        try:
            if self._enrolled_labels is None:
                raise ValueError("the gallery is empty; call enrol(embeddings, labels) first")
            if verification:
                raise ValueError(
                    "verification=True is not available on a ShardedGallery: exact thresholds need every "
                    "probe x gallery score in one place"
                )
            p = _as_rows(probes, "probes")
            if p.shape[1] != self._dim:
                raise ValueError(
                    f"probes have dimension {p.shape[1]} but the gallery embeddings have {self._dim}"
                )
            n = p.shape[0]
            local.update(
                rows=n,
                dtype=str(p.dtype),
                labels=_local_values(labels, n, "labels", "probes"),
                ids=None if image_ids is None else as_image_ids(image_ids, n, rows_name="probes"),
                templates=None
                if template_ids is None
                else _local_values(template_ids, n, "template_ids", "probes"),
                options=(
                    check_ks(ranks, "ranks"),
                    repr(fpir_targets),
                    bool(identification),
                    open_set,
                ),
            )
        except (TypeError, ValueError) as caught:
            error = caught
        everyone = _exchange(local, error, group)
        _same_everywhere(everyone, "options", "ranks, fpir_targets, identification and open_set")
        _same_everywhere(everyone, "dtype", "probe dtype")
        rows = [int(e["rows"]) for e in everyone]
        if sum(rows) == 0:
            raise ValueError("no process passed probes; expected at least one probe row")
        p = p.to(self._device)
        all_probes = distributed._padded_gather(p, rows, group) if len(rows) > 1 else p
        ids_given = _all_or_none(everyone, "ids", "image_ids")
        pooled = _all_or_none(everyone, "templates", "template_ids")
        setup = self._probe_setup(
            all_probes,
            _concatenated([e["labels"] for e in everyone]),
            ranks=ranks,
            fpir_targets=fpir_targets,
            image_ids=_concatenated([e["ids"] for e in everyone]) if ids_given else None,
            template_ids=_concatenated([e["templates"] for e in everyone]) if pooled else None,
            identification=identification,
            open_set=open_set,
            device=self._device,
        )
        scan = self._sharded_scan(setup.probes, setup.identity, progress=progress)
        counts, notes = self._counts_and_notes(
            setup, scan.nearest_ratio, ids_checked=ids_given and self._image_ids is not None
        )
        notes.insert(0, f"sharded over {len(rows)} processes: gallery shards and probes of every process")
        return self._reports(setup, scan, counts, notes)

    def _score_dtype(self) -> np.dtype:
        return np.dtype(np.float64 if self._dtype == torch.float64 else np.float32)

    def _sharded_scan(self, probes: Tensor, probe_identity: np.ndarray, *, progress: bool) -> _Scan:
        """:meth:`Gallery._scan` of every probe against every process's shard, combined exactly.

        Scores are exact (:func:`~embedkit.evaluation.search.exact_scores`): the true
        identity's, then the best one. The rank of the true identity is one plus the number of
        other identities whose exact score is at least its own; each process counts its own,
        from its block scores where they are surely above or below and by exact scores within
        rounding, the tie rule of :class:`Gallery`.
        """
        group = self.process_group
        world = process_count(group)
        device = probes.device
        n = probes.shape[0]
        mated = probe_identity >= 0
        shard = self._shard
        n_split = self._split.size
        # 1. The exact score of every mated probe's true identity: the best over every process.
        true_exact = np.full(n, -np.inf)
        true_column = np.full(n, -1, dtype=np.int64)
        if shard is not None:
            at = np.minimum(np.searchsorted(shard.identities, probe_identity), shard.identities.size - 1)
            held = np.flatnonzero(mated & (shard.identities[at] == probe_identity))
            true_column[held] = shard._identity_column[at[held]]
            true_exact[held] = shard._exact_identity_scores(probes, held, true_column[held])
        if world > 1:
            true_exact = max_across(torch.from_numpy(true_exact).to(device), group).cpu().numpy()
        true_exact = np.where(mated, true_exact, np.nan)
        # 2. This process's shard: best exact score, identities at or above the true one.
        best = np.full(n, -np.inf)
        nearest = np.full(n, np.inf)
        above = np.zeros(n, dtype=np.int64)
        flags = np.zeros((n, n_split), dtype=np.uint8)
        if shard is not None and n:
            self._scan_shard(
                shard, probes, mated, true_exact, true_column, best, nearest, above, flags, progress
            )
        if self._shard_images is not None and n:
            nearest = _nearest_image_ratio(self._shard_images, probes, self.metric)
        # 3. Combined: maxima (best, -nearest, flags) and a sum (the counts).
        if world > 1:
            floats = max_across(torch.from_numpy(np.stack([best, -nearest])).to(device), group).cpu().numpy()
            best, nearest = floats[0], -floats[1]
            (summed,) = sum_across([torch.from_numpy(above).to(device)], group)
            above = summed.cpu().numpy()
            if n_split:
                flags = max_across(torch.from_numpy(flags).to(device), group).cpu().numpy()
        rank = np.where(mated, 1 + above + flags.sum(axis=1, dtype=np.int64), 0)
        return _Scan(best_score=best, true_score=true_exact, rank=rank, nearest_ratio=nearest)

    def _scan_shard(
        self,
        shard: Gallery,
        probes: Tensor,
        mated: np.ndarray,
        true_exact: np.ndarray,
        true_column: np.ndarray,
        best: np.ndarray,
        nearest: np.ndarray,
        above: np.ndarray,
        flags: np.ndarray,
        progress: bool,
    ) -> None:
        """Fill this process's ``best``, ``nearest``, ``above`` and ``flags`` (see :meth:`_sharded_scan`)."""
        assert shard._entries is not None
        entries = shard._entries
        device = entries.device
        dtype = working_dtype(torch.promote_types(probes.dtype, entries.dtype))
        n, n_local = probes.shape[0], shard.num_identities
        tolerance = score_tolerance(probes, entries, metric=self.metric, search_dtype=dtype)
        # This shard's columns of the identities that also have images elsewhere: flagged, not counted.
        at = np.minimum(np.searchsorted(shard.identities, self._split), n_local - 1)
        here = np.flatnonzero(shard.identities[at] == self._split)
        split_columns = shard._identity_column[at[here]]
        counted = torch.ones(n_local, dtype=torch.bool, device=device)
        counted[torch.from_numpy(split_columns).to(device)] = False
        scan_images = self.template == "none"
        probe_sq = (
            to_numpy(probes.double().pow(2).sum(dim=1)) if scan_images and self.metric != "cosine" else None
        )
        entry_sq = entries.to(dtype).pow(2).sum(dim=1) if scan_images and self.metric == "dot" else None
        chunk_size = shard._block_rows(dtype)
        grouped = not (len(shard._groups) == 1 and shard._groups[0][2] == 1)
        buffer = torch.empty((min(chunk_size, n), n_local), dtype=dtype, device=device) if grouped else None
        with torch.no_grad(), progress_bar(n, "sharded gallery search", progress) as update:
            for start, block in shard._score_blocks(probes, chunk_size):
                c = block.shape[0]
                rows = slice(start, start + c)
                scores = shard._identity_scores(block, None if buffer is None else buffer[:c])
                top = scores.amax(dim=1)
                # The best exact score lies among the identities within rounding of the best block score.
                low, _ = shard._tie_window(to_numpy(top).astype(np.float64), tolerance[rows], dtype)
                where, column = (to_numpy(t) for t in torch.nonzero(scores >= low.to(device)[:, None]).T)
                np.maximum.at(
                    best, start + where, shard._exact_identity_scores(probes, start + where, column)
                )
                is_mated = mated[rows]
                if is_mated.any():
                    centre = np.where(is_mated, true_exact[rows], 0.0)
                    low, high = (t.to(device) for t in shard._tie_window(centre, tolerance[rows], dtype))
                    at_least = scores > high[:, None]  # surely above the true identity
                    window = (scores >= low[:, None]) & ~at_least
                    skip = torch.from_numpy(~is_mated).to(device)
                    at_least[skip] = False
                    window[skip] = False
                    where, column = (to_numpy(t) for t in torch.nonzero(window).T)
                    if where.size:  # within rounding: exact scores decide, ties counted as above
                        exact = shard._exact_identity_scores(probes, start + where, column)
                        keep = exact >= true_exact[start + where]
                        at_least[
                            torch.from_numpy(where[keep]).to(device),
                            torch.from_numpy(column[keep]).to(device),
                        ] = True
                    own = np.flatnonzero(true_column[rows] >= 0)  # the true identity is not counted
                    at_least[
                        torch.from_numpy(own).to(device), torch.from_numpy(true_column[rows][own]).to(device)
                    ] = False
                    above[rows] = to_numpy((at_least & counted).sum(dim=1))
                    if split_columns.size:
                        flags[rows, here] = to_numpy(at_least[:, torch.from_numpy(split_columns).to(device)])
                if scan_images:  # last: for dot it overwrites the block
                    nearest[rows] = shard._nearest_from_block(
                        block, top, entry_sq, None if probe_sq is None else probe_sq[rows]
                    )
                if update is not None:
                    update(c)
