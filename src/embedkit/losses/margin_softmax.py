"""Margin-softmax losses with learnable class centres: NormFace, CosFace, ArcFace, sub-center ArcFace.

All four compute the cosine between each embedding and each class centre, change
the target class's cosine by a margin, scale, divide by ``temperature`` and apply
cross-entropy::

    logits[i, j] = scale * f(cos θ_ij) / temperature   with f = identity for j ≠ y_i

Cosines come from ``embedkit.similarity._scaled_cosine`` (the values of
:func:`embedkit.similarity.pairwise_similarity` with ``metric="cosine"``, with a cheaper
graph), which runs in float32 under fp16/bf16 autocast, and the margin is computed
without ``acos`` so the loss and its gradient stay finite at cos = ±1.

``temperature`` divides the logits after scaling (case study 02 softened an
over-confident head with ``temperature=4``); ``scale / temperature`` is the
effective inverse temperature of the softmax.

How the work is laid out (each pass over the (batch, classes) matrix costs about as
much as the rest of the step apart from the matmul, so there are few): embeddings and
class centres are normalised outside autograd with a written-out backward (no
normalisation graph, no (batch, classes) rescaling), the scale is folded into the
smaller of the two before the matmul, which therefore yields the margin-free logits
directly, and sub-centres are maximised over contiguous blocks; the logits are kept
(detached, no copy) as ``last_logits`` for :class:`~embedkit.monitors.ClassCollapseMonitor`.
The margin touches one entry per row, so it is applied to the ``batch_size`` target
logits only, and a fused cross-entropy (:class:`_MarginCrossEntropy`) takes the
margin-free logits and the changed target logits, finds each row's maximum,
exponentiates in place (as ``exp2``, several times faster than ``exp`` on CPU), and in
backward turns the saved exponentials into the gradient in place: no one-hot masks, no
scattered copy of the logits, and the batch accuracy comes from the same row maxima.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from .._checks import check_bool, check_embeddings, check_int, check_real
from ..similarity import _scaled_cosine, pairwise_similarity, working_dtype
from .base import ClassifierLoss, HyperChecks, NonFinite, Reduction

__all__ = ["ArcFaceLoss", "CosFaceLoss", "NormalizedSoftmaxLoss", "SubCenterArcFaceLoss"]


def _check_angular_margin(margin: object) -> float:
    value = check_real(margin, "margin")
    if not 0.0 <= value < math.pi / 2:
        raise ValueError(
            f"margin is in radians and must lie in [0, pi/2); got {value:g}. "
            "For a margin in degrees pass math.radians(margin)."
        )
    return value


_LOG2_E = 1.0 / math.log(2.0)


def exp_floor(dtype: torch.dtype) -> float:
    """The lowest argument ``exp`` is given in the fused softmaxes: ``log(eps**4)``.

    After shifting by the row maximum (so the largest term is ``exp(0) = 1``), a term
    below ``eps**4`` cannot change the sum by one rounding unit unless there are more
    than ``1 / eps**3`` classes (about 6e20 in float32), so clamping the arguments
    here changes no value beyond rounding. It keeps ``exp`` out of the subnormal range,
    which CPUs compute many times slower: a saturated scale-64 head otherwise spends
    most of its cross-entropy there. The softmax weight of a clamped term (below
    ``eps**4``, exactly a negligible gradient) is read as ``eps**4``.
    """
    return 4.0 * math.log(torch.finfo(dtype).eps)


class _MarginCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of logits whose target column is replaced by ``target_logits``.

    ``forward(logits, labels, target_logits, target_slope) -> (loss, hits)``:

    * ``logits`` (N, C): the margin-free logits; the target column is ignored;
    * ``target_logits`` (N,): the target logits with the margin, which replace it;
    * ``target_slope`` (N,): d target_logit / d margin-free target logit (1 without a
      margin, the slope of ``f`` for ArcFace); backward multiplies the target column's
      gradient by it, so the margin needs no (N, C) pass of its own;
    * ``loss`` (N,): ``logsumexp(row) - target_logit`` per row;
    * ``hits`` (N,) bool, not differentiable: the margin-free target logit is strictly
      above every other logit of its row (ties count as misses, so constant logits
      never score).

    Work on (N, C): two row maxima, a subtraction into a new buffer, then a second
    subtraction, a clamp, a product and ``exp2`` in place, and a row sum; backward scales the saved
    exponentials in place into the gradient (so it can run once: a second backward through the same graph
    raises, as PyTorch does for any in-place change of saved tensors).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, logits: Tensor, labels: Tensor, target_logits: Tensor, target_slope: Tensor
    ) -> tuple[Tensor, Tensor]:
        index = labels[:, None]
        # An upper bound of every entry of the margin row (the margin may raise the
        # target when negative), so nothing overflows before the exact maximum is known.
        bound = torch.maximum(logits.amax(dim=1), target_logits)[:, None]
        shifted = logits - bound
        own = shifted.gather(1, index)  # the margin-free target logit, shifted
        shifted.scatter_(1, index, -math.inf)
        other = shifted.amax(dim=1, keepdim=True)  # the largest non-target logit, shifted
        hits = (own > other).squeeze(1)
        target = target_logits[:, None] - bound
        top = torch.maximum(other, target)  # the row maximum with the margin, shifted (<= 0)
        shifted.scatter_(1, index, target)
        shifted.sub_(top)  # now <= 0, with an exact 0 at each row's maximum
        # exp(z) as exp2(z log2 e): torch's CPU exp2 kernel is about 4 times faster than
        # its exp, and this was the costliest pass outside the matmuls; rounding the
        # product costs 2-3 ulp instead of 1.
        exps = shifted.clamp_min_(exp_floor(shifted.dtype)).mul_(_LOG2_E).exp2_()
        total = exps.sum(dim=1)
        loss = total.log() - (target - top).squeeze(1)
        ctx.save_for_backward(exps, total, index, target_slope)
        ctx.mark_non_differentiable(hits)
        return loss, hits

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, grad_hits: Tensor) -> tuple[Tensor | None, ...]:
        exps, total, index, target_slope = ctx.saved_tensors
        # d loss_i / d z_ij = softmax_ij - [j = y_i]; the target entry goes through the margin.
        grad = exps.mul_((grad_loss / total)[:, None])
        at_target = (grad.gather(1, index) - grad_loss[:, None]) * target_slope[:, None]
        grad.scatter_(1, index, at_target)
        return grad, None, None, None


class _MarginSoftmaxLoss(ClassifierLoss):
    """Shared machinery: class centres, logits, margin, fused cross-entropy and stats."""

    hyper_parameters: ClassVar[HyperChecks] = {
        "margin": partial(check_real, name="margin"),
        "scale": partial(check_real, name="scale", low=0.0, low_inclusive=False),
        "temperature": partial(check_real, name="temperature", low=0.0, low_inclusive=False),
    }

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        margin: float,
        scale: float,
        temperature: float,
        sub_centers: int = 1,
        reduction: Reduction = "mean",
        keep_logits: bool = True,
        nonfinite: NonFinite = "auto",
        record_stats: bool = True,
    ) -> None:
        super().__init__(reduction=reduction, nonfinite=nonfinite, record_stats=record_stats)
        self.num_classes = check_int(num_classes, "num_classes", low=1)
        self._embedding_dim = check_int(embedding_dim, "embedding_dim", low=1)
        self.sub_centers = check_int(sub_centers, "sub_centers", low=1)
        self.margin = check_real(margin, "margin")
        self.scale = check_real(scale, "scale", low=0.0, low_inclusive=False)
        self.temperature = check_real(temperature, "temperature", low=0.0, low_inclusive=False)
        self._last_logits: Tensor | None = None
        self.keep_logits = keep_logits
        # One row per (class, sub-centre), class-major: row c * sub_centers + k.
        self.weight = nn.Parameter(torch.empty(self.num_classes * self.sub_centers, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    @property
    def keep_logits(self) -> bool:
        """Whether :attr:`last_logits` keeps the logits of the last call (see there)."""
        return self._keep_logits

    @keep_logits.setter
    def keep_logits(self, value: bool) -> None:
        self._keep_logits = check_bool(value, "keep_logits")
        if not self._keep_logits:
            self._last_logits = None  # freed now, not at the next call

    @property
    def last_logits(self) -> Tensor | None:
        """The margin-free logits of the last call, detached: what :meth:`logits` would return.

        The tensor the forward pass computed anyway (no copy, no host sync, no second
        matmul), of shape (batch_size, num_classes) in float32 (float64 for float64
        inputs). Feed it to :class:`~embedkit.monitors.ClassCollapseMonitor`::

            loss = arcface(embeddings, labels)
            collapse.update(arcface.last_logits, labels)

        Without the margin, because the monitor is about the class the head predicts:
        at inference (and for top-k accuracy, the prediction histogram and the softmax
        confidence) there is no margin, and with it the target class would be handicapped
        by ``scale * margin`` and every accuracy would read low.

        ``None`` before the first call and when the loss was built with
        ``keep_logits=False``. Keeping them holds one (batch_size, num_classes) tensor
        alive between steps (4 MiB at batch 1,024 and 1,000 classes, 400 MiB at batch 1,024
        and 100,000 classes) — it is released at the start of the next call, so the peak
        memory of a step does not grow; ``keep_logits=False`` (in the constructor, or
        assigned later, which frees them at once) keeps nothing.
        """
        return self._last_logits

    def _scaled_logits(self, embeddings: Tensor) -> Tensor:
        """``scale * cos / temperature`` for every class (its nearest sub-centre), one matmul."""
        x = embeddings.to(working_dtype(embeddings.dtype))
        weight = self.weight.to(x.dtype)
        # The scale multiplies the smaller factor of the matmul, not the (batch, classes) product.
        scale = self.scale / self.temperature
        x_scale, w_scale = (scale, 1.0) if x.shape[0] <= weight.shape[0] else (1.0, scale)
        # One sub-centre takes each class's gradient (as in the paper and
        # pytorch-metric-learning), not a split over ties as amax's backward would.
        logits = _scaled_cosine(x, weight, x_scale=x_scale, y_scale=w_scale, group=self.sub_centers)
        return logits

    def cosine(self, embeddings: Tensor) -> Tensor:
        """Cosine between each embedding and each class (its nearest sub-centre).

        Parameters
        ----------
        embeddings : Tensor of shape (batch_size, embedding_dim)

        Returns
        -------
        Tensor of shape (batch_size, num_classes)
            In float32 (float64 for float64 inputs), clamped to [-1, 1].
        """
        cos = pairwise_similarity(embeddings, self.weight, metric="cosine").clamp(-1.0, 1.0)
        if self.sub_centers > 1:
            cos = cos.view(cos.shape[0], self.num_classes, self.sub_centers).amax(dim=2)
        return cos

    def logits(self, embeddings: Tensor) -> Tensor:
        """Class scores without the margin, as used at inference and by monitors.

        During training prefer :attr:`last_logits`: the same values, already computed
        by the forward pass.

        Parameters
        ----------
        embeddings : Tensor of shape (batch_size, embedding_dim)

        Returns
        -------
        Tensor of shape (batch_size, num_classes)
            ``scale * cos / temperature``.
        """
        check_embeddings(embeddings, "embeddings")
        self._check_dim(embeddings)
        return self._scaled_logits(embeddings)

    def target_with_margin(self, target_cosine: Tensor) -> Tensor:
        """``f(cos θ_y)``: the target-class cosine after the margin."""
        return self._target_and_slope(target_cosine)[0]

    def _target_and_slope(self, target_cosine: Tensor) -> tuple[Tensor, Tensor]:
        """``f(cos θ_y)`` and its derivative ``f'(cos θ_y)`` (for the fused backward)."""
        raise NotImplementedError

    def compute(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor | float]]:
        self._last_logits = None  # released before this step's (batch, classes) tensors exist
        scale = self.scale / self.temperature
        logits = self._scaled_logits(embeddings)
        with torch.no_grad():
            target_cosine = logits.gather(1, labels[:, None]).squeeze(1) / scale
            target, slope = self._target_and_slope(target_cosine)
        per_row, hits = _MarginCrossEntropy.apply(logits, labels, target * scale, slope)
        stats: dict[str, Tensor | float] = {}
        if self.record_stats:
            with torch.no_grad():
                n, c = logits.shape
                total_cosine = logits.sum() / scale  # one read of the logits
                stats = {
                    "accuracy": hits.float().mean(),
                    # Counts and chance, so LossMonitor can compare the accuracy with chance.
                    "accuracy_hits": hits.sum(),
                    "accuracy_total": float(n),
                    "accuracy_chance": 1.0 / self.num_classes,
                    "mean_target_cosine": target_cosine.mean(),
                    "mean_nontarget_cosine": (total_cosine - target_cosine.sum()) / (n * max(c - 1, 1)),
                }
        if self.keep_logits:
            self._last_logits = logits.detach()
        return self._reduce(per_row), stats

    def extra_repr(self) -> str:
        parts = [f"num_classes={self.num_classes}", f"embedding_dim={self.embedding_dim}"]
        if self.sub_centers > 1:
            parts.append(f"sub_centers={self.sub_centers}")
        parts += [f"margin={self.margin:g}", f"scale={self.scale:g}", f"temperature={self.temperature:g}"]
        return ", ".join(parts + self._common_repr())

    def _common_repr(self) -> list[str]:
        parts = [] if self.reduction == "mean" else [f"reduction={self.reduction!r}"]
        return parts + ([] if self.keep_logits else ["keep_logits=False"])


