"""Loss signals: what a loss's value and statistics over many steps say about training.

:class:`LossMonitor` reads a loss's ``last_value`` and ``last_stats`` after every step
(or a dict of statistics you computed), keeps them in a
:class:`~embedkit.monitors.history.TrainingHistory`, and looks at the last ``window``
steps for the failures a single step cannot show:

* ``loss_at_margin`` — a triplet loss flat at its margin with nearly every triplet
  active: every distance d_ap ≈ d_an, the embeddings have collapsed (case study 04);
* ``no_positive_pairs`` — no batch in the window held two samples of one class, so a
  pair loss had nothing to pull together;
* ``no_active_triplets`` — no triplet violated the margin (or none was valid): the
  loss and its gradient are zero and nothing is learned;
* ``loss_falling_at_chance`` — the loss keeps falling while an accuracy passed as a
  :class:`~embedkit.evaluation.report.Rate` stays at chance (case study 01);
* ``non_finite`` — the loss was NaN or inf.

Reading a loss module keeps its detached tensors as they are, so an update costs no
device-to-host sync; they are read back together by :meth:`LossMonitor.compute`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import Tensor

from .._checks import check_int, check_real, describe
from ..evaluation.report import Rate
from ..losses.base import Loss, LossSum
from .chance import chance_verdict, describe_rate
from .diagnosis import Diagnosis, non_finite
from .history import TrainingHistory
from .report import MonitorReport

__all__ = ["LossMonitor"]

_ACTIVE = "active_triplet_fraction"


class LossMonitor:
    """Loss values and statistics over steps, and the diagnoses they support.

    Parameters
    ----------
    window : int
        How many of the most recent steps a diagnosis looks at (default 20); no
        window diagnosis fires before that many steps were recorded.
    margin : float, optional
        The triplet margin, when :meth:`update` is given statistics rather than the
        loss module (a module's own ``margin`` is read from it).
    margin_tolerance : float
        ``loss_at_margin``: every loss value in the window lies within
        ``margin_tolerance * margin`` of the margin (default 0.05, i.e. 0.19–0.21 for 0.2) ...
    active_fraction : float
        ... while the mean ``active_triplet_fraction`` is at least this (default 0.9).
    min_decrease : float
        ``loss_falling_at_chance``: the mean loss of the window's second half is at
        least this fraction below that of its first half (default 0.01).
    confidence : float
        Coverage of the Wilson intervals used to compare accuracies with chance.

    Examples
    --------
    >>> loss_fn = TripletMarginLoss(margin=0.2)
    >>> monitor = LossMonitor()
    >>> for step, (x, y) in enumerate(loader):                       # doctest: +SKIP
    ...     loss_fn(model(x), y).backward()
    ...     monitor.update(step, loss_fn)
    >>> monitor.compute().codes                                       # doctest: +SKIP
    ['loss_at_margin']
    """

    def __init__(
        self,
        *,
        window: int = 20,
        margin: float | None = None,
        margin_tolerance: float = 0.05,
        active_fraction: float = 0.9,
        min_decrease: float = 0.01,
        confidence: float = 0.95,
    ) -> None:
        self.window = check_int(window, "window", low=2)
        self.margin = None if margin is None else check_real(margin, "margin", low=0.0, low_inclusive=False)
        self.margin_tolerance = check_real(margin_tolerance, "margin_tolerance", low=0.0, low_inclusive=False)
        self.active_fraction = check_real(active_fraction, "active_fraction", low=0.0, high=1.0)
        self.min_decrease = check_real(min_decrease, "min_decrease", low=0.0)
        self.confidence = check_real(
            confidence, "confidence", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
        )
        self.history = TrainingHistory()
        # stats prefix -> (collapsed value, key of the active fraction, how it was derived)
        self._margins: dict[str, tuple[float, str, str]] = {}
        self._names: dict[str, str] = {}  # stats prefix -> loss class name, for messages

    def __repr__(self) -> str:
        return (
            f"LossMonitor(window={self.window}, margin={self.margin}, "
            f"margin_tolerance={self.margin_tolerance:g}, "
            f"active_fraction={self.active_fraction:g}, min_decrease={self.min_decrease:g}, "
            f"steps={len(self.history)})"
        )

    def reset(self) -> None:
        """Forget the recorded steps."""
        self.history.reset()
        self._margins, self._names = {}, {}

    def update(
        self,
        step: int,
        loss: Loss | Mapping[str, Any] | float | Tensor,
        metrics: Mapping[str, float | Rate | Tensor] | None = None,
    ) -> None:
        """Record one step.

        Parameters
        ----------
        step : int
            The training step (non-decreasing).
        loss : embedkit.losses.base.Loss, mapping, float or 0-d Tensor
            An embedkit loss after it was called (its ``last_value`` is recorded as
            ``"loss"`` and its ``last_stats`` under their own names — for a
            :class:`~embedkit.losses.base.LossSum` ``"<i>.<Name>.<key>"``), or a mapping
            of statistics that includes ``"loss"``, or the loss value alone.
        metrics : mapping of str to float, Rate or 0-d Tensor, optional
            Accuracies and other metrics of this step; a :class:`Rate` with a chance
            level (e.g. ``report.rate("top1_accuracy")`` of a
            :class:`~embedkit.monitors.collapse.ClassCollapseMonitor`) is checked against
            chance by ``loss_falling_at_chance``.
        """
        values: dict[str, Any] = {}
        if isinstance(loss, Loss):
            last_value, last_stats = loss.last_record
            if last_value is None:
                raise ValueError(
                    f"loss ({type(loss).__name__}) has not been called yet; call it before update()"
                )
            values["loss"] = last_value
            values.update(last_stats)
            self._margins.update(_margins_of(loss))
            self._names.setdefault("", type(loss).__name__)
        elif isinstance(loss, Mapping):
            if "loss" not in loss:
                raise ValueError(f"loss statistics must include 'loss'; got keys {sorted(loss)}")
            values.update(loss)
        elif isinstance(loss, (float, int, Tensor)) and not isinstance(loss, bool):
            values["loss"] = loss
        else:
            raise TypeError(f"loss must be an embedkit Loss, a mapping or a number; got {describe(loss)}")
        if self.margin is not None:
            for key in values:
                if key.endswith(_ACTIVE):
                    self._margins.setdefault(
                        key[: -len(_ACTIVE)], (self.margin, _ACTIVE, f"the margin {self.margin:g}")
                    )
        self.history.record(step, values)
        if metrics is not None:
            if not isinstance(metrics, Mapping):
                raise TypeError(
                    f"metrics must be a mapping of name to number or Rate; got {describe(metrics)}"
                )
            self.history.record(step, metrics, prefix="metric/")

    def compute(self) -> MonitorReport:
        """The latest values, window summaries and the diagnoses over the last ``window`` steps.

        Returns
        -------
        MonitorReport
            Statistics: the latest value of every recorded name, ``steps``, and
            ``loss_window_change`` (relative change of the mean loss from the first to
            the second half of the window).

        Raises
        ------
        ValueError
            Before any update.
        """
        history = self.history
        if not len(history):
            raise ValueError("LossMonitor.compute() called before any update(); nothing to report")
        metrics: dict[str, float | Rate] = {"steps": len(history)}
        for key in history.keys:
            latest = history.latest(key)
            if latest is not None:
                metrics[key] = latest
        notes: list[str] = []
        diagnoses: list[Diagnosis] = []
        _, losses = history.series("loss")
        bad = int((~np.isfinite(losses)).sum())
        if bad:
            diagnoses.append(non_finite(bad, int(losses.size), "loss values"))
        if losses.size < self.window:
            notes.append(
                f"{losses.size} of the {self.window} steps of a window recorded: no window diagnosis yet"
            )
            return MonitorReport("loss signals", metrics, notes=notes, diagnoses=tuple(diagnoses))
        window = losses[-self.window :]
        half = self.window // 2
        first, second = float(window[:half].mean()), float(window[-half:].mean())
        change = (second - first) / abs(first) if first != 0 else math.nan
        metrics["loss_window_change"] = change

        for prefix in self._pair_groups():
            diagnosis = self._pair_signals(prefix)
            if diagnosis is not None:
                diagnoses.append(diagnosis)
        for prefix, collapsed in self._margins.items():
            diagnosis = self._at_margin(prefix, *collapsed)
            if diagnosis is not None:
                diagnoses.append(diagnosis)
        falling = self._falling_at_chance(first, second, change)
        if falling is not None:
            diagnoses.append(falling)
        return MonitorReport("loss signals", metrics, notes=notes, diagnoses=tuple(diagnoses))

    # ------------------------------------------------------------------------------ signals
    def _window(self, key: str) -> np.ndarray | None:
        if key not in self.history.keys:
            return None
        _, values = self.history.series(key, last=self.window)
        return values if values.size >= self.window else None

    def _pair_groups(self) -> list[str]:
        """Prefixes of the losses that record pair counts or active triplets."""
        prefixes = []
        for key in self.history.keys:
            for stat in ("num_positive_pairs", _ACTIVE):
                if key.endswith(stat) and not key.startswith("metric/"):
                    prefix = key[: -len(stat)]
                    if prefix not in prefixes:
                        prefixes.append(prefix)
        return prefixes

    def _pair_signals(self, prefix: str) -> Diagnosis | None:
        name = _loss_name(prefix, self._names)
        positives = self._window(f"{prefix}num_positive_pairs")
        if positives is not None and not positives.any():
            return Diagnosis(
                "no_positive_pairs",
                "error",
                f"{name}: none of the last {self.window} batches held two samples of the same class, "
                "so the pair loss had nothing to pull together",
                evidence={"loss": name, "window": self.window, "max_positive_pairs": float(positives.max())},
                suggestion="Sample P classes x K samples per batch (PKSampler, K >= 2) or pass a reference "
                "set with ref_embeddings/ref_labels.",
            )
        active = self._window(f"{prefix}{_ACTIVE}")
        if active is None or active.any():
            return None
        triplets = self._window(f"{prefix}num_triplets")
        none_valid = triplets is not None and not triplets.any()
        what = "no valid triplet was found" if none_valid else "every triplet already satisfied the margin"
        return Diagnosis(
            "no_active_triplets",
            "warning",
            f"{name}: in the last {self.window} steps {what}: the loss and its gradient are zero",
            evidence={
                "loss": name,
                "window": self.window,
                "max_active_triplet_fraction": float(active.max()),
                "max_num_triplets": math.nan if triplets is None else float(triplets.max()),
            },
            suggestion="Batches need P classes x K >= 2 samples (PKSampler) for valid triplets; when every "
            "triplet is satisfied use harder mining (batch_hard, semi_hard) or a larger margin.",
        )

    def _at_margin(self, prefix: str, margin: float, active_key: str, derived: str) -> Diagnosis | None:
        """The loss flat at the value a collapsed embedding gives (``margin``), nearly all terms active."""
        values = self._window(f"{prefix}loss")
        active = self._window(f"{prefix}{active_key}")
        if values is None or active is None or margin <= 0:
            return None
        deviation = float(np.abs(values - margin).max())
        mean_active = float(active.mean())
        if not (deviation <= self.margin_tolerance * margin and mean_active >= self.active_fraction):
            return None
        name = _loss_name(prefix, self._names)
        return Diagnosis(
            "loss_at_margin",
            "error",
            f"{name} has stayed at {margin:.4g} = {derived}, its value when every embedding is the same "
            f"point, for {self.window} steps (within {deviation:.3g}) with {mean_active:.0%} of its "
            f"terms active ({active_key}): the embeddings have collapsed",
            evidence={
                "loss": name,
                "margin": margin,
                "collapsed_value_is": derived,
                "max_deviation": deviation,
                "tolerance": self.margin_tolerance * margin,
                f"mean_{active_key}": mean_active,
                "active_fraction_threshold": self.active_fraction,
                "window": self.window,
            },
            suggestion="Check the embeddings with EmbeddingHealthMonitor (complete_collapse). Make sure the "
            "network can pass its input through (residual blocks: case study 04 was fixed by a ResNeXt "
            "block), normalise the inputs, lower the learning rate, and mine semi-hard triplets.",
        )

    def _window_rates(self) -> dict[str, Rate]:
        """Accuracies recorded as counts (``<prefix>accuracy_hits`` / ``_total`` / ``_chance``, as the
        margin-softmax losses do), pooled over the second half of the window."""
        rates = {}
        half = self.window // 2
        for key in self.history.keys:
            if not key.endswith("accuracy_hits") or key.startswith("metric/"):
                continue
            stem = key[: -len("_hits")]
            if f"{stem}_total" not in self.history.keys or f"{stem}_chance" not in self.history.keys:
                continue
            _, hits = self.history.series(key, last=half)
            _, totals = self.history.series(f"{stem}_total", last=half)
            chance = self.history.latest(f"{stem}_chance")
            if hits.size == totals.size and totals.sum() > 0 and isinstance(chance, float):
                rates[stem] = Rate(int(hits.sum()), int(totals.sum()), chance=chance)
        return rates

    def _falling_at_chance(self, first: float, second: float, change: float) -> Diagnosis | None:
        if not (math.isfinite(change) and change <= -self.min_decrease):
            return None
        stuck: dict[str, str] = {}
        # Accuracies a loss records as counts, pooled over the window's second half.
        # Each is judged against its own term's loss when the loss is a sum: the total can
        # fall because another term learns.
        for key, rate in self._window_rates().items():
            term_loss = self._window(f"{key[: -len('accuracy')]}loss")
            if term_loss is not None:
                half = self.window // 2
                first_half, second_half = term_loss[:half], term_loss[-half:]
                before, after = float(first_half.mean()), float(second_half.mean())
                # A fall beyond the step-to-step noise (two standard errors of the difference
                # of the half means): an untrained head's loss fluctuates by several percent.
                noise = 2 * math.sqrt((first_half.var() + second_half.var()) / half)
                falling = before != 0 and (after - before) / abs(before) <= -self.min_decrease
                if not (falling and before - after > noise):
                    continue
            if chance_verdict(rate, confidence=self.confidence) in ("at_chance", "below_chance"):
                stuck[key] = describe_rate(rate, confidence=self.confidence)
        for key in self.history.keys:
            latest = self.history.latest(key)
            if isinstance(latest, Rate) and latest.chance is not None and latest.total > 0:
                if chance_verdict(latest, confidence=self.confidence) in ("at_chance", "below_chance"):
                    stuck[key.removeprefix("metric/")] = describe_rate(latest, confidence=self.confidence)
        if not stuck:
            return None
        listed = "; ".join(f"{k} {v}" for k, v in stuck.items())
        return Diagnosis(
            "loss_falling_at_chance",
            "warning",
            f"the loss fell {-change:.1%} over the last {self.window} steps ({first:.4g} -> {second:.4g}) "
            f"but {listed} is still consistent with chance",
            evidence={
                "loss_first_half_mean": first,
                "loss_second_half_mean": second,
                "relative_change": change,
                "min_decrease": self.min_decrease,
                **stuck,
            },
            suggestion="A falling loss is not learning until a metric leaves chance: check the metric on "
            "held-out data with counts and chance (top-5, gallery-probe retrieval), and look for a shortcut "
            "the loss can exploit (paired_shortcut, class_collapse).",
        )


def _margins_of(loss: Loss) -> dict[str, tuple[float, str, str]]:
    """The loss value of a collapsed embedding for each term that has one, keyed by stats prefix.

    When every embedding is the same point all distances are 0, so a hinge triplet term
    [d_ap - d_an + m]_+ is m, a soft-margin one softplus(m) = log(1 + e^m), and a
    contrastive term [m_neg - d]_+ over the (all active) negative pairs is m_neg.
    """
    terms = (
        [(f"{i}.{type(term).__name__}.", term) for i, (_, term) in enumerate(loss.terms)]
        if isinstance(loss, LossSum)
        else [("", loss)]
    )
    values = {}
    for prefix, term in terms:
        stats = term.last_record[1]
        margin = getattr(term, "margin", None)
        neg_margin = getattr(term, "neg_margin", None)
        if _ACTIVE in stats and isinstance(margin, float):
            if getattr(term, "soft_margin", False):
                values[prefix] = (math.log1p(math.exp(margin)), _ACTIVE, f"softplus({margin:g})")
            elif margin > 0:
                values[prefix] = (margin, _ACTIVE, f"the margin {margin:g}")
        elif "active_negative_fraction" in stats and isinstance(neg_margin, float) and neg_margin > 0:
            if getattr(term, "pos_margin", 0.0) >= 0:
                values[prefix] = (neg_margin, "active_negative_fraction", f"neg_margin {neg_margin:g}")
    return values


def _loss_name(prefix: str, names: dict[str, str]) -> str:
    return prefix.rstrip(".") or names.get(prefix, "the loss")
