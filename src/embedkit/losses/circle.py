"""Circle loss for pair-wise labels (Sun et al., CVPR 2020)."""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import check_real
from ..similarity import pairwise_similarity
from .base import HyperChecks, NonFinite, PairBatch, PairLoss, Reduction, masked_logsumexp

__all__ = ["CircleLoss"]


class CircleLoss(PairLoss):
    r"""Circle loss: each similarity is re-weighted by how far it is from its optimum.

    .. math:: L_i = \log\Big(1 + \sum_{n} e^{\gamma\alpha_n(s_n-\Delta_n)}
              \sum_{p} e^{-\gamma\alpha_p(s_p-\Delta_p)}\Big)

    with ``α_p = [1 + m - s_p]_+``, ``α_n = [s_n + m]_+`` (treated as constants, as in
    the authors' code), ``Δ_p = 1 - m``, ``Δ_n = m`` and ``s`` the cosine similarity.
    The loss is the mean of ``L_i`` over anchors with at least one positive and one
    negative.

    Parameters
    ----------
    m : float
        Relaxation margin (default 0.4; the paper uses 0.25 for face recognition and
        re-identification, 0.4 for fine-grained retrieval).
    gamma : float
        Scale (default 80; the paper uses 256 for faces, 128 for re-identification).
    reduction, nonfinite, record_stats
        As for every loss (:mod:`embedkit.losses.base`). ``"none"`` gives each ``L_i``
        (0 for an anchor without a positive or a negative); ``"mean"`` is their sum over
        the number of anchors with both, not the mean over the batch.

    Notes
    -----
    Equal to pytorch-metric-learning's ``CircleLoss(m, gamma)``. ``last_stats``:
    pair counts, ``num_anchors``, mean positive/negative similarity.
    """

    hyper_parameters: ClassVar[HyperChecks] = {
        "m": partial(check_real, name="m"),
        "gamma": partial(check_real, name="gamma", low=0.0, low_inclusive=False),
    }

    def __init__(
        self,
        m: float = 0.4,
        gamma: float = 80.0,
        *,
        reduction: Reduction = "mean",
        nonfinite: NonFinite = "auto",
        record_stats: bool = True,
    ) -> None:
        super().__init__(reduction=reduction, nonfinite=nonfinite, record_stats=record_stats)
        self.m = check_real(m, "m")
        self.gamma = check_real(gamma, "gamma", low=0.0, low_inclusive=False)

    def compute(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor | float]]:
        cos = pairwise_similarity(batch.embeddings, None if batch.is_self else batch.ref_embeddings)
        pos, neg = batch.positive_mask, batch.negative_mask
        fixed = cos.detach()
        alpha_p = torch.relu(1.0 + self.m - fixed)
        alpha_n = torch.relu(fixed + self.m)
        pos_lse, has_pos = masked_logsumexp(-self.gamma * alpha_p * (cos - (1.0 - self.m)), pos, dim=1)
        neg_lse, has_neg = masked_logsumexp(self.gamma * alpha_n * (cos - self.m), neg, dim=1)
        anchors = has_pos & has_neg
        total = pos_lse + neg_lse
        per_anchor = torch.where(anchors, torch.logaddexp(total, torch.zeros_like(total)), 0.0)
        num_anchors = torch.count_nonzero(anchors)
        loss = self._reduce(per_anchor, per_anchor.sum() / num_anchors.clamp_min(1))
        stats: dict[str, Tensor | float] = {}
        if self.record_stats:
            with torch.no_grad():
                mean_positive, mean_negative = self.pair_means(batch, cos)
                stats = self.pair_counts(batch)
                stats["num_anchors"] = num_anchors
                stats["mean_positive_similarity"] = mean_positive
                stats["mean_negative_similarity"] = mean_negative
        return loss, stats

    def extra_repr(self) -> str:
        return f"m={self.m:g}, gamma={self.gamma:g}"
