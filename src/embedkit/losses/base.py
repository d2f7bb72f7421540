"""The contract every embedkit loss follows, and the algebra that combines them.

A loss is a ``torch.nn.Module`` called as ``loss(embeddings, labels)`` that returns
a scalar tensor. After each call it exposes

* ``last_value`` — the value it returned, as a float;
* ``last_stats`` — a dict of floats describing the batch (positive pairs found,
  active triplets, mean similarities, ...) for monitors and logging.

Both are kept as detached tensors and only turned into floats when read, so a
training step that never reads them never waits for the GPU.

Losses add and scale like tensors: ``ArcFaceLoss(...) + 0.5 * SupConLoss(...)`` is
a :class:`LossSum`, itself a loss, whose parameters (class centres, proxies) are
registered with it so ``optimizer(loss.parameters())`` and ``loss.to(device)`` work.
A weight may be a 0-d tensor, read at each call, so a schedule can update it in place::

    weight = torch.tensor(0.0)
    loss = ArcFaceLoss(...) + weight * SupConLoss(...)
    ...
    weight.fill_(min(1.0, epoch / 10))  # the next call uses the new weight

Hyper-parameters (``margin``, ``scale``, ``temperature``, ...) are checked whenever they
are assigned, not only by the constructor: ``arcface.margin = 2.0`` raises as
``ArcFaceLoss(..., margin=2.0)`` does. They are saved in ``state_dict`` (with a sum's
weights), and loading a checkpoint into a loss built with other values raises a
``ValueError`` naming them rather than silently mixing settings.

pytorch-metric-learning's ``ref_emb=`` is answered by a ``TypeError`` that names
embedkit's ``ref_embeddings=``.

Every loss takes ``reduction="mean" | "sum" | "none"``. ``"none"`` returns one value per
sample of the batch, shape ``(batch_size,)`` (per anchor for pair losses, per row for
classifier losses); ``"sum"`` is their sum; ``"mean"`` is the loss as published, which for
some families is not the plain mean of the per-sample values (each loss's docstring says
how they relate). ``last_value`` is the returned value for ``"mean"``/``"sum"`` and the mean
of the per-sample values for ``"none"``. For pair losses the per-sample value is each
anchor's term before the loss's outer average: its own term where the published loss is a
mean over anchors, the sum of its pairs' or triplets' terms where it is a mean over pairs
or triplets.

Input validation: one pass per public call
------------------------------------------
The entry point (:meth:`PairLoss.forward`, :meth:`ClassifierLoss.forward`) checks its
inputs once; nothing it calls (similarity, mining, the loss's ``compute``) checks again.

* Shape, dtype and device checks are free (they read metadata) and always run.
* Value checks cost a read of the data, which on an accelerator is a host sync that
  stalls the queue every step, so they depend on where the data is:

  - labels out of ``[0, num_classes)`` (classifier losses) raise a ``ValueError`` on the
    CPU and are queued with ``torch._assert_async`` on an accelerator (no sync; a bad
    label stops the device's work, as the indexing that follows would anyway); inside
    ``torch.compile`` the check is left to that indexing;
  - non-finite embeddings follow ``nonfinite`` (below).

Non-finite inputs: ``nonfinite="auto" | "raise" | "propagate"``
---------------------------------------------------------------
``"raise"`` rejects NaN/inf embeddings with a ``ValueError`` naming the argument and the
count (a host sync on an accelerator). ``"propagate"`` lets them through without any sync:
the loss returned is NaN (so every gradient is non-finite, and
``torch.amp.GradScaler`` skips the step and lowers its scale, which is what mixed
precision expects of an occasional overflow) and ``last_stats["nonfinite_inputs"]``
counts the non-finite entries seen. ``"auto"`` (the default) raises in plain CPU eager
mode and propagates under autocast, on an accelerator and inside ``torch.compile`` (where
a data-dependent raise would break the graph). Set it in the constructor or later
(``loss.nonfinite = "propagate"``).

Statistics
----------
``last_stats`` is built from quantities the loss computed anyway (pair counts, active
counts, the sums it reduced) plus at most two extra reads of the N×M matrix for the mean
positive/negative similarity. ``record_stats=False`` (a pair loss's constructor keyword,
or the attribute on any loss) skips them: ``last_stats`` is then empty (but for
``nonfinite_inputs`` when propagating).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .._checks import (
    check_bool,
    check_choice,
    check_class_labels,
    check_embeddings,
    check_labels,
    check_matching_dim,
    check_real,
    count_nonfinite,
)
from ..mining import _compiling, pair_masks
from ..similarity import _autocast_enabled, working_dtype

__all__ = [
    "ClassifierLoss",
    "HyperChecks",
    "Loss",
    "LossSum",
    "NonFinite",
    "PairBatch",
    "PairLoss",
    "Reduction",
]

#: Hyper-parameter name -> a check that returns the checked value or raises.
HyperChecks = Mapping[str, Callable[[Any], Any]]

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS = ("mean", "sum", "none")

NonFinite = Literal["auto", "raise", "propagate"]
NONFINITE_MODES = ("auto", "raise", "propagate")


class Loss(nn.Module):
    """Base class of every embedkit loss: statistics recording and loss algebra.

    Subclasses set ``accepts_reference`` to say whether they take
    ``ref_embeddings=``/``ref_labels=``.
    """

    accepts_reference: bool = False
    #: Hyper-parameter name -> check returning the checked value. Run on every assignment,
    #: in the constructor and after it (``arcface.margin = 2.0`` raises as the constructor
    #: does), and saved in ``state_dict`` so a checkpoint cannot load into other settings.
    hyper_parameters: ClassVar[HyperChecks] = {}

    def __init__(
        self, *, reduction: Reduction = "mean", nonfinite: NonFinite = "auto", record_stats: bool = True
    ) -> None:
        super().__init__()
        self._last_value: Tensor | None = None
        self._last_stats: dict[str, Tensor | float] = {}
        self.reduction: Reduction = reduction
        self.nonfinite: NonFinite = nonfinite
        self.record_stats: bool = record_stats

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "reduction":
            value = check_choice(value, "reduction", REDUCTIONS)
        elif name == "nonfinite":
            value = check_choice(value, "nonfinite", NONFINITE_MODES)
        elif name == "record_stats":
            value = check_bool(value, "record_stats")
        check = type(self).hyper_parameters.get(name)
        if check is not None:
            value = check(value)
        super().__setattr__(name, value)

    def _reduce(self, per_sample: Tensor, mean: Tensor | None = None) -> Tensor:
        """Apply ``self.reduction`` to per-sample values of shape ``(batch_size,)``.

        ``mean`` is the family's published mean when it is not ``per_sample.mean()``
        (e.g. a mean over the anchors that have a positive only).
        """
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample.mean() if mean is None else mean

    # -- input values ------------------------------------------------------------
    def _check_values(self, *named: tuple[Tensor | None, str]) -> Tensor | None:
        """The value checks of one call, after the shape checks (see the module docstring).

        Raises on non-finite embeddings when ``nonfinite`` resolves to ``"raise"`` and
        returns ``None``; otherwise returns the number of non-finite entries as a 0-d
        tensor (no host sync), for :meth:`_finish`.
        """
        tensors = [(t, name) for t, name in named if t is not None]
        device = tensors[0][0].device
        mode = self.nonfinite
        if mode == "auto":
            lenient = device.type != "cpu" or _autocast_enabled(device.type) or _compiling()
            mode = "propagate" if lenient else "raise"
        if mode == "raise":
            for tensor, name in tensors:
                check_embeddings(tensor, name)
            return None
        count = count_nonfinite(tensors[0][0])
        for tensor, _ in tensors[1:]:
            count = count + count_nonfinite(tensor)
        return count

    def _finish(self, value: Tensor, stats: dict[str, Tensor | float], nonfinite: Tensor | None) -> Tensor:
        """Record the call; with non-finite inputs let through, make the value NaN."""
        if not self.record_stats:
            # Pair losses skip computing them; a loss that computed some anyway keeps none.
            stats = {}
        if nonfinite is not None:
            # NaN times the value: a NaN loss and NaN gradients everywhere, so a GradScaler
            # sees the overflow and skips the step (a masked NaN could leave finite garbage).
            poison = torch.where(nonfinite > 0, float("nan"), 1.0).to(value.dtype)
            value = value * poison
            stats["nonfinite_inputs"] = nonfinite
        return self._record(value, stats)

    # -- checkpoints -------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        """The hyper-parameters, stored in ``state_dict`` under ``_extra_state``."""
        return {name: getattr(self, name) for name in type(self).hyper_parameters}

    def set_extra_state(self, state: Any) -> None:
        """Refuse a checkpoint saved with other hyper-parameters instead of loading it silently."""
        if not isinstance(state, Mapping):
            raise TypeError(
                f"{type(self).__name__}: extra state must be a mapping; got {type(state).__name__}"
            )
        mismatched = [
            f"{name}={state[name]!r} in the checkpoint, {getattr(self, name)!r} here"
            for name in type(self).hyper_parameters
            if name in state and state[name] != getattr(self, name)
        ]
        if mismatched:
            raise ValueError(
                f"cannot load a {type(self).__name__} state saved with other hyper-parameters: "
                + "; ".join(mismatched)
            )

    # -- recording -------------------------------------------------------------
    def _record(self, value: Tensor, stats: Mapping[str, Tensor | float]) -> Tensor:
        # Per-sample values (reduction="none") are recorded by their mean: monitors read a scalar.
        self._last_value = value.detach() if value.dim() == 0 else value.detach().mean()
        self._last_stats = {k: (v.detach() if isinstance(v, Tensor) else float(v)) for k, v in stats.items()}
        return value

    @property
    def last_value(self) -> float | None:
        """The value returned by the last call, or ``None`` before the first call."""
        return None if self._last_value is None else float(self._last_value)

    @property
    def last_stats(self) -> dict[str, float]:
        """Statistics of the last call as floats (empty before the first call)."""
        return {k: float(v) for k, v in self._last_stats.items()}

    @property
    def last_record(self) -> tuple[Tensor | None, dict[str, Tensor | float]]:
        """The detached value and statistics of the last call, still as tensors.

        For monitors that accumulate them on the device without a host sync;
        :attr:`last_value` and :attr:`last_stats` are the float views.
        """
        return self._last_value, dict(self._last_stats)

    # -- algebra -----------------------------------------------------------------
    def __add__(self, other: object) -> LossSum:
        if isinstance(other, Loss):
            return LossSum([(1.0, self), (1.0, other)])
        return NotImplemented

    def __radd__(self, other: object) -> Loss:
        # ``sum(losses)`` starts from 0.
        if isinstance(other, numbers.Number) and other == 0:
            return self
        return NotImplemented

    def __mul__(self, weight: object) -> LossSum:
        if isinstance(weight, Tensor):
            # A 0-d tensor weight is kept as the same object: a schedule that updates it in
            # place (``w.fill_(0.1 * epoch)``) is seen by the sum on its next call.
            return LossSum([(_check_tensor_weight(weight, "weight"), self)])
        if isinstance(weight, numbers.Real) and not isinstance(weight, bool):
            return LossSum([(check_real(weight, "weight"), self)])
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, divisor: object) -> LossSum:
        if isinstance(divisor, Tensor):
            divisor = _check_tensor_weight(divisor, "divisor")
            if bool(divisor == 0):
                raise ZeroDivisionError("cannot divide a loss by 0")
            return LossSum([(1.0 / divisor, self)])
        if isinstance(divisor, numbers.Real) and not isinstance(divisor, bool):
            divisor = check_real(divisor, "divisor")
            if divisor == 0:
                raise ZeroDivisionError("cannot divide a loss by 0")
            return LossSum([(1.0 / divisor, self)])
        return NotImplemented

    def __neg__(self) -> LossSum:
        return LossSum([(-1.0, self)])

    def __sub__(self, other: object) -> LossSum:
        if isinstance(other, Loss):
            return self + (-other)
        return NotImplemented

    @staticmethod
    def _zero(embeddings: Tensor) -> Tensor:
        """A zero loss still attached to the graph, so ``backward()`` works.

        In the working dtype (float32, float64 for float64 inputs), the dtype of every
        non-zero value: a batch without pairs must not return a float16 loss.
        """
        # "+ 0.0" turns the -0.0 of a negative sum times zero into 0.0.
        return embeddings.to(working_dtype(embeddings.dtype)).sum() * 0.0 + 0.0


def _check_tensor_weight(weight: Tensor, name: str) -> Tensor:
    """A loss weight given as a tensor: one finite real number, gradient-free."""
    if weight.numel() != 1 or weight.dim() > 1:
        raise ValueError(f"{name} must be a single number; got a tensor of shape {tuple(weight.shape)}")
    if weight.is_complex() or weight.dtype == torch.bool:
        raise TypeError(f"{name} must be a real number; got a tensor of dtype {weight.dtype}")
    check_real(weight.item(), name)  # finite (read once, at construction)
    return weight.reshape(())


def _check_weight(weight: object) -> float | Tensor:
    if isinstance(weight, Tensor):
        return _check_tensor_weight(weight, "weight")
    return check_real(weight, "weight")


def _one_dropped(weight: float | Tensor) -> tuple[float | Tensor, ...]:
    return () if isinstance(weight, float) and weight == 1.0 else (weight,)


def _product(factors: tuple[float | Tensor, ...]) -> float | Tensor:
    if not factors:
        return 1.0
    result = factors[0]
    for factor in factors[1:]:
        result = result * factor
    return result


class LossSum(Loss):
    """A weighted sum of losses, built by ``a + b``, ``w * a``, ``a / w`` or ``sum(...)``.

    Nested sums are flattened: ``0.5 * (a + b) + c`` holds the three terms
    ``(0.5, a), (0.5, b), (1.0, c)``. Each term keeps its own ``last_value`` and
    ``last_stats``; the sum's ``last_stats`` lists them under ``"<i>.<Name>.<key>"``.

    ``ref_embeddings``/``ref_labels`` are passed to the terms that accept them (pair
    losses) and not to classification or proxy losses, which compare embeddings
    with their own learnable centres.

    Parameters
    ----------
    terms : iterable of (float or 0-d Tensor, Loss)
        The weights and losses. A tensor weight is used as it is at each call (a
        schedule may update it in place); it is not a learnable parameter.

    Notes
    -----
    ``state_dict`` holds each term's state and hyper-parameters and the weights (as
    floats): loading it into a sum with other weights or other terms' settings raises
    a ``ValueError`` instead of silently mixing them.
    """

    def __init__(self, terms: Iterable[tuple[float | Tensor, Loss]]) -> None:
        super().__init__()
        # A sum has no reduction of its own: its terms' reductions decide (and must agree).
        # Each term keeps its weight as a product of factors, multiplied at each call, so a
        # tensor weight stays live through nesting: ``0.5 * (w * a) + b`` still reads ``w``.
        flat: list[tuple[tuple[float | Tensor, ...], Loss]] = []
        for weight, loss in terms:
            if not isinstance(loss, Loss):
                raise TypeError(f"each term must be an embedkit Loss; got {type(loss).__name__}")
            if isinstance(loss, LossSum):
                outer = _check_weight(weight)
                flat.extend(((*_one_dropped(outer), *factors), inner) for factors, inner in loss._terms)
            else:
                flat.append(((_check_weight(weight),), loss))
        if not flat:
            raise ValueError("a LossSum needs at least one term")
        self._factors = tuple(factors for factors, _ in flat)
        self.losses = nn.ModuleList([loss for _, loss in flat])
        self.accepts_reference = any(loss.accepts_reference for loss in self.losses)

    @property
    def _terms(self) -> list[tuple[tuple[float | Tensor, ...], Loss]]:
        return list(zip(self._factors, self.losses, strict=True))  # type: ignore[arg-type]

    @property
    def weights(self) -> tuple[float | Tensor, ...]:
        """The weight of each term now (a tensor where a tensor weight is involved)."""
        return tuple(_product(factors) for factors in self._factors)

    @property
    def terms(self) -> list[tuple[float | Tensor, Loss]]:
        """The (weight, loss) pairs of this sum, flattened."""
        return list(zip(self.weights, self.losses, strict=True))  # type: ignore[arg-type]

    def get_extra_state(self) -> dict[str, Any]:
        return {"weights": [float(w) for w in self.weights]}

    def set_extra_state(self, state: Any) -> None:
        saved = state.get("weights") if isinstance(state, Mapping) else None
        here = [float(w) for w in self.weights]
        if saved != here:
            raise ValueError(
                f"cannot load a LossSum state saved with weights {saved} into one with weights {here}"
            )

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        *,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
        **unexpected: Any,
    ) -> Tensor:
        """Weighted sum of every term's loss on the same batch.

        Parameters
        ----------
        embeddings : Tensor of shape (batch_size, embedding_dim)
        labels : Tensor of shape (batch_size,)
        ref_embeddings : Tensor of shape (ref_size, embedding_dim), optional
            Passed to the terms that accept a reference set.
        ref_labels : Tensor of shape (ref_size,), optional

        Returns
        -------
        Tensor
            A scalar.
        """
        _reject_unexpected(self, unexpected)
        has_ref = ref_embeddings is not None or ref_labels is not None
        if has_ref and not self.accepts_reference:
            names = ", ".join(type(loss).__name__ for loss in self.losses)
            raise TypeError(f"none of the terms ({names}) accepts ref_embeddings/ref_labels")
        reductions = {loss.reduction for loss in self.losses}
        if len(reductions) > 1:
            raise ValueError(
                "the terms of a LossSum must share one reduction (per-sample values cannot be added "
                f"to a scalar); got {', '.join(f'{type(l).__name__}: {l.reduction!r}' for l in self.losses)}"
            )
        total: Tensor | None = None
        stats: dict[str, Tensor | float] = {}
        for i, (weight, loss) in enumerate(self.terms):
            if has_ref and loss.accepts_reference:
                value = loss(embeddings, labels, ref_embeddings=ref_embeddings, ref_labels=ref_labels)
            else:
                value = loss(embeddings, labels)
            total = weight * value if total is None else total + weight * value
            prefix = f"{i}.{type(loss).__name__}"
            stats[f"{prefix}.loss"] = loss._last_value if loss._last_value is not None else value.detach()
            stats.update({f"{prefix}.{k}": v for k, v in loss._last_stats.items()})
        assert total is not None
        return self._record(total, stats)

    def extra_repr(self) -> str:
        return "weights=" + ", ".join(f"{float(w):g}" for w in self.weights)


def _reject_unexpected(loss: Loss, kwargs: Mapping[str, Any]) -> None:
    """Name embedkit's keywords where a pytorch-metric-learning user typed its ``ref_emb=``."""
    if not kwargs:
        return
    hints = {"ref_emb": "ref_embeddings", "ref_label": "ref_labels", "ref_lbls": "ref_labels"}
    names = sorted(kwargs)
    known = [f"{n}= (embedkit calls it {hints[n]}=)" for n in names if n in hints]
    if loss.accepts_reference:
        detail = "; ".join(known) if known else "it takes ref_embeddings= and ref_labels= only"
    else:
        detail = "it compares embeddings with its learnable class parameters and takes no " + ", ".join(names)
    raise TypeError(f"{type(loss).__name__} got unexpected keyword argument(s) {', '.join(names)}: {detail}")


