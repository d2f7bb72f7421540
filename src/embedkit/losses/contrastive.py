"""Contrastive loss (Hadsell et al., 2006) with separate positive and negative margins."""

from __future__ import annotations

from functools import partial
from typing import ClassVar, Literal

import torch
from torch import Tensor

from .._checks import check_bool, check_choice, check_real
from ..similarity import pairwise_distance
from .base import HyperChecks, PairBatch, PairLoss, masked_mean

__all__ = ["ContrastiveLoss", "Distance"]

Distance = Literal["euclidean", "squared_euclidean", "cosine"]
DISTANCES = ("euclidean", "squared_euclidean", "cosine")


class ContrastiveLoss(PairLoss):
    r"""Pull positive pairs within ``pos_margin``, push negative pairs beyond ``neg_margin``.

    .. math:: L = \operatorname{mean}_{(a,p):\,\ell>0}[d_{ap} - m_+]_+ \;+\;
              \operatorname{mean}_{(a,n):\,\ell>0}[m_- - d_{an}]_+

    Each term is averaged over its *active* pairs (those with a non-zero loss),
    so easy pairs do not dilute the gradient as the model improves.

    Parameters
    ----------
    pos_margin : float
        ``m+``: positive pairs closer than this cost nothing (default 0).
    neg_margin : float
        ``m-``: negative pairs farther than this cost nothing (default 1).
    distance : {"euclidean", "squared_euclidean", "cosine"}
        ``"cosine"`` is ``1 - cos``.
    normalize : bool
        L2-normalise embeddings before a euclidean distance (default True).

    Notes
    -----
    Equal to pytorch-metric-learning's ``ContrastiveLoss(pos_margin, neg_margin)``
    with its default distance (normalised L2); ``normalize=False`` is its
    ``LpDistance(normalize_embeddings=False)`` and ``"squared_euclidean"`` its
    ``LpDistance(power=2)``. With ``CosineSimilarity`` there, its margins ``p, n`` on
    the similarity are ``1 - p, 1 - n`` here. A batch without positive pairs still
    has the negative term (the definition has no positive requirement).
    ``last_stats``: ``num_positive_pairs``, ``num_negative_pairs``,
    ``active_positive_fraction``, ``active_negative_fraction``,
    ``mean_positive_distance``, ``mean_negative_distance``.
    """

    hyper_parameters: ClassVar[HyperChecks] = {
        "pos_margin": partial(check_real, name="pos_margin"),
        "neg_margin": partial(check_real, name="neg_margin"),
        "distance": partial(check_choice, name="distance", choices=DISTANCES),
        "normalize": partial(check_bool, name="normalize"),
    }

    def __init__(
        self,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        *,
        distance: Distance = "euclidean",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        # Each assignment is checked by ``hyper_parameters`` (here and after construction).
        self.pos_margin: float = pos_margin
        self.neg_margin: float = neg_margin
        self.distance: Distance = distance
        self.normalize: bool = normalize

    def compute(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor | float]]:
        d = pairwise_distance(
            batch.embeddings, None if batch.is_self else batch.ref_embeddings,
            metric=self.distance, normalize=self.normalize,
        )  # fmt: skip
        pos_loss = torch.relu(d - self.pos_margin)
        neg_loss = torch.relu(self.neg_margin - d)
        pos_active = batch.positive_mask & (pos_loss > 0)
        neg_active = batch.negative_mask & (neg_loss > 0)
        loss = masked_mean(pos_loss, pos_active) + masked_mean(neg_loss, neg_active)
        with torch.no_grad():
            stats = self.pair_counts(batch)
            stats.update(
                active_positive_fraction=pos_active.sum() / batch.positive_mask.sum().clamp_min(1),
                active_negative_fraction=neg_active.sum() / batch.negative_mask.sum().clamp_min(1),
                mean_positive_distance=masked_mean(d, batch.positive_mask),
                mean_negative_distance=masked_mean(d, batch.negative_mask),
            )
        return loss, stats

    def extra_repr(self) -> str:
        return (
            f"pos_margin={self.pos_margin:g}, neg_margin={self.neg_margin:g}, "
            f"distance={self.distance!r}, normalize={self.normalize}"
        )
