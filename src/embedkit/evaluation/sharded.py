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
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

# The module, not its names: embedkit.distributed imports the losses, which import the monitors,
# which import this package; its names are read at call time.
from .. import distributed
from .._checks import check_bool, check_choice, check_embeddings, check_int, check_ks, check_labels
from ..monitors._distributed import gather_same_shape, process_count, process_index, sum_across
from ..similarity import METRICS, Metric
from .report import Report
from .retrieval import (
    _near_duplicate_queries,
    _neighbour_sums,
    closing_notes,
    hit_chance,
    rank_metrics,
    too_few_references_note,
)
from .search import Backend, exact_scores, resolve_backend, search_checked

__all__ = ["sharded_knn", "sharded_retrieval_metrics"]

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
        query_classes, reference_classes = relevant_later

        def tie_order(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            return reference_classes[cols + ref_offset] == query_classes[rows]

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