class PairBatch:
    """A validated batch for pair-based losses: queries, references and label masks.

    Attributes
    ----------
    embeddings : Tensor of shape (n, d)
    ref_embeddings : Tensor of shape (m, d)
        ``embeddings`` itself when no reference set was given.
    labels : Tensor of shape (n,)
    ref_labels : Tensor of shape (m,)
    is_self : bool
        The batch is compared against itself; the diagonal is no pair.
    positive_mask, negative_mask : Tensor of shape (n, m) and dtype bool
        Same label (excluding each item paired with itself) and different label.
    num_positive_pairs, num_negative_pairs : Tensor of shape () and dtype int64
        Their sizes (counted once, from the positive mask).

    Only shapes and dtypes are checked here: the values (finite or not) are the calling
    loss's business (see ``nonfinite`` in the module docstring).
    """

    def __init__(
        self,
        embeddings: Tensor,
        labels: Any,
        ref_embeddings: Tensor | None,
        ref_labels: Any,
    ) -> None:
        check_embeddings(embeddings, "embeddings", check_finite=False)
        self.labels = check_labels(labels, embeddings.shape[0], "labels", device=embeddings.device)
        if (ref_embeddings is None) != (ref_labels is None):
            raise ValueError(
                "ref_embeddings and ref_labels must be given together; got only "
                + ("ref_embeddings" if ref_labels is None else "ref_labels")
            )
        self.embeddings = embeddings
        self.is_self = ref_embeddings is None
        if ref_embeddings is None:
            self.ref_embeddings, self.ref_labels = embeddings, self.labels
        else:
            check_embeddings(ref_embeddings, "ref_embeddings", check_finite=False)
            check_matching_dim(embeddings, ref_embeddings, "embeddings", "ref_embeddings")
            self.ref_embeddings = ref_embeddings
            self.ref_labels = check_labels(
                ref_labels,
                ref_embeddings.shape[0],
                "ref_labels",
                device=embeddings.device,
                rows_name="ref_embeddings",
            )
        self._masks: tuple[Tensor, Tensor] | None = None
        self._num_positive: Tensor | None = None

    # The N×M masks are built on first use: the tiled InfoNCE path never needs them.
    @property
    def positive_mask(self) -> Tensor:
        return self._pair_masks()[0]

    @property
    def negative_mask(self) -> Tensor:
        return self._pair_masks()[1]

    def _pair_masks(self) -> tuple[Tensor, Tensor]:
        if self._masks is None:
            self._masks = pair_masks(self.labels, None if self.is_self else self.ref_labels)
        return self._masks

    @property
    def num_positive_pairs(self) -> Tensor:
        if self._num_positive is None:
            # count_nonzero, not .sum(): a bool sum first converts all N×M entries to int64.
            self._num_positive = torch.count_nonzero(self.positive_mask)
        return self._num_positive

    @property
    def num_negative_pairs(self) -> Tensor:
        # Every (query, reference) pair is positive or negative, but for the self-pairs.
        n, m = self.embeddings.shape[0], self.ref_embeddings.shape[0]
        return n * m - (n if self.is_self else 0) - self.num_positive_pairs


