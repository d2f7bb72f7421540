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
Probes can be pooled the same way (``template_ids=``: IJB-C style probe templates, one per
media group or subject). Labels and template ids may be any hashable ids (strings, integers
of any dtype), coded once by :func:`embedkit.labels.encode_labels`.

Ranks count ties pessimistically, the rule of every rank-based metric of
:mod:`embedkit.evaluation`: an identity scoring exactly as much as the true one is ranked
before it. Which scores are equal is decided by :func:`~embedkit.evaluation.search.exact_scores`
(one elementwise formula, pair by pair) wherever the block scores lie within rounding error
(:func:`~embedkit.evaluation.search.score_tolerance`) of the true identity's, so exact
duplicates enrolled under different identities tie wherever they sit in the gallery. Scores
follow :func:`embedkit.similarity.pairwise_similarity` (higher is closer). Every probe is
scored against every gallery entry, block by block, on the gallery's device: memory holds one
block, never a probes × gallery matrix (:meth:`verify` included).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_ks, check_matching_dim, check_rate_targets
from ..labels import encode_label_sets, encode_labels
from ..similarity import (
    BLOCK_BYTES,
    METRICS,
    Metric,
    _full_precision,
    l2_normalize,
    rows_per_block,
    similarity_blocks,
    working_dtype,
)
from ._inputs import (
    as_embeddings,
    as_image_ids,
    first_few,
    progress_bar,
    repeated_ids,
    shared_ids,
    to_numpy,
)
from .report import Rate, Report
from .search import exact_scores, score_tolerance, search_checked
from .verification import _all_pairs_report, unmeasurable_target_note

__all__ = ["Gallery", "fpir_key"]

Template = Literal["none", "mean"]

# A probe this similar (cosine) to an enrolled image is almost surely the same image. For
# every metric the test is geometric: ||p - x|| <= _NEAR_DUPLICATE_DISTANCE * ||p|| on the
# vectors the metric compares (L2-normalised for cosine), which for unit vectors is exactly
# cosine >= _NEAR_DUPLICATE.
_NEAR_DUPLICATE = 0.9999
_NEAR_DUPLICATE_DISTANCE = float(np.sqrt(2.0 * (1.0 - _NEAR_DUPLICATE)))

# Bytes of the two temporaries that count, a few rows at a time, the identities scoring above
# a probe's true one: a few MiB, so that the rows stay in cache while they are compared.
_COUNT_BYTES = 2**24


def fpir_key(fpir: float, prefix: str = "dir") -> str:
    """The report key at an FPIR target, written as a plain decimal: ``"dir@fpir=0.01"``."""
    return f"{prefix}@fpir={np.format_float_positional(fpir, trim='-')}"


@dataclass(frozen=True)
class _Scan:
    """Per-probe results of one pass over the gallery."""

    best_score: np.ndarray  # (n_probes,) best identity score
    true_score: np.ndarray  # (n_probes,) score of the true identity; NaN when not enrolled
    rank: np.ndarray  # (n_probes,) 1-based rank of the true identity; 0 when not enrolled
    # (n_probes,) squared distance to the nearest enrolled image over the probe's squared norm
    # (metric space); NaN when the scan could not see images (mean templates)
    nearest_ratio: np.ndarray


