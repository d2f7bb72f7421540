"""Embedding-health monitor: spread, rank, separation and the paired-similarity shortcut.

:class:`EmbeddingHealthMonitor` watches the embeddings themselves and names the
failures of case studies 03 and 04: every embedding the same point
(``complete_collapse``), embeddings confined to a few directions
(``dimensional_collapse``), norms that grew by orders of magnitude
(``exploding_norms``), same-identity pairs no closer than different-identity
pairs (``no_separation``), a paired similarity that does not carry over to other
images of the same identity (``paired_shortcut``), and NaN/inf rows (``non_finite``).

What is exact and what is sampled
---------------------------------
Exact over every row since the last reset (streaming sums, O(d) memory):

* N, the norm statistics (Σ‖z‖, Σ‖z‖², min, max) and the non-finite row count;
* the mean norm of the first ``sample_size`` rows (whole batches), for the growth of the
  norms;
* with labels, the number of distinct labels of the finite rows, in a bitmap of 65,536
  label codes (label mod 65,536: exact unless two ids seen differ by a multiple of it);
* Σẑ of the ℓ2-normalised embeddings ẑ and the number of non-zero rows, giving the
  mean pairwise cosine over *all* pairs, (‖Σẑ‖² − Σ‖ẑ‖²) / (N(N − 1));
* with ``paired_embeddings``, the paired similarity mean cos(z_i, p_i).

The covariance (O(d²) memory): the mean and the centred scatter matrix
M = Σ(z − μ)(z − μ)ᵀ in float64, from which M / N, its effective rank and
first-component share follow. M is ZᵀZ − Nμμᵀ, accumulated by pooling groups of
rows with the update of Chan et al. (1979) so that the tiny variance of nearly
collapsed embeddings is not lost to cancellation. It is exact with
``covariance_rows=None``; by default it takes 64 rows spread over each batch, because
the d×d product costs about 4 µs per row at d = 512 on a 2-core CPU, and for a whole
batch of 1,024 about a seventh of an ArcFace forward+backward (see
``benchmarks/bench_monitors.py``) — the rank estimate still converges as batches
accumulate, and ``counts["covariance_samples"]`` says how many rows it rests on.

Sampled, from the most recent ``sample_size`` rows (kept on the device, default
1,024 rows): every statistic that needs pairs of rows — the positive and
negative similarity distributions with their AUC and d′, alignment and uniformity
(Wang & Isola, 2020), the same-identity / different-identity cross similarities of
paired data — and the per-dimension std of ẑ. Their pair counts are reported.

:meth:`~EmbeddingHealthMonitor.update` makes no device-to-host sync; it keeps each
batch's per-row results and folds them into the running sums eight batches at a time
(every tensor operation costs microseconds of dispatch on CPU, whatever its size).
:meth:`~EmbeddingHealthMonitor.compute` folds what is pending, so a report always
covers every batch, and then interprets the sums.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .._checks import check_bool, check_embeddings, check_int, check_labels, check_matching_dim
from ..evaluation.verification import roc_auc
from ..similarity import ZERO_NORM, l2_normalize, pairwise_similarity, working_dtype
from ._distributed import (
    check_same_setup,
    fair_shares,
    gather_rows,
    gather_same_shape,
    max_across,
    process_count,
    process_index,
    reduce_min_max,
    sum_across,
)
from ._rows import spread_rows
from .diagnosis import Diagnosis, Severity, non_finite
from .report import MonitorReport

__all__ = ["EmbeddingHealthMonitor"]

# Thresholds, each justified in docs/guides/reading-the-diagnoses.rst.
#: update() keeps each batch's results and folds them into the float64 sums this many
#: batches at a time: every tensor operation costs microseconds of dispatch whatever its
#: size, and folding one batch takes some thirty of them.
FOLD_EVERY = 8
#: RankMe's ε added to each normalised singular value.
RANK_EPS = 1e-7
#: Total variance below this share of E‖z‖² is zero variance (float32 rounding level).
ZERO_VARIANCE = 1e-10
#: complete_collapse: centred relative variance at or below this, when the identities do
#: not separate: typical distances sqrt(2 x 1e-3) = 0.045 of the norm, under a quarter of a
#: 0.2 triplet margin.
COLLAPSE_VARIANCE = 1e-3
#: mean_offset (info): mean pairwise cosine at or above this (unit-sphere distances <= 0.2)
#: while the centred spread is not collapsed: a common offset dominates the scores.
OFFSET_COSINE = 0.98
#: Identities separate: same- vs different-label AUC above this. No error-severity
#: diagnosis of the embedding's geometry fires on an embedding that separates this well.
SEPARATED_AUC = 0.95
#: dimensional_collapse: effective rank below this share of the reference dimension
#: m = min(d, N - 1, C - 1). Null model: isotropic Gaussian data (or C random class means)
#: in m dimensions have a RankMe effective rank of at least 0.80 m (0.80 at N = m + 1,
#: 0.92 at N = 2m, 0.99 at N = 10m; measured for m = 9 to 512); the threshold is half of
#: that worst case.
RANK_FRACTION = 0.4
#: dimensional_collapse counts the classes of every labelled row in a bitmap of this many
#: label codes (label mod LABEL_CODES): exact for labels within any range of this many
#: consecutive ids, a lower bound otherwise; 64 KiB per monitor, combined across processes
#: by a maximum. The count matters only below d + 1 classes.
LABEL_CODES = 1 << 16
#: exploding_norms: mean norm of the most recent sample_size rows at least this multiple
#: of that of the first sample_size rows (three orders of magnitude) ...
NORM_GROWTH = 1e3
#: ... or a norm at or above this: a float32 sum of squares over 1,024 such rows (a batch's
#: Σ‖z‖², a covariance trace) overflows, sqrt(3.4e38 / 1024).
NORM_LIMIT = math.sqrt(float(torch.finfo(torch.float32).max) / 1024)
#: A note is added when fewer than this many samples per dimension were seen.
SAMPLES_PER_DIM = 10
#: no_separation: AUC of positive vs negative similarities below this.
SEPARATION_AUC = 0.6
#: Pair statistics need at least this many pairs of each kind.
MIN_PAIRS = 10
#: paired_shortcut (error): the probes' same- vs different-identity AUC against the other
#: rows' paired embeddings below this (halfway between no separation, 0.5, and perfect, 1)
#: -- the identity does not explain the match -- besides the two gaps below.
SHORTCUT_AUC = 0.75
#: paired_shortcut: paired minus same-identity similarity at least this ...
SHORTCUT_GAP = 0.2
#: ... and at least this share of paired minus different-identity similarity.
SHORTCUT_SHARE = 0.5


@dataclass
class _HealthState:
    seen: int  # rows passed to update; those not finite are seen - rows counted
    # (4,) float64: rows counted (finite), Σ‖z‖, Σ‖z‖², rows with a non-zero norm (= Σ‖ẑ‖²)
    row_sums: Tensor
    covariance_n: Tensor  # rows that entered the covariance (float64, exact)
    mean: Tensor  # (d,) float64, mean of those rows
    scatter: Tensor  # (d, d) float64, centred
    # Σ of the pending batches' centred scatters (each about its own batch mean), in the
    # working dtype fixed by the first batch; folded into `scatter` with the batch means
    # (see _fold).
    pending_scatter: Tensor  # (d, d)
    # Centred covariance rows not yet in pending_scatter: the product waits until about d
    # rows are there (see _add_scatter).
    pending_rows: list[Tensor]
    # (2,) float64: Σ of the batches' within-batch scatter traces, and the rows of the
    # batches with at least two covariance rows (the within-batch variance, see _fold)
    within_batch: Tensor
    min_norm: Tensor
    max_norm: Tensor
    sum_unit: Tensor  # (d,) Σẑ
    # (3,) float64: rows with a usable pair, Σ cos(z_i, p_i) over them, non-finite paired rows
    paired_sums: Tensor
    # (2,) float64: Σ‖z‖ and finite rows of the first batches, until sample_size rows were seen
    early_norms: Tensor
    # (LABEL_CODES + 1,) uint8, with labels: 1 where a finite row had label ≡ code mod
    # LABEL_CODES (the last entry collects the non-finite rows)
    label_seen: Tensor | None
    # The most recent batches' last rows, until they are no longer among the last
    # sample_size rows (see _store_sample).
    recent: deque[_RecentRows]
    recent_rows: int


class _RecentRows(NamedTuple):
    embeddings: Tensor  # (b, d), non-finite rows zeroed
    usable: Tensor  # (b,) bool: finite, and with a finite paired row when paired data is given
    labels: Tensor | None  # (b,)
    paired: Tensor | None  # (b, d)


@dataclass
class _BatchFacts:
    """What update() keeps of one batch until it is folded into the running sums."""

    covariance_rows: Tensor  # () finite rows that entered the pending scatter
    covariance_mean: Tensor  # (d,) their mean
    finite: Tensor  # (b,) bool
    norms: Tensor  # (b,) 0 for non-finite rows
    unit_sum: Tensor  # (d,) Σẑ of the batch
    paired_cos: Tensor | None  # (b,) cos(z_i, p_i)
    paired_finite: Tensor | None  # (b,) bool


class EmbeddingHealthMonitor:
    """Norms, spread, effective rank, separation and paired shortcut of embeddings.

    Parameters
    ----------
    sample_size : int
        Rows kept (the most recent ones) for the pairwise statistics; at least 2.
        The pair statistics of one ``compute()`` cost O(sample_size² · d).
    covariance_rows : int or None
        Rows of each batch (every k-th, spread over it) that enter the covariance;
        ``None`` for all rows (exact, about 4× the update cost at batch 1,024 and
        d = 512). Default 64.
    sync_on_compute : bool
        Under ``torch.distributed`` (DDP), combine the state of every process in
        :meth:`compute` (default): sums, covariance and norm range over all batches, and
        the pair statistics over the most recent ``sample_size`` rows, an even share
        from each process (a process with fewer rows leaves its share to the others).
        Every process must then call :meth:`compute`, after at least one update.
        ``False`` reports on this process's batches alone. Outside ``torch.distributed``
        it changes nothing.
    process_group : optional
        The ``torch.distributed`` group to combine over (default: all processes).

    Examples
    --------
    >>> monitor = EmbeddingHealthMonitor()
    >>> for images, labels in loader:                                  # doctest: +SKIP
    ...     monitor.update(model(images), labels)
    >>> report = monitor.compute()                                     # doctest: +SKIP
    >>> report["effective_rank"], report.codes                         # doctest: +SKIP

    Notes
    -----
    Statistics (keys of the report):

    * exact: ``num_samples``, ``mean_norm``, ``norm_std``, ``min_norm``, ``max_norm``,
      ``mean_pairwise_cosine``, ``paired_similarity``, ``early_mean_norm`` (mean norm of
      the first ``sample_size`` rows, in whole batches); with labels,
      ``counts["label_classes"]`` (distinct labels of every finite row);
    * from the covariance (``covariance_rows`` of each batch): ``effective_rank``
      (RankMe: σ_k = sqrt of the eigenvalues of the centred covariance M / N,
      p_k = σ_k / Σσ + ε with ε = 1e-7, erank = exp(−Σ p_k log p_k);
      1 for rank-one data, at most min(N − 1, d), and **0 when the variance is zero**),
      ``first_pc_variance_share`` (largest eigenvalue / trace; NaN at zero variance),
      ``relative_variance`` (trace of the covariance / E‖z‖²: 0 when every embedding
      is the same, 1 for centred data), ``within_batch_relative_variance`` (the same
      for the spread inside each batch, pooled: 0 when every batch is one point, even
      a point that moves between batches; measured on the sampled covariance rows, NaN
      without a batch of two finite ones);
    * sampled: ``recent_mean_norm`` (mean norm of the sample), ``normalized_std`` (mean
      over dimensions of the std of ẑ; about 1/√d when isotropic, 0 when collapsed),
      ``mean_positive_similarity``,
      ``mean_negative_similarity``, ``positive_similarity_std``,
      ``negative_similarity_std``, ``auc`` (probability that a same-label pair is more
      similar than a different-label pair, ties ½),
      ``d_prime`` ((μ₊ − μ₋) / sqrt((σ₊² + σ₋²) / 2)), ``alignment`` (mean ‖ẑ_i − ẑ_j‖²
      over same-label pairs), ``uniformity`` (log mean exp(−2‖ẑ_i − ẑ_j‖²) over all
      pairs: 0 when collapsed, towards −4 when uniform on the sphere),
      ``same_identity_similarity`` and ``different_identity_similarity`` (mean
      cos(z_i, p_j), j ≠ i, same / different label).
    """

    def __init__(
        self,
        sample_size: int = 1024,
        *,
        covariance_rows: int | None = 64,
        sync_on_compute: bool = True,
        process_group: Any = None,
    ) -> None:
        self.sample_size = check_int(sample_size, "sample_size", low=2)
        self.covariance_rows = (
            None if covariance_rows is None else check_int(covariance_rows, "covariance_rows", low=2)
        )
        self.sync_on_compute = check_bool(sync_on_compute, "sync_on_compute")
        self.process_group = process_group
        self._state: _HealthState | None = None
        self._with_labels = False
        self._with_paired = False
        self._pending: list[_BatchFacts] = []

    def __repr__(self) -> str:
        seen = 0 if self._state is None else self._state.seen
        return (
            f"EmbeddingHealthMonitor(sample_size={self.sample_size}, covariance_rows={self.covariance_rows}, "
            f"sync_on_compute={self.sync_on_compute}, seen={seen})"
        )

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._state = None
        self._pending = []

    def _new_state(self, z: Tensor, with_labels: bool, with_paired: bool) -> _HealthState:
        d, device = z.shape[1], z.device

        def f64(*shape: int, fill: float = 0.0) -> Tensor:
            return torch.full(shape, fill, dtype=torch.float64, device=device)

        self._with_labels, self._with_paired = with_labels, with_paired
        return _HealthState(
            seen=0,
            covariance_n=f64(),
            mean=f64(d),
            scatter=f64(d, d),
            pending_scatter=torch.zeros((d, d), dtype=z.dtype, device=device),
            pending_rows=[],
            within_batch=f64(2),
            row_sums=f64(4),
            min_norm=f64(fill=math.inf),
            max_norm=f64(fill=-math.inf),
            sum_unit=f64(d),
            paired_sums=f64(3),
            early_norms=f64(2),
            label_seen=torch.zeros(LABEL_CODES + 1, dtype=torch.uint8, device=device)
            if with_labels
            else None,
            recent=deque(),
            recent_rows=0,
        )

    def update(self, embeddings: Tensor, labels: Any = None, paired_embeddings: Tensor | None = None) -> None:
        """Accumulate one batch.

        Parameters
        ----------
        embeddings : Tensor of shape (batch_size, embedding_dim)
            Any floating dtype (kept in float32 or float64); detached. Rows with
            NaN/inf are counted and left out.
        labels : Tensor, ndarray or sequence of int, of shape (batch_size,), optional
            Identity labels; needed for the separation and paired-shortcut statistics.
            Pass them on the embeddings' device: copying them over waits for a GPU.
        paired_embeddings : Tensor of shape (batch_size, embedding_dim), optional
            The embedding each row was trained or validated against (e.g. the
            high-resolution image paired with each super-resolved probe).

        Raises
        ------
        ValueError
            On wrong shapes, or when ``labels``/``paired_embeddings`` are given in
            some updates but not in others since the last reset.
        """
        check_embeddings(embeddings, "embeddings", check_finite=False)
        b = embeddings.shape[0]
        device = embeddings.device
        if labels is not None:
            labels = check_labels(labels, b, "labels", device=device)
        if paired_embeddings is not None:
            check_embeddings(paired_embeddings, "paired_embeddings", check_finite=False)
            check_matching_dim(embeddings, paired_embeddings, "embeddings", "paired_embeddings")
            if paired_embeddings.shape[0] != b:
                raise ValueError(
                    f"paired_embeddings has {paired_embeddings.shape[0]} rows but embeddings has {b}; "
                    "expected one paired embedding per row"
                )
            if paired_embeddings.device != device:
                raise ValueError(
                    f"paired_embeddings is on {paired_embeddings.device} but embeddings is on {device}; "
                    "expected both on the same device"
                )
        z = embeddings.detach().to(working_dtype(embeddings.dtype))
        if self._state is None:
            self._state = self._new_state(z, labels is not None, paired_embeddings is not None)
        state = self._state
        self._check_consistent(state, z, labels is not None, paired_embeddings is not None)
        # The first batch fixes the working dtype (float32, or float64 for float64 input).
        dtype = state.pending_scatter.dtype
        z = z.to(dtype)
        with torch.no_grad():
            z, finite, copied = _zero_non_finite_rows(z)
            count, mean = self._add_scatter(state, z, finite)
            norms = torch.linalg.vector_norm(z, dim=1)
            inverse_norm = _inverse(norms)
            # Σẑ = Σ z_i / ‖z_i‖ with zero rows left out, as l2_normalize does, as one
            # vector-matrix product (the norms are needed anyway).
            facts = _BatchFacts(count, mean, finite, norms, inverse_norm @ z, None, None)
            if state.seen < self.sample_size:
                state.early_norms += torch.stack([norms.sum(), finite.sum()]).double()
            if labels is not None and state.label_seen is not None:
                # The low 16 bits: label mod LABEL_CODES, also for negative labels.
                codes = torch.where(finite, labels & (LABEL_CODES - 1), LABEL_CODES)
                state.label_seen.index_fill_(0, codes, 1)
            paired, usable = None, finite
            if paired_embeddings is not None:
                # Not zeroed: a NaN/inf paired row has a non-finite norm (and cosine), is
                # flagged unusable, and is left out wherever it is read.
                paired = paired_embeddings.detach().to(dtype)
                paired_norm = torch.linalg.vector_norm(paired, dim=1)
                facts.paired_finite = paired_norm.isfinite()
                usable = finite & facts.paired_finite
                facts.paired_cos = torch.linalg.vecdot(z, paired) * inverse_norm * _inverse(paired_norm)
            # z is the caller's tensor unless a dtype conversion or the zeroing copied it.
            own = copied or z.data_ptr() != embeddings.data_ptr()
            self._store_sample(state, z, usable, labels, paired, own=own)
        state.seen += b
        self._pending.append(facts)
        if len(self._pending) >= FOLD_EVERY:
            self._fold()

    def _check_consistent(self, state: _HealthState, z: Tensor, with_labels: bool, with_paired: bool) -> None:
        if z.shape[1] != state.mean.shape[0]:
            raise ValueError(
                f"embeddings has embedding_dim {z.shape[1]} but earlier batches had {state.mean.shape[0]}; "
                "call reset() between models"
            )
        if z.device != state.mean.device:
            raise ValueError(
                f"embeddings is on {z.device} but earlier batches were on {state.mean.device}; "
                "call reset() before switching devices"
            )
        checks = (
            (with_labels, self._with_labels, "labels"),
            (with_paired, self._with_paired, "paired_embeddings"),
        )
        for given, kept, name in checks:
            if given != kept:
                raise ValueError(
                    f"{name} was {'given' if given else 'not given'} in this update but "
                    f"{'given' if kept else 'not given'} in earlier ones; pass it in every update "
                    "or in none since the last reset()"
                )

    def _add_scatter(self, state: _HealthState, z: Tensor, finite: Tensor) -> tuple[Tensor, Tensor]:
        """Centre the batch's covariance rows; their scatter joins the pending sum later.

        Returns their number (finite rows) and mean, which :meth:`_fold` needs to
        combine the batches.
        """
        rows = spread_rows(z.shape[0], self.covariance_rows)
        head, weight = z[rows], finite[rows].to(z.dtype)
        count = weight.sum()
        mean = head.sum(dim=0).div_(count.clamp_min(1))
        # head - mean on finite rows, 0 on the zeroed ones: one fused pass.
        state.pending_rows.append(torch.addmm(head, weight[:, None], mean[None, :], alpha=-1))
        # One d x d product per d rows or so, rather than one per batch: with 64 rows the
        # product reads and writes the whole d x d sum for little work, and in a training
        # step that sum has left the cache (bench_monitors). Waiting longer would hold
        # more rows than the sum itself.
        if sum(r.shape[0] for r in state.pending_rows) >= z.shape[1]:
            _flush_rows(state)
        return count, mean

    def _fold(self) -> None:
        """Fold the pending batches into the running float64 sums (no host sync).

        The covariance pools groups: the running rows and each pending batch, each with
        its count n_g, mean μ_g and centred scatter M_g. With μ the pooled mean,
        M = Σ M_g + Σ n_g (μ_g − μ)(μ_g − μ)ᵀ (Chan et al., 1979): every term is a
        deviation from a mean, so the tiny variance of nearly collapsed embeddings is
        not lost to cancellation. Summing a few batches' M_g in float32 first adds
        rounding far below the rank cutoff λ_max · d · ε of :meth:`_global_statistics`.
        """
        state, batches = self._state, self._pending
        self._pending = []
        if state is None or not batches:
            return
        with torch.no_grad():
            counts = torch.cat(
                [state.covariance_n[None], torch.stack([b.covariance_rows for b in batches]).double()]
            )
            means = torch.cat([state.mean[None], torch.stack([b.covariance_mean for b in batches]).double()])
            total, mean, deviations = _pool(counts, means)
            _flush_rows(state)
            # Before the between-batch terms join: the spread inside the batches alone.
            rows = counts[1:] * (counts[1:] >= 2)
            within = torch.stack([state.pending_scatter.diagonal().sum().double(), rows.sum()])
            state.within_batch += within
            state.scatter.add_(state.pending_scatter).addmm_(deviations.T, deviations)
            state.pending_scatter.zero_()
            state.mean, state.covariance_n = mean, total

            finite = torch.cat([b.finite for b in batches])
            norms = torch.cat([b.norms for b in batches])
            wide = norms.double()  # squared in float64: the spread of near-constant norms is tiny
            per_row = torch.stack([finite.double(), wide, wide * wide, (norms > ZERO_NORM).double()])
            state.row_sums += per_row.sum(dim=1)
            state.min_norm = torch.minimum(
                state.min_norm, torch.where(finite, norms, math.inf).min().double()
            )
            state.max_norm = torch.maximum(state.max_norm, norms.max().double())
            state.sum_unit += torch.stack([b.unit_sum for b in batches]).sum(dim=0).double()

            if batches[0].paired_cos is not None:
                cos = torch.cat([b.paired_cos for b in batches if b.paired_cos is not None])
                paired_finite = torch.cat([b.paired_finite for b in batches if b.paired_finite is not None])
                usable = finite & paired_finite
                paired = torch.stack(
                    [usable.to(cos.dtype), torch.where(usable, cos, 0.0), (~paired_finite).to(cos.dtype)]
                )
                state.paired_sums += paired.double().sum(dim=1)

    def _store_sample(
        self,
        state: _HealthState,
        z: Tensor,
        usable: Tensor,
        labels: Tensor | None,
        paired: Tensor | None,
        *,
        own: bool,
    ) -> None:
        """Keep the batch's last rows for the pair statistics.

        ``z`` is kept by reference when it is this monitor's ``own`` (zeroed) copy, unless
        the batch is larger than the sample (a view would keep the whole batch alive);
        the caller's tensors (z otherwise, the labels and paired rows) are copied.
        """
        start = max(z.shape[0] - self.sample_size, 0)
        rows = slice(start, None)
        state.recent.append(
            _RecentRows(
                z[rows].clone() if start or not own else z,
                usable[rows],
                None if labels is None else labels[rows].clone(),
                None if paired is None else paired[rows].clone(),
            )
        )
        state.recent_rows += state.recent[-1].usable.shape[0]
        while state.recent_rows - state.recent[0].usable.shape[0] >= self.sample_size:
            state.recent_rows -= state.recent.popleft().usable.shape[0]

    def _combined_across_processes(self, s: _HealthState) -> _HealthState:
        """The state of every process combined (a copy; see ``sync_on_compute``)."""
        group = self.process_group
        setup = {
            "embedding_dim": s.mean.shape[0],
            "labels": int(self._with_labels),
            "paired_embeddings": int(self._with_paired),
            "bytes_per_value": s.pending_scatter.element_size(),
        }
        check_same_setup(setup, "EmbeddingHealthMonitor", s.mean.device, group)
        # The covariance pools the processes' groups of rows as _fold pools batches.
        groups = gather_same_shape(torch.cat([s.covariance_n[None], s.mean]), group)
        total, mean, deviations = _pool(groups[:, 0], groups[:, 1:])
        seen = torch.tensor([s.seen], dtype=torch.int64, device=s.mean.device)
        parts = [seen, s.row_sums, s.scatter, s.within_batch, s.sum_unit, s.paired_sums, s.early_norms]
        seen, row_sums, scatter, within_batch, sum_unit, paired_sums, early_norms = sum_across(parts, group)
        scatter.addmm_(deviations.T, deviations)
        min_norm, max_norm = reduce_min_max(s.min_norm, s.max_norm, group)
        # A class seen by any process is seen.
        label_seen = None if s.label_seen is None else max_across(s.label_seen, group)
        # Each process's most recent rows, sample_size in all: an even share from each,
        # and the shares of processes with fewer rows go to the others.
        kept = min(sum(rows.usable.shape[0] for rows in s.recent), self.sample_size)
        device = s.mean.device
        available = gather_same_shape(torch.tensor([kept], device=device), group)[:, 0].tolist()
        last = slice(kept - fair_shares(available, self.sample_size)[process_index(group)], None)
        usable = gather_rows(torch.cat([rows.usable for rows in s.recent])[last], group)
        recent = _RecentRows(
            gather_rows(torch.cat([rows.embeddings for rows in s.recent])[last], group),
            usable,
            gather_rows(torch.cat([r.labels for r in s.recent if r.labels is not None])[last], group)
            if self._with_labels
            else None,
            gather_rows(torch.cat([r.paired for r in s.recent if r.paired is not None])[last], group)
            if self._with_paired
            else None,
        )
        return dataclasses.replace(
            s,
            seen=int(seen[0]),
            row_sums=row_sums,
            covariance_n=total,
            mean=mean,
            scatter=scatter,
            within_batch=within_batch,
            min_norm=min_norm,
            max_norm=max_norm,
            sum_unit=sum_unit,
            paired_sums=paired_sums,
            early_norms=early_norms,
            label_seen=label_seen,
            recent=deque([recent]),
            recent_rows=usable.shape[0],
        )

    # ------------------------------------------------------------------------------ compute
    def compute(self) -> MonitorReport:
        """Statistics over every batch since the last reset, and their diagnoses.

        Returns
        -------
        MonitorReport
            Mapping of the statistics listed in the class notes, with ``.diagnoses``.

        Raises
        ------
        ValueError
            Before any update.
        """
        if self._state is None:
            raise ValueError("EmbeddingHealthMonitor.compute() called before any update(); nothing to report")
        self._fold()
        s = self._state
        if self.sync_on_compute and process_count(self.process_group) > 1:
            s = self._combined_across_processes(s)
        n, d = int(s.row_sums[0]), s.mean.shape[0]
        bad_rows = s.seen - n
        diagnoses: list[Diagnosis] = []
        notes: list[str] = []
        counts = {"samples": n, "non_finite_rows": bad_rows, "embedding_dim": d}
        if self._with_paired:
            paired_bad = int(s.paired_sums[2])
            counts["paired_non_finite_rows"] = paired_bad
            if bad_rows or paired_bad:
                what = "rows of embeddings and paired_embeddings"
                diagnoses.append(non_finite(bad_rows + paired_bad, 2 * s.seen, what))
        elif bad_rows:
            diagnoses.append(non_finite(bad_rows, s.seen, "embeddings"))
        if n == 0:
            notes.append("every embedding held NaN or inf")
            return MonitorReport(
                "embedding health", {}, counts=counts, notes=notes, diagnoses=tuple(diagnoses)
            )

        nc = int(s.covariance_n)
        counts["covariance_samples"] = nc
        label_classes = None
        if s.label_seen is not None:
            label_classes = int(s.label_seen[:LABEL_CODES].sum())
            counts["label_classes"] = label_classes
        metrics = self._global_statistics(s, n, nc)
        caution = None
        if nc < SAMPLES_PER_DIM * d:
            caution = (
                f"N = {nc} samples in the covariance for d = {d} dimensions: the effective rank is at "
                f"most N - 1 = {nc - 1} and biased low until N is well above d "
                f"(aim for N >= {SAMPLES_PER_DIM * d})"
            )
            notes.append(caution)
        sample = self._sample_statistics(s)
        metrics.update(sample.metrics)
        counts.update(sample.counts)
        notes += sample.notes

        separated = _separated(metrics, sample.counts)
        collapse = None
        if n < 2:
            # One embedding has no spread to judge: not a collapse.
            notes.append("a single finite embedding: spread, rank and separation need at least two")
        else:
            collapse = _complete_collapse(metrics, n, separated)
        if collapse is not None:
            diagnoses.append(collapse)
        elif n >= 2:
            offset = _mean_offset(metrics, n, separated)
            if offset is not None:
                diagnoses.append(offset)
            dimensional = _dimensional_collapse(metrics, nc, d, label_classes, caution)
            if dimensional is not None:
                diagnoses.append(dimensional)
        exploding = _exploding_norms(metrics, n)
        if exploding is not None:
            diagnoses.append(exploding)
        separation = _no_separation(metrics, sample.counts, collapsed=collapse is not None)
        if separation is not None:
            diagnoses.append(separation)
        shortcut = _paired_shortcut(metrics, sample.counts, separated)
        if shortcut is not None:
            diagnoses.append(shortcut)
        return MonitorReport(
            "embedding health", metrics, counts=counts, notes=notes, diagnoses=tuple(diagnoses)
        )

    @staticmethod
    def _global_statistics(s: _HealthState, n: int, nc: int) -> dict[str, float]:
        # numpy's LAPACK call: several times faster than torch.linalg.eigvalsh on CPU here.
        covariance = (s.scatter / max(nc, 1)).cpu().numpy()
        eigenvalues = torch.from_numpy(np.linalg.eigvalsh(covariance)).clamp_min(0.0)
        # Numerical rank (numpy.linalg.matrix_rank's rule): eigenvalues below
        # λ_max · d · ε of the embeddings' dtype are rounding noise of the batch products.
        # Zero them, or their square roots would inflate the effective rank of data that
        # lies exactly in a subspace (rank-2 float32 data would read as 2.05).
        cutoff = float(eigenvalues.max()) * covariance.shape[0] * torch.finfo(s.pending_scatter.dtype).eps
        eigenvalues = torch.where(eigenvalues > cutoff, eigenvalues, 0.0)
        trace = float(eigenvalues.sum())
        _, sum_norm, sum_sq_norm, nonzero = s.row_sums.tolist()
        mean_sq_norm = sum_sq_norm / n
        relative_variance = trace / mean_sq_norm if mean_sq_norm > 0 else 0.0
        if relative_variance <= ZERO_VARIANCE:
            # Zero variance is complete collapse: no direction of variation, rank 0.
            effective_rank, first_share = 0.0, math.nan
        else:
            singular = eigenvalues.sqrt()
            p = singular / singular.sum() + RANK_EPS
            effective_rank = float(torch.exp(-(p * p.log()).sum()))
            first_share = float(eigenvalues.max()) / trace
        mean_norm = sum_norm / n
        unit_sum = s.sum_unit.cpu()
        within_trace, within_rows = s.within_batch.tolist()
        within_variance = (
            within_trace / within_rows / mean_sq_norm if within_rows and mean_sq_norm > 0 else math.nan
        )
        metrics = {
            "num_samples": int(n),
            "mean_norm": mean_norm,
            "norm_std": math.sqrt(max(mean_sq_norm - mean_norm**2, 0.0)),
            "min_norm": float(s.min_norm),
            "max_norm": float(s.max_norm),
            "effective_rank": effective_rank,
            "first_pc_variance_share": first_share,
            "relative_variance": min(relative_variance, 1.0),
            "within_batch_relative_variance": min(within_variance, 1.0),
            # (‖Σẑ‖² − Σ‖ẑ‖²) / (N(N − 1)), with Σ‖ẑ‖² = the number of non-zero rows.
            "mean_pairwise_cosine": (
                (float(unit_sum @ unit_sum) - nonzero) / (n * (n - 1)) if n > 1 else math.nan
            ),
        }
        early_sum, early_rows = s.early_norms.tolist()
        metrics["early_mean_norm"] = early_sum / early_rows if early_rows else math.nan
        paired_count, paired_cos_sum, _ = s.paired_sums.tolist()
        if paired_count > 0:
            metrics["paired_similarity"] = paired_cos_sum / paired_count
        return metrics

    def _sample_statistics(self, s: _HealthState) -> _SampleStatistics:
        out = _SampleStatistics()
        last = slice(-self.sample_size, None)
        usable = torch.cat([rows.usable for rows in s.recent])[last]
        z = torch.cat([rows.embeddings for rows in s.recent])[last][usable]
        m = z.shape[0]
        out.counts["sample_rows"] = m
        if m:
            out.metrics["recent_mean_norm"] = float(torch.linalg.vector_norm(z, dim=1).double().mean())
        if m < 2:
            return out
        upper = torch.triu(torch.ones(m, m, dtype=torch.bool, device=z.device), diagonal=1)
        unit = l2_normalize(z)
        out.metrics["normalized_std"] = float(unit.double().std(dim=0, correction=0).mean())
        cos = pairwise_similarity(z)
        unit_sq_dist = (2.0 - 2.0 * cos).clamp_min(0.0)
        # Uniformity: log of the mean of exp(-2 ||ẑ_i - ẑ_j||²) over all pairs i < j.
        values = -2.0 * unit_sq_dist[upper].double()
        out.metrics["uniformity"] = float(torch.logsumexp(values, dim=0)) - math.log(values.numel())
        if not self._with_labels:
            return out
        labels = torch.cat([rows.labels for rows in s.recent if rows.labels is not None])[last][usable]
        same = labels[:, None] == labels[None, :]
        positive, negative = upper & same, upper & ~same
        out.counts["positive_pairs"] = int(positive.sum())
        out.counts["negative_pairs"] = int(negative.sum())
        if out.counts["positive_pairs"] > 0:
            out.metrics["alignment"] = float(unit_sq_dist[positive].double().mean())
        pos = cos[positive].double().cpu().numpy()
        neg = cos[negative].double().cpu().numpy()
        out.metrics.update(_separation(pos, neg))
        if self._with_paired:
            paired = torch.cat([rows.paired for rows in s.recent if rows.paired is not None])[last][usable]
            cross = pairwise_similarity(z, paired)
            off_diagonal = ~torch.eye(m, dtype=torch.bool, device=z.device)
            same_identity, different_identity = off_diagonal & same, ~same
            out.counts["same_identity_pairs"] = int(same_identity.sum())
            out.counts["different_identity_pairs"] = int(different_identity.sum())
            if out.counts["same_identity_pairs"]:
                out.metrics["same_identity_similarity"] = float(cross[same_identity].double().mean())
            else:
                out.notes.append(
                    "no two rows of the sample share a label, so the paired similarity cannot be compared "
                    "with same-identity similarity; use P x K batches (PKSampler) with K >= 2"
                )
            if out.counts["different_identity_pairs"]:
                out.metrics["different_identity_similarity"] = float(
                    cross[different_identity].double().mean()
                )
            if out.counts["same_identity_pairs"] and out.counts["different_identity_pairs"]:
                # Does the identity explain the match? Same- vs different-identity cross
                # similarities, ranked like a verification score.
                scores = torch.cat([cross[same_identity], cross[different_identity]]).double().cpu().numpy()
                genuine = np.zeros(scores.size, dtype=bool)
                genuine[: out.counts["same_identity_pairs"]] = True
                out.metrics["cross_identity_auc"] = roc_auc(scores, genuine)
        return out


#: Devices whose results the host reads without waiting: update() may branch on them.
_FREE_FLAG_DEVICES = frozenset({"cpu"})


def _zero_non_finite_rows(x: Tensor) -> tuple[Tensor, Tensor, bool]:
    """x with NaN/inf rows set to zero, which rows were finite, and whether x was copied.

    No host sync on an accelerator, where the result is always a copy. On CPU, where
    reading a flag costs nothing, a batch without bad rows is returned as it is (the
    copy is a tenth of the update's time at batch 1,024, d = 512).
    """
    # A row holds NaN/inf exactly when its sum does (or when the sum overflows, which
    # needs values near 1e35): one reduction instead of an element-wise isfinite.
    finite = torch.isfinite(x.sum(dim=1))
    if x.device.type in _FREE_FLAG_DEVICES and bool(finite.all()):
        return x, finite, False
    # Weight 0 turns a bad row into zeros and NaNs (0 * inf), which nan_to_num_ zeroes;
    # finite rows hold no NaN/inf to change. Three times cheaper on CPU than torch.where.
    return (x * finite[:, None].to(x.dtype)).nan_to_num_(nan=0.0), finite, True


def _flush_rows(state: _HealthState) -> None:
    """Add the scatter of the waiting centred rows to ``pending_scatter``, in one product."""
    if state.pending_rows:
        rows = torch.cat(state.pending_rows) if len(state.pending_rows) > 1 else state.pending_rows[0]
        state.pending_scatter.addmm_(rows.T, rows)
        state.pending_rows.clear()


def _pool(counts: Tensor, means: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pool groups of rows given their counts (g,) and means (g, d), in float64.

    Returns the total count, the pooled mean and the rows √n_g (μ_g − μ) whose product
    DᵀD is the between-group scatter Σ n_g (μ_g − μ)(μ_g − μ)ᵀ (Chan et al., 1979).
    """
    total = counts.sum()
    mean = (counts @ means) / total.clamp_min(1)
    return total, mean, (means - mean) * counts.sqrt()[:, None]


def _inverse(norms: Tensor) -> Tensor:
    """1 / norm, and 0 for (near-)zero norms, matching :func:`~embedkit.similarity.l2_normalize`."""
    return torch.where(norms > ZERO_NORM, 1.0 / norms.clamp_min(ZERO_NORM), 0.0)


@dataclass
class _SampleStatistics:
    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _separation(pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
    """Means, stds, AUC and d′ of positive vs negative similarities (empty when a side is empty)."""
    out: dict[str, float] = {}
    if pos.size:
        out["mean_positive_similarity"] = float(pos.mean())
        out["positive_similarity_std"] = float(pos.std())
    if neg.size:
        out["mean_negative_similarity"] = float(neg.mean())
        out["negative_similarity_std"] = float(neg.std())
    if pos.size and neg.size:
        scores = np.concatenate([pos, neg])
        genuine = np.concatenate([np.ones(pos.size, dtype=bool), np.zeros(neg.size, dtype=bool)])
        out["auc"] = roc_auc(scores, genuine)
        pooled = math.sqrt((pos.var() + neg.var()) / 2)
        gap = float(pos.mean() - neg.mean())
        out["d_prime"] = gap / pooled if pooled > 0 else math.nan
    return out


# ---------------------------------------------------------------------------------- diagnoses
def _separated(metrics: dict[str, float], counts: dict[str, int]) -> bool:
    """True when enough labelled pairs show that same-label pairs rank above different-label ones."""
    enough = counts.get("positive_pairs", 0) >= MIN_PAIRS and counts.get("negative_pairs", 0) >= MIN_PAIRS
    return enough and metrics.get("auc", math.nan) > SEPARATED_AUC


def _complete_collapse(metrics: dict[str, float], n: int, separated: bool) -> Diagnosis | None:
    # Centred spread, not the uncentred cosine: a healthy embedding plus a common offset
    # keeps its distances (and its ranking) and is no collapse (see _mean_offset).
    variance = metrics["relative_variance"]
    zero_variance = variance <= ZERO_VARIANCE
    # NaN (no batch of two rows) compares False.
    zero_within = metrics["within_batch_relative_variance"] <= ZERO_VARIANCE
    narrow = variance <= COLLAPSE_VARIANCE and not separated
    if not (zero_variance or zero_within or narrow):
        return None
    if zero_variance and metrics["max_norm"] == 0:
        what = f"all {n} embeddings are zero vectors (zero norm, zero variance)"
    elif zero_variance:
        what = f"all {n} embeddings are the same point (zero variance)"
    elif zero_within:
        what = (
            "within every batch all embeddings are the same point (zero within-batch variance); the point "
            f"moves between batches (relative variance over all {n} embeddings {variance:.2e})"
        )
    else:
        distance = math.sqrt(2 * variance)
        what = (
            f"the {n} embeddings have collapsed to nearly one point: centred relative variance "
            f"{variance:.2e} "
            f"(typical distance {distance:.3f} of the norm, below a quarter of a 0.2 triplet margin)"
        )
        if "auc" in metrics:
            what += f", and same-label pairs do not separate (AUC {metrics['auc']:.3f})"
    return Diagnosis(
        "complete_collapse",
        "error",
        what,
        evidence={
            "relative_variance": variance,
            "collapse_variance_threshold": COLLAPSE_VARIANCE,
            "within_batch_relative_variance": metrics["within_batch_relative_variance"],
            "zero_variance_threshold": ZERO_VARIANCE,
            "auc": metrics.get("auc", math.nan),
            "mean_pairwise_cosine": metrics["mean_pairwise_cosine"],
            "effective_rank": metrics["effective_rank"],
            "normalized_std": metrics.get("normalized_std", math.nan),
            "mean_norm": metrics["mean_norm"],
            "samples": n,
        },
        suggestion="Check that the network can pass its input through (residual connections, no dead ReLUs, "
        "inputs normalised) and that the loss sees informative pairs: with a triplet loss use "
        "batch-hard or semi-hard mining on P x K batches; lower the learning rate if it collapsed after "
        "a spike.",
    )


def _mean_offset(metrics: dict[str, float], n: int, separated: bool) -> Diagnosis | None:
    """Info: a common offset dominates the (uncentred) cosines, the centred spread is not collapsed."""
    cosine = metrics["mean_pairwise_cosine"]
    variance = metrics["relative_variance"]
    if not (cosine >= OFFSET_COSINE or variance <= COLLAPSE_VARIANCE):
        return None
    ranking = (
        f"same-label pairs still rank above different-label pairs (AUC {metrics['auc']:.3f})"
        if separated
        else "the spread around the offset is what carries the identity"
    )
    return Diagnosis(
        "mean_offset",
        "info",
        f"the embeddings share a common offset: mean pairwise cosine {cosine:.4f}, centred relative "
        f"variance {variance:.3g} ({1 - variance:.1%} of E|z|^2 is the mean); {ranking}. Cosine scores "
        "sit in a narrow band and a fixed distance margin sees small distances.",
        evidence={
            "mean_pairwise_cosine": cosine,
            "cosine_threshold": OFFSET_COSINE,
            "relative_variance": variance,
            "auc": metrics.get("auc", math.nan),
            "samples": n,
        },
        suggestion="Usually harmless for ranking; to use the whole sphere, centre the embeddings (subtract a "
        "running mean or add BatchNorm before the embedding) or use a scale-free loss (SupConLoss).",
    )


def _dimensional_collapse(
    metrics: dict[str, float], n: int, d: int, label_classes: int | None, caution: str | None
) -> Diagnosis | None:
    # The classes of every row seen, like the rank: counted over the last rows only, the
    # reference would depend on the sampler's order (P x K batches hold few classes each).
    reference = min(d, n - 1)
    basis = f"min(d, N - 1) = min({d}, {n - 1})"
    if label_classes is not None and label_classes >= 2:
        reference = min(reference, label_classes - 1)
        basis = f"min(d, N - 1, classes - 1) = min({d}, {n - 1}, {label_classes - 1})"
    threshold = RANK_FRACTION * reference
    rank = metrics["effective_rank"]
    if not rank < threshold:
        return None
    evidence: dict[str, Any] = {
        "effective_rank": rank,
        "rank_threshold": threshold,
        "reference_dimension": reference,
        "reference": basis,
        "first_pc_variance_share": metrics["first_pc_variance_share"],
        "samples": n,
        "embedding_dim": d,
    }
    if label_classes is not None:
        evidence["label_classes"] = label_classes
    if caution is not None:
        evidence["caution"] = caution
    return Diagnosis(
        "dimensional_collapse",
        "warning",
        f"the embeddings use about {rank:.1f} effective dimensions of {d} "
        f"(below {threshold:.1f} = {RANK_FRACTION:g} x {basis}); the first principal component holds "
        f"{metrics['first_pc_variance_share']:.1%} of the variance",
        evidence=evidence,
        suggestion="Add a projection head and monitor the representation before it, lower the weight decay "
        "or learning rate of the last layers, use stronger augmentations or more negatives; a "
        "decorrelation term (VICReg/Barlow Twins) counters it directly.",
    )


def _exploding_norms(metrics: dict[str, float], n: int) -> Diagnosis | None:
    """Warning: the norms grew by orders of magnitude, or near where float32 sums of squares overflow."""
    early, recent, largest = (
        metrics["early_mean_norm"],
        metrics.get("recent_mean_norm", math.nan),
        metrics["max_norm"],
    )
    growth = recent / early if early > 0 else math.nan
    grew = growth >= NORM_GROWTH  # NaN compares False
    overflowing = largest >= NORM_LIMIT
    if not (grew or overflowing):
        return None
    parts = []
    if grew:
        parts.append(
            f"the mean embedding norm grew {growth:.3g}-fold since the last reset ({early:.3g} in the "
            f"first rows, {recent:.3g} in the most recent ones; the threshold is {NORM_GROWTH:,.0f}-fold)"
        )
    if overflowing:
        parts.append(
            f"the largest norm {largest:.3g} is at or above {NORM_LIMIT:.3g}, where a float32 sum of "
            "squares over a batch of 1,024 such rows overflows"
        )
    return Diagnosis(
        "exploding_norms",
        "warning",
        "; and ".join(parts),
        evidence={
            "norm_growth": growth,
            "growth_threshold": NORM_GROWTH,
            "early_mean_norm": early,
            "recent_mean_norm": recent,
            "mean_norm": metrics["mean_norm"],
            "max_norm": largest,
            "norm_limit": NORM_LIMIT,
            "auc": metrics.get("auc", math.nan),
            "samples": n,
        },
        suggestion="Lower the learning rate or clip gradients; a loss on unnormalised embeddings that "
        "rewards distance without bound (a soft-margin triplet or a contrastive loss without margin) grows "
        "them: L2-normalise the embeddings in the loss, or add weight decay or a norm penalty. If the first "
        "embeddings were near zero by design (a zero-initialised head), the growth is expected.",
    )


def _no_separation(
    metrics: dict[str, float], counts: dict[str, int], *, collapsed: bool = False
) -> Diagnosis | None:
    if "auc" not in metrics:
        return None
    if counts.get("positive_pairs", 0) < MIN_PAIRS or counts.get("negative_pairs", 0) < MIN_PAIRS:
        return None
    auc = metrics["auc"]
    if not auc < SEPARATION_AUC:
        return None
    if collapsed:
        # Point to the cause instead of repeating it.
        message = (
            f"same-label pairs do not separate (AUC {auc:.3f}) because the embeddings have collapsed: "
            "see complete_collapse"
        )
    else:
        message = (
            f"same-label pairs are barely more similar than different-label pairs: AUC {auc:.3f} "
            f"(0.5 = no separation), mean similarity {metrics['mean_positive_similarity']:.3f} vs "
            f"{metrics['mean_negative_similarity']:.3f}"
        )
    return Diagnosis(
        "no_separation",
        "warning",
        message,
        evidence={
            "auc": auc,
            "auc_threshold": SEPARATION_AUC,
            "d_prime": metrics["d_prime"],
            "mean_positive_similarity": metrics["mean_positive_similarity"],
            "mean_negative_similarity": metrics["mean_negative_similarity"],
            "positive_pairs": counts["positive_pairs"],
            "negative_pairs": counts["negative_pairs"],
        },
        suggestion="The embedding does not group identities: train it with a loss on same-identity pairs "
        "(SupConLoss or a triplet loss on P x K batches) and evaluate gallery-probe retrieval, not a "
        "classifier head or a paired similarity.",
    )


def _paired_shortcut(metrics: dict[str, float], counts: dict[str, int], separated: bool) -> Diagnosis | None:
    keys = ("paired_similarity", "same_identity_similarity", "different_identity_similarity")
    if any(key not in metrics for key in keys):
        return None
    if (
        counts.get("same_identity_pairs", 0) < MIN_PAIRS
        or counts.get("different_identity_pairs", 0) < MIN_PAIRS
    ):
        return None
    paired, same, different = (metrics[key] for key in keys)
    gap = paired - same
    margin = paired - different
    if not (gap >= SHORTCUT_GAP and gap >= SHORTCUT_SHARE * margin):
        return None
    cross_auc = metrics.get("cross_identity_auc", math.nan)
    # An error only when the identity does not explain the match: the same-identity cross
    # similarities barely rank above the different-identity ones. Otherwise the pairing
    # overstates a working embedding, which is worth a note, not an alarm.
    shortcut = not separated and not cross_auc >= SHORTCUT_AUC
    severity: Severity
    if shortcut:
        severity, message = (
            "error",
            f"paired similarity {paired:.4f} but only {same:.4f} with other images of the same identity "
            f"(and {different:.4f} with other identities; same- vs different-identity AUC {cross_auc:.3f}): "
            "the pairing, not the identity, is what matches",
        )
    else:
        severity, message = (
            "info",
            f"paired similarity {paired:.4f} overstates the match of other images of the same identity "
            f"({same:.4f}); the identities still separate (same- vs different-identity AUC "
            f"{cross_auc:.3f}), so report gallery-probe retrieval rather than the paired similarity",
        )
    return Diagnosis(
        "paired_shortcut",
        severity,
        message,
        evidence={
            "cross_identity_auc": cross_auc,
            "cross_auc_threshold": SHORTCUT_AUC,
            "paired_similarity": paired,
            "same_identity_similarity": same,
            "different_identity_similarity": different,
            "gap": gap,
            "gap_threshold": SHORTCUT_GAP,
            "gap_share_of_margin": gap / margin if margin > 0 else math.inf,
            "share_threshold": SHORTCUT_SHARE,
            "same_identity_pairs": counts["same_identity_pairs"],
        },
        suggestion="Validate with gallery-probe matching on disjoint images (embedkit.evaluation), and train "
        "with a loss that pulls together every image of an identity, e.g. SupConLoss(embeddings, labels, "
        "ref_embeddings=paired, ref_labels=labels) on P x K batches.",
    )