class NormalizedSoftmaxLoss(_MarginSoftmaxLoss):
    r"""Normalised softmax (NormFace; Wang et al., 2017): cross-entropy on scaled cosines.

    .. math:: L = -\frac{1}{N}\sum_i \log
              \frac{e^{s\cos\theta_{y_i}/T}{\sum_j e^{s\cos\theta_j/T}

    Parameters
    ----------
    num_classes : int
        Number of classes (identities).
    embedding_dim : int
        Dimension of the embeddings.
    scale : float
        ``s``, the logit scale. The default 20 equals pytorch-metric-learning's
        default ``temperature=0.05`` (its temperature is ``1 / scale``).
    temperature : float
        ``T``, an extra divisor of the logits.
    reduction : {"mean", "sum", "none"}
        ``"none"`` returns the per-row cross-entropy, shape (batch_size,); ``"sum"``
        their sum; ``"mean"`` (default) their mean, the published loss.
    keep_logits : bool
        Keep the margin-free logits of each call as :attr:`last_logits` for the
        collapse monitor (default ``True``; one (batch_size, num_classes) tensor is
        held between steps).
    nonfinite, record_stats
        As for every loss (:mod:`embedkit.losses.base`).

    Attributes
    ----------
    weight : Parameter of shape (num_classes, embedding_dim)
        The class centres (not normalised; cosines normalise them).

    Notes
    -----
    ``last_stats``: ``accuracy`` (batch top-1 from the margin-free logits; a tie with
    another class counts as a miss), ``accuracy_hits``, ``accuracy_total``,
    ``accuracy_chance``, ``mean_target_cosine``, ``mean_nontarget_cosine``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        scale: float = 20.0,
        temperature: float = 1.0,
        reduction: Reduction = "mean",
        keep_logits: bool = True,
        nonfinite: NonFinite = "auto",
        record_stats: bool = True,
    ) -> None:
        super().__init__(
            num_classes,
            embedding_dim,
            margin=0.0,
            scale=scale,
            temperature=temperature,
            reduction=reduction,
            keep_logits=keep_logits,
            nonfinite=nonfinite,
            record_stats=record_stats,
        )

    def _target_and_slope(self, target_cosine: Tensor) -> tuple[Tensor, Tensor]:
        return target_cosine, torch.ones_like(target_cosine)

    def extra_repr(self) -> str:
        parts = [
            f"num_classes={self.num_classes}",
            f"embedding_dim={self.embedding_dim}",
            f"scale={self.scale:g}",
            f"temperature={self.temperature:g}",
        ]
        return ", ".join(parts + self._common_repr())


class CosFaceLoss(_MarginSoftmaxLoss):
    r"""CosFace / large-margin cosine loss (Wang et al., 2018): an additive cosine margin.

    .. math:: f(\cos\theta_y) = \cos\theta_y - m

    Parameters
    ----------
    num_classes : int
        Number of classes (identities).
    embedding_dim : int
        Dimension of the embeddings.
    margin : float
        ``m``, subtracted from the target cosine (paper default 0.35).
    scale : float
        ``s``, the logit scale (paper default 64).
    temperature : float
        An extra divisor of the logits.
    reduction : {"mean", "sum", "none"}
        ``"none"`` returns the per-row cross-entropy, shape (batch_size,); ``"sum"``
        their sum; ``"mean"`` (default) their mean, the published loss.
    keep_logits : bool
        Keep the margin-free logits of each call as :attr:`last_logits` for the
        collapse monitor (default ``True``; one (batch_size, num_classes) tensor is
        held between steps).
    nonfinite, record_stats
        As for every loss (:mod:`embedkit.losses.base`).

    Notes
    -----
    Equal to pytorch-metric-learning's ``CosFaceLoss`` for equal ``margin`` and
    ``scale`` (with ``temperature=1``). ``last_stats`` as for
    :class:`NormalizedSoftmaxLoss`.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        margin: float = 0.35,
        scale: float = 64.0,
        temperature: float = 1.0,
        reduction: Reduction = "mean",
        keep_logits: bool = True,
        nonfinite: NonFinite = "auto",
        record_stats: bool = True,
    ) -> None:
        super().__init__(
            num_classes,
            embedding_dim,
            margin=margin,
            scale=scale,
            temperature=temperature,
            reduction=reduction,
            keep_logits=keep_logits,
            nonfinite=nonfinite,
            record_stats=record_stats,
        )

    def _target_and_slope(self, target_cosine: Tensor) -> tuple[Tensor, Tensor]:
        return target_cosine - self.margin, torch.ones_like(target_cosine)


