"""Proxy-Anchor loss (Kim et al., CVPR 2020)."""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int, check_real
from ..similarity import pairwise_similarity
from .base import ClassifierLoss, HyperChecks, log1p_sum_exp, masked_mean

__all__ = ["ProxyAnchorLoss"]


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
        self, num_classes: int, embedding_dim: int, *, margin: float = 0.1, alpha: float = 32.0
    ) -> None:
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", low=1)
        self._embedding_dim = check_int(embedding_dim, "embedding_dim", low=1)
        self.margin = check_real(margin, "margin")
        self.alpha = check_real(alpha, "alpha", low=0.0, low_inclusive=False)
        self.proxies = nn.Parameter(torch.empty(self.num_classes, self._embedding_dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    def compute(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor | float]]:
        cos = pairwise_similarity(embeddings, self.proxies, metric="cosine")  # (N, C)
        positive = F.one_hot(labels, self.num_classes).bool()
        negative = ~positive
        pos_term = log1p_sum_exp(-self.alpha * (cos - self.margin), positive, dim=0)
        neg_term = log1p_sum_exp(self.alpha * (cos + self.margin), negative, dim=0)
        with_positives = positive.any(dim=0)
        loss = pos_term.sum() / with_positives.sum() + neg_term.sum() / self.num_classes
        with torch.no_grad():
            stats: dict[str, Tensor | float] = {
                "num_positive_proxies": with_positives.sum(),
                "mean_positive_similarity": masked_mean(cos, positive),
                "mean_negative_similarity": masked_mean(cos, negative),
            }
        return loss, stats

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"margin={self.margin:g}, alpha={self.alpha:g}"
        )
