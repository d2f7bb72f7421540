"""Class-collapse monitor for classification heads (margin-softmax, linear probes).

:class:`ClassCollapseMonitor` watches the logits of a classifier and names the
failures of case studies 01 and 02: a head that predicts one class for everyone
(``class_collapse``), an accuracy that is only chance level (``at_chance``), an
accuracy *below* chance (``below_chance``), a saturated softmax far more confident
than it is accurate (``overconfident``) and NaN/inf logits (``non_finite``).

Life cycle (torchmetrics style): :meth:`~ClassCollapseMonitor.update` once per batch
accumulates counts in tensors on the logits' device, without a device-to-host sync
(no ``.item()``, no ``bincount`` — whose CUDA kernel reads the maximum back — and no
data-dependent shapes); :meth:`~ClassCollapseMonitor.compute` reads them back once
and interprets them; :meth:`~ClassCollapseMonitor.reset` starts over. Every
statistic is exact over all rows seen since the last reset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import check_embeddings, check_int, check_labels, check_real, describe
from ..evaluation.report import Rate, format_percent
from ..similarity import working_dtype
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


@dataclass
class _CollapseState:
    count: Tensor  # rows counted (finite logits, valid label)
    seen: Tensor  # rows passed to update
    non_finite_rows: Tensor
    invalid_labels: Tensor
    predicted: Tensor  # (C,) prediction histogram
    wrong_predicted: Tensor  # (C,) predictions of class c for samples whose label is not c
    labels: Tensor  # (C,) label histogram
    # Within each batch, the class that takes the most predictions of samples of other
    # classes: its count of those predictions, and the batch's samples of other classes.
    batch_absorbed: Tensor
    batch_others: Tensor
    topk_hits: Tensor  # (len(topk),)
    ks: Tensor  # (len(topk),) the k's, min(k, C), kept on the device
    sum_max_softmax: Tensor
    logit_sum: Tensor
    logit_sum_sq: Tensor


class ClassCollapseMonitor:
    """Top-k accuracy with chance levels, prediction histogram and logit statistics.

    Parameters
    ----------
    num_classes : int
        Number of classes ``C`` (columns of the logits), at least 2.
    topk : sequence of int
        The ``k`` of the top-k accuracies (default ``(1, 5)``); a ``k`` above ``C`` is
        computed as top-``C`` (always a hit, chance 100%).
    confidence : float
        Coverage of the Wilson intervals used to compare accuracies with chance.

    Examples
    --------
    >>> monitor = ClassCollapseMonitor(num_classes=518)
    >>> for images, labels in loader:                       # doctest: +SKIP
    ...     monitor.update(head.logits(model(images)), labels)
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
    ``mean_max_softmax``, ``logit_mean``, ``logit_std`` (over all entries).
    Rows with a NaN/inf logit are counted and left out of every statistic.
    """

    def __init__(self, num_classes: int, topk: Sequence[int] = (1, 5), *, confidence: float = 0.95) -> None:
        self.num_classes = check_int(num_classes, "num_classes", low=2)
        if isinstance(topk, (str, bytes)) or not isinstance(topk, Sequence) or len(topk) == 0:
            raise TypeError(f"topk must be a non-empty sequence of positive integers; got {describe(topk)}")
        ks = sorted({check_int(k, "topk entries", low=1) for k in topk})
        self.topk: tuple[int, ...] = tuple(ks)
        self.confidence = check_real(
            confidence, "confidence", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
        )
        self._state: _CollapseState | None = None

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._state = None

    def _new_state(self, device: torch.device) -> _CollapseState:
        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        c = self.num_classes
        return _CollapseState(
            count=zeros(),
            seen=zeros(),
            non_finite_rows=zeros(),
            invalid_labels=zeros(),
            predicted=zeros(c),
            wrong_predicted=zeros(c),
            labels=zeros(c),
            batch_absorbed=zeros(),
            batch_others=zeros(),
            topk_hits=zeros(len(self.topk)),
            ks=torch.tensor([min(k, c) for k in self.topk], dtype=torch.int32, device=device),
            sum_max_softmax=zeros(dtype=torch.float64),
            logit_sum=zeros(dtype=torch.float64),
            logit_sum_sq=zeros(dtype=torch.float64),
        )

    def update(self, logits: Tensor, labels: Any) -> None:
        """Accumulate one batch.

        Parameters
        ----------
        logits : Tensor of shape (batch_size, num_classes)
            Class scores before softmax (any floating dtype; e.g.
            ``ArcFaceLoss.logits(embeddings)``). Detached; no gradient flows.
        labels : Tensor, ndarray or sequence of int, of shape (batch_size,)
            True classes in ``[0, num_classes)``. Out-of-range labels are counted here
            and raise in :meth:`compute` (checking them here would need a host sync).
        """
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
        if state.count.device != logits.device:
            raise ValueError(
                f"logits is on {logits.device} but earlier batches were on {state.count.device}; "
                "call reset() before switching devices"
            )
        with torch.no_grad():
            x = logits.detach().to(working_dtype(logits.dtype))
            # A row holds NaN/inf exactly when its sum does (or when the sum overflows, at
            # |logit| ~ 1e35): one cheap reduction instead of an element-wise isfinite.
            # Such rows stay in the tensors below but carry weight 0 everywhere.
            row_sum = x.sum(dim=1)
            finite = torch.isfinite(row_sum)
            valid = (labels >= 0) & (labels < self.num_classes)
            used = finite & valid
            y = labels.clamp(0, self.num_classes - 1)
            used_long = used.long()

            # Rank of the true class = how many classes score at least as high as it
            # (ties count against it, so constant logits are never "correct"); top-k
            # hit = rank <= k. Cheaper than topk, and exact.
            # argmax alone is several times cheaper on CPU than max(dim) with indices; the
            # fused log-softmax at the prediction is the log of the max-softmax confidence
            # (cheaper here than logsumexp).
            predicted = x.argmax(dim=1)
            max_log_prob = torch.log_softmax(x, dim=1).gather(1, predicted[:, None]).squeeze(1)
            # x - t >= 0 exactly when x >= t for finite floats; counting in the float domain
            # avoids casting a (batch, C) boolean matrix (3x cheaper on CPU).
            rank = (x - x.gather(1, y[:, None])).ge_(0).sum(dim=1)
            state.topk_hits += ((rank[:, None] <= state.ks[None, :]) & used[:, None]).sum(dim=0)

            state.predicted.index_add_(0, predicted, used_long)
            batch_labels = torch.zeros_like(state.labels).index_add_(0, y, used_long)
            batch_wrong = torch.zeros_like(state.wrong_predicted)
            batch_wrong.index_add_(0, predicted, (used & (predicted != y)).long())
            state.labels += batch_labels
            state.wrong_predicted += batch_wrong
            # A head can give every sample of a batch the same class while that class drifts
            # from step to step: the epoch histogram then spreads, the batches do not.
            worst = batch_wrong.argmax()
            state.batch_absorbed += batch_wrong[worst]
            state.batch_others += used_long.sum() - batch_labels[worst]

            max_softmax = max_log_prob.exp()
            row_sq = torch.linalg.vector_norm(x, dim=1) ** 2
            zero = torch.zeros((), dtype=x.dtype, device=x.device)
            state.sum_max_softmax += torch.where(used, max_softmax, zero).sum().double()
            state.logit_sum += torch.where(used, row_sum, zero).double().sum()
            state.logit_sum_sq += torch.where(used, row_sq, zero).double().sum()

            state.count += used_long.sum()
            state.seen += x.shape[0]
            state.non_finite_rows += (~finite).sum()
            state.invalid_labels += (~valid).sum()

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
        s = self._state
        invalid = int(s.invalid_labels)
        seen = int(s.seen)
        if invalid:
            raise ValueError(
                f"labels: {invalid} of the {seen} labels passed to update() lay outside "
                f"[0, num_classes) = [0, {self.num_classes}); map classes to 0..num_classes-1 first"
            )
        c = self.num_classes
        n = int(s.count)
        bad_rows = int(s.non_finite_rows)
        predicted = s.predicted.cpu()
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
            k: Rate(int(hits), n, chance=min(k, c) / c)
            for k, hits in zip(self.topk, s.topk_hits.tolist(), strict=True)
        }
        dominant = int(predicted.argmax())
        dominant_count = int(predicted[dominant])
        others = n - int(label_hist[dominant])
        absorption = int(s.wrong_predicted[dominant]) / others if others else math.nan
        batch_others = int(s.batch_others)
        batch_absorption = int(s.batch_absorbed) / batch_others if batch_others else math.nan
        shares = predicted.double() / n
        entropy = max(0.0, float(-(shares[shares > 0] * shares[shares > 0].log()).sum()) / math.log(c))
        num_predicted = int((predicted > 0).sum())
        num_label_classes = int((label_hist > 0).sum())
        ceiling = int(label_hist[predicted > 0].sum()) / n
        mean_confidence = float(s.sum_max_softmax) / n
        entries = n * c
        logit_mean = float(s.logit_sum) / entries
        logit_var = max(float(s.logit_sum_sq) / entries - logit_mean**2, 0.0)

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
        diagnoses += self._chance(rates)
        top1_high = wilson_interval(rates[self.topk[0]].hits, n, confidence=self.confidence)[1]
        if (
            self.topk[0] == 1
            and n >= MIN_CONFIDENCE_SAMPLES
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
        counts = {"samples": n, "non_finite_rows": bad_rows, "num_classes": c}
        return MonitorReport("class collapse", metrics, counts=counts, diagnoses=tuple(diagnoses))

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
        absorbed_in_batches = batch_others >= MIN_OTHER_SAMPLES and batch_absorption >= absorption_threshold
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

    def _chance(self, rates: dict[int, Rate]) -> list[Diagnosis]:
        verdicts = {k: chance_verdict(rate, confidence=self.confidence) for k, rate in rates.items()}
        diagnoses = []
        at = [k for k, v in verdicts.items() if v == "at_chance"]
        above = [k for k, v in verdicts.items() if v == "above_chance"]
        below = [k for k, v in verdicts.items() if v == "below_chance"]
        evidence = {f"top{k}_accuracy": describe_rate(rates[k], confidence=self.confidence) for k in rates}
        if at:
            listed = "; ".join(f"top-{k} {describe_rate(rates[k], confidence=self.confidence)}" for k in at)
            if above:
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
