"""Margin-softmax losses with learnable class centres: NormFace, CosFace, ArcFace, sub-center ArcFace.

All four compute the cosine between each embedding and each class centre, change
the target class's cosine by a margin, scale, divide by ``temperature`` and apply
cross-entropy::

    logits[i, j] = scale * f(cos θ_ij) / temperature   with f = identity for j ≠ y_i

Cosines come from :func:`embedkit.similarity.pairwise_similarity`, which runs in
float32 under fp16/bf16 autocast, and the margin is computed without ``acos`` so
the loss and its gradient stay finite at cos = ±1.

``temperature`` divides the logits after scaling (case study 02 softened an
over-confident head with ``temperature=4``); ``scale / temperature`` is the
effective inverse temperature of the softmax.
"""

from __future__ import annotations

import math
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_embeddings, check_int, check_real
from ..similarity import pairwise_similarity
from .base import ClassifierLoss, HyperChecks

__all__ = ["ArcFaceLoss", "CosFaceLoss", "NormalizedSoftmaxLoss", "SubCenterArcFaceLoss"]


def _check_angular_margin(margin: object) -> float:
    value = check_real(margin, "margin")
    if not 0.0 <= value < math.pi / 2:
        raise ValueError(
            f"margin is in radians and must lie in [0, pi/2); got {value:g}. "
            "For a margin in degrees pass math.radians(margin)."
        )
    return value


class _MarginSoftmaxLoss(ClassifierLoss):
    """Shared machinery: class centres, cosines, logits, cross-entropy and stats."""

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
    ) -> None:
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", low=1)
        self._embedding_dim = check_int(embedding_dim, "embedding_dim", low=1)
        self.sub_centers = check_int(sub_centers, "sub_centers", low=1)
        self.margin = check_real(margin, "margin")
        self.scale = check_real(scale, "scale", low=0.0, low_inclusive=False)
        self.temperature = check_real(temperature, "temperature", low=0.0, low_inclusive=False)
        # One row per (class, sub-centre), class-major: row c * sub_centers + k.
        self.weight = nn.Parameter(torch.empty(self.num_classes * self.sub_centers, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

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
        return self.cosine(embeddings) * (self.scale / self.temperature)

    def target_with_margin(self, target_cosine: Tensor) -> Tensor:
        """``f(cos θ_y)``: the target-class cosine after the margin."""
        raise NotImplementedError

    def compute(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor | float]]:
        cos = self.cosine(embeddings)
        index = labels[:, None]
        target = cos.gather(1, index).squeeze(1)
        logits = cos.scatter(1, index, self.target_with_margin(target)[:, None])
        loss = F.cross_entropy(logits * (self.scale / self.temperature), labels)
        with torch.no_grad():
            others = (cos.sum(dim=1) - target) / max(self.num_classes - 1, 1)
            stats: dict[str, Tensor | float] = {
                "accuracy": (cos.argmax(dim=1) == labels).float().mean(),
                # Counts and chance, so LossMonitor can compare the accuracy with chance.
                "accuracy_hits": (cos.argmax(dim=1) == labels).sum(),
                "accuracy_total": float(labels.shape[0]),
                "accuracy_chance": 1.0 / self.num_classes,
                "mean_target_cosine": target.mean(),
                "mean_nontarget_cosine": others.mean(),
            }
        return loss, stats

    def extra_repr(self) -> str:
        parts = [f"num_classes={self.num_classes}", f"embedding_dim={self.embedding_dim}"]
        if self.sub_centers > 1:
            parts.append(f"sub_centers={self.sub_centers}")
        parts += [f"margin={self.margin:g}", f"scale={self.scale:g}", f"temperature={self.temperature:g}"]
        return ", ".join(parts)


class NormalizedSoftmaxLoss(_MarginSoftmaxLoss):
    r"""Normalised softmax (NormFace; Wang et al., 2017): cross-entropy on scaled cosines.

    .. math:: L = -\frac{1}{N}\sum_i \log
              \frac{e^{s\cos\theta_{y_i}/T}}{\sum_j e^{s\cos\theta_j/T}}

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

    Attributes
    ----------
    weight : Parameter of shape (num_classes, embedding_dim)
        The class centres (not normalised; cosines normalise them).

    Notes
    -----
    ``last_stats``: ``accuracy`` (batch top-1 from the margin-free logits),
    ``mean_target_cosine``, ``mean_nontarget_cosine``.
    """

    def __init__(
        self, num_classes: int, embedding_dim: int, *, scale: float = 20.0, temperature: float = 1.0
    ) -> None:
        super().__init__(num_classes, embedding_dim, margin=0.0, scale=scale, temperature=temperature)

    def target_with_margin(self, target_cosine: Tensor) -> Tensor:
        return target_cosine

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"scale={self.scale:g}, temperature={self.temperature:g}"
        )


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
    ) -> None:
        super().__init__(num_classes, embedding_dim, margin=margin, scale=scale, temperature=temperature)

    def target_with_margin(self, target_cosine: Tensor) -> Tensor:
        return target_cosine - self.margin


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
    ) -> None:
        super().__init__(
            num_classes,
            embedding_dim,
            margin=margin,
            scale=scale,
            temperature=temperature,
            sub_centers=sub_centers,
        )

    def target_with_margin(self, target_cosine: Tensor) -> Tensor:
        m = self.margin
        eps = torch.finfo(target_cosine.dtype).eps
        sine = torch.sqrt((1.0 - target_cosine * target_cosine).clamp_min(eps))
        with_margin = target_cosine * math.cos(m) - sine * math.sin(m)
        fallback = target_cosine - m * math.sin(m)
        # θ ≤ π − m  ⇔  cos θ ≥ −cos m
        return torch.where(target_cosine >= -math.cos(m), with_margin, fallback)


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

    Attributes
    ----------
    weight : Parameter of shape (num_classes * sub_centers, embedding_dim)
        Row ``c * sub_centers + k`` is sub-centre ``k`` of class ``c`` (the layout of
        pytorch-metric-learning's ``W.T``).
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
    ) -> None:
        super().__init__(
            num_classes,
            embedding_dim,
            margin=margin,
            scale=scale,
            temperature=temperature,
            sub_centers=sub_centers,
        )
