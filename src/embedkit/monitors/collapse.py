"""Class-collapse monitor for classification heads (margin-softmax, linear probes).

:class:`ClassCollapseMonitor` watches the logits of a classifier and names the
failures of case studies 01 and 02: a head that predicts one class for everyone
(``class_collapse``), an accuracy that is only chance level (``at_chance``), an
accuracy *below* chance (``below_chance``), a saturated softmax far more confident
than it is accurate (``overconfident``) and NaN/inf logits (``non_finite``).

Life cycle (torchmetrics style): :meth:`~ClassCollapseMonitor.update` once per batch
does the work that needs the logits and keeps a few per-row results on the logits'
device, which are counted up to eight batches at a time — all without a
device-to-host sync (no ``.item()``, no indexing with a tensor, no ``bincount`` —
whose CUDA kernel reads the maximum back — and no data-dependent shapes);
:meth:`~ClassCollapseMonitor.compute` counts what is pending, reads the counts back
once and interprets them; :meth:`~ClassCollapseMonitor.reset` starts over. Every
statistic is exact over all rows seen since the last reset, except the mean
max-softmax confidence and the logit mean and spread, which by default come from 128
rows spread evenly over each batch (``softmax_rows``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import check_bool, check_embeddings, check_int, check_ks, check_labels, check_real
from ..evaluation.report import Rate, format_percent
from ..similarity import working_dtype
from ._distributed import check_same_setup, process_count, sum_across
from ._rows import spread_rows
from .chance import chance_verdict, describe_rate, wilson_interval
from .diagnosis import Diagnosis, non_finite
from .report import MonitorReport

__all__ = ["ClassCollapseMonitor"]

# Thresholds, each justified in docs/guides/reading-the-diagnoses.rst.
#: class_collapse (a): the dominant class takes at least this share of the samples of
#: the *other* classes, measured between chance (1/C) and total absorption (1).
ABSORPTION_FRACTION = 0.5
#: ... out of at least this many samples of other classes.
MIN_OTHER_SAMPLES = 20
#: class_collapse (b): at most this share of the distinct true classes is ever predicted ...
PREDICTED_CLASS_FRACTION = 0.1
#: ... when at least this many distinct true classes were seen.
MIN_LABEL_CLASSES = 10
#: overconfident: mean max-softmax exceeds the upper end of the top-1 interval by this much.
CONFIDENCE_GAP = 0.5
#: overconfident needs at least this many samples.
MIN_CONFIDENCE_SAMPLES = 20

# update() keeps each batch's per-row results and counts them FOLD_EVERY batches at a
# time: every tensor operation costs microseconds of dispatch whatever its size, and
# counting one batch takes some thirty of them. The per-batch histograms of a fold are
# a (batches, C) table, so fewer batches are folded together when C is large.
FOLD_EVERY = 8
FOLD_CELLS = 2**20


@dataclass
class _CollapseState:
    seen: int  # rows passed to update
    # (3 + len(topk),): rows counted (finite logits and a valid label), rows with finite
    # logits, rows with a valid label, then the top-k hits for each k
    row_counts: Tensor
    # (C, 2): predictions of class c, and predictions of class c for samples of other classes
    histograms: Tensor
    labels: Tensor  # (C,) label histogram
    # (2,): within each batch, the class that takes the most predictions of samples of
    # other classes: its count of those predictions, and the batch's samples of other classes.
    batch_absorption: Tensor
    ks: Tensor  # (len(topk),) the k's, min(k, C), kept on the device
    # (4,) float64, over the counted rows among the softmax_rows sampled from each batch:
    # their number, and their sums of max-softmax confidence, of logits and of squared logits.
    sampled_sums: Tensor


@dataclass
class _BatchFacts:
    """What update() keeps of one batch until it is counted (all on the logits' device)."""

    predicted: Tensor  # (b,) int64, argmax of each row
    labels: Tensor  # (b,) int64, clamped into [0, C)
    finite: Tensor  # (b,) bool, the row's logits are finite
    valid: Tensor  # (b,) bool, the label was in [0, C)
    rank: Tensor  # (b,) classes scoring at least as high as the true class
    sampled_rows: slice  # the rows of the batch sampled for the confidence and logit moments
    sampled: Tensor  # (h, 3) of those rows: max-softmax, sum and sum of squares of the logits


class ClassCollapseMonitor:
    """Top-k accuracy with chance levels, prediction histogram and logit statistics.

    Parameters
    ----------
    num_classes : int
        Number of classes ``C`` (columns of the logits), at least 2.
    topk : int or sequence of int
        The ``k`` of the top-k accuracies (default ``(1, 5)``); a ``k`` above ``C`` is
        computed as top-``C`` (always a hit, chance 100%).
    confidence : float
        Coverage of the Wilson intervals used to compare accuracies with chance.
    softmax_rows : int or None
        Rows of each batch (every k-th, spread over it) on which the max-softmax
        confidence and the logit mean and spread are measured; ``None`` for all rows
        (exact, about 1.5× the update cost at batch 1,024 and 1,000 classes: the softmax
        needs an ``exp`` of every logit). Default 128; ``counts["softmax_samples"]`` says
        how many rows these statistics rest on.
    sync_on_compute : bool
        Under ``torch.distributed`` (DDP), combine the counts of every process in
        :meth:`compute` (default), so each process reports on all batches; every process
        must then call :meth:`compute`, after at least one update. ``False`` reports on
        this process's batches alone. Outside ``torch.distributed`` it changes nothing.
    process_group : optional
        The ``torch.distributed`` group to combine over (default: all processes).

    Examples
    --------
    >>> monitor = ClassCollapseMonitor(num_classes=518)
    >>> for images, labels in loader:                       # doctest: +SKIP
    ...     loss = arcface(model(images), labels)
    ...     monitor.update(arcface.last_logits, labels)    # the loss's own logits, free
    >>> report = monitor.compute()                          # doctest: +SKIP
    >>> report.codes, report.rate("top1_accuracy")          # doctest: +SKIP
    (['class_collapse'], Rate(hits=45, total=25729, chance=0.0019...))

    Notes
    -----
    Statistics (keys of the report): ``top{k}_accuracy`` (a :class:`Rate` with chance
    ``min(k, C) / C``; a sample is a top-k hit when at most k classes, its own
    included, score at least as high as its true class, so ties count against it and
    constant logits never score), ``num_predicted_classes``, ``num_label_classes``,
    ``dominant_class``, ``dominant_class_share``, ``dominant_class_absorption`` (share of
    the samples of *other* classes predicted as the dominant class),
    ``batch_dominant_absorption`` (the same measured inside each batch for that batch's
    most-absorbing class, pooled over batches: it catches a head that gives a whole batch
    one class that changes from step to step),
    ``accuracy_ceiling`` (the best top-1 accuracy possible with the set of classes
    that is ever predicted), ``prediction_entropy`` (entropy of the prediction
    histogram divided by ``log C``: 0 for one class, 1 for uniform),
    ``mean_max_softmax``, ``logit_mean`` and ``logit_std`` (over every entry of the
    ``softmax_rows`` of each batch); every other statistic is exact over all rows. Rows
    with a NaN/inf logit are counted and left out of every statistic.
    """

    def __init__(
        self,
        num_classes: int,
        topk: int | Sequence[int] = (1, 5),
        *,
        confidence: float = 0.95,
        softmax_rows: int | None = 128,
        sync_on_compute: bool = True,
        process_group: Any = None,
    ) -> None:
        self.num_classes = check_int(num_classes, "num_classes", low=2)
        self.topk: tuple[int, ...] = check_ks(topk, "topk")
        self.confidence = check_real(
            confidence, "confidence", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
        )
        self.softmax_rows = None if softmax_rows is None else check_int(softmax_rows, "softmax_rows", low=1)
        self.sync_on_compute = check_bool(sync_on_compute, "sync_on_compute")
        self.process_group = process_group
        self._state: _CollapseState | None = None
        self._pending: list[_BatchFacts] = []
        self._fold_every = max(1, min(FOLD_EVERY, FOLD_CELLS // self.num_classes))
        self._reversed: Tensor | None = None  # C-1, ..., 1, 0, see _scan_rows
        self._work: Tensor | None = None  # the (batch, C) workspace of _scan_rows, reused

    def __repr__(self) -> str:
        seen = 0 if self._state is None else self._state.seen + 0
        return (
            f"ClassCollapseMonitor(num_classes={self.num_classes}, topk={self.topk}, "
            f"confidence={self.confidence:g}, softmax_rows={self.softmax_rows}, seen={seen})"
        )

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._state = None
        self._pending = []

    def _new_state(self, device: torch.device) -> _CollapseState:
        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        c = self.num_classes
        return _CollapseState(
            seen=0,
            row_counts=zeros(3 + len(self.topk)),
            histograms=zeros(c, 2),
            labels=zeros(c),
            batch_absorption=zeros(2),
            ks=torch.tensor([min(k, c) for k in self.topk], dtype=torch.int32, device=device),
            sampled_sums=zeros(4, dtype=torch.float64),
        )

    def update(self, logits: Tensor | None, labels: Any) -> None:
        """Accumulate one batch.

        Parameters
        ----------
        logits : Tensor of shape (batch_size, num_classes)
            Class scores before softmax (any floating dtype). From a margin-softmax
            loss pass its ``last_logits`` after the loss call: the margin-free logits its
            forward pass computed, at no cost (``loss.logits(embeddings)`` computes them
            again with a second matmul). Detached; no gradient flows.
        labels : Tensor, ndarray or sequence of int, of shape (batch_size,)
            True classes in ``[0, num_classes)``. Out-of-range labels are counted here
            and raise in :meth:`compute` (checking them here would need a host sync).
            Labels on another device than the logits are copied over, which on a GPU
            waits for it: pass them on the logits' device to keep the update sync-free.
        """
        if logits is None:
            raise TypeError(
                "logits is None: a loss's last_logits is None before its first call and when it "
                "was built with keep_logits=False; call the loss first (or pass loss.logits(embeddings))"
            )
        check_embeddings(logits, "logits", check_finite=False)
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits has {logits.shape[1]} columns but the monitor was built with "
                f"num_classes={self.num_classes}; expected shape (batch_size, {self.num_classes})"
            )
        labels = check_labels(labels, logits.shape[0], "labels", device=logits.device, rows_name="logits")
        if self._state is None:
            self._state = self._new_state(logits.device)
        state = self._state
        if state.row_counts.device != logits.device:
            raise ValueError(
                f"logits is on {logits.device} but earlier batches were on {state.row_counts.device}; "
                "call reset() before switching devices"
            )
        with torch.no_grad():
            x = logits.detach()
            if x.dtype != working_dtype(x.dtype):
                x = x.float()
            # A row holds NaN/inf exactly when its sum does (or when the sum overflows, at
            # |logit| ~ 1e35): one cheap reduction instead of an element-wise isfinite.
            # Such rows are kept but carry weight 0 in every count.
            row_sum = x.sum(dim=1)
            y = labels.clamp(0, self.num_classes - 1)
            rows = spread_rows(x.shape[0], self.softmax_rows)
            predicted, rank, max_softmax = self._scan_rows(x, y, rows)
            sampled = torch.stack([max_softmax, row_sum[rows], x[rows].square().sum(dim=1)], dim=1)
            facts = _BatchFacts(predicted, y, row_sum.isfinite(), y == labels, rank, rows, sampled)
        self._pending.append(facts)
        state.seen += x.shape[0]
        if len(self._pending) >= self._fold_every:
            self._fold()

    def _fold(self) -> None:
        """Count the pending batches into the running state, all of them at once (no host sync)."""
        if not self._pending or self._state is None:
            return
        state, batches, c = self._state, self._pending, self.num_classes
        self._pending = []
        with torch.no_grad():
            predicted = torch.cat([b.predicted for b in batches])
            y = torch.cat([b.labels for b in batches])
            finite = torch.cat([b.finite for b in batches])
            valid = torch.cat([b.valid for b in batches])
            used = finite & valid
            hits = (torch.cat([b.rank for b in batches])[:, None] <= state.ks) & used[:, None]
            # Rows counted, finite, valid label, and the top-k hits: one reduction.
            state.row_counts += torch.cat([torch.stack([used, finite, valid], dim=1), hits], dim=1).sum(dim=0)

            # Each batch's histograms as one row of a (batches, C) table: predictions and
            # predictions of samples of other classes, and labels.
            offset = torch.cat([torch.full_like(b.labels, i * c) for i, b in enumerate(batches)])
            cell, label_cell = predicted + offset, y + offset
            weights = torch.stack([used, used & (predicted != y)], dim=1).long()
            per_batch = torch.zeros((len(batches) * c, 2), dtype=torch.int64, device=used.device)
            per_batch = per_batch.index_add_(0, cell, weights).view(len(batches), c, 2)
            per_batch_labels = torch.zeros(len(batches) * c, dtype=torch.int64, device=used.device)
            per_batch_labels = per_batch_labels.index_add_(0, label_cell, used.long()).view(len(batches), c)
            state.histograms += per_batch.sum(dim=0)
            state.labels += per_batch_labels.sum(dim=0)
            # A head can give every sample of a batch the same class while that class drifts
            # from step to step: the epoch histogram then spreads, the batches do not.
            # (max and gather keep the indices on the device; indexing with them would sync.)
            absorbed, worst = per_batch[:, :, 1].max(dim=1)
            others = per_batch_labels.sum(dim=1) - per_batch_labels.gather(1, worst[:, None])[:, 0]
            # Only batches with MIN_OTHER_SAMPLES samples of other classes, as for the
            # whole-run absorption: the most-absorbing class of a batch is picked after
            # seeing it, so in a batch of 1-2 rows any wrong prediction reads as 100%
            # absorption, even for a random head.
            large = (others >= MIN_OTHER_SAMPLES).long()
            state.batch_absorption += torch.stack([(absorbed * large).sum(), (others * large).sum()])

            # Confidence and logit moments of the sampled rows; a where, not a product with
            # the weights, because 0 * inf is NaN.
            starts = itertools.accumulate((b.predicted.shape[0] for b in batches[:-1]), initial=0)
            head_used = torch.cat(
                [
                    used[start : start + b.predicted.shape[0]][b.sampled_rows]
                    for b, start in zip(batches, starts, strict=True)
                ]
            )
            sampled = torch.cat([b.sampled for b in batches])
            sampled = torch.cat([head_used[:, None].to(sampled.dtype), sampled], dim=1)
            zero = torch.zeros((), dtype=sampled.dtype, device=sampled.device)
            state.sampled_sums += torch.where(head_used[:, None], sampled, zero).double().sum(dim=0)

    def _combined_across_processes(self, s: _CollapseState) -> _CollapseState:
        """The state summed over the processes (a copy; every count is a sum)."""
        setup = {"num_classes": self.num_classes, "topk_count": len(self.topk)}
        check_same_setup(setup, "ClassCollapseMonitor", s.row_counts.device, self.process_group)
        seen = torch.tensor([s.seen], dtype=torch.int64, device=s.row_counts.device)
        parts = [seen, s.row_counts, s.histograms, s.labels, s.batch_absorption, s.sampled_sums]
        seen, row_counts, histograms, labels, batch_absorption, sampled_sums = sum_across(
            parts, self.process_group
        )
        return dataclasses.replace(
            s,
            seen=int(seen[0]),
            row_counts=row_counts,
            histograms=histograms,
            labels=labels,
            batch_absorption=batch_absorption,
            sampled_sums=sampled_sums,
        )

    def _scan_rows(self, x: Tensor, y: Tensor, sampled: slice) -> tuple[Tensor, Tensor, Tensor]:
        """The three statistics that need every logit: prediction, rank of the true class, confidence.

        Returns ``predicted`` (argmax, first column on ties), ``rank`` (how many classes
        score at least as high as the true class ``y``, as floats) and the max-softmax
        confidence of the ``sampled`` rows.

        Every (batch, C) pass counts here: on CPU the update must stay a small fraction
        of a loss step (``benchmarks/bench_monitors.py``). So the scans share one
        workspace, write comparisons straight into it as 0/1 floats and count in the
        float domain (reducing a boolean matrix is several times slower), and keep
        ``exp`` away from subnormal results, which are ten times slower to produce.
        """
        c = self.num_classes
        row_max = x.amax(dim=1, keepdim=True)
        # Reused from call to call: a fresh (batch, C) buffer is fresh memory pages, whose
        # first writes cost more than the comparisons written into them.
        work = self._work
        if work is None or work.shape != x.shape or work.dtype != x.dtype or work.device != x.device:
            work = self._work = torch.empty_like(x)
        # Max-softmax = 1 / sum(exp(x - x_max)): the sum is >= 1, no overflow. Terms below
        # exp(-80) (< 1e-34 of the largest) change nothing but would be subnormal.
        head = x[sampled]
        gap = torch.sub(head, row_max[sampled], out=work[: head.shape[0]]).clamp_min_(-80.0)
        max_softmax = gap.exp_().sum(dim=1).reciprocal_()
        # Ties count against the true class, so constant logits are never "correct";
        # top-k hit = rank <= k. Cheaper than topk, and exact.
        rank = torch.ge(x, x.gather(1, y[:, None]), out=work).sum(dim=1)
        at_max = torch.ge(x, row_max, out=work)  # 1 at each row's maxima, else 0
        # Column numbers (and the float rank counts) are exact below 2**24 columns in float32.
        if c * torch.finfo(x.dtype).eps >= 1:
            return at_max.argmax(dim=1), rank, max_softmax
        # argmax as the first column at the maximum: (C - 1) - max over the maxima of
        # (C - 1 - column), several times cheaper on CPU than argmax. A non-finite row has
        # no maximum and gives C - 1, in range (its weight is 0 anyway).
        reversed_columns = self._reversed
        if (
            reversed_columns is None
            or reversed_columns.dtype != x.dtype
            or reversed_columns.device != x.device
        ):
            reversed_columns = torch.arange(c - 1, -1, -1, dtype=x.dtype, device=x.device)
            self._reversed = reversed_columns
        first = at_max.mul_(reversed_columns).amax(dim=1)
        return torch.rsub(first, c - 1).long(), rank, max_softmax

    def compute(self) -> MonitorReport:
        """Statistics over every batch since the last reset, and their diagnoses.

        Returns
        -------
        MonitorReport
            Mapping of the statistics listed in the class notes, with ``.diagnoses``.

        Raises
        ------
        ValueError
            Before any update, or when labels outside ``[0, num_classes)`` were seen.
        """
        if self._state is None:
            raise ValueError("ClassCollapseMonitor.compute() called before any update(); nothing to report")
        self._fold()
        s = self._state
        if self.sync_on_compute and process_count(self.process_group) > 1:
            s = self._combined_across_processes(s)
        n, finite_rows, valid_rows, *topk_hits = s.row_counts.tolist()
        seen = s.seen
        bad_rows, invalid = seen - finite_rows, seen - valid_rows
        if invalid:
            raise ValueError(
                f"labels: {invalid} of the {seen} labels passed to update() lay outside "
                f"[0, num_classes) = [0, {self.num_classes}); map classes to 0..num_classes-1 first"
            )
        c = self.num_classes
        predicted, wrong_predicted = s.histograms.cpu().unbind(dim=1)
        label_hist = s.labels.cpu()
        diagnoses: list[Diagnosis] = []
        if bad_rows:
            diagnoses.append(non_finite(bad_rows, seen, "logit rows"))
        if n == 0:
            return MonitorReport(
                "class collapse",
                {},
                counts={"samples": 0, "non_finite_rows": bad_rows},
                notes=["every row of logits held NaN or inf"],
                diagnoses=tuple(diagnoses),
            )

        rates = {
            k: Rate(int(hits), n, chance=min(k, c) / c) for k, hits in zip(self.topk, topk_hits, strict=True)
        }
        dominant = int(predicted.argmax())
        dominant_count = int(predicted[dominant])
        others = n - int(label_hist[dominant])
        absorption = int(wrong_predicted[dominant]) / others if others else math.nan
        batch_absorbed, batch_others = s.batch_absorption.tolist()
        batch_absorption = batch_absorbed / batch_others if batch_others else math.nan
        shares = predicted.double() / n
        entropy = max(0.0, float(-(shares[shares > 0] * shares[shares > 0].log()).sum()) / math.log(c))
        num_predicted = int((predicted > 0).sum())
        num_label_classes = int((label_hist > 0).sum())
        ceiling = int(label_hist[predicted > 0].sum()) / n
        sampled_rows, confidence_sum, logit_sum, logit_sq_sum = s.sampled_sums.tolist()
        sampled = int(sampled_rows)
        if sampled:
            mean_confidence = confidence_sum / sampled
            logit_mean = logit_sum / (sampled * c)
            logit_var = max(logit_sq_sum / (sampled * c) - logit_mean**2, 0.0)
        else:  # every sampled row was non-finite or had an invalid label
            mean_confidence = logit_mean = logit_var = math.nan

        metrics: dict[str, float | Rate] = {f"top{k}_accuracy": rate for k, rate in rates.items()}
        metrics.update(
            num_predicted_classes=num_predicted,
            num_label_classes=num_label_classes,
            dominant_class=dominant,
            dominant_class_share=dominant_count / n,
            dominant_class_absorption=absorption,
            batch_dominant_absorption=batch_absorption,
            accuracy_ceiling=ceiling,
            prediction_entropy=entropy,
            mean_max_softmax=mean_confidence,
            logit_mean=logit_mean,
            logit_std=math.sqrt(logit_var),
        )

        collapse = self._class_collapse(
            dominant,
            dominant_count,
            n,
            others,
            absorption,
            num_predicted,
            num_label_classes,
            ceiling,
            entropy,
            batch_absorption,
            batch_others,
        )
        if collapse is not None:
            diagnoses.append(collapse)
        diagnoses += self._chance(rates, collapsed=collapse is not None)
        top1_high = wilson_interval(rates[self.topk[0]].hits, n, confidence=self.confidence)[1]
        if (
            self.topk[0] == 1
            and sampled >= MIN_CONFIDENCE_SAMPLES
            and mean_confidence - top1_high >= CONFIDENCE_GAP
        ):
            diagnoses.append(
                Diagnosis(
                    "overconfident",
                    "warning",
                    f"mean max-softmax confidence {mean_confidence:.3f} but top-1 accuracy {rates[1]}: "
                    "the softmax is saturated, not informed",
                    evidence={
                        "mean_max_softmax": mean_confidence,
                        "top1_accuracy": str(rates[1]),
                        "top1_upper_bound": top1_high,
                        "logit_std": math.sqrt(logit_var),
                        "threshold_gap": CONFIDENCE_GAP,
                    },
                    suggestion="Lower the logit scale of the margin-softmax head or divide the logits by a "
                    "temperature above 1 (case study 02 went from scale 32 to 8 and T=4).",
                )
            )
        counts = {
            "samples": n,
            "non_finite_rows": bad_rows,
            "num_classes": c,
            "softmax_samples": sampled,
        }
        notes = [
            f"topk {k} is at least num_classes={c}: top-{k} accuracy is computed as top-{c}, always a hit "
            "(chance 100%)"
            for k in self.topk
            if k >= c
        ]
        return MonitorReport(
            "class collapse", metrics, counts=counts, notes=notes, diagnoses=tuple(diagnoses)
        )

    def _class_collapse(
        self,
        dominant: int,
        dominant_count: int,
        n: int,
        others: int,
        absorption: float,
        num_predicted: int,
        num_label_classes: int,
        ceiling: float,
        entropy: float,
        batch_absorption: float,
        batch_others: int,
    ) -> Diagnosis | None:
        c = self.num_classes
        absorption_threshold = 1 / c + ABSORPTION_FRACTION * (1 - 1 / c)
        absorbed = others >= MIN_OTHER_SAMPLES and absorption >= absorption_threshold
        # batch_others only counts batches of at least MIN_OTHER_SAMPLES samples of other classes.
        absorbed_in_batches = batch_others > 0 and batch_absorption >= absorption_threshold
        class_threshold = PREDICTED_CLASS_FRACTION * num_label_classes
        too_few = num_label_classes >= MIN_LABEL_CLASSES and num_predicted <= class_threshold
        if not (absorbed or absorbed_in_batches or too_few):
            return None
        if dominant_count == n:
            what = f"every one of the {n} predictions is class {dominant}"
        elif absorbed_in_batches and not (absorbed or too_few):
            what = (
                f"within each batch one class takes {format_percent(batch_absorption)} of the predictions "
                f"for samples of other classes, but which class changes between batches (over all batches "
                f"{num_predicted} classes are predicted, class {dominant} most often)"
            )
        else:
            what = (
                f"class {dominant} takes {dominant_count}/{n} = {format_percent(dominant_count / n)} of the "
                f"predictions; only {num_predicted} of the {num_label_classes} classes in the labels are "
                "ever predicted"
            )
        return Diagnosis(
            "class_collapse",
            "error",
            what,
            evidence={
                "dominant_class": dominant,
                "dominant_class_share": dominant_count / n,
                "dominant_class_absorption": absorption,
                "batch_dominant_absorption": batch_absorption,
                "absorption_threshold": absorption_threshold,
                "num_predicted_classes": num_predicted,
                "num_label_classes": num_label_classes,
                "predicted_classes_threshold": class_threshold,
                "accuracy_ceiling": ceiling,
                "prediction_entropy": entropy,
                "uniform_share": 1 / c,
                "samples": n,
            },
            suggestion="Soften the head: lower the margin-softmax scale (e.g. 64 -> 16) and margin, or "
            "divide the logits by a temperature above 1; check the head's initialisation and learning rate. "
            "When fine-tuning with few images per identity, prefer a pair loss such as SupConLoss.",
        )

    def _chance(self, rates: dict[int, Rate], *, collapsed: bool = False) -> list[Diagnosis]:
        verdicts = {k: chance_verdict(rate, confidence=self.confidence) for k, rate in rates.items()}
        diagnoses = []
        at = [k for k, v in verdicts.items() if v == "at_chance"]
        above = [k for k, v in verdicts.items() if v == "above_chance"]
        below = [k for k, v in verdicts.items() if v == "below_chance"]
        evidence = {f"top{k}_accuracy": describe_rate(rates[k], confidence=self.confidence) for k in rates}
        if at:
            listed = "; ".join(f"top-{k} {describe_rate(rates[k], confidence=self.confidence)}" for k in at)
            if above and collapsed:
                # No "the model is learning" beside a class_collapse error.
                message = (
                    f"{listed}: consistent with chance, while top-{above[0]} is above chance (see "
                    "class_collapse: the predictions themselves have collapsed)"
                )
            elif above:
                message = (
                    f"{listed}: consistent with chance, while top-{above[0]} is above chance — the model is "
                    "learning, these accuracies are not informative yet"
                )
            else:
                message = f"{listed}: consistent with chance, the classifier has learned nothing measurable"
            diagnoses.append(
                Diagnosis(
                    "at_chance",
                    "info" if above else "warning",
                    message,
                    evidence=evidence,
                    suggestion="Compare accuracies with their chance level, never with 0%; watch a larger k "
                    "and whether the interval leaves chance. If it stays at chance, check the learning rate "
                    "and that label i is logit column i.",
                )
            )
        if below:
            listed = "; ".join(
                f"top-{k} {describe_rate(rates[k], confidence=self.confidence)}" for k in below
            )
            diagnoses.append(
                Diagnosis(
                    "below_chance",
                    "error",
                    f"{listed}: significantly below chance — worse than guessing",
                    evidence=evidence,
                    suggestion="Worse than guessing is a bug, not slow learning: check that label i matches "
                    "logit column i (the same class mapping in training and evaluation) and look for "
                    "class collapse onto classes the labels avoid.",
                )
            )
        return diagnoses
