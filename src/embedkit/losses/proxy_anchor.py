"""Proxy-Anchor loss (Kim et al., CVPR 2020)."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from .._checks import check_choice, check_int, check_real
from ..similarity import l2_normalize, pairwise_similarity, working_dtype
from .base import REDUCTIONS, ClassifierLoss, HyperChecks, NonFinite, Reduction
from .margin_softmax import exp_floor

__all__ = ["ProxyAnchorLoss"]


class _ProxyAnchorTerms(torch.autograd.Function):
    """Each proxy's positive and negative term from the scaled cosines, fused.

    ``forward(scaled, labels, shift) -> (positive, negative)``, with ``scaled = α·cos``
    of shape (N, C) and ``shift = α·δ``:

    * ``positive[p] = log(1 + Σ_{i: y_i = p} exp(-(scaled[i, p] - shift)))``, from the N
      target entries only (gathered and reduced per class, no (N, C) mask);
    * ``negative[p] = log(1 + Σ_{i: y_i ≠ p} exp(scaled[i, p] + shift))``: one subtraction
      into a new (N, C) buffer, a clamp and ``exp`` in place (see
      :func:`~embedkit.losses.margin_softmax.exp_floor`), a column sum; the target
      entries are zeroed after ``exp``.

    Backward scales the saved exponentials in place into the gradient, so it runs once
    per forward (a second backward through the same graph raises).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, scaled: Tensor, labels: Tensor, shift: float) -> tuple[Tensor, Tensor]:
        c = scaled.shape[1]
        index = labels[:, None]
        # Positive terms: the targets' exponents, shifted per class by their maximum
        # (and by 0, for the "1 +"), summed per class.
        pos_exponent = shift - scaled.gather(1, index).squeeze(1)
        pos_top = torch.zeros(c, dtype=scaled.dtype, device=scaled.device)
        pos_top = pos_top.scatter_reduce(0, labels, pos_exponent, reduce="amax", include_self=True)
        pos_exps = (pos_exponent - pos_top[labels]).exp()
        pos_total = torch.exp(-pos_top).index_add_(0, labels, pos_exps)
        positive = pos_total.log() + pos_top
        # Negative terms: every non-target entry of each column.
        neg = scaled + shift
        neg.scatter_(1, index, -math.inf)
        neg_top = neg.amax(dim=0).clamp_min(0.0)  # >= the "1 +" term's exponent 0
        neg.sub_(neg_top).clamp_min_(exp_floor(neg.dtype)).exp_()
        neg.scatter_(1, index, 0.0)
        neg_total = neg.sum(dim=0) + torch.exp(-neg_top)
        negative = neg_total.log() + neg_top
        ctx.save_for_backward(neg, neg_total, pos_exps, pos_total, index, labels)
        return positive, negative

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_positive: Tensor, grad_negative: Tensor) -> tuple[Tensor | None, ...]:
        neg, neg_total, pos_exps, pos_total, index, labels = ctx.saved_tensors
        grad = neg.mul_(grad_negative / neg_total)  # target entries stay 0
        # d positive[y_i] / d scaled[i, y_i] = -(its softmax weight within the class).
        at_target = -(grad_positive / pos_total)[labels] * pos_exps
        grad.scatter_(1, index, at_target[:, None])
        return grad, None, None


