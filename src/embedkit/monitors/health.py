"""Embedding-health monitor: spread, rank, separation and the paired-similarity shortcut.

:class:`EmbeddingHealthMonitor` watches the embeddings themselves and names the
failures of case studies 03 and 04: every embedding the same point
(``complete_collapse``), embeddings confined to a few directions
(``dimensional_collapse``), same-identity pairs no closer than different-identity
pairs (``no_separation``), a paired similarity that does not carry over to other
images of the same identity (``paired_shortcut``), and NaN/inf rows (``non_finite``).

What is exact and what is sampled
---------------------------------
Exact over every row since the last reset (streaming sums, O(d) memory):

* N, the norm statistics (Σ‖z‖, Σ‖z‖², min, max) and the non-finite row count;
* Σẑ of the ℓ2-normalised embeddings ẑ and the number of non-zero rows, giving the
  mean pairwise cosine over *all* pairs, (‖Σẑ‖² − Σ‖ẑ‖²) / (N(N − 1));
* with ``paired_embeddings``, the paired similarity mean cos(z_i, p_i).

The covariance (O(d²) memory): the mean and the centred scatter matrix
M = Σ(z − μ)(z − μ)ᵀ in float64, from which M / N, its effective rank and
first-component share follow. M is ZᵀZ − Nμμᵀ, accumulated batch by batch with the
pairwise update of Chan et al. (1979) so that the tiny variance of nearly collapsed
embeddings is not lost to cancellation. It is exact with ``covariance_rows=None``; by
default it takes the first 256 rows of each batch, because the d×d product of a
whole batch of 1,024 costs about a sixth of an ArcFace forward+backward (see
``benchmarks/bench_monitors.py``) — the rank estimate still converges as batches
accumulate, and ``counts["covariance_samples"]`` says how many rows it rests on.

Sampled, from the most recent ``sample_size`` rows (a ring buffer on the device,
default 1,024 rows): every statistic that needs pairs of rows — the positive and
negative similarity distributions with their AUC and d′, alignment and uniformity
(Wang & Isola, 2020), the same-identity / different-identity cross similarities of
paired data — and the per-dimension std of ẑ. Their pair counts are reported.

:meth:`~EmbeddingHealthMonitor.update` makes no device-to-host sync; the interpretation
happens in :meth:`~EmbeddingHealthMonitor.compute`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._checks import check_embeddings, check_int, check_labels, check_matching_dim
from ..evaluation.verification import roc_auc
from ..similarity import ZERO_NORM, l2_normalize, pairwise_similarity, working_dtype
from .diagnosis import Diagnosis, non_finite
from .report import MonitorReport

__all__ = ["EmbeddingHealthMonitor"]

# Thresholds, each justified in docs/guides/reading-the-diagnoses.rst.
#: RankMe's ε added to each normalised singular value.
RANK_EPS = 1e-7
#: Total variance below this share of E‖z‖² is zero variance (float32 rounding level).
ZERO_VARIANCE = 1e-10
#: complete_collapse: mean pairwise cosine at or above this (unit-sphere distances ≤ 0.2).
COLLAPSE_COSINE = 0.98
#: dimensional_collapse: effective rank below this share of the reference dimension.
RANK_FRACTION = 0.25
#: A note is added when fewer than this many samples per dimension were seen.
SAMPLES_PER_DIM = 10
#: no_separation: AUC of positive vs negative similarities below this.
SEPARATION_AUC = 0.6
#: Pair statistics need at least this many pairs of each kind.
MIN_PAIRS = 10
#: paired_shortcut: paired minus same-identity similarity at least this ...
SHORTCUT_GAP = 0.2
#: ... and at least this share of paired minus different-identity similarity.
SHORTCUT_SHARE = 0.5


@dataclass
class _HealthState:
    n: Tensor
    seen: int
    non_finite_rows: Tensor
    covariance_n: Tensor  # rows that entered the covariance
    mean: Tensor  # (d,) float64, mean of those rows
    scatter: Tensor  # (d, d) float64, centred
    sum_sq_norm: Tensor
    sum_norm: Tensor
    min_norm: Tensor
    max_norm: Tensor
    sum_unit: Tensor  # (d,) Σẑ
    nonzero: Tensor  # rows with a non-zero norm, = Σ‖ẑ‖²
    paired_count: Tensor
    paired_cos_sum: Tensor
    paired_non_finite_rows: Tensor
    buffer: Tensor  # (S, d)
    buffer_finite: Tensor  # (S,) bool
    buffer_labels: Tensor | None  # (S,)
    buffer_paired: Tensor | None  # (S, d)
    filled: int
    position: int


class EmbeddingHealthMonitor:
    """Norms, spread, effective rank, separation and paired shortcut of embeddings.

    Parameters
    ----------
    sample_size : int
        Rows kept (the most recent ones) for the pairwise statistics; at least 2.
        The pair statistics of one ``compute()`` cost O(sample_size² · d).
    covariance_rows : int or None
        Rows of each batch (the first ones) that enter the covariance; ``None`` for
        all rows (exact, about 4× the update cost at batch 1,024). Default 256.

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
      ``mean_pairwise_cosine``, ``paired_similarity``;
    * from the covariance (``covariance_rows`` of each batch): ``effective_rank``
      (RankMe: σ_k = sqrt of the eigenvalues of the centred covariance M / N,
      p_k = σ_k / Σσ + ε with ε = 1e-7, erank = exp(−Σ p_k log p_k);
      1 for rank-one data, at most min(N − 1, d), and **0 when the variance is zero**),
      ``first_pc_variance_share`` (largest eigenvalue / trace; NaN at zero variance),
      ``relative_variance`` (trace of the covariance / E‖z‖²: 0 when every embedding
      is the same, 1 for centred data);
    * sampled: ``normalized_std`` (mean over dimensions of the std of ẑ; about 1/√d
      when isotropic, 0 when collapsed), ``mean_positive_similarity``,
      ``mean_negative_similarity``, ``positive_similarity_std``,
      ``negative_similarity_std``, ``auc`` (probability that a same-label pair is more
      similar than a different-label pair, ties ½),
      ``d_prime`` ((μ₊ − μ₋) / sqrt((σ₊² + σ₋²) / 2)), ``alignment`` (mean ‖ẑ_i − ẑ_j‖²
      over same-label pairs), ``uniformity`` (log mean exp(−2‖ẑ_i − ẑ_j‖²) over all
      pairs: 0 when collapsed, towards −4 when uniform on the sphere),
      ``same_identity_similarity`` and ``different_identity_similarity`` (mean
      cos(z_i, p_j), j ≠ i, same / different label).
    """

    def __init__(self, sample_size: int = 1024, *, covariance_rows: int | None = 256) -> None:
        self.sample_size = check_int(sample_size, "sample_size", low=2)
        self.covariance_rows = (
            None if covariance_rows is None else check_int(covariance_rows, "covariance_rows", low=2)
        )
        self._state: _HealthState | None = None
        self._with_labels = False
        self._with_paired = False

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._state = None

    def _new_state(self, z: Tensor, with_labels: bool, with_paired: bool) -> _HealthState:
        d, device = z.shape[1], z.device

        def f64(*shape: int, fill: float = 0.0) -> Tensor:
            return torch.full(shape, fill, dtype=torch.float64, device=device)

        s = self.sample_size
        self._with_labels, self._with_paired = with_labels, with_paired
        return _HealthState(
            n=torch.zeros((), dtype=torch.int64, device=device),
            seen=0,
            non_finite_rows=torch.zeros((), dtype=torch.int64, device=device),
            covariance_n=torch.zeros((), dtype=torch.int64, device=device),
            mean=f64(d),
            scatter=f64(d, d),
            sum_sq_norm=f64(),
            sum_norm=f64(),
            min_norm=f64(fill=math.inf),
            max_norm=f64(fill=-math.inf),
            sum_unit=f64(d),
            nonzero=torch.zeros((), dtype=torch.int64, device=device),
            paired_count=torch.zeros((), dtype=torch.int64, device=device),
            paired_cos_sum=f64(),
            paired_non_finite_rows=torch.zeros((), dtype=torch.int64, device=device),
            buffer=torch.zeros((s, d), dtype=z.dtype, device=device),
            buffer_finite=torch.zeros(s, dtype=torch.bool, device=device),
            buffer_labels=torch.zeros(s, dtype=torch.int64, device=device) if with_labels else None,
            buffer_paired=torch.zeros((s, d), dtype=z.dtype, device=device) if with_paired else None,
            filled=0,
            position=0,
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
        dtype = working_dtype(embeddings.dtype)
        z = embeddings.detach().to(dtype)
        if self._state is None:
            self._state = self._new_state(z, labels is not None, paired_embeddings is not None)
        state = self._state
        self._check_consistent(state, z, labels is not None, paired_embeddings is not None)
        with torch.no_grad():
            z, finite = _zero_non_finite_rows(z)
            inverse_norm = self._accumulate(state, z, finite)
            paired, usable = None, finite
            if paired_embeddings is not None:
                paired, paired_finite = _zero_non_finite_rows(paired_embeddings.detach().to(dtype))
                usable = finite & paired_finite
                paired_norm = torch.linalg.vector_norm(paired, dim=1)
                cos = (z * paired).sum(dim=1) * inverse_norm * _inverse(paired_norm)
                state.paired_cos_sum += torch.where(usable, cos, 0.0).double().sum()
                state.paired_count += usable.sum()
                state.paired_non_finite_rows += (~paired_finite).sum()
            self._store_sample(state, z, usable, labels, paired)
            state.seen += b

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

    def _accumulate(self, state: _HealthState, z: Tensor, finite: Tensor) -> Tensor:
        """Add a batch (non-finite rows zeroed) to the exact sums; return 1 / row norms (0 for zero rows)."""
        state.n += finite.sum()
        state.non_finite_rows += (~finite).sum()

        rows = z.shape[0] if self.covariance_rows is None else min(self.covariance_rows, z.shape[0])
        head, weight = z[:rows], finite[:rows].to(z.dtype)
        nb = weight.sum()
        batch_mean = head.sum(dim=0) / nb.clamp_min(1)
        # head - mean on finite rows, 0 on the zeroed ones: one fused pass.
        centred = torch.addmm(head, weight[:, None], batch_mean[None, :], alpha=-1)
        # Chan et al.'s pairwise update of the mean and centred scatter, in float64:
        # M += M_batch + n·n_b/(n + n_b) · δδᵀ with δ = batch mean − running mean.
        total = state.covariance_n.double() + nb.double()
        delta = batch_mean.double() - state.mean
        share = nb.double() / total.clamp_min(1)
        state.scatter.add_(centred.T @ centred)
        state.scatter.addmm_((delta * (state.covariance_n.double() * share))[:, None], delta[None, :])
        state.mean += delta * share
        state.covariance_n += nb.long()

        norms = torch.linalg.vector_norm(z, dim=1)
        state.sum_norm += norms.double().sum()  # zeroed rows add nothing
        state.sum_sq_norm += (norms.double() ** 2).sum()
        state.min_norm = torch.minimum(state.min_norm, torch.where(finite, norms, math.inf).min().double())
        state.max_norm = torch.maximum(state.max_norm, norms.max().double())
        # Σẑ = Σ z_i / ‖z_i‖ with zero rows left out, as l2_normalize does, as one
        # vector-matrix product (the norms are needed above anyway).
        inverse_norm = _inverse(norms)
        state.sum_unit += (inverse_norm @ z).double()
        state.nonzero += (inverse_norm > 0).sum()
        return inverse_norm

    def _store_sample(
        self, state: _HealthState, z: Tensor, finite: Tensor, labels: Tensor | None, paired: Tensor | None
    ) -> None:
        size = self.sample_size
        keep = min(z.shape[0], size)
        rows = slice(z.shape[0] - keep, None)
        index = (torch.arange(keep, device=z.device) + state.position) % size
        state.buffer.index_copy_(0, index, z[rows].to(state.buffer.dtype))
        state.buffer_finite.index_copy_(0, index, finite[rows])
        if state.buffer_labels is not None and labels is not None:
            state.buffer_labels.index_copy_(0, index, labels[rows].long())
        if state.buffer_paired is not None and paired is not None:
            state.buffer_paired.index_copy_(0, index, paired[rows].to(state.buffer_paired.dtype))
        state.position = (state.position + keep) % size
        state.filled = min(size, state.filled + keep)

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
        s = self._state
        n, d = int(s.n), s.mean.shape[0]
        bad_rows = int(s.non_finite_rows)
        diagnoses: list[Diagnosis] = []
        notes: list[str] = []
        counts = {"samples": n, "non_finite_rows": bad_rows, "embedding_dim": d}
        if self._with_paired:
            paired_bad = int(s.paired_non_finite_rows)
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

        collapse = _complete_collapse(metrics, n)
        if collapse is not None:
            diagnoses.append(collapse)
        else:
            dimensional = _dimensional_collapse(metrics, nc, d, sample.num_label_classes, caution)
            if dimensional is not None:
                diagnoses.append(dimensional)
        separation = _no_separation(metrics, sample.counts)
        if separation is not None:
            diagnoses.append(separation)
        shortcut = _paired_shortcut(metrics, sample.counts)
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
        cutoff = float(eigenvalues.max()) * covariance.shape[0] * torch.finfo(s.buffer.dtype).eps
        eigenvalues = torch.where(eigenvalues > cutoff, eigenvalues, 0.0)
        trace = float(eigenvalues.sum())
        mean_sq_norm = float(s.sum_sq_norm) / n
        relative_variance = trace / mean_sq_norm if mean_sq_norm > 0 else 0.0
        if relative_variance <= ZERO_VARIANCE:
            # Zero variance is complete collapse: no direction of variation, rank 0.
            effective_rank, first_share = 0.0, math.nan
        else:
            singular = eigenvalues.sqrt()
            p = singular / singular.sum() + RANK_EPS
            effective_rank = float(torch.exp(-(p * p.log()).sum()))
            first_share = float(eigenvalues.max()) / trace
        mean_norm = float(s.sum_norm) / n
        unit_sum = s.sum_unit.cpu()
        metrics = {
            "num_samples": float(n),
            "mean_norm": mean_norm,
            "norm_std": math.sqrt(max(mean_sq_norm - mean_norm**2, 0.0)),
            "min_norm": float(s.min_norm),
            "max_norm": float(s.max_norm),
            "effective_rank": effective_rank,
            "first_pc_variance_share": first_share,
            "relative_variance": min(relative_variance, 1.0),
            # (‖Σẑ‖² − Σ‖ẑ‖²) / (N(N − 1)), with Σ‖ẑ‖² = the number of non-zero rows.
            "mean_pairwise_cosine": (
                (float(unit_sum @ unit_sum) - int(s.nonzero)) / (n * (n - 1)) if n > 1 else math.nan
            ),
        }
        if int(s.paired_count) > 0:
            metrics["paired_similarity"] = float(s.paired_cos_sum) / int(s.paired_count)
        return metrics

    def _sample_statistics(self, s: _HealthState) -> _SampleStatistics:
        out = _SampleStatistics()
        finite = s.buffer_finite[: s.filled]
        z = s.buffer[: s.filled][finite]
        m = z.shape[0]
        out.counts["sample_rows"] = m
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
        if s.buffer_labels is None:
            return out
        labels = s.buffer_labels[: s.filled][finite]
        out.num_label_classes = int(torch.unique(labels).numel())
        same = labels[:, None] == labels[None, :]
        positive, negative = upper & same, upper & ~same
        out.counts["positive_pairs"] = int(positive.sum())
        out.counts["negative_pairs"] = int(negative.sum())
        if out.counts["positive_pairs"] > 0:
            out.metrics["alignment"] = float(unit_sq_dist[positive].double().mean())
        pos = cos[positive].double().cpu().numpy()
        neg = cos[negative].double().cpu().numpy()
        out.metrics.update(_separation(pos, neg))
        if s.buffer_paired is not None:
            paired = s.buffer_paired[: s.filled][finite]
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
        return out


def _zero_non_finite_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows with NaN/inf set to zero, and which rows were finite (no host sync)."""
    # A row holds NaN/inf exactly when its sum does (or when the sum overflows, which
    # needs values near 1e35): one reduction instead of an element-wise isfinite.
    finite = torch.isfinite(x.sum(dim=1))
    return torch.where(finite[:, None], x, 0.0), finite


