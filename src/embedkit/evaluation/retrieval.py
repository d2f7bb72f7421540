r"""Retrieval metrics with the definitions of Musgrave et al., "A Metric Learning Reality Check".

For every query, the *relevant* references are those with the query's label (the query
itself excluded when the queries are their own reference set), and ``R`` is how many
there are. With the references ranked by similarity to the query:

* **precision@1** — the top reference is relevant;
* **R-precision** — relevant references among the first ``R``, divided by ``R``;
* **MAP@R** — :math:`\frac{1}{R}\sum_{i=1}^{R} P(i)\,\mathrm{rel}(i)`, where ``P(i)`` is
  the precision of the first ``i`` results and ``rel(i)`` is 1 when result ``i`` is relevant;
* **recall@k** — at least one relevant reference in the top ``k`` (the metric-learning
  recall, equal to CMC at rank ``k``; not the information-retrieval recall);
* **precision@k** — relevant references in the top ``k``, divided by ``k`` (always ``k``,
  even when ``R < k``);
* **mAP** — average precision over the *full* ranking,
  :math:`\frac{1}{R}\sum_{j} \frac{\#\{\text{relevant ranked at or above } j\}}{\mathrm{rank}(j)}`
  over the ``R`` relevant references ``j``. Without ties this equals
  ``sklearn.metrics.average_precision_score`` per query, and pytorch-metric-learning's
  ``mean_average_precision`` with ``k=None``.

Ties, one rule for every metric above: **among references with the same score, irrelevant
ones rank before relevant ones**, so a tie between a relevant and an irrelevant reference
counts against the model (the order among tied relevant references changes no metric). It is a
lower bound that no ordering of the ties can raise, it needs one search, and it is the same for
every back-end, every ``ks`` and every search depth: a tie that reaches past the searched depth
is followed to its end (:func:`~embedkit.evaluation.search.settle_ties`). Scores are equal when
:func:`~embedkit.evaluation.search.exact_scores` makes them equal (pair by pair in float64,
rounded to float32 — float64 for float64 inputs), so exact duplicates tie even where the
search's BLAS rounded their scores one ulp apart. With ties, mAP is below scikit-learn's
``average_precision_score``, which ranks each relevant reference of a tie last of the tie
*together* with the other relevant ones — more than any ordering of the tie achieves.

Queries whose class has no other sample in the reference set (``R = 0``) are excluded
from every average, counted in ``report.counts["queries_without_relevant"]`` and named in
a note — never dropped silently.

Cost. The first six metrics need one k-NN search of depth ``max(max R, max ks)``, plus an
exact re-scoring of the few results within rounding of each other, and a scan of the whole
reference set for the rare query whose tie reaches past that depth:
``n_queries × depth`` results are held, never an ``n_queries × n_reference`` matrix. A collapsed
embedding, whose rows are mostly identical, ties every query with every reference: it is ranked
from its distinct rows and the ties are counted by label, not listed (seconds at 1e5 rows);
nearly identical rows are re-scored pair by pair, in time proportional to queries × references. mAP
needs the rank of *every* relevant reference, wherever it falls in the ranking, so it takes
a second, chunked pass that scores every (query, reference) pair and places each score among
the query's ``R`` relevant scores: ``O(n_queries · n_reference · (d + log R))`` time (five to
eight times the search itself at 10,000 embeddings, ``benchmarks/bench_evaluation.py``) and
memory for one block of scores. It runs only with ``compute_map=True``; by default the
call costs one k-NN search and ``"map"`` is absent from the report (``"map@r"``, from the
search, is there).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_ks, check_matching_dim
from ..labels import encode_label_sets
from ..similarity import METRICS, Metric, rows_per_block, similarity_blocks, working_dtype
from ._inputs import as_embeddings, as_image_ids, first_few, progress_bar, repeated_ids, shared_ids, to_numpy
from .report import Rate, Report
from .search import (
    APPROXIMATE_BACKENDS,
    Backend,
    LabelTieOrder,
    exact_scores,
    ranking_key,
    recall_against_exact,
    resolve_backend,
    score_tolerance,
    search_checked,
)

__all__ = ["average_precision_full", "hit_chance", "retrieval_metrics"]

# Query rows per block when turning neighbour labels into metrics (bounds temporaries).
_METRIC_ROWS = 16384

# The near-duplicate test of the gallery (see gallery.py): cosine >= 0.9999, or in general
# ||q - r|| <= sqrt(2 * (1 - 0.9999)) * ||q|| on the vectors the metric compares.
_NEAR_DUPLICATE = 0.9999
_NEAR_DUPLICATE_DISTANCE = float(np.sqrt(2.0 * (1.0 - _NEAR_DUPLICATE)))


def retrieval_metrics(
    queries: Any,
    query_labels: Any,
    reference: Any = None,
    reference_labels: Any = None,
    *,
    ks: Any = (1, 5, 10),
    metric: Metric = "cosine",
    backend: Backend = "auto",
    compute_map: bool = False,
    image_ids: Any = None,
    reference_image_ids: Any = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Report:
    """Precision@1, R-precision, MAP@R, recall@k, precision@k and mAP of a retrieval.

    Parameters
    ----------
    queries : ndarray or Tensor of shape (n_queries, d)
        Query embeddings, on any device.
    query_labels : ndarray, Tensor or sequence of int, of shape (n_queries,)
        Integer class labels of any size (kept as int64, never cast to float).
    reference : ndarray or Tensor of shape (n_reference, d), optional
        The set searched. ``None`` evaluates ``queries`` against themselves, each query
        excluded from its own results. Passing the very same object as ``queries`` is an
        error (every query would find itself first); use ``None`` for that.
    reference_labels : ndarray, Tensor or sequence of int, of shape (n_reference,)
        Required with ``reference``, not allowed without.
    ks : sequence of int
        Cut-offs for ``"recall@k"`` and ``"precision@k"``.
    metric : {"cosine", "dot", "euclidean", "squared_euclidean"}
        Similarity used for the ranking.
    backend : {"auto", "faiss", "faiss-ivf", "faiss-hnsw", "torch"}
        k-NN back-end (see :func:`embedkit.evaluation.search.knn`). The mAP pass always runs
        on torch, on the queries' device.
    compute_map : bool
        Also compute ``"map"`` over the full ranking: an extra pass over every (query,
        reference) pair, five to eight times the search at 1e4 embeddings (module notes).
        Off by default, so that the call costs one k-NN search.
    image_ids : sequence of shape (n_queries,), optional
        Source image of each query (file names or integer ids, compared by value and type).
        With ``reference=None`` a repeated id is an error (the same image would be found as
        its own neighbour); with a reference set, an id that is also in
        ``reference_image_ids`` is an error.
    reference_image_ids : sequence of shape (n_reference,), optional
        Source image of each reference; only with ``reference``.
    chunk_size : int, optional
        Query rows per block of scores on the torch paths.
    progress : bool
        Show progress bars for the search and the mAP pass.

    Every metric counts ties pessimistically (see the module notes): among references with
    the same score, irrelevant ones rank before relevant ones, whatever the back-end and ``ks``.

    Returns
    -------
    Report
        Keys ``"precision@1"``, ``"r_precision"``, ``"map@r"``, ``"recall@k"`` and
        ``"precision@k"`` for each ``k`` in ``ks``, and ``"map"`` with ``compute_map=True``. ``precision@1``,
        ``recall@k`` and ``precision@k`` are :class:`~embedkit.evaluation.report.Rate`
        with counts and chance level; ``report.curves["cmc"]`` holds recall at every rank
        up to the search depth. Chance levels are those of a uniformly random ranking:
        ``R / n`` per query for precision@1 and precision@k (``n`` references available to
        the query), the exact hypergeometric ``1 - C(n-R, k) / C(n, k)`` for recall@k,
        each averaged over the evaluated queries; the chance R-precision (also the mean
        ``R / n``) is given in a note. ``counts["near_duplicate_queries"]`` counts queries
        with a returned reference that is almost surely the same image (cosine >= 0.9999, or a
        distance at most 0.0141 × the query's norm), named in a note. With an approximate
        ``backend``, ``"search_recall"`` is the share of the exact neighbours the index
        returned, measured on a sample of 1,000 queries, with a note.

    Raises
    ------
    ValueError
        For inconsistent shapes, labels or arguments, or when no query has a relevant
        reference at all.
    """
    q = as_embeddings(queries, "queries")
    self_mode = reference is None
    if self_mode:
        if reference_labels is not None:
            raise ValueError("reference_labels were given without reference; pass both or neither")
        ref = q
    else:
        if reference is queries:
            raise ValueError(
                "reference is the same object as queries, so every query would retrieve itself first; "
                "pass reference=None to evaluate a set against itself with each query excluded"
            )
        if reference_labels is None:
            raise ValueError("reference was given without reference_labels; pass both")
        ref = as_embeddings(reference, "reference")
        check_matching_dim(q, ref, "queries", "reference")
    ks = check_ks(ks)
    check_choice(metric, "metric", METRICS)
    chunk_size = None if chunk_size is None else check_int(chunk_size, "chunk_size", low=1)
    ids_checked = _check_image_ids(image_ids, reference_image_ids, q.shape[0], ref.shape[0], self_mode)

    # Labels of any type as compact class ids shared by queries and references: vectorised
    # counting without Python loops over labels.
    label_sets, names = [query_labels], ["query_labels"]
    if not self_mode:
        label_sets.append(reference_labels)
        names.append("reference_labels")
    codes, classes = encode_label_sets(label_sets, names, [q.shape[0], ref.shape[0]][: len(names)])
    q_ids, r_ids = codes[0], codes[-1]
    class_sizes = np.bincount(r_ids, minlength=classes.size)
    relevant = class_sizes[q_ids] - int(self_mode)
    available = ref.shape[0] - int(self_mode)
    evaluated = np.flatnonzero(relevant > 0)
    if evaluated.size == 0:
        raise ValueError(
            f"none of the {q.shape[0]} queries has a relevant reference (a reference with the same label"
            f"{', other than itself' if self_mode else ''}); retrieval metrics are undefined"
        )
    depth = min(available, max(int(relevant.max()), ks[-1]))

    scores, indices = search_checked(
        q,
        None if self_mode else ref,
        depth,
        metric=metric,
        backend=backend,
        exclude_self=self_mode,
        chunk_size=chunk_size,
        progress=progress,
        tie_order=LabelTieOrder(q_ids, r_ids),  # the tie rule: irrelevant references first
    )
    indices = to_numpy(indices) if isinstance(indices, Tensor) else indices
    top_score = to_numpy(scores[:, 0]) if isinstance(scores, Tensor) else scores[:, 0]
    near_duplicates = _near_duplicate_queries(q, ref, top_score, indices, metric)
    del scores
    search_recall = None
    if resolve_backend(backend, q, ref) in APPROXIMATE_BACKENDS:
        search_recall = recall_against_exact(
            q, None if self_mode else ref, indices, metric=metric, chunk_size=chunk_size
        )

    n_eval = evaluated.size
    r_eval = relevant[evaluated]
    sums = _neighbour_sums(indices, evaluated, q_ids, r_ids, r_eval, ks, depth)
    first_hit = sums["first_hit_at"]  # 0-based position of the first relevant result; depth if none
    cmc_hits = np.bincount(np.minimum(first_hit, depth), minlength=depth + 1)[:depth].cumsum()
    p_random = r_eval / available  # chance that one random reference is relevant
    metrics = rank_metrics(
        ks,
        depth,
        n_eval,
        cmc_hits,
        hits_at={k: int(sums[f"hits@{k}"]) for k in ks},
        r_precision=float(sums["r_precision"] / n_eval),
        map_at_r=float(sums["map_at_r"] / n_eval),
        p_random=float(p_random.mean()),
        recall_chance={k: float(hit_chance(r_eval, available, k).mean()) for k in ks},
    )
    notes = []
    if search_recall is not None:
        metrics["search_recall"] = search_recall[0]
        notes.append(
            f"backend {backend!r} is approximate: on {search_recall[1]} sampled queries it returned "
            f"{100 * search_recall[0]:.1f}% of the exact top-{depth} neighbours (search_recall); "
            "every metric above is that of the approximate ranking"
        )
    notes += too_few_references_note(ks, available)
    counts = {
        "queries": int(q.shape[0]),
        "references": int(ref.shape[0]),
        "evaluated_queries": int(n_eval),
        "queries_without_relevant": int(q.shape[0] - n_eval),
        "classes": int(np.count_nonzero(np.bincount(q_ids))),
        "search_depth": int(depth),
        "near_duplicate_queries": near_duplicates,
    }
    if near_duplicates:
        notes.append(
            f"{near_duplicates} queries have a near-identical reference among their results "
            f"(cosine >= {_NEAR_DUPLICATE}, or "
            f"distance <= {_NEAR_DUPLICATE_DISTANCE:.4f} x the query's norm): probably the same image on "
            "both sides, which measures memorisation, not retrieval (pass image_ids to find them)"
        )
    if not ids_checked and not self_mode:
        notes.append(
            "image ids not given for both sides: disjointness of query and reference images unchecked"
        )
    if compute_map:
        ap = average_precision_full(
            q[torch.from_numpy(evaluated).to(q.device)],
            q_ids[evaluated],
            ref,
            r_ids,
            self_index=evaluated if self_mode else None,
            metric=metric,
            chunk_size=chunk_size,
            progress=progress,
        )
        metrics["map"] = float(ap.mean())
    notes += closing_notes(
        counts["queries_without_relevant"],
        int(q.shape[0]),
        classes[np.unique(q_ids[relevant <= 0])],
        float(p_random.mean()),
        self_mode=self_mode,
    )
    return Report(
        title="retrieval", metrics=metrics, counts=counts, notes=notes, curves={"cmc": cmc_hits / n_eval}
    )


def rank_metrics(
    ks: tuple[int, ...],
    depth: int,
    n_eval: int,
    cmc_hits: np.ndarray,
    *,
    hits_at: dict[int, int],
    r_precision: float,
    map_at_r: float,
    p_random: float,
    recall_chance: dict[int, float],
) -> dict[str, float | Rate]:
    """The metrics of a retrieval report from counts over ``n_eval`` evaluated queries.

    Shared by :func:`retrieval_metrics` and the sharded version, which sums the same counts
    over processes first. ``cmc_hits[i]``: queries whose first relevant result is within
    rank ``i + 1``; ``hits_at[k]``: relevant results in every top-k; ``r_precision`` and
    ``map_at_r`` are means, ``p_random`` the mean chance that one random reference is
    relevant and ``recall_chance[k]`` the mean chance of a hit in k random draws.
    """
    metrics: dict[str, float | Rate] = {
        "precision@1": Rate(int(cmc_hits[0]), n_eval, p_random),
        "r_precision": r_precision,
        "map@r": map_at_r,
    }
    for k in ks:
        metrics[f"recall@{k}"] = Rate(int(cmc_hits[min(k, depth) - 1]), n_eval, recall_chance[k])
    for k in ks:
        metrics[f"precision@{k}"] = Rate(hits_at[k], k * n_eval, p_random)
    return metrics


def too_few_references_note(ks: tuple[int, ...], available: int) -> list[str]:
    """The note that precision@k cannot reach 1 when fewer than k references exist."""
    if ks[-1] <= available:
        return []
    return [
        f"only {available} references are available per query, fewer than k={ks[-1]}: precision@k still "
        "divides by k, so it cannot reach 1"
    ]


def closing_notes(
    without_relevant: int, n_queries: int, lone_labels: np.ndarray, p_random: float, *, self_mode: bool
) -> list[str]:
    """The report's last notes: queries left out for want of a relevant reference, and chance."""
    notes = []
    if without_relevant:
        notes.append(
            f"{without_relevant} of {n_queries} queries have no relevant reference "
            f"(labels {first_few(lone_labels, render=str)}) and are excluded from every average"
        )
    mode = (
        "each query excluded from its own results"
        if self_mode
        else "queries and references are separate sets"
    )
    notes.append(f"chance level of r_precision (random ranking) = mean R/n = {p_random:.4g}; {mode}")
    return notes


def _check_image_ids(
    image_ids: Any, reference_image_ids: Any, n_queries: int, n_reference: int, self_mode: bool
) -> bool:
    """Refuse an image on both sides of the retrieval; True when the ids allowed a full check."""
    if self_mode:
        if reference_image_ids is not None:
            raise ValueError("reference_image_ids were given without reference; use image_ids alone")
        if image_ids is None:
            return False
        ids = as_image_ids(image_ids, n_queries, "image_ids", rows_name="queries")
        repeats = repeated_ids(ids)
        if repeats:
            shown = first_few(repeats)
            raise ValueError(
                f"{len(repeats)} image id(s) occur more than once among the queries: {shown}. With "
                "reference=None every query is searched among the others, so a repeated image would be "
                "found as its own neighbour; keep one embedding per image"
            )
        return True
    q_ids = (
        None if image_ids is None else as_image_ids(image_ids, n_queries, "image_ids", rows_name="queries")
    )
    r_ids = (
        None
        if reference_image_ids is None
        else as_image_ids(reference_image_ids, n_reference, "reference_image_ids", rows_name="reference")
    )
    if q_ids is None or r_ids is None:
        return False
    shared = shared_ids(q_ids, r_ids)
    if shared:
        shown = first_few(shared)
        raise ValueError(
            f"{len(shared)} image id(s) are both queries and references: {shown}. A query that retrieves "
            "its own image measures memorisation, not retrieval; use disjoint images"
        )
    return True


def _near_duplicate_queries(
    q: Tensor, ref: Tensor, top_score: np.ndarray, indices: np.ndarray, metric: str
) -> int:
    """Queries with a returned reference that is almost surely the same image.

    The test of :class:`~embedkit.evaluation.gallery.Gallery`: ``||q - r|| <= 0.0141 ||q||`` on
    the vectors the metric compares (cosine >= 0.9999 for unit vectors). For cosine and the
    euclidean metrics the top reference is the nearest one, and its score gives the distance;
    under ``"dot"`` it need not be, so the distance to every returned reference is computed.
    """
    top = top_score.astype(np.float64)
    if metric == "cosine":
        return int((top >= _NEAR_DUPLICATE).sum())
    norm_sq = to_numpy(q.double().pow(2).sum(dim=1))
    if metric == "dot":
        distance_sq = np.empty(q.shape[0])
        step = max(1, rows_per_block(indices.shape[1] * q.shape[1], bytes_per_entry=8))
        for start in range(0, q.shape[0], step):
            found = torch.from_numpy(indices[start : start + step]).to(ref.device)
            gap = ref[found].double() - q[start : start + step, None, :].double()  # (rows, depth, d)
            distance_sq[start : start + step] = to_numpy(gap.pow(2).sum(dim=2).amin(dim=1))
    else:
        distance_sq = top**2 if metric == "euclidean" else -top
    limit = _NEAR_DUPLICATE_DISTANCE**2 * norm_sq
    return int(((distance_sq <= limit) & ((norm_sq > 0) | (distance_sq == 0))).sum())


def _neighbour_sums(
    indices: np.ndarray,
    evaluated: np.ndarray,
    q_ids: np.ndarray,
    r_ids: np.ndarray,
    r_eval: np.ndarray,
    ks: tuple[int, ...],
    depth: int,
) -> dict[str, Any]:
    """Sums over the evaluated queries of the neighbour-based metrics, block by block."""
    totals: dict[str, Any] = {"r_precision": 0.0, "map_at_r": 0.0, **{f"hits@{k}": 0 for k in ks}}
    first_hits = []
    positions = np.arange(1, depth + 1)
    for start in range(0, evaluated.size, _METRIC_ROWS):
        rows = evaluated[start : start + _METRIC_ROWS]
        r = r_eval[start : start + _METRIC_ROWS]
        hits = r_ids[indices[rows]] == q_ids[rows, None]  # (rows, depth)
        for k in ks:
            totals[f"hits@{k}"] += int(hits[:, :k].sum())
        any_hit = hits.any(axis=1)
        first_hits.append(np.where(any_hit, hits.argmax(axis=1), depth))
        within_r = hits & (positions[None, :] <= r[:, None])
        cumulative = within_r.cumsum(axis=1)
        totals["r_precision"] += float((cumulative[:, -1] / r).sum())
        totals["map_at_r"] += float((((cumulative / positions) * within_r).sum(axis=1) / r).sum())
    totals["first_hit_at"] = np.concatenate(first_hits)
    return totals


def hit_chance(relevant: np.ndarray, available: int, k: int) -> np.ndarray:
    """Probability that a random ranking puts a relevant item in the top ``k``.

    The exact hypergeometric ``1 - C(n - R, k) / C(n, k)`` for ``n = available`` items of
    which ``R = relevant`` are relevant.

    Parameters
    ----------
    relevant : ndarray of shape (n_queries,)
        ``R`` per query.
    available : int
        ``n``: the references each query is ranked against.
    k : int
        The cut-off (capped at ``n``).

    Returns
    -------
    ndarray of shape (n_queries,)
    """
    # Imported here: scipy.special adds about 0.3 s to `import embedkit`.
    from scipy.special import gammaln

    n = float(available)
    k = min(k, available)
    misses = n - relevant.astype(np.float64)
    possible = misses >= k
    safe = np.where(possible, misses, k)
    log_none = gammaln(safe + 1) - gammaln(safe - k + 1) - gammaln(n + 1) + gammaln(n - k + 1)
    return np.where(possible, 1.0 - np.exp(log_none), 1.0)


def average_precision_full(
    queries: Tensor,
    query_ids: np.ndarray,
    reference: Tensor,
    reference_ids: np.ndarray,
    *,
    self_index: np.ndarray | None = None,
    metric: Metric = "cosine",
    chunk_size: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Average precision over the full ranking for each query, without an N×N matrix.

    Ties count pessimistically (the module's rule): among references with the same score,
    irrelevant ones rank before relevant ones. With the query's ``R`` relevant references in
    descending order of score, the ``i``-th then has rank ``i + m_i``, where ``m_i`` counts
    the irrelevant references scoring at least as high, and the average precision is the
    mean over ``i`` of ``i / (i + m_i)``.

    Block by block, every reference is scored against the query; the relevant references are
    scored exactly (:func:`~embedkit.evaluation.search.exact_scores`) and sorted, and every
    irrelevant score of the block is placed among them with ``searchsorted``. An irrelevant
    score within rounding of a relevant one is re-scored exactly first, so that exact
    duplicates tie whatever the block's arithmetic did to them.

    Parameters
    ----------
    queries : Tensor of shape (n_queries, d)
    query_ids : ndarray of shape (n_queries,) and dtype int64
        Compact class ids (``0..n_classes-1``) of the queries.
    reference : Tensor of shape (n_reference, d)
    reference_ids : ndarray of shape (n_reference,)
        Compact class ids of the references, in the same numbering.
    self_index : ndarray of shape (n_queries,), optional
        Row of ``reference`` that *is* each query, excluded from its ranking.
    metric : {"cosine", "dot", "euclidean", "squared_euclidean"}
    chunk_size : int, optional
        Query rows per block (default: a 128 MiB budget for the block and its temporaries).
    progress : bool
        Show a progress bar.

    Returns
    -------
    ndarray of shape (n_queries,) and dtype float64
        The average precision of each query; every query needs at least one relevant
        reference.
    """
    device = queries.device
    n_ref = reference.shape[0]
    order = np.argsort(reference_ids, kind="stable")
    sizes = np.bincount(reference_ids, minlength=int(max(query_ids.max(), reference_ids.max())) + 1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    if chunk_size is None:
        chunk_size = rows_per_block(n_ref, bytes_per_entry=40)
    dtype = working_dtype(torch.promote_types(queries.dtype, reference.dtype))
    tol = score_tolerance(queries, reference, metric=metric, search_dtype=dtype)
    out = np.empty(queries.shape[0], dtype=np.float64)
    with progress_bar(queries.shape[0], "mAP over the full ranking", progress) as update:
        for start, block in similarity_blocks(queries, reference, metric=metric, chunk_size=chunk_size):
            c = block.shape[0]
            rows = np.arange(start, start + c)
            cls = query_ids[rows]
            size = sizes[cls]
            width = int(size.max())
            offsets = np.arange(width)
            valid = offsets[None, :] < size[:, None]
            rel_index = order[np.minimum(starts[cls][:, None] + offsets[None, :], n_ref - 1)]  # (c, width)
            if self_index is not None:
                own = self_index[rows]
                valid &= rel_index != own[:, None]
                block[torch.arange(c, device=device), torch.from_numpy(own).to(device)] = -torch.inf
            r = valid.sum(axis=1)
            vr, vs = np.nonzero(valid)
            rel_exact = np.full((c, width), np.inf)  # padding last once sorted
            rel_exact[vr, vs] = exact_scores(queries, reference, rows[vr], rel_index[vr, vs], metric=metric)
            rel_exact.sort(axis=1)
            # the relevant references leave the block: only irrelevant ones are counted in it
            rel_rows, rel_cols = torch.from_numpy(vr).to(device), torch.from_numpy(rel_index[vr, vs])
            block[rel_rows, rel_cols.to(device)] = -torch.inf
            key = ranking_key(block, metric)
            rel_key_np = np.where(np.isinf(rel_exact), np.inf, ranking_key(rel_exact, metric))
            rel_key = torch.from_numpy(rel_key_np).to(device=device, dtype=block.dtype)
            # position[i, j] = how many relevant scores are <= block[i, j]
            position = torch.searchsorted(rel_key, key, right=True)
            _settle_near_relevant(
                queries, reference, rows, key, rel_key, rel_exact, position, tol[rows], metric=metric
            )
            flat = (position + torch.arange(c, device=device)[:, None] * (width + 1)).reshape(-1)
            histogram = to_numpy(torch.bincount(flat, minlength=c * (width + 1)).reshape(c, width + 1))
            # irrelevant references scoring >= the j-th smallest relevant score (masked: never)
            irrelevant_above = n_ref - histogram.cumsum(axis=1)[:, :width]
            place = r[:, None] - offsets[None, :]  # descending place i of the j-th smallest
            is_real = offsets[None, :] < r[:, None]
            precision = np.where(is_real, place / np.maximum(place + irrelevant_above, 1), 0.0)
            out[rows] = precision.sum(axis=1) / r
            if update is not None:
                update(c)
    return out


def _settle_near_relevant(
    queries: Tensor,
    reference: Tensor,
    rows: np.ndarray,
    key: Tensor,
    rel_key: Tensor,
    rel_exact: np.ndarray,
    position: Tensor,
    tol: np.ndarray,
    *,
    metric: str,
) -> None:
    """Re-place, in ``position``, the block's scores within rounding of a relevant score.

    ``rel_key`` holds each row's relevant keys in ascending order (``+inf`` padding);
    ``rel_exact`` the same references' exact scores. A key closer than ``2·tol`` to the
    nearest relevant key below or above it is re-scored exactly and counted against the
    exact relevant scores.
    """
    device = key.device
    c = key.shape[0]
    margin = torch.from_numpy(2.0 * tol).to(device=device, dtype=key.dtype)[:, None]
    pad = torch.full((c, 1), torch.inf, device=device, dtype=key.dtype)
    # the nearest relevant key above each key (rel_key[p]), then the one at or below (rel_key[p - 1])
    gap = torch.gather(torch.cat([rel_key, pad], dim=1), 1, position).sub_(key)
    near = gap <= margin
    torch.gather(torch.cat([-pad, rel_key], dim=1), 1, position, out=gap)
    near |= torch.sub(key, gap, out=gap) <= margin  # nan (-inf - -inf) for masked keys: False
    del gap
    if device.type == "cpu":  # numpy's nonzero: a fraction of torch's on a CPU
        near_rows, near_cols = np.nonzero(to_numpy(near))
    else:
        found = torch.nonzero(near, as_tuple=True)
        near_rows, near_cols = to_numpy(found[0]), to_numpy(found[1])
    if near_rows.size == 0:
        return
    near_rows_t, near_cols_t = torch.from_numpy(near_rows).to(device), torch.from_numpy(near_cols).to(device)
    value = exact_scores(queries, reference, rows[near_rows], near_cols, metric=metric)
    counts = (rel_exact[near_rows] <= value[:, None]).sum(axis=1)
    position[near_rows_t, near_cols_t] = torch.from_numpy(counts).to(device)
