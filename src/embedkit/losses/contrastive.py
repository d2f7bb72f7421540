"""Contrastive loss (Hadsell et al., 2006) with separate positive and negative margins."""

from __future__ import annotations

from functools import partial
from typing import ClassVar, Literal

import torch
from torch import Tensor

from .._checks import check_bool, check_choice, check_real
from ..similarity import pairwise_distance
from .base import HyperChecks, NonFinite, PairBatch, PairLoss, Reduction

__all__ = ["ContrastiveLoss", "Distance"]

Distance = Literal["euclidean", "squared_euclidean", "cosine"]
DISTANCES = ("euclidean", "squared_euclidean", "cosine")


class ContrastiveLoss(PairLoss):
    r"""Pull positive pairs within ``pos_margin``, push negative pairs beyond ``neg_margin``.

    .. math:: L = \operatorname{mean}_{(a,p):\,\ell>0}[d_{ap} - m_+]_+ \;+\;
              \operatorname{mean}_{(a,n):\,\ell>0}[m_- - d_{an}]_+

    Each term is averaged over its *active* pairs (those with a non-zero loss),
    so easy pairs do not dilute the gradient as the model improves.

    ``reduction="none"`` gives each anchor's sum of hinges,
    ``ℓ_i = Σ_p [d_ip - m+]_+ + Σ_n [m- - d_in]_+``, and ``"sum"`` their total; the mean
    (``"mean"``) divides the positive part of that total by the number of active positive
    pairs and the negative part by the number of active negative pairs, so it is not
    ``ℓ.mean()``.

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
    reduction, nonfinite, record_stats
        As for every loss (:mod:`embedkit.losses.base`).

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
        reduction: Reduction = "mean",
        nonfinite: NonFinite = "auto",
        record_stats: bool = True,
    ) -> None:
        super().__init__(reduction=reduction, nonfinite=nonfinite, record_stats=record_stats)
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
        with torch.no_grad():
            # [d - m]_+ > 0 exactly when d > m (a difference of floats is 0 only for equal ones).
            pos_active = batch.positive_mask & (d > self.pos_margin)
            neg_active = batch.negative_mask & (d < self.neg_margin)
            per_anchor = self.reduction == "none"
            num_pos_active = torch.count_nonzero(pos_active, dim=1 if per_anchor else None)
            num_neg_active = torch.count_nonzero(neg_active, dim=1 if per_anchor else None)
            # The loss is linear in d on its active pairs: L = Σ w·d + c, with w = +1/-1 (per
            # anchor) or 1/#active (the mean) on the active positive/negative pairs. One
            # product with d, instead of a hinge, a mask and a mean per term.
            if per_anchor or self.reduction == "sum":
                pos_weight = torch.ones((), dtype=d.dtype, device=d.device)
                neg_weight = pos_weight
            else:
                pos_weight = 1.0 / num_pos_active.clamp_min(1).to(d.dtype)
                neg_weight = 1.0 / num_neg_active.clamp_min(1).to(d.dtype)
            weight = torch.where(pos_active, pos_weight, 0.0).masked_fill_(neg_active, -neg_weight)
            constant = (
                self.neg_margin * num_neg_active * neg_weight - self.pos_margin * num_pos_active * pos_weight
            )
        # "none": each anchor's hinges; "sum": their total; "mean": the two active-pair means.
        loss = (d * weight).sum(dim=1) + constant if per_anchor else (d * weight).sum() + constant
        stats: dict[str, Tensor | float] = {}
        if self.record_stats:
            with torch.no_grad():
                mean_positive, mean_negative = self.pair_means(batch, d)
                stats = self.pair_counts(batch)
                stats.update(
                    active_positive_fraction=num_pos_active.sum() / batch.num_positive_pairs.clamp_min(1),
                    active_negative_fraction=num_neg_active.sum() / batch.num_negative_pairs.clamp_min(1),
                    mean_positive_distance=mean_positive,
                    mean_negative_distance=mean_negative,
                )
        return loss, stats

    def extra_repr(self) -> str:
        return (
            f"pos_margin={self.pos_margin:g}, neg_margin={self.neg_margin:g}, "
            f"distance={self.distance!r}, normalize={self.normalize}"
        )