def _inverse(norms: Tensor) -> Tensor:
    """1 / norm, and 0 for (near-)zero norms, matching :func:`~embedkit.similarity.l2_normalize`."""
    return torch.where(norms > ZERO_NORM, 1.0 / norms.clamp_min(ZERO_NORM), 0.0)


@dataclass
class _SampleStatistics:
    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    num_label_classes: int | None = None


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
def _complete_collapse(metrics: dict[str, float], n: int) -> Diagnosis | None:
    zero_variance = metrics["relative_variance"] <= ZERO_VARIANCE
    cosine = metrics["mean_pairwise_cosine"]
    if not (zero_variance or (n > 1 and cosine >= COLLAPSE_COSINE)):
        return None
    if zero_variance:
        what = f"all {n} embeddings are the same point (zero variance)"
    else:
        distance = math.sqrt(max(2 - 2 * cosine, 0.0))
        what = (
            f"the {n} embeddings have collapsed to one direction: mean pairwise cosine {cosine:.4f} "
            f"(typical unit-sphere distance {distance:.3f}, below a triplet margin of 0.2)"
        )
    return Diagnosis(
        "complete_collapse",
        "error",
        what,
        evidence={
            "mean_pairwise_cosine": cosine,
            "cosine_threshold": COLLAPSE_COSINE,
            "relative_variance": metrics["relative_variance"],
            "zero_variance_threshold": ZERO_VARIANCE,
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


def _dimensional_collapse(
    metrics: dict[str, float], n: int, d: int, num_label_classes: int | None, caution: str | None
) -> Diagnosis | None:
    reference = min(d, n - 1)
    basis = f"min(d, N - 1) = min({d}, {n - 1})"
    if num_label_classes is not None and num_label_classes >= 2:
        reference = min(reference, num_label_classes - 1)
        basis = f"min(d, N - 1, classes - 1) = min({d}, {n - 1}, {num_label_classes - 1})"
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


def _no_separation(metrics: dict[str, float], counts: dict[str, int]) -> Diagnosis | None:
    if "auc" not in metrics:
        return None
    if counts.get("positive_pairs", 0) < MIN_PAIRS or counts.get("negative_pairs", 0) < MIN_PAIRS:
        return None
    auc = metrics["auc"]
    if not auc < SEPARATION_AUC:
        return None
    return Diagnosis(
        "no_separation",
        "warning",
        f"same-label pairs are barely more similar than different-label pairs: AUC {auc:.3f} "
        f"(0.5 = no separation), mean similarity {metrics['mean_positive_similarity']:.3f} vs "
        f"{metrics['mean_negative_similarity']:.3f}",
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


def _paired_shortcut(metrics: dict[str, float], counts: dict[str, int]) -> Diagnosis | None:
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
    return Diagnosis(
        "paired_shortcut",
        "error",
        f"paired similarity {paired:.4f} but only {same:.4f} with other images of the same identity "
        f"(and {different:.4f} with other identities): the pairing, not the identity, is what matches",
        evidence={
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
