"""Gallery-probe evaluation: enrol a gallery, then identify and verify probes against it.

This is how a recognition system is used — and the evaluation that case study 03 skipped.
The gallery holds *enrolled* images (e.g. high-resolution photos, one or several per
identity); probes are *other* images (e.g. super-resolved low-resolution captures) whose
identity is sought. Comparing each probe with its own paired gallery image measures how well
a pair was memorised, not recognition; pass ``image_ids`` and a probe whose image is also in
the gallery is an error.

* :meth:`Gallery.identify` — closed-set identification: the rank of each probe's true
  identity among all enrolled identities; rank-k accuracy and the CMC curve.
* :meth:`Gallery.dir_at_fpir` — open-set identification (IJB style): probes of identities
  that are not enrolled (*non-mated*) set the threshold for a false-positive identification
  rate (FPIR); the detection-and-identification rate (DIR) counts mated probes whose true
  identity is ranked first *and* scores above it.
* :meth:`Gallery.verify` — 1:1 verification of every probe against every gallery entry,
  summarised by :func:`embedkit.evaluation.verification.verification_metrics`.

Identity scores. With ``template="none"`` every enrolled image is kept and a probe's score
for an identity is its best score over that identity's images; with ``template="mean"``
each identity is one template, the mean of its (L2-normalised, for cosine) embeddings.
Ranks count ties pessimistically: an identity scoring exactly as much as the true one is
ranked before it. Scores follow :func:`embedkit.similarity.pairwise_similarity` (higher is
closer). Every probe is scored against every gallery entry, block by block, on the gallery's
device: memory holds one block, never a probes × gallery matrix (:meth:`verify` included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_ks, check_matching_dim, check_rate_targets
from ..similarity import (
    BLOCK_BYTES,
    METRICS,
    Metric,
    l2_normalize,
    rows_per_block,
    similarity_blocks,
    working_dtype,
)
from ._inputs import (
    as_embeddings,
    as_image_ids,
    as_labels,
    first_few,
    progress_bar,
    repeated_ids,
    shared_ids,
    to_numpy,
)
from .report import Rate, Report
from .search import search_checked
from .verification import _all_pairs_report, unmeasurable_target_note

__all__ = ["Gallery", "fpir_key"]

Template = Literal["none", "mean"]

# A probe this similar (cosine) to an enrolled image is almost surely the same image. For
# every metric the test is geometric: ||p - x|| <= _NEAR_DUPLICATE_DISTANCE * ||p|| on the
# vectors the metric compares (L2-normalised for cosine), which for unit vectors is exactly
# cosine >= _NEAR_DUPLICATE.
_NEAR_DUPLICATE = 0.9999
_NEAR_DUPLICATE_DISTANCE = float(np.sqrt(2.0 * (1.0 - _NEAR_DUPLICATE)))


def fpir_key(fpir: float, prefix: str = "dir") -> str:
    """The report key at an FPIR target, written as a plain decimal: ``"dir@fpir=0.01"``."""
    return f"{prefix}@fpir={np.format_float_positional(fpir, trim='-')}"


@dataclass(frozen=True)
class _Scan:
    """Per-probe results of one pass over the gallery."""

    best_score: np.ndarray  # (n_probes,) best identity score
    true_score: np.ndarray  # (n_probes,) score of the true identity; NaN when not enrolled
    rank: np.ndarray  # (n_probes,) 1-based rank of the true identity; 0 when not enrolled
    pair_scores: np.ndarray | None  # (n_probes, n_entries) when asked for
    # (n_probes,) squared distance to the nearest enrolled image over the probe's squared norm
    # (metric space); NaN when the scan could not see images (mean templates)
    nearest_ratio: np.ndarray


class Gallery:
    """An enrolled gallery of identities to identify and verify probes against.

    Parameters
    ----------
    metric : {"cosine", "dot", "euclidean", "squared_euclidean"}
        Similarity between probes and gallery entries (euclidean metrics negated).
    chunk_size : int, optional
        Probes per block of scores (default: a 128 MiB block).

    Examples
    --------
    >>> gallery = Gallery().enrol(hr_embeddings, hr_labels, image_ids=hr_files)
    >>> report = gallery.identify(probe_embeddings, probe_labels, image_ids=probe_files)
    >>> report["rank-1"], report.rate("rank-1")   # 0.02, 45/2250 (chance 0.19%)
    """

    def __init__(self, *, metric: Metric = "cosine", chunk_size: int | None = None) -> None:
        self.metric: Metric = check_choice(metric, "metric", METRICS)  # type: ignore[assignment]
        self.chunk_size = None if chunk_size is None else check_int(chunk_size, "chunk_size", low=1)
        self._entries: Tensor | None = None
        self._entry_identity = np.empty(0, dtype=np.int64)
        self._image_ids: np.ndarray | None = None
        self.identities = np.empty(0, dtype=np.int64)
        self.template: Template = "none"
        # Entries are stored sorted by (images per identity, identity), so that the best score
        # of each identity is one reshape-and-max per group of equal-sized identities.
        self._groups: list[tuple[int, int, int]] = []  # (first entry, end entry, images each)
        self._identity_column = np.empty(0, dtype=np.int64)  # identity -> column of identity scores
        self._enrol_position = np.empty(0, dtype=np.int64)  # enrolled image i -> its entry
        self._images: Tensor | None = None  # metric-space images, kept for mean templates only

    def __repr__(self) -> str:
        if self._entries is None:
            return f"Gallery(metric={self.metric!r}, empty)"
        e = self._entries
        return (
            f"Gallery(metric={self.metric!r}, template={self.template!r}, identities={self.num_identities}, "
            f"entries={self.num_entries}, dim={e.shape[1]}, dtype={str(e.dtype).replace('torch.', '')}, "
            f"device={e.device.type}, image_ids={'yes' if self._image_ids is not None else 'no'})"
        )

    # -- enrolment ---------------------------------------------------------------------------------

    def enrol(
        self, embeddings: Any, labels: Any, *, template: Template = "none", image_ids: Any = None
    ) -> Gallery:
        """Enrol gallery images, replacing any earlier enrolment.

        Parameters
        ----------
        embeddings : ndarray or Tensor of shape (n_images, d)
            Gallery embeddings, on any device (scores are computed there).
        labels : ndarray, Tensor or sequence of int, of shape (n_images,)
            Identity of each image (int64, never cast to float).
        template : {"none", "mean"}
            ``"none"`` keeps every image; ``"mean"`` keeps one template per identity, the
            mean of its embeddings (each L2-normalised first for cosine).
        image_ids : sequence of shape (n_images,), optional
            Identifiers of the source images (file names, ids); probes are checked against
            them so that no image is both enrolled and probed.

        Returns
        -------
        Gallery
            ``self``, so ``Gallery().enrol(...)`` can be chained.
        """
        emb = as_embeddings(embeddings, "embeddings")
        lab = as_labels(labels, emb.shape[0], "labels")
        template = check_choice(template, "template", ("none", "mean"))  # type: ignore[assignment]
        ids = None if image_ids is None else as_image_ids(image_ids, emb.shape[0], rows_name="embeddings")
        if ids is not None:
            repeats = repeated_ids(ids)
            if repeats:
                raise ValueError(f"image_ids must be unique within the gallery; {repeats[:5]} repeat")
        identities, identity = np.unique(lab, return_inverse=True)
        identity = identity.reshape(-1).astype(np.int64)
        emb = emb.to(working_dtype(emb.dtype))
        self._images = None
        if template == "mean":
            if self.metric == "cosine":
                emb = l2_normalize(emb)
            # The near-duplicate check compares probes with the enrolled *images*, not templates.
            self._images = emb
            index = torch.from_numpy(identity).to(emb.device)
            sums = torch.zeros(identities.size, emb.shape[1], dtype=emb.dtype, device=emb.device)
            sums.index_add_(0, index, emb)
            counts = torch.bincount(index, minlength=identities.size).to(emb.dtype)
            emb = sums / counts[:, None]
            self._enrol_position = identity  # each image is represented by its identity's template
            identity = np.arange(identities.size, dtype=np.int64)
            self._groups = [(0, identities.size, 1)]
            self._identity_column = np.arange(identities.size, dtype=np.int64)
        else:
            counts_np = np.bincount(identity, minlength=identities.size)
            order = np.lexsort((identity, counts_np[identity]))  # by (images per identity, identity)
            emb = emb[torch.from_numpy(order).to(emb.device)]
            identity = identity[order]
            self._enrol_position = np.empty_like(order)
            self._enrol_position[order] = np.arange(order.size)
            column_identity = np.lexsort((np.arange(identities.size), counts_np))
            self._identity_column = np.empty_like(column_identity)
            self._identity_column[column_identity] = np.arange(identities.size)
            sizes = counts_np[column_identity]
            change = np.flatnonzero(np.diff(sizes)) + 1
            first_column = np.concatenate([[0], change])
            end_column = np.concatenate([change, [identities.size]])
            entry_edges = np.concatenate([[0], np.cumsum(sizes)])
            self._groups = [
                (int(entry_edges[a]), int(entry_edges[b]), int(sizes[a]))
                for a, b in zip(first_column, end_column, strict=True)
            ]
        self.template = template
        self.identities = identities
        self._image_ids = ids
        self._entries = emb
        self._entry_identity = identity
        return self

    @property
    def num_identities(self) -> int:
        """Number of enrolled identities."""
        return int(self.identities.size)

    @property
    def num_entries(self) -> int:
        """Number of gallery entries: images (``template="none"``) or templates."""
        return 0 if self._entries is None else int(self._entries.shape[0])

    @property
    def labels(self) -> np.ndarray:
        """The identity label of each gallery entry, shape (num_entries,).

        In enrolment order for ``template="none"`` (one per enrolled image), and in
        ascending label order for ``template="mean"`` (one per identity).
        """
        if self.template == "mean":
            return self.identities.copy()
        return self.identities[self._entry_identity[self._enrol_position]]

    # -- evaluation ----------------------------------------------------------------------------------

    def identify(
        self,
        probes: Any,
        labels: Any,
        *,
        ranks: Sequence[int] = (1, 5, 10),
        image_ids: Any = None,
        progress: bool = False,
    ) -> Report:
        """Closed-set identification: rank-k accuracy and CMC of the probes' true identities.

        Parameters
        ----------
        probes : ndarray or Tensor of shape (n_probes, d)
            Probe embeddings.
        labels : ndarray, Tensor or sequence of int, of shape (n_probes,)
            True identity of each probe. Probes of identities that are not enrolled are
            counted (``counts["non_mated_probes"]``) and left out, with a note.
        ranks : sequence of int
            Ranks ``k`` reported as ``"rank-k"``.
        image_ids : sequence of shape (n_probes,), optional
            Source image of each probe; one that is also enrolled is an error.
        progress : bool
            Show a progress bar.

        Returns
        -------
        Report
            ``"rank-k"`` for each ``k`` (a :class:`Rate`, chance ``min(k, C) / C`` for ``C``
            enrolled identities) and ``"mean_genuine_score"`` (the mean score of each probe
            for its true identity — compare it with a paired similarity);
            ``curves["cmc"][r - 1]`` is the rank-``r`` accuracy for ``r = 1..C`` and
            ``curves["cmc_chance"]`` its chance level ``r / C``.
        """
        return self.evaluate(
            probes, labels, ranks=ranks, image_ids=image_ids, progress=progress, open_set=False
        )["identification"]

    def dir_at_fpir(
        self,
        probes: Any,
        labels: Any,
        *,
        fpir_targets: Sequence[float] = (0.001, 0.01, 0.1),
        image_ids: Any = None,
        progress: bool = False,
    ) -> Report:
        """Open-set identification: DIR at given FPIR, from mated and non-mated probes.

        For a target FPIR ``f`` the threshold ``t`` is the one that lets through the most
        non-mated probes without exceeding ``f``: a probe is accepted when its best score is
        strictly above ``t``. ``DIR = #(mated probes whose true identity is rank 1 and scores
        above t) / #mated``. A target finer than ``1 / #non-mated`` puts ``t`` above every
        non-mated probe (measured FPIR 0), with a note.

        Parameters
        ----------
        probes : ndarray or Tensor of shape (n_probes, d)
        labels : ndarray, Tensor or sequence of int, of shape (n_probes,)
            Probes whose label is enrolled are mated, the others non-mated; both must occur.
        fpir_targets : sequence of float
            Targets in (0, 1].
        image_ids : sequence of shape (n_probes,), optional
            As in :meth:`identify`.
        progress : bool
            Show a progress bar.

        Returns
        -------
        Report
            ``"dir@fpir=<f>"`` (a :class:`Rate` over mated probes; chance ``FPIR / C``, what
            a scorer that ignores identity reaches), ``"fpir@fpir=<f>"`` (the measured FPIR
            as a :class:`Rate` over non-mated probes) and ``"threshold@fpir=<f>"``; curves
            ``"fpir"`` and ``"dir"`` at every threshold.
        """
        return self.evaluate(
            probes,
            labels,
            fpir_targets=fpir_targets,
            image_ids=image_ids,
            progress=progress,
            identification=False,
            open_set=True,
        )["open_set"]

    def verify(
        self,
        probes: Any,
        labels: Any,
        *,
        far_targets: Sequence[float] = (1e-4, 1e-3, 1e-2),
        image_ids: Any = None,
        progress: bool = False,
    ) -> Report:
        """1:1 verification of every probe against every gallery entry.

        Genuine pairs share an identity, impostor pairs do not. Computed exactly by
        :func:`~embedkit.evaluation.verification.all_pairs_verification`: two passes over
        the score blocks, holding one block and the genuine scores, never all ``n_probes ×
        num_entries`` scores; the result equals ``verification_metrics`` on all of them.

        Parameters
        ----------
        probes : ndarray or Tensor of shape (n_probes, d)
        labels : ndarray, Tensor or sequence of int, of shape (n_probes,)
        far_targets : sequence of float
            FAR targets in (0, 1] for ``"tar@far=<target>"``.
        image_ids : sequence of shape (n_probes,), optional
            As in :meth:`identify`.
        progress : bool
            Show a progress bar.

        Returns
        -------
        Report
            The report of :func:`~embedkit.evaluation.verification.all_pairs_verification`
            (``"auc"``, ``"eer"``, ``"tar@far=..."``, ``"best_accuracy"``, ...), with the
            probe and gallery sizes added to its counts; its curves hold the ROC, the genuine
            scores (in the embeddings' precision) and exact genuine and impostor score
            histograms (``"score_bin_edges"``, ``"genuine_histogram"``, ``"impostor_histogram"``).
        """
        return self.evaluate(
            probes,
            labels,
            far_targets=far_targets,
            image_ids=image_ids,
            progress=progress,
            identification=False,
            open_set=False,
            verification=True,
        )["verification"]

    def evaluate(
        self,
        probes: Any,
        labels: Any,
        *,
        ranks: Sequence[int] = (1, 5, 10),
        fpir_targets: Sequence[float] = (0.001, 0.01, 0.1),
        far_targets: Sequence[float] = (1e-4, 1e-3, 1e-2),
        image_ids: Any = None,
        identification: bool = True,
        open_set: bool | None = None,
        verification: bool = False,
        progress: bool = False,
    ) -> dict[str, Report]:
        """Identification, open-set identification and verification from one pass.

        Parameters
        ----------
        probes, labels, image_ids, progress
            As in :meth:`identify`.
        ranks, fpir_targets, far_targets
            As in :meth:`identify`, :meth:`dir_at_fpir` and :meth:`verify`.
        identification : bool
            Compute ``"identification"`` (closed-set; needs mated probes).
        open_set : bool, optional
            Compute ``"open_set"``; by default whenever some probes are non-mated.
        verification : bool
            Compute ``"verification"`` (holds every probe-gallery score).

        Returns
        -------
        dict of str to Report
            ``"identification"``, ``"open_set"`` and ``"verification"``, those computed.
        """
        if self._entries is None:
            raise ValueError("the gallery is empty; call enrol(embeddings, labels) first")
        p = as_embeddings(probes, "probes")
        check_matching_dim(p, self._entries, "probes", "gallery embeddings")
        p_labels = as_labels(labels, p.shape[0], "labels", rows_name="probes")
        ranks = check_ks(ranks, "ranks")
        if image_ids is not None:
            self._check_disjoint(as_image_ids(image_ids, p.shape[0], rows_name="probes"))
        position = np.searchsorted(self.identities, p_labels)
        position = np.minimum(position, self.identities.size - 1)
        mated = self.identities[position] == p_labels
        probe_identity = np.where(mated, position, -1)
        n_mated, n_non_mated = int(mated.sum()), int((~mated).sum())
        if open_set is None:
            open_set = n_non_mated > 0
        if identification and n_mated == 0:
            raise ValueError(
                f"none of the {p.shape[0]} probe labels is enrolled; closed-set identification needs mated "
                "probes (use dir_at_fpir for open-set evaluation)"
            )
        if open_set:
            fpir_targets = check_rate_targets(fpir_targets, "fpir_targets")
            if n_mated == 0 or n_non_mated == 0:
                raise ValueError(
                    f"open-set identification needs mated and non-mated probes; got {n_mated} mated and "
                    f"{n_non_mated} non-mated (a probe is non-mated when its label is not enrolled)"
                )
        scan = self._scan(p.to(self._entries.device), probe_identity, keep_pairs=False, progress=progress)

        counts = {
            "probes": int(p.shape[0]),
            "mated_probes": n_mated,
            "non_mated_probes": n_non_mated,
            "identities": self.num_identities,
            "gallery_entries": self.num_entries,
        }
        notes = []
        nearest_ratio = scan.nearest_ratio
        if self._images is not None:  # mean templates: compare with the enrolled images themselves
            nearest_ratio = self._nearest_image_ratio(p.to(self._images.device))
        near = int((nearest_ratio <= _NEAR_DUPLICATE_DISTANCE**2).sum())
        counts["near_duplicate_probes"] = near
        if near:
            closeness = (
                f"cosine >= {_NEAR_DUPLICATE}"
                if self.metric == "cosine"
                else f"distance <= {_NEAR_DUPLICATE_DISTANCE:.4f} x the probe's norm"
            )
            notes.append(
                f"{near} probes have an enrolled image with {closeness}: probably the same image enrolled "
                "and probed, which measures memorisation, not recognition (pass image_ids to find them)"
            )
        if image_ids is None or self._image_ids is None:
            notes.append(
                "image ids not given for both sides: disjointness of gallery and probe images unchecked"
            )

        reports: dict[str, Report] = {}
        if identification:
            reports["identification"] = self._identification_report(scan, mated, ranks, counts, notes)
        if open_set:
            reports["open_set"] = self._open_set_report(scan, mated, fpir_targets, counts, notes)
        if verification:
            # Exact, in bounded memory: never a probes x entries matrix (see all_pairs_verification).
            base = _all_pairs_report(
                p.to(self._entries.device),
                probe_identity,
                self._entries,
                self._entry_identity,
                metric=self.metric,
                far_targets=far_targets,
                chunk_size=self.chunk_size,
                progress=progress,
            )
            reports["verification"] = Report(
                title=f"verification (probe vs gallery {'template' if self.template == 'mean' else 'image'})",
                metrics=base.metrics,
                counts={**base.counts, **counts},
                notes=[*base.notes, *notes],
                curves=base.curves,
            )
        return reports

    # -- internals ----------------------------------------------------------------------------------

    def _check_disjoint(self, probe_ids: np.ndarray) -> None:
        if self._image_ids is None:
            return
        shared = shared_ids(self._image_ids, probe_ids)
        if shared:
            shown = first_few(shared)
            raise ValueError(
                f"{len(shared)} image id(s) are both enrolled in the gallery and used as probes: {shown}. "
                "A probe compared with its own gallery image measures memorisation of the pair, not "
                "recognition; enrol and probe disjoint images"
            )

    def _block_rows(self, device: torch.device) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        # 128 MiB blocks: measured at 1e5 entries x 1e4 probes (1,000 identities), an 8 MiB,
        # cache-sized block was 2x slower overall (per-block overhead of the identity groups).
        return rows_per_block(self.num_entries, budget=BLOCK_BYTES)

    def _identity_scores(self, block: Tensor) -> Tensor:
        """Per-identity scores ``(rows, C)`` of a block of entry scores ``(rows, num_entries)``.

        Columns follow ``self._identity_column``. Identities with ``m`` images each sit in one
        contiguous run of entries, so their best image is a max over a ``(rows, ·, m)`` view.
        """
        if len(self._groups) == 1 and self._groups[0][2] == 1:
            return block
        c = block.shape[0]
        parts = [
            block[:, a:b] if m == 1 else block[:, a:b].unflatten(1, ((b - a) // m, m)).amax(dim=2)
            for a, b, m in self._groups
        ]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].reshape(c, -1)

    def _nearest_image_ratio(self, probes: Tensor) -> np.ndarray:
        """Squared distance from each probe to its nearest enrolled image, over its squared norm.

        In metric space (probes L2-normalised for cosine); one exact k=1 search of the images.
        """
        assert self._images is not None
        q = l2_normalize(probes.to(self._images.dtype)) if self.metric == "cosine" else probes
        q = q.to(self._images.dtype)
        scores, _ = search_checked(q, self._images, 1, metric="squared_euclidean")
        distance_sq = -(to_numpy(scores) if isinstance(scores, Tensor) else scores)[:, 0].astype(np.float64)
        return _relative(distance_sq, to_numpy(q.double().pow(2).sum(dim=1)))

    def _scan(self, probes: Tensor, probe_identity: np.ndarray, *, keep_pairs: bool, progress: bool) -> _Scan:
        assert self._entries is not None
        entries = self._entries
        device = entries.device
        n = probes.shape[0]
        true_column = torch.from_numpy(self._identity_column[np.maximum(probe_identity, 0)]).to(device)
        is_mated = torch.from_numpy(probe_identity >= 0).to(device)
        best = np.empty(n)
        true = np.full(n, np.nan)
        rank = np.zeros(n, dtype=np.int64)
        nearest = np.full(n, np.nan)
        probe_sq = to_numpy(probes.double().pow(2).sum(dim=1))
        entry_sq = entries.pow(2).sum(dim=1) if self.metric == "dot" else None
        scan_images = self._images is None  # the entries are the images: nearest image comes free
        pairs = np.empty((n, self.num_entries), dtype=to_numpy(entries[:0]).dtype) if keep_pairs else None
        with progress_bar(n, "gallery search", progress) as update:
            for start, block in similarity_blocks(
                probes, entries, metric=self.metric, chunk_size=self._block_rows(device)
            ):
                c = block.shape[0]
                rows = slice(start, start + c)
                if pairs is not None:
                    pairs[rows] = to_numpy(block)
                per_identity = self._identity_scores(block)
                top = per_identity.max(dim=1).values
                best[rows] = to_numpy(top)
                true_score = per_identity.gather(1, true_column[rows, None])
                true_rank = (per_identity >= true_score).sum(dim=1)  # ties counted against the probe
                mated_rows = probe_identity[rows] >= 0
                true[rows] = np.where(mated_rows, to_numpy(true_score[:, 0]), np.nan)
                rank[rows] = to_numpy(torch.where(is_mated[rows], true_rank, 0))
                if scan_images:
                    nearest[rows] = self._nearest_from_block(block, top, entry_sq, probe_sq[rows])
                if update is not None:
                    update(c)
        return _Scan(best_score=best, true_score=true, rank=rank, pair_scores=pairs, nearest_ratio=nearest)

    def _nearest_from_block(
        self, block: Tensor, top: Tensor, entry_sq: Tensor | None, probe_sq: np.ndarray
    ) -> np.ndarray:
        """Relative squared distance to the nearest image from a block of image scores."""
        if self.metric == "cosine":  # unit vectors: ||p - x||^2 = 2 - 2 cos
            return np.maximum(2.0 - 2.0 * to_numpy(top).astype(np.float64), 0.0)
        if self.metric == "dot":  # the best dot product is not the nearest image: ||x||^2 - 2 p.x
            assert entry_sq is not None
            closest = to_numpy((entry_sq[None, :] - 2.0 * block).amin(dim=1)).astype(np.float64)
            return _relative(np.maximum(probe_sq + closest, 0.0), probe_sq)
        distance = -to_numpy(top).astype(np.float64)  # the best score is the nearest image
        return _relative(distance**2 if self.metric == "euclidean" else distance, probe_sq)

    def _identification_report(
        self,
        scan: _Scan,
        mated: np.ndarray,
        ranks: tuple[int, ...],
        counts: dict[str, int],
        notes: list[str],
    ) -> Report:
        n_ids = self.num_identities
        mated_rank = scan.rank[mated]
        cmc_hits = np.bincount(mated_rank, minlength=n_ids + 1)[1:].cumsum()
        n_mated = int(mated.sum())
        metrics: dict[str, float | Rate] = {
            f"rank-{k}": Rate(int(cmc_hits[min(k, n_ids) - 1]), n_mated, min(k, n_ids) / n_ids) for k in ranks
        }
        metrics["mean_genuine_score"] = float(scan.true_score[mated].mean())
        own_notes = list(notes)
        if counts["non_mated_probes"]:
            own_notes.append(
                f"{counts['non_mated_probes']} probes belong to identities that are not enrolled; they are "
                "left out of closed-set identification (they are the non-mated probes of open-set DIR@FPIR)"
            )
        return Report(
            title=f"closed-set identification (template={self.template!r})",
            metrics=metrics,
            counts=dict(counts),
            notes=own_notes,
            curves={"cmc": cmc_hits / n_mated, "cmc_chance": np.arange(1, n_ids + 1) / n_ids},
        )

    def _open_set_report(
        self,
        scan: _Scan,
        mated: np.ndarray,
        fpir_targets: Sequence[float],
        counts: dict[str, int],
        notes: list[str],
    ) -> Report:
        n_mated, n_non = int(mated.sum()), int((~mated).sum())
        non_mated_desc = np.sort(scan.best_score[~mated])[::-1]
        # Mated probes identified at rank 1, by score (ascending) for counting above a threshold.
        hits_sorted = np.sort(scan.true_score[mated & (scan.rank == 1)])
        observed = np.unique(scan.best_score)  # every probe's best score, ascending
        metrics: dict[str, float | Rate] = {}
        own_notes = list(notes)
        for f in fpir_targets:
            allowed = int(np.floor(f * n_non))
            if (allowed + 1) / n_non <= f:  # floating-point floor, as FPIR itself is computed
                allowed += 1
            threshold = self._fpir_threshold(non_mated_desc, allowed, observed)
            false_positive = int(n_non - np.searchsorted(non_mated_desc[::-1], threshold, side="left"))
            detected = int(hits_sorted.size - np.searchsorted(hits_sorted, threshold, side="left"))
            chance = false_positive / n_non / self.num_identities
            metrics[fpir_key(f)] = Rate(detected, n_mated, chance)
            metrics[fpir_key(f, "fpir")] = Rate(false_positive, n_non, None)
            metrics[fpir_key(f, "threshold")] = threshold
            if allowed == 0:  # the one rule of TAR@FAR too: the value at measured FPIR 0, with a note
                own_notes.append(
                    unmeasurable_target_note(fpir_key(f), f, n_non, "non-mated probes", fpir_key(f, "fpir"))
                )
        # Curves at every threshold t_j = j-th highest non-mated score, accepting scores >= t_j
        # (ties make FPIR above j / n_non).
        non_mated_asc = non_mated_desc[::-1]
        fpir = (n_non - np.searchsorted(non_mated_asc, non_mated_desc, side="left")) / n_non
        detected_at = hits_sorted.size - np.searchsorted(hits_sorted, non_mated_desc, side="left")
        return Report(
            title=f"open-set identification (template={self.template!r})",
            metrics=metrics,
            counts=dict(counts),
            notes=own_notes,
            curves={"fpir": fpir, "dir": detected_at / n_mated, "threshold": non_mated_desc.copy()},
        )

    def _fpir_threshold(self, non_mated_desc: np.ndarray, allowed: int, observed: np.ndarray) -> float:
        """The loosest threshold ``t`` (accept when score >= t) with at most ``allowed`` non-mated.

        ``allowed == n_non``: the lowest observed score (everything is accepted). Otherwise ``t``
        must lie above the ``allowed + 1``-th highest non-mated score ``s``: it is the lowest
        observed score above ``s`` (so no observed score lies between), or, when no probe scores
        above ``s``, the next representable score above it.
        """
        if allowed >= non_mated_desc.size:
            return float(observed[0])
        s = non_mated_desc[allowed]
        above = np.searchsorted(observed, s, side="right")
        if above < observed.size:
            return float(observed[above])
        assert self._entries is not None
        dtype = to_numpy(self._entries[:0]).dtype
        return float(np.nextafter(dtype.type(s), dtype.type(np.inf)))


def _relative(distance_sq: np.ndarray, norm_sq: np.ndarray) -> np.ndarray:
    """``distance² / norm²``; 0 for an exact match of a zero vector, ``inf`` for a near miss of one."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = distance_sq / norm_sq
    return np.where(norm_sq > 0, ratio, np.where(distance_sq > 0, np.inf, 0.0))