class ProxyAnchorLoss(ClassifierLoss):
    r"""Proxy-Anchor loss: each class proxy is an anchor pulling its batch samples in.

    .. math:: L = \frac{1}{|P^+|}\sum_{p\in P^+}\log\Big(1+\sum_{x\in X_p^+}
              e^{-\alpha(s(x,p)-\delta)}\Big) + \frac{1}{|P|}\sum_{p\in P}
              \log\Big(1+\sum_{x\in X_p^-} e^{\alpha(s(x,p)+\delta)}\Big)

    with ``s`` the cosine similarity, ``P`` all proxies and ``P+`` the proxies of
    classes present in the batch.

    Parameters
    ----------
    num_classes : int
        Number of classes (one proxy each).
    embedding_dim : int
        Dimension of the embeddings.
    margin : float
        ``δ`` (paper default 0.1).
    alpha : float
        ``α``, the scaling factor (paper default 32).
    reduction : {"mean"}
        Only ``"mean"``, the published loss. Its terms belong to proxies, not samples:
        each is the log of a sum over the samples of a class (or of the other classes),
        so the loss is no sum of per-sample values, and any split of it over the batch
        would be an invention of ours. ``"sum"`` and ``"none"`` raise a ``ValueError``.
    nonfinite, record_stats
        As for every loss (:mod:`embedkit.losses.base`).

    Attributes
    ----------
    proxies : Parameter of shape (num_classes, embedding_dim)
        Initialised with Kaiming normal (fan-out), as in the paper's code.

    Notes
    -----
    Equal to pytorch-metric-learning's ``ProxyAnchorLoss`` for equal arguments.
    The paper trains proxies with a learning rate about 100× the backbone's.
    ``last_stats``: ``num_positive_proxies``, ``mean_positive_similarity``,
    ``mean_negative_similarity``.
    """

    hyper_parameters: ClassVar[HyperChecks] = {
        "margin": partial(check_real, name="margin"),
        "alpha": partial(check_real, name="alpha", low=0.0, low_inclusive=False),
    }

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        margin: float = 0.1,
        alpha: float = 32.0,
        reduction: Reduction = "mean",
        nonfinite: NonFinite = "auto",
        record_stats: bool = True,
    ) -> None:
        super().__init__(reduction=reduction, nonfinite=nonfinite, record_stats=record_stats)
        self.num_classes = check_int(num_classes, "num_classes", low=1)
        self._embedding_dim = check_int(embedding_dim, "embedding_dim", low=1)
        self.margin = check_real(margin, "margin")
        self.alpha = check_real(alpha, "alpha", low=0.0, low_inclusive=False)
        self.proxies = nn.Parameter(torch.empty(self.num_classes, self._embedding_dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "reduction" and check_choice(value, "reduction", REDUCTIONS) != "mean":
            raise ValueError(
                f"ProxyAnchorLoss supports reduction='mean' only; got {value!r}. Its terms are per "
                "proxy (the log of a sum over a class's samples), so there are no per-sample values "
                "to return ('none') or add up ('sum')."
            )
        super().__setattr__(name, value)

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    def compute(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor | float]]:
        x = l2_normalize(embeddings.to(working_dtype(embeddings.dtype)))
        proxies = l2_normalize(self.proxies.to(x.dtype))
        # α multiplies the smaller factor of the matmul, not the (batch, classes) product.
        if x.shape[0] <= proxies.shape[0]:
            x = x * self.alpha
        else:
            proxies = proxies * self.alpha
        scaled = pairwise_similarity(x, proxies, metric="dot")  # α·cos, (N, C)
        positive, negative = _ProxyAnchorTerms.apply(scaled, labels, self.alpha * self.margin)
        with torch.no_grad():
            counts = torch.zeros(self.num_classes, dtype=positive.dtype, device=positive.device)
            with_positives = counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype)) > 0
            num_positive = with_positives.sum()
        # Absent classes have positive == log(1) == 0.
        loss = positive.sum() / num_positive + negative.sum() / self.num_classes
        stats: dict[str, Tensor | float] = {}
        if self.record_stats:
            with torch.no_grad():
                n, c = scaled.shape
                target_sum = scaled.gather(1, labels[:, None]).sum() / self.alpha
                negative_sum = scaled.sum() / self.alpha - target_sum  # one read of the (N, C) cosines
                stats = {
                    "num_positive_proxies": num_positive,
                    "mean_positive_similarity": target_sum / n,
                    "mean_negative_similarity": negative_sum / max(n * (c - 1), 1),
                }
        return loss, stats

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"margin={self.margin:g}, alpha={self.alpha:g}"
        )