class PairLoss(Loss):
    """Base of losses computed from pairs of a batch (or of queries vs a reference set).

    Subclasses implement :meth:`compute` on a validated :class:`PairBatch`.

    Notes
    -----
    * Self-pairs are excluded only when no reference set is given. Passing the batch
      itself as ``ref_embeddings`` counts each item as its own positive (pytorch-
      metric-learning decides by object identity instead).
    * The formula is applied to any batch with pairs. pytorch-metric-learning returns
      0 when a batch has at most one positive *and* at most one negative pair (possible
      in reference mode or after multi-similarity mining); embedkit does not.
    * A batch without positive pairs gives 0 for every loss made only of
      positive-pair terms; :class:`~embedkit.losses.contrastive.ContrastiveLoss` and
      :class:`~embedkit.losses.multi_similarity.MultiSimilarityLoss` (without mining)
      keep their negative-pair term, as the published definitions do.
    """

    accepts_reference = True

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        *,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
        **unexpected: Any,
    ) -> Tensor:
        """Compute the loss.

        Parameters
        ----------
        embeddings : Tensor of shape (batch_size, embedding_dim)
            Query embeddings (any floating dtype; computed in float32 or float64).
        labels : Tensor of shape (batch_size,)
            Integer class labels.
        ref_embeddings : Tensor of shape (ref_size, embedding_dim), optional
            A reference set to contrast the queries against (e.g. high-resolution
            gallery images for super-resolved probes). Without it the batch is
            contrasted with itself, each item excluded from its own pairs.
        ref_labels : Tensor of shape (ref_size,), optional
            Labels of ``ref_embeddings``; required with it.

        Returns
        -------
        Tensor
            A scalar. 0 (with the graph kept) when the batch has no usable pair;
            ``last_stats["num_positive_pairs"]`` then says so.
        """
        _reject_unexpected(self, unexpected)
        batch = PairBatch(embeddings, labels, ref_embeddings, ref_labels)
        nonfinite = self._check_values(
            (batch.embeddings, "embeddings"),
            (None if batch.is_self else batch.ref_embeddings, "ref_embeddings"),
        )
        value, stats = self.compute(batch)
        return self._finish(value, stats, nonfinite)

    def compute(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor | float]]:
        """The loss (reduced as ``self.reduction`` says) and its statistics, on a checked batch."""
        raise NotImplementedError

    @staticmethod
    def pair_counts(batch: PairBatch) -> dict[str, Tensor | float]:
        """The number of positive and negative pairs, for ``last_stats``."""
        return {
            "num_positive_pairs": batch.num_positive_pairs,
            "num_negative_pairs": batch.num_negative_pairs,
        }

    @staticmethod
    def pair_means(
        batch: PairBatch, values: Tensor, positive_sum: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Mean of ``values`` (N×M) over the positive pairs and over the negative pairs.

        ``positive_sum`` (the sum over the positive pairs) is reused when the loss has it.
        Each sum is read directly (a total minus the positives would round to values just
        outside the range, e.g. a distance of -2e-16, when negatives are few).
        """
        values = values.detach()
        if positive_sum is None:
            positive_sum = torch.where(batch.positive_mask, values, 0.0).sum()
        negative_sum = torch.where(batch.negative_mask, values, 0.0).sum()
        positive_mean = positive_sum / batch.num_positive_pairs.clamp_min(1)
        negative_mean = negative_sum / batch.num_negative_pairs.clamp_min(1)
        return positive_mean, negative_mean


class ClassifierLoss(Loss):
    """Base of losses with learnable per-class parameters (class centres, proxies).

    Subclasses hold ``num_classes`` and implement :meth:`compute`.
    """

    num_classes: int

    def forward(self, embeddings: Tensor, labels: Tensor, **kwargs: Any) -> Tensor:
        """Compute the loss.

        Parameters
        ----------
        embeddings : Tensor of shape (batch_size, embedding_dim)
        labels : Tensor of shape (batch_size,)
            Integer class labels in ``[0, num_classes)``.

        Returns
        -------
        Tensor
            A scalar.
        """
        _reject_unexpected(self, kwargs)
        check_embeddings(embeddings, "embeddings", check_finite=False)
        self._check_dim(embeddings)
        labels = check_labels(labels, embeddings.shape[0], "labels", device=embeddings.device)
        nonfinite = self._check_values((embeddings, "embeddings"))
        if not _compiling():  # a data-dependent raise would break the graph; indexing still fails
            check_class_labels(labels, self.num_classes, "labels")
        value, stats = self.compute(embeddings, labels)
        return self._finish(value, stats, nonfinite)

    def compute(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor | float]]:
        raise NotImplementedError

    def _check_dim(self, embeddings: Tensor) -> None:
        expected = self.embedding_dim
        if embeddings.shape[1] != expected:
            raise ValueError(
                f"embeddings has embedding_dim {embeddings.shape[1]} but "
                f"{type(self).__name__} was built with embedding_dim={expected}"
            )

    @property
    def embedding_dim(self) -> int:
        raise NotImplementedError


# -- masked reductions shared by the losses ---------------------------------------
def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is true; 0 (not NaN) where nothing is selected."""
    kept = torch.where(mask, values, 0.0)
    # count_nonzero, not mask.sum(): a bool sum converts every entry to int64 first.
    if dim is None:
        return kept.sum() / torch.count_nonzero(mask).clamp_min(1)
    return kept.sum(dim) / torch.count_nonzero(mask, dim=dim).clamp_min(1)


def masked_logsumexp(values: Tensor, mask: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``log Σ exp(values)`` over the masked entries along ``dim``.

    Returns the result and whether any entry was selected. Masked entries are filled
    with the dtype's lowest finite value instead of ``-inf``, so an empty selection
    gives a finite value with a zero gradient rather than NaN.
    """
    filled = torch.where(mask, values, torch.finfo(values.dtype).min)
    return torch.logsumexp(filled, dim=dim), mask.any(dim=dim)


def log1p_sum_exp(values: Tensor, mask: Tensor, dim: int) -> Tensor:
    """``log(1 + Σ exp(values))`` over the masked entries along ``dim`` (0 if none)."""
    lse, anything = masked_logsumexp(values, mask, dim)
    # logaddexp(lse, 0) is log(1 + e^lse) exactly; softplus returns x itself above 20.
    return torch.where(anything, torch.logaddexp(lse, torch.zeros_like(lse)), 0.0)


def attached_zero_unless(condition: Tensor, value: Tensor) -> Tensor:
    """``value`` where ``condition`` holds, else an attached 0 — without a host sync.

    For "a batch without pairs gives 0" rules: ``torch.where`` keeps the graph (the
    gradient is 0 on the zero side) and torch.compile sees no data-dependent branch.
    """
    return torch.where(condition, value, 0.0)
