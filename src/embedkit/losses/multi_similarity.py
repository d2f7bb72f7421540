"""Multi-similarity loss with its own pair mining (Wang et al., CVPR 2019)."""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import check_bool, check_real
from ..mining import multi_similarity_pairs
from ..similarity import pairwise_similarity
from .base import HyperChecks, NonFinite, PairBatch, PairLoss, Reduction, log1p_sum_exp

__all__ = ["MultiSimilarityLoss"]


class MultiSimilarityLoss(PairLoss):
    r"""Multi-similarity loss: weights each pair by its self- and relative similarity.

    .. math:: L = \frac{1}{N}\sum_i \Big[\frac{1}{\alpha}\log\Big(1+\sum_{p\in P_i}
              e^{-\alpha(s_{ip}-\lambda)}\Big) + \frac{1}{\beta}\log\Big(1+\sum_{n\in N_i}
              e^{\beta(s_{in}-\lambda)}\Big)\Big]

    with ``s`` the cosine similarity. With ``mining=True`` the pairs ``P_i``,
    ``N_i`` are first filtered by the paper's rule (see
    :func:`embedkit.mining.multi_similarity_pairs`).

    Parameters
    ----------
    alpha : float
        Weight of positive pairs (paper default 2).
    beta : float
        Weight of negative pairs (paper default 50).
    base : float
        ``λ``, the similarity margin (paper default 0.5).
    mining : bool
        Apply the paper's pair mining first (default True, as in the paper).
    epsilon : float
        The mining margin (paper default 0.1).
    reduction, nonfinite, record_stats
        As for every loss (:mod:`embedkit.losses.base`). ``"none"`` gives each anchor's
        bracket; ``"mean"`` is their plain mean (every anchor counts).

    Notes
    -----
    With ``mining=False`` equal to pytorch-metric-learning's
    ``MultiSimilarityLoss(alpha, beta, base)``; with ``mining=True`` to the same with
    ``MultiSimilarityMiner(epsilon)``. The mean runs over every anchor of the batch.
    ``last_stats``: pair counts, ``num_mined_positive_pairs``,
    ``num_mined_negative_pairs``, mean positive/negative similarity.
    """

    hyper_parameters: ClassVar[HyperChecks] = {
        "alpha": partial(check_real, name="alpha", low=0.0, low_inclusive=False),
        "beta": partial(check_real, name="beta", low=0.0, low_inclusive=False),
        "base": partial(check_real, name="base"),
        "mining": partial(check_bool, name="mining"),
        "epsilon": partial(check_real, name="epsilon", low=0.0),
    }

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        *,
        mining: bool = True,
        epsilon: float = 0.1,
        reduction: Reduction = "mean",
        nonfinite: NonFinite = "auto",
        record_stats: bool = True,
    ) -> None:
        super().__init__(reduction=reduction, nonfinite=nonfinite, record_stats=record_stats)
        self.alpha = check_real(alpha, "alpha", low=0.0, low_inclusive=False)
        self.beta = check_real(beta, "beta", low=0.0, low_inclusive=False)
        self.base = check_real(base, "base")
        self.mining: bool = mining
        self.epsilon = check_real(epsilon, "epsilon", low=0.0)

    def compute(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor | float]]:
        cos = pairwise_similarity(batch.embeddings, None if batch.is_self else batch.ref_embeddings)
        pos, neg = batch.positive_mask, batch.negative_mask
        if self.mining:
            pos, neg = multi_similarity_pairs(cos, pos, neg, self.epsilon)
        pos_term = log1p_sum_exp(-self.alpha * (cos - self.base), pos, dim=1) / self.alpha
        neg_term = log1p_sum_exp(self.beta * (cos - self.base), neg, dim=1) / self.beta
        loss = self._reduce(pos_term + neg_term)
        stats: dict[str, Tensor | float] = {}
        if self.record_stats:
            with torch.no_grad():
                mean_positive, mean_negative = self.pair_means(batch, cos)
                stats = self.pair_counts(batch)
                stats.update(
                    num_mined_positive_pairs=torch.count_nonzero(pos),
                    num_mined_negative_pairs=torch.count_nonzero(neg),
                    mean_positive_similarity=mean_positive,
                    mean_negative_similarity=mean_negative,
                )
        return loss, stats

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha:g}, beta={self.beta:g}, base={self.base:g}, "
            f"mining={self.mining}, epsilon={self.epsilon:g}"
        )