@dataclass(frozen=True)
class _ProbeSetup:
    """Validated probes of one evaluation, pooled into templates when asked."""

    probes: Tensor  # (n_probes, d) probes or probe templates
    identity: np.ndarray  # (n_probes,) enrolled identity of each; -1 when not enrolled
    mated: np.ndarray  # (n_probes,) identity >= 0
    n_rows: int  # probe rows given (before pooling)
    pooled: bool  # probe templates were formed
    notes: list[str]
    ranks: tuple[int, ...]
    fpir_targets: Sequence[float]
    identification: bool
    open_set: bool


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
        self.identities: np.ndarray = np.empty(0, dtype=np.int64)
        self.template: Template = "none"
        # Identity scores have one column per identity, ordered by (images per identity,
        # identity). The identities with m images each form a group whose entries are stored
        # slot-major — first image of every identity of the group, then every second image,
        # ... — so that their best scores are one max over m contiguous runs of columns.
        self._groups: list[
            tuple[int, int, int, int]
        ] = []  # (first entry, end entry, images each, first column)
        self._identity_column = np.empty(0, dtype=np.int64)  # identity -> column of identity scores
        # column -> its identity's images: entries first + stride * (0 .. images - 1)
        self._column_first = np.empty(0, dtype=np.int64)
        self._column_stride = np.empty(0, dtype=np.int64)
        self._column_images = np.empty(0, dtype=np.int64)
        self._enrol_position = np.empty(0, dtype=np.int64)  # enrolled image i -> its entry
        self._images: Tensor | None = None  # metric-space images, kept for mean templates only
        self._unit_entries: Tensor | None = None  # cosine: the entries L2-normalised, made on first use

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
        labels : array-like of shape (n_images,)
            Identity of each image: integers of any dtype, strings or other hashable ids
            (coded once by :func:`embedkit.labels.encode_labels`; floats are rejected).
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
        identity, identities = _encode(labels, emb.shape[0], "labels", rows_name="embeddings")
        template = check_choice(template, "template", ("none", "mean"))  # type: ignore[assignment]
        ids = None if image_ids is None else as_image_ids(image_ids, emb.shape[0], rows_name="embeddings")
        if ids is not None:
            repeats = repeated_ids(ids)
            if repeats:
                raise ValueError(f"image_ids must be unique within the gallery; {repeats[:5]} repeat")
        emb = emb.to(working_dtype(emb.dtype))
        n_ids = identities.size
        self._images = None
        if template == "mean":
            if self.metric == "cosine":
                emb = l2_normalize(emb)
            # The near-duplicate check compares probes with the enrolled *images*, not templates.
            self._images = emb
            emb = _group_means(emb, identity, n_ids)
            self._enrol_position = identity  # each image is represented by its identity's template
            identity = np.arange(n_ids, dtype=np.int64)
            self._groups = [(0, n_ids, 1, 0)]
            self._identity_column = np.arange(n_ids, dtype=np.int64)
            self._column_first = np.arange(n_ids, dtype=np.int64)
            self._column_stride = np.ones(n_ids, dtype=np.int64)
            self._column_images = np.ones(n_ids, dtype=np.int64)
        else:
            position = self._lay_out(identity, n_ids)
            order = np.empty_like(position)
            order[position] = np.arange(position.size)
            emb = emb[torch.from_numpy(order).to(emb.device)]
            identity = identity[order]
            self._enrol_position = position
        self.template = template
        self.identities = identities
        self._image_ids = ids
        self._entries = emb
        self._unit_entries = None
        self._entry_identity = identity
        return self

    def _lay_out(self, identity: np.ndarray, n_ids: int) -> np.ndarray:
        """Set the identity groups and columns; return the entry of each enrolled image."""
        counts = np.bincount(identity, minlength=n_ids)
        column_identity = np.lexsort((np.arange(n_ids), counts))  # by (images per identity, identity)
        self._identity_column = np.empty_like(column_identity)
        self._identity_column[column_identity] = np.arange(n_ids)
        sizes = counts[column_identity]
        change = np.flatnonzero(np.diff(sizes)) + 1
        first_column = np.concatenate([[0], change]).astype(np.int64)
        end_column = np.concatenate([change, [n_ids]]).astype(np.int64)
        entry_edges = np.concatenate([[0], np.cumsum(sizes)])  # first entry of each column's group run
        self._groups = [
            (int(entry_edges[a]), int(entry_edges[b]), int(sizes[a]), int(a))
            for a, b in zip(first_column, end_column, strict=True)
        ]
        group_first_column = np.repeat(first_column, end_column - first_column)
        self._column_stride = np.repeat(end_column - first_column, end_column - first_column)
        self._column_first = entry_edges[group_first_column] + np.arange(n_ids) - group_first_column
        self._column_images = sizes
        # The slot of each image among its identity's images, in enrolment order.
        by_identity = np.argsort(identity, kind="stable")
        identity_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = np.empty_like(identity)
        slot[by_identity] = np.arange(identity.size) - identity_start[identity[by_identity]]
        column = self._identity_column[identity]
        return np.asarray(self._column_first[column] + slot * self._column_stride[column], dtype=np.int64)

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

        The original labels, in enrolment order for ``template="none"`` (one per enrolled
        image), and in the order of :attr:`identities` for ``template="mean"`` (one per
        identity; ascending whenever the labels can be ordered).
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
        template_ids: Any = None,
        progress: bool = False,
    ) -> Report:
        """Closed-set identification: rank-k accuracy and CMC of the probes' true identities.

        Ranks count ties pessimistically: the rank of a probe's true identity is the number
        of enrolled identities scoring at least as much as it, itself included, so an
        identity (or an exact duplicate of the true image enrolled under another identity)
        that scores exactly the same ranks before it. Scores whose computed values lie within
        rounding error of each other are re-scored exactly
        (:func:`~embedkit.evaluation.search.exact_scores`, the rule of every rank-based
        metric in :mod:`embedkit.evaluation`), so that the rank never depends on where an
        entry sits in the gallery.

        Parameters
        ----------
        probes : ndarray or Tensor of shape (n_probes, d)
            Probe embeddings.
        labels : array-like of shape (n_probes,)
            True identity of each probe (any hashable labels, compared with the enrolled
            ones by value and type). Probes of identities that are not enrolled are counted
            (``counts["non_mated_probes"]``) and left out, with a note.
        ranks : sequence of int
            Ranks ``k`` reported as ``"rank-k"``.
        image_ids : sequence of shape (n_probes,), optional
            Source image of each probe; one that is also enrolled is an error.
        template_ids : array-like of shape (n_probes,), optional
            Probe templates (IJB-C style): the template, media group or subject each probe
            row belongs to, as any hashable ids. Rows sharing an id are pooled into one probe
            template, the mean of their embeddings (each L2-normalised first for cosine: the
            rule of ``enrol(template="mean")``), which is then identified as one probe; its
            rows must share one label. Counts and rates are then per template;
            ``counts["probe_rows"]`` and ``counts["probe_templates"]`` say how many
            templates were formed from how many rows. ``None``: every row is a probe.
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
            probes,
            labels,
            ranks=ranks,
            image_ids=image_ids,
            template_ids=template_ids,
            progress=progress,
            open_set=False,
        )["identification"]

    def dir_at_fpir(
        self,
        probes: Any,
        labels: Any,
        *,
        fpir_targets: Sequence[float] = (0.001, 0.01, 0.1),
        image_ids: Any = None,
        template_ids: Any = None,
        progress: bool = False,
    ) -> Report:
        """Open-set identification: DIR at given FPIR, from mated and non-mated probes.

        For a target FPIR ``f`` the threshold ``t`` is the one that lets through the most
        non-mated probes without exceeding ``f``: a probe is accepted when its best score is
        at or above ``t``. ``DIR = #(mated probes whose true identity is rank 1 and scores
        at least t) / #mated``, rank 1 counted pessimistically as in :meth:`identify` (an
        identity tied with the true one makes it rank 2). A target finer than
        ``1 / #non-mated`` puts ``t`` above every non-mated probe (measured FPIR 0), with a
        note.

        Parameters
        ----------
        probes : ndarray or Tensor of shape (n_probes, d)
        labels : array-like of shape (n_probes,)
            Probes whose label is enrolled are mated, the others non-mated; both must occur.
        fpir_targets : sequence of float
            Targets in (0, 1].
        image_ids : sequence of shape (n_probes,), optional
            As in :meth:`identify`.
        template_ids : array-like of shape (n_probes,), optional
            Probe templates, as in :meth:`identify`: FPIR and DIR then count templates.
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
            template_ids=template_ids,
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
        template_ids: Any = None,
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
        labels : array-like of shape (n_probes,)
        far_targets : sequence of float
            FAR targets in (0, 1] for ``"tar@far=<target>"``.
        image_ids : sequence of shape (n_probes,), optional
            As in :meth:`identify`.
        template_ids : array-like of shape (n_probes,), optional
            Probe templates, as in :meth:`identify`: with ``enrol(template="mean")`` this is
            IJB-C's template-to-template 1:1 protocol (every pair a probe template and a
            gallery template).
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
            template_ids=template_ids,
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
        template_ids: Any = None,
        identification: bool = True,
        open_set: bool | None = None,
        verification: bool = False,
        progress: bool = False,
    ) -> dict[str, Report]:
        """Identification, open-set identification and verification from one pass.

        Parameters
        ----------
        probes, labels, image_ids, template_ids, progress
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
        setup = self._probe_setup(
            p,
            labels,
            ranks=ranks,
            fpir_targets=fpir_targets,
            image_ids=image_ids,
            template_ids=template_ids,
            identification=identification,
            open_set=open_set,
            device=self._entries.device,
        )
        p = setup.probes
        scan = self._scan(p, setup.identity, progress=progress)
        nearest_ratio = scan.nearest_ratio
        if self._images is not None:  # mean templates: compare with the enrolled images themselves
            nearest_ratio = self._nearest_image_ratio(p.to(self._images.device))
        counts, notes = self._counts_and_notes(
            setup, nearest_ratio, ids_checked=image_ids is not None and self._image_ids is not None
        )
        reports = self._reports(setup, scan, counts, notes)
        if verification:
            # Exact, in bounded memory: never a probes x entries matrix (see all_pairs_verification).
            base = _all_pairs_report(
                p,
                setup.identity,
                self._entries,
                self._entry_identity,
                metric=self.metric,
                far_targets=far_targets,
                chunk_size=self.chunk_size,
                progress=progress,
            )
            reports["verification"] = Report(
                title=(
                    f"verification (probe {'template' if template_ids is not None else 'image'} vs gallery "
                    f"{'template' if self.template == 'mean' else 'image'})"
                ),
                metrics=base.metrics,
                counts={**base.counts, **counts},
                notes=[*base.notes, *notes],
                curves=base.curves,
            )
        return reports

    # -- the steps of evaluate, shared with the sharded gallery -------------------------------------

    def _probe_setup(
        self,
        p: Tensor,
        labels: Any,
        *,
        ranks: Sequence[int],
        fpir_targets: Sequence[float],
        image_ids: Any,
        template_ids: Any,
        identification: bool,
        open_set: bool | None,
        device: torch.device,
    ) -> _ProbeSetup:
        """Validate the probes' labels, ids and options; pool probe templates (on ``device``)."""
        n_rows = p.shape[0]
        probe_code, classes, probe_identity = self._probe_identity(labels, n_rows)
        ranks = check_ks(ranks, "ranks")
        if image_ids is not None:
            self._check_disjoint(as_image_ids(image_ids, n_rows, rows_name="probes"))
        p = p.to(device)
        notes = []
        if template_ids is not None:
            p, probe_identity = self._pool_probe_templates(
                p, probe_code, classes, probe_identity, template_ids
            )
            notes.append(
                f"{p.shape[0]} probe templates formed from {n_rows} probe rows (the mean of each template's "
                f"{'L2-normalised ' if self.metric == 'cosine' else ''}embeddings); counts and rates are "
                "per template"
            )
        mated = probe_identity >= 0
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
        return _ProbeSetup(
            probes=p,
            identity=probe_identity,
            mated=mated,
            n_rows=n_rows,
            pooled=template_ids is not None,
            notes=notes,
            ranks=ranks,
            fpir_targets=fpir_targets,
            identification=bool(identification),
            open_set=bool(open_set),
        )

    def _counts_and_notes(
        self, setup: _ProbeSetup, nearest_ratio: np.ndarray, *, ids_checked: bool
    ) -> tuple[dict[str, int], list[str]]:
        """The counts of every report, and the notes on near-duplicate and unchecked probes."""
        n_probes = int(setup.probes.shape[0])
        counts = {
            "probes": n_probes,
            "mated_probes": int(setup.mated.sum()),
            "non_mated_probes": int((~setup.mated).sum()),
            "identities": self.num_identities,
            "gallery_entries": self.num_entries,
        }
        if setup.pooled:
            counts["probe_rows"] = setup.n_rows
            counts["probe_templates"] = n_probes
        notes = list(setup.notes)
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
        if not ids_checked:
            notes.append(
                "image ids not given for both sides: disjointness of gallery and probe images unchecked"
            )
        return counts, notes

    def _reports(
        self, setup: _ProbeSetup, scan: _Scan, counts: dict[str, int], notes: list[str]
    ) -> dict[str, Report]:
        """The identification and open-set reports asked for, from one scan."""
        reports: dict[str, Report] = {}
        if setup.identification:
            reports["identification"] = self._identification_report(
                scan, setup.mated, setup.ranks, counts, notes
            )
        if setup.open_set:
            reports["open_set"] = self._open_set_report(scan, setup.mated, setup.fpir_targets, counts, notes)
        return reports

    def _score_dtype(self) -> np.dtype:
        """The numpy dtype the identity scores are computed in (that of the entries)."""
        assert self._entries is not None
        return to_numpy(self._entries[:0]).dtype

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

    def _probe_identity(self, labels: Any, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Probe label codes, their classes, and each probe's enrolled identity (-1: not enrolled).

        Labels are coded together with the enrolled ones (:func:`encode_label_sets`), so a
        probe is mated when its label equals an enrolled label in value and type.
        """
        (enrolled, probe_code), classes = encode_label_sets(
            [self.identities, labels], ["enrolled labels", "labels"], [self.num_identities, n_rows]
        )
        identity_of = np.full(classes.size, -1, dtype=np.int64)
        identity_of[enrolled] = np.arange(self.num_identities)
        return probe_code, classes, identity_of[probe_code]

    def _pool_probe_templates(
        self,
        probes: Tensor,
        probe_code: np.ndarray,
        classes: np.ndarray,
        probe_identity: np.ndarray,
        template_ids: Any,
    ) -> tuple[Tensor, np.ndarray]:
        """Pool probe rows into templates: ``(templates (T, d), identity of each (T,))``.

        A template is the mean of its rows' embeddings, each L2-normalised first for cosine
        (as ``enrol(template="mean")``); templates come in the order of their sorted ids.
        """
        n_rows = probes.shape[0]
        template, template_names = _encode(template_ids, n_rows, "template_ids", rows_name="probes")
        n_templates = template_names.size
        low = np.full(n_templates, np.iinfo(np.int64).max)
        high = np.full(n_templates, -1)
        np.minimum.at(low, template, probe_code)
        np.maximum.at(high, template, probe_code)
        mixed = np.flatnonzero(low != high)
        if mixed.size:
            t = int(mixed[0])
            shown = first_few(classes[np.unique(probe_code[template == t])].tolist())
            raise ValueError(
                f"template_ids: every probe row of a template must have one label; {mixed.size} template(s) "
                f"mix labels, e.g. template {template_names[t : t + 1].tolist()[0]!r} holds rows of labels "
                f"{shown}"
            )
        first_row = np.full(n_templates, n_rows)
        np.minimum.at(first_row, template, np.arange(n_rows))
        rows = probes.to(working_dtype(probes.dtype))
        if self.metric == "cosine":
            rows = l2_normalize(rows)
        return _group_means(rows, template, n_templates), probe_identity[first_row]

    def _block_rows(self, dtype: torch.dtype) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        # 128 MiB blocks: measured at 1e5 entries x 1e4 probes (1,000 identities), an 8 MiB,
        # cache-sized block was 2x slower overall (per-block overhead of the identity groups).
        return rows_per_block(self.num_entries, bytes_per_entry=dtype.itemsize, budget=BLOCK_BYTES)

    def _score_blocks(self, probes: Tensor, chunk_size: int) -> Iterator[tuple[int, Tensor]]:
        """:func:`~embedkit.similarity.similarity_blocks` of the probes against the entries.

        For cosine and dot every block is written into one buffer, allocated once: with a fresh
        128 MiB block per step the kernel's page faults made each step 1.7x slower than the
        matrix product alone. A block is valid until the next one is asked for.
        """
        assert self._entries is not None
        if self.metric not in ("cosine", "dot"):
            yield from similarity_blocks(probes, self._entries, metric=self.metric, chunk_size=chunk_size)
            return
        dtype = working_dtype(torch.promote_types(probes.dtype, self._entries.dtype))
        device = self._entries.device
        # The same operations as similarity_blocks (normalised once, then x @ y.T in the working
        # dtype with autocast off), so the blocks are the same numbers. The normalised entries
        # are kept: normalising 1e5 x 128 entries cost 6% of a whole identify call.
        with _full_precision(device):
            reference = self._entries.to(dtype)
            if self.metric == "cosine":
                if self._unit_entries is None or self._unit_entries.dtype != dtype:
                    self._unit_entries = l2_normalize(reference)
                reference = self._unit_entries
        n = probes.shape[0]
        buffer = torch.empty((min(chunk_size, n), reference.shape[0]), dtype=dtype, device=device)
        for start in range(0, n, chunk_size):
            with _full_precision(device):
                rows = probes[start : start + chunk_size].to(dtype)
                if self.metric == "cosine":
                    rows = l2_normalize(rows)
                block = buffer[: rows.shape[0]]
                torch.mm(rows, reference.T, out=block)
            yield start, block

    def _identity_scores(self, block: Tensor, out: Tensor | None) -> Tensor:
        """Per-identity scores ``(rows, C)`` of a block of entry scores ``(rows, num_entries)``.

        Columns follow ``self._identity_column``. The ``m`` images of each identity of a group
        lie ``n`` entries apart (slot-major), so the group's best images are one max over an
        ``(rows, m, n)`` view, reduced along the middle axis: contiguous runs, vectorised.
        ``out`` (``(rows, C)``) receives them unless every identity has one entry, when the
        block itself is the answer.
        """
        if out is None:
            return block
        for a, b, m, column in self._groups:
            n = (b - a) // m
            part = block[:, a:b]
            if m == 1:
                out[:, column : column + n].copy_(part)
            else:
                torch.amax(part.unflatten(1, (m, n)), dim=1, out=out[:, column : column + n])
        return out

    def _nearest_image_ratio(self, probes: Tensor) -> np.ndarray:
        """Squared distance from each probe to its nearest enrolled image, over its squared norm.

        In metric space (probes L2-normalised for cosine); one exact k=1 search of the images.
        """
        assert self._images is not None
        return _nearest_image_ratio(self._images, probes, self.metric)

    def _scan(self, probes: Tensor, probe_identity: np.ndarray, *, progress: bool) -> _Scan:
        """Every probe against every entry, one block of probes at a time.

        Holds one block of scores (``chunk_size × num_entries``), the identity scores of the
        block (``chunk_size × C``, when identities have several images) and two 8 MiB counting
        buffers, each allocated once per call and reused block after block.
        """
        assert self._entries is not None
        entries = self._entries
        device = entries.device
        dtype = working_dtype(torch.promote_types(probes.dtype, entries.dtype))
        n = probes.shape[0]
        mated = probe_identity >= 0
        true_column = self._identity_column[np.maximum(probe_identity, 0)]
        true_column_t = torch.from_numpy(true_column).to(device)
        tolerance = score_tolerance(probes, entries, metric=self.metric, search_dtype=dtype)
        best = np.empty(n)
        true = np.full(n, np.nan)
        rank = np.zeros(n, dtype=np.int64)
        nearest = np.full(n, np.nan)
        scan_images = self._images is None  # the entries are the images: nearest image comes free
        probe_sq = (
            to_numpy(probes.double().pow(2).sum(dim=1)) if scan_images and self.metric != "cosine" else None
        )
        entry_sq = entries.to(dtype).pow(2).sum(dim=1) if scan_images and self.metric == "dot" else None
        chunk_size = self._block_rows(dtype)
        grouped = not (len(self._groups) == 1 and self._groups[0][2] == 1)
        per_identity_buffer = (
            torch.empty((min(chunk_size, n), self.num_identities), dtype=dtype, device=device)
            if grouped
            else None
        )
        with torch.no_grad(), progress_bar(n, "gallery search", progress) as update:
            for start, block in self._score_blocks(probes, chunk_size):
                c = block.shape[0]
                rows = slice(start, start + c)
                per_identity = self._identity_scores(
                    block, None if per_identity_buffer is None else per_identity_buffer[:c]
                )
                top = per_identity.amax(dim=1)
                true_score = per_identity.gather(1, true_column_t[rows, None])[:, 0]
                true_np = to_numpy(true_score).astype(np.float64)
                best[rows] = to_numpy(top)
                true[rows] = np.where(mated[rows], true_np, np.nan)
                rank[rows] = self._true_ranks(
                    per_identity, true_np, tolerance[rows], mated[rows], true_column[rows], probes, start
                )
                if scan_images:  # last: for dot it overwrites the block
                    nearest[rows] = self._nearest_from_block(
                        block, top, entry_sq, None if probe_sq is None else probe_sq[rows]
                    )
                if update is not None:
                    update(c)
        return _Scan(best_score=best, true_score=true, rank=rank, nearest_ratio=nearest)

    def _tie_window(
        self, true_score: np.ndarray, tolerance: np.ndarray, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """Per row, the scores ``[low, high]`` that may tie with the true identity's exactly.

        Every computed score is within ``tolerance`` (:func:`score_tolerance`, on the ranking
        key: the score, or minus the squared distance for ``"euclidean"``) of its exact value,
        so a score above ``high`` is surely higher than the true one, below ``low`` surely
        lower. Rounded outwards to ``dtype``.
        """
        margin = 2.0 * tolerance
        if self.metric == "euclidean":  # score -d, key -d**2
            square = true_score**2
            low = -np.sqrt(square + margin)
            high = -np.sqrt(np.maximum(square - margin, 0.0))
        else:
            low, high = true_score - margin, true_score + margin
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        low_r, high_r = low.astype(np_dtype), high.astype(np_dtype)
        low_r = np.where(low_r > low, np.nextafter(low_r, np_dtype(-np.inf)), low_r)
        high_r = np.where(high_r < high, np.nextafter(high_r, np_dtype(np.inf)), high_r)
        return torch.from_numpy(low_r), torch.from_numpy(high_r)

    def _true_ranks(
        self,
        per_identity: Tensor,
        true_score: np.ndarray,
        tolerance: np.ndarray,
        mated: np.ndarray,
        true_column: np.ndarray,
        probes: Tensor,
        start: int,
    ) -> np.ndarray:
        """Pessimistic 1-based rank of each row's true identity among ``per_identity``'s columns.

        ``#(identities scoring surely higher) + #(identities within rounding of the true score
        whose exact score is >= its exact score)``, the true identity itself included; 0 for
        non-mated rows. Taken a few rows at a time through two cache-sized float buffers:
        counting in floats is exact below 2**24 identities and several times faster than a
        boolean sum, and the rows' tie windows are read while the rows are in cache.
        """
        c, n_ids = per_identity.shape
        device = per_identity.device
        low, high = (t.to(device) for t in self._tie_window(true_score, tolerance, per_identity.dtype))
        count_dtype = torch.float32 if n_ids < 2**24 else torch.float64
        step = max(1, _COUNT_BYTES // (2 * 4 * n_ids))
        scratch = torch.empty((2, min(step, c), n_ids), dtype=count_dtype, device=device)
        above = torch.empty(c, dtype=count_dtype, device=device)
        in_window = torch.empty(c, dtype=count_dtype, device=device)
        found: list[tuple[np.ndarray, np.ndarray]] = []  # (row, column) in the windows of crowded rows
        mated_t = torch.from_numpy(mated).to(device)
        for r in range(0, c, step):
            part = per_identity[r : r + step]
            surely, window = scratch[0, : part.shape[0]], scratch[1, : part.shape[0]]
            torch.gt(part, high[r : r + step, None], out=surely)
            torch.sum(surely, dim=1, out=above[r : r + step])
            torch.ge(part, low[r : r + step, None], out=window)
            window.mul_(torch.le(part, high[r : r + step, None], out=surely))
            torch.sum(window, dim=1, out=in_window[r : r + step])
            # Each row's window holds its true identity; anything else there needs exact scores.
            is_crowded = (in_window[r : r + step] > 1) & mated_t[r : r + step]
            crowded = torch.nonzero(is_crowded)[:, 0]
            if 2 * crowded.numel() > part.shape[0]:  # most rows: all of them, no gather
                where, column = torch.nonzero(window).T
                keep = is_crowded[where]
                found.append((to_numpy(where[keep]) + r, to_numpy(column[keep])))
            elif crowded.numel():  # nonzero costs ten comparisons: only on the rows that need it
                where, column = torch.nonzero(window[crowded]).T
                found.append((to_numpy(crowded[where]) + r, to_numpy(column)))
        rank = to_numpy(above).astype(np.int64) + 1
        if found:
            where, column = (np.concatenate(parts).astype(np.int64) for parts in zip(*found, strict=True))
            rows = np.unique(where)
            counts = self._exact_window_ranks(where, column, c, true_column, probes, start)
            rank[rows] += counts[rows] - 1
        rank[~mated] = 0
        return rank

    def _exact_window_ranks(
        self,
        where: np.ndarray,
        column: np.ndarray,
        n_rows: int,
        true_column: np.ndarray,
        probes: Tensor,
        start: int,
    ) -> np.ndarray:
        """Per block row, how many of its window's identities score >= its true identity, exactly.

        ``(where, column)``: the block rows and identity columns in each row's tie window (the
        true identity's among them). An identity's exact score is the best
        :func:`exact_scores` over its images (or its template): one fixed elementwise formula,
        so exact duplicates always tie. Rows without a window count 0.
        """
        identity_score = self._exact_identity_scores(probes, start + where, column)
        is_true = column == true_column[where]
        true_score = np.full(n_rows, np.nan)
        true_score[where[is_true]] = identity_score[is_true]
        at_least = identity_score >= true_score[where]
        return np.bincount(where, weights=at_least, minlength=n_rows).astype(np.int64)

    def _exact_identity_scores(self, probes: Tensor, probe_row: np.ndarray, column: np.ndarray) -> np.ndarray:
        """The exact score of each pair (``probes[probe_row]``, identity column ``column``), float64.

        The best :func:`exact_scores` over the identity's images (or its template).
        """
        assert self._entries is not None
        if column.size == 0:
            return np.empty(0)
        images = self._column_images[column]
        first_image = np.cumsum(images) - images
        slot = np.arange(int(images.sum())) - np.repeat(first_image, images)
        entry = np.repeat(self._column_first[column], images) + slot * np.repeat(
            self._column_stride[column], images
        )
        value = exact_scores(probes, self._entries, np.repeat(probe_row, images), entry, metric=self.metric)
        return np.maximum.reduceat(value, first_image)

    def _nearest_from_block(
        self, block: Tensor, top: Tensor, entry_sq: Tensor | None, probe_sq: np.ndarray | None
    ) -> np.ndarray:
        """Relative squared distance to the nearest image from a block of image scores.

        For ``"dot"`` the block is overwritten (``||x||² - 2 p·x``, in place).
        """
        if self.metric == "cosine":  # unit vectors: ||p - x||^2 = 2 - 2 cos
            return np.maximum(2.0 - 2.0 * to_numpy(top).astype(np.float64), 0.0)
        assert probe_sq is not None
        if self.metric == "dot":  # the best dot product is not the nearest image: ||x||^2 - 2 p.x
            assert entry_sq is not None
            closest = to_numpy(block.mul_(-2.0).add_(entry_sq).amin(dim=1)).astype(np.float64)
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
        dtype = self._score_dtype()
        return float(np.nextafter(dtype.type(s), dtype.type(np.inf)))


def _encode(
    labels: Any, n_rows: int, name: str, *, rows_name: str, allow_empty: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_labels`, one label per row of ``rows_name``."""
    codes, classes = encode_labels(labels, name, allow_empty=allow_empty)
    if codes.shape[0] != n_rows:
        raise ValueError(
            f"{name} has {codes.shape[0]} entries but {rows_name} has {n_rows} rows; expected one per row"
        )
    return codes, classes


