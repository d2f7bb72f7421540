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
device: memory holds one block, never a probes × gallery matrix (except in :meth:`verify`,
whose output is all those pairs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._checks import check_choice, check_ks, check_matching_dim, check_rate_targets
from ..similarity import METRICS, Metric, l2_normalize, similarity_blocks, working_dtype
from ._inputs import as_embeddings, as_image_ids, as_labels, progress_bar, to_numpy
from .report import Rate, Report
from .verification import verification_metrics

__all__ = ["Gallery", "fpir_key"]

Template = Literal["none", "mean"]

# A probe this similar (cosine) to a gallery entry is almost surely the same image.
_NEAR_DUPLICATE = 0.9999


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
        self.chunk_size = chunk_size
        self._entries: Tensor | None = None
        self._entry_identity = np.empty(0, dtype=np.int64)
        self._image_ids: np.ndarray | None = None
        self.identities = np.empty(0, dtype=np.int64)
        self.template: Template = "none"

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
        self.template = check_choice(template, "template", ("none", "mean"))  # type: ignore[assignment]
        self._image_ids = (
            None if image_ids is None else as_image_ids(image_ids, emb.shape[0], rows_name="embeddings")
        )
        if self._image_ids is not None:
            unique_ids, id_counts = np.unique(self._image_ids, return_counts=True)
            if (id_counts > 1).any():
                raise ValueError(
                    "image_ids must be unique within the gallery; "
                    f"{unique_ids[id_counts > 1][:5].tolist()} repeat"
                )
        self.identities, identity = np.unique(lab, return_inverse=True)
        emb = emb.to(working_dtype(emb.dtype))
        if self.template == "mean":
            if self.metric == "cosine":
                emb = l2_normalize(emb)
            index = torch.from_numpy(identity).to(emb.device)
            sums = torch.zeros(self.identities.size, emb.shape[1], dtype=emb.dtype, device=emb.device)
            sums.index_add_(0, index, emb)
            counts = torch.bincount(index, minlength=self.identities.size).to(emb.dtype)
            emb = sums / counts[:, None]
            identity = np.arange(self.identities.size)
        self._entries = emb
        self._entry_identity = identity.astype(np.int64)
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
        """The identity label of each gallery entry, shape (num_entries,)."""
        return self.identities[self._entry_identity]

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

        Genuine pairs share an identity, impostor pairs do not; all ``n_probes ×
        num_entries`` scores are held (as float32/float64 plus a boolean flag each).

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
            The report of :func:`~embedkit.evaluation.verification.verification_metrics`
            (``"auc"``, ``"eer"``, ``"tar@far=..."``, ``"best_accuracy"``, ...), with the
            probe and gallery sizes added to its counts and the raw scores added to its curves
            (``"genuine_scores"``, ``"impostor_scores"``) for histograms.
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
        scan = self._scan(
            p.to(self._entries.device), probe_identity, keep_pairs=verification, progress=progress
        )

        counts = {
            "probes": int(p.shape[0]),
            "mated_probes": n_mated,
            "non_mated_probes": n_non_mated,
            "identities": self.num_identities,
            "gallery_entries": self.num_entries,
        }
        notes = []
        if self.metric == "cosine":
            near = int((scan.best_score >= _NEAR_DUPLICATE).sum())
            counts["near_duplicate_probes"] = near
            if near:
                notes.append(
                    f"{near} probes have a gallery entry with cosine >= {_NEAR_DUPLICATE}: probably the same "
                    "image enrolled and probed, which measures memorisation, not recognition (pass image_ids)"
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
            assert scan.pair_scores is not None
            genuine = self._entry_identity[None, :] == probe_identity[:, None]
            scores, genuine = scan.pair_scores.ravel(), genuine.ravel()
            base = verification_metrics(scores, genuine, far_targets=far_targets)
            reports["verification"] = Report(
                title=f"verification (probe vs gallery {'template' if self.template == 'mean' else 'image'})",
                metrics=base.metrics,
                counts={**base.counts, **counts},
                notes=[*base.notes, *notes],
                curves={
                    **base.curves,
                    "genuine_scores": scores[genuine],
                    "impostor_scores": scores[~genuine],
                },
            )
        return reports

    # -- internals ----------------------------------------------------------------------------------

    def _check_disjoint(self, probe_ids: np.ndarray) -> None:
        if self._image_ids is None:
            return
        shared = np.intersect1d(self._image_ids, probe_ids)
        if shared.size:
            shown = ", ".join(repr(v) for v in shared[:5].tolist()) + (", ..." if shared.size > 5 else "")
            raise ValueError(
                f"{shared.size} image id(s) are both enrolled in the gallery and used as probes: {shown}. "
                "A probe compared with its own gallery image measures memorisation of the pair, not "
                "recognition; enrol and probe disjoint images"
            )

    def _scan(self, probes: Tensor, probe_identity: np.ndarray, *, keep_pairs: bool, progress: bool) -> _Scan:
        assert self._entries is not None
        device = self._entries.device
        n_ids = self.num_identities
        entry_identity = torch.from_numpy(self._entry_identity).to(device)
        best = np.empty(probes.shape[0])
        true = np.full(probes.shape[0], np.nan)
        rank = np.zeros(probes.shape[0], dtype=np.int64)
        pairs = np.empty((probes.shape[0], self.num_entries), dtype=np.float32) if keep_pairs else None
        with progress_bar(probes.shape[0], "gallery search", progress) as update:
            for start, block in similarity_blocks(
                probes, self._entries, metric=self.metric, chunk_size=self.chunk_size
            ):
                c = block.shape[0]
                if pairs is not None:
                    pairs[start : start + c] = to_numpy(block)
                if self.template == "mean":
                    per_identity = block
                else:
                    per_identity = torch.full((c, n_ids), -torch.inf, dtype=block.dtype, device=device)
                    per_identity.scatter_reduce_(1, entry_identity.expand(c, -1), block, reduce="amax")
                best[start : start + c] = to_numpy(per_identity.max(dim=1).values)
                ids = probe_identity[start : start + c]
                is_mated = torch.from_numpy(ids >= 0).to(device)
                safe = torch.from_numpy(np.maximum(ids, 0)).to(device)
                true_score = per_identity.gather(1, safe[:, None])
                true_rank = (per_identity >= true_score).sum(dim=1)
                true[start : start + c] = np.where(ids >= 0, to_numpy(true_score[:, 0]), np.nan)
                rank[start : start + c] = to_numpy(torch.where(is_mated, true_rank, 0))
                if update is not None:
                    update(c)
        return _Scan(best_score=best, true_score=true, rank=rank, pair_scores=pairs)

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
        metrics: dict[str, float | Rate] = {}
        own_notes = list(notes)
        for f in fpir_targets:
            allowed = int(np.floor(f * n_non))
            if (allowed + 1) / n_non <= f:  # floating-point floor, as FPIR itself is computed
                allowed += 1
            threshold = float(non_mated_desc[allowed]) if allowed < n_non else -np.inf
            false_positive = int((non_mated_desc > threshold).sum())
            detected = int(hits_sorted.size - np.searchsorted(hits_sorted, threshold, side="right"))
            chance = false_positive / n_non / self.num_identities
            metrics[fpir_key(f)] = Rate(detected, n_mated, chance)
            metrics[fpir_key(f, "fpir")] = Rate(false_positive, n_non, None)
            metrics[fpir_key(f, "threshold")] = threshold
            if allowed == 0:
                own_notes.append(
                    f"FPIR target {f:g} is finer than 1/{n_non} non-mated probes: the threshold is set above "
                    "every non-mated probe (measured FPIR 0); more non-mated probes are needed to measure it"
                )
        # Curves at every threshold t_j = j-th highest non-mated score (ties make FPIR below j / n_non).
        non_mated_asc = non_mated_desc[::-1]
        fpir = (n_non - np.searchsorted(non_mated_asc, non_mated_desc, side="right")) / n_non
        detected_at = hits_sorted.size - np.searchsorted(hits_sorted, non_mated_desc, side="right")
        return Report(
            title=f"open-set identification (template={self.template!r})",
            metrics=metrics,
            counts=dict(counts),
            notes=own_notes,
            curves={"fpir": fpir, "dir": detected_at / n_mated},
        )