class ArcFaceLoss(_MarginSoftmaxLoss):
    r"""ArcFace / additive angular margin loss (Deng et al., 2019).

    .. math:: f(\cos\theta_y) = \begin{cases}\cos(\theta_y + m) & \theta_y \le \pi - m\\
              \cos\theta_y - m\sin m & \text{otherwise}\end{cases}

    The second branch keeps the target logit decreasing in θ where θ + m would pass
    π (the official implementation's rule). ``cos(θ + m)`` is computed as
    ``cos θ cos m - sin θ sin m`` with ``sin θ = sqrt(max(1 - cos²θ, eps))``: the
    exact gradient of the margin (not a constant shift as in insightface, which
    applies the margin under ``no_grad``), finite at cos θ = ±1.

    Parameters
    ----------
    num_classes : int
        Number of classes (identities).
    embedding_dim : int
        Dimension of the embeddings.
    margin : float
        ``m`` in **radians** (insightface convention; default 0.5 ≈ 28.65°).
        pytorch-metric-learning takes degrees: its ``margin=28.6`` is
        ``math.radians(28.6)`` here.
    scale : float
        ``s``, the logit scale (default 64).
    temperature : float
        An extra divisor of the logits.
    sub_centers : int
        Centres per class; above 1 this is :class:`SubCenterArcFaceLoss`.
    reduction : {"mean", "sum", "none"}
        ``"none"`` returns the per-row cross-entropy, shape (batch_size,); ``"sum"``
        their sum; ``"mean"`` (default) their mean, the published loss.
    keep_logits : bool
        Keep the margin-free logits of each call as :attr:`last_logits` for the
        collapse monitor (default ``True``; one (batch_size, num_classes) tensor is
        held between steps).
    nonfinite, record_stats
        As for every loss (:mod:`embedkit.losses.base`).

    Notes
    -----
    Equal to pytorch-metric-learning's ``ArcFaceLoss(margin=math.degrees(m))`` in
    value and gradient. ``last_stats`` as for :class:`NormalizedSoftmaxLoss`.
    """

    hyper_parameters: ClassVar[HyperChecks] = {
        **_MarginSoftmaxLoss.hyper_parameters,
        "margin": _check_angular_margin,
    }

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        margin: float = 0.5,
        scale: float = 64.0,
        temperature: float = 1.0,
        sub_centers: int = 1,
        reduction: Reduction = "mean",
        keep_logits: bool = True,
        nonfinite: NonFinite = "auto",
        record_stats: bool = True,
    ) -> None:
        super().__init__(
            num_classes,
            embedding_dim,
            margin=margin,
            scale=scale,
            temperature=temperature,
            sub_centers=sub_centers,
            reduction=reduction,
            keep_logits=keep_logits,
            nonfinite=nonfinite,
            record_stats=record_stats,
        )

    def _target_and_slope(self, target_cosine: Tensor) -> tuple[Tensor, Tensor]:
        m, c = self.margin, target_cosine
        eps = torch.finfo(c.dtype).eps
        sine_squared = 1.0 - c * c
        sine = torch.sqrt(sine_squared.clamp_min(eps))
        with_margin = c * math.cos(m) - sine * math.sin(m)
        # d sin θ / d cos θ = -cos θ / sin θ, and 0 where the clamp holds sin θ at sqrt(eps).
        slope = math.cos(m) + torch.where(sine_squared >= eps, c / sine, 0.0) * math.sin(m)
        # θ ≤ π − m  ⇔  cos θ ≥ −cos m; beyond, f = cos θ − m sin m with slope 1.
        main = c >= -math.cos(m)
        return (
            torch.where(main, with_margin, c - m * math.sin(m)),
            torch.where(main, slope, torch.ones_like(slope)),
        )