def _group_means(rows: Tensor, group: np.ndarray, n_groups: int) -> Tensor:
    """The mean of the rows of each group, ``(n_groups, d)``; every group has a row."""
    index = torch.from_numpy(group).to(rows.device)
    sums = torch.zeros(n_groups, rows.shape[1], dtype=rows.dtype, device=rows.device)
    sums.index_add_(0, index, rows)
    counts = torch.bincount(index, minlength=n_groups).to(rows.dtype)
    return sums / counts[:, None]


def _nearest_image_ratio(images: Tensor, probes: Tensor, metric: Metric) -> np.ndarray:
    """Squared distance from each probe to its nearest row of ``images``, over its squared norm.

    ``images`` are in metric space (L2-normalised for cosine); the probes are normalised here.
    """
    q = l2_normalize(probes.to(images.dtype)) if metric == "cosine" else probes
    q = q.to(images.dtype)
    scores, _ = search_checked(q, images, 1, metric="squared_euclidean")
    distance_sq = -(to_numpy(scores) if isinstance(scores, Tensor) else scores)[:, 0].astype(np.float64)
    return _relative(distance_sq, to_numpy(q.double().pow(2).sum(dim=1)))


def _relative(distance_sq: np.ndarray, norm_sq: np.ndarray) -> np.ndarray:
    """``distance² / norm²``; 0 for an exact match of a zero vector, ``inf`` for a near miss of one."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = distance_sq / norm_sq
    return np.where(norm_sq > 0, ratio, np.where(distance_sq > 0, np.inf, 0.0))