class SubCenterArcFaceLoss(ArcFaceLoss):
    r"""Sub-center ArcFace (Deng et al., 2020): ArcFace with ``sub_centers`` centres per class.

    Each class's cosine is the largest over its sub-centres, so noisy samples can
    gather around a secondary centre instead of pulling the dominant one.

    Parameters
    ----------
    num_classes : int
        Number of classes (identities).
    embedding_dim : int
        Dimension of the embeddings.
    margin : float
        Angular margin in radians (default 0.5).
    scale : float
        Logit scale (default 64).
    temperature : float
        An extra divisor of the logits.
    sub_centers : int
        Centres per class (paper default 3).
    reduction : {"mean", "sum", "none"}
        ``"none"`` returns the per-row cross-entropy, shape (batch_size,); ``"sum"``
        their sum; ``"mean"`` (default) their mean, the published loss.
    keep_logits : bool
        Keep the margin-free logits of each call as :attr:`last_logits` for the
        collapse monitor (default ``True``; one (batch_size, num_classes) tensor is
        held between steps).
    nonfinite, record_stats
        As for every loss (:mod:`embedkit.losses.base`).

    Attributes
    ----------
    weight : Parameter of shape (num_classes * sub_centers, embedding_dim)
        Row ``c * sub_centers + k`` is sub-centre ``k`` of class ``c`` (the layout of
        pytorch-metric-learning's ``W.T``).

    Notes
    -----
    The gradient of a class's cosine goes to one sub-centre, the nearest (the first on
    a tie), as in pytorch-metric-learning.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        margin: float = 0.5,
        scale: float = 64.0,
        temperature: float = 1.0,
        sub_centers: int = 3,
        reduction: Reduction = "mean",
        keep_logits: bool = True,
        nonfinite: NonFinite = "auto",
        record_stats: bool = True,
    ) -> None:
        super().__init__(
            num_classes,
            embedding_dim,
            margin=margin,
            scale=scale,
            temperature=temperature,
            sub_centers=sub_centers,
            reduction=reduction,
            keep_logits=keep_logits,
            nonfinite=nonfinite,
            record_stats=record_stats,
        )
