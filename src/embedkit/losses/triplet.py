"""Triplet margin loss with online mining: all, batch-all, batch-hard and semi-hard triplets."""

from __future__ import annotations

from functools import partial
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .._checks import check_bool, check_choice, check_real
from ..mining import hardest_pairs, semi_hard_negatives, sorted_negatives
from ..similarity import pairwise_distance
from .base import HyperChecks, PairBatch, PairLoss, masked_mean
from .contrastive import DISTANCES, Distance

__all__ = ["TripletMarginLoss"]

Mining = Literal["all", "batch_all", "batch_hard", "semi_hard"]
MININGS = ("all", "batch_all", "batch_hard", "semi_hard")

# Soft-margin "all" triplets are summed over anchor blocks of at most this many
# (anchor, positive, negative) entries, recomputed in backward (bounded memory).
_BLOCK_ELEMENTS = 1 << 22


class TripletMarginLoss(PairLoss):
    r"""Triplet margin loss (Schroff et al., 2015) over triplets mined in the batch.

    For a triplet (a, p, n) with distances ``d_ap``, ``d_an``:

    .. math:: \ell = [d_{ap} - d_{an} + m]_+ \quad\text{or, with soft\_margin,}\quad
              \log(1 + e^{d_{ap} - d_{an} + m})

    Mining (which triplets, and what the loss averages over):

    ``"all"``
        every valid triplet; the mean over all of them.
    ``"batch_all"``
        every valid triplet; the mean over the *active* ones (ℓ > 0) — Hermans et
        al.'s BA≠0, and pytorch-metric-learning's default reduction.
    ``"batch_hard"``
        per anchor, its farthest positive and nearest negative (Hermans et al.,
        2017); the mean over anchors with both.
    ``"semi_hard"``
        per anchor-positive pair, the nearest negative farther than the positive,
        or the farthest negative if none is (FaceNet; TensorFlow Addons' rule); the
        mean over those pairs.

    "all"/"batch_all" are summed exactly from the N×M distance matrix by sorting
    each anchor's negatives (O(N·M log M) time and O(N·M) memory, no N×M×M cube).

    Parameters
    ----------
    margin : float
        ``m >= 0`` (default 0.2, as in FaceNet and case study 04). A negative margin
        is rejected: every triplet already satisfying it, it would ask for nothing.
    mining : {"all", "batch_all", "batch_hard", "semi_hard"}
        See above (default ``"batch_all"``).
    distance : {"euclidean", "squared_euclidean", "cosine"}
        ``"cosine"`` is ``1 - cos``, so the hinge is ``s_an - s_ap + m``.
    normalize : bool
        L2-normalise embeddings before a euclidean distance (default True).
    soft_margin : bool
        Replace the hinge by a softplus (Hermans et al.; use ``margin=0`` for their form).

    Notes
    -----
    Equal to pytorch-metric-learning's ``TripletMarginLoss(margin)`` for
    ``"batch_all"``, to the same with ``reducer=MeanReducer()`` for ``"all"``, and
    to ``BatchHardMiner`` + ``TripletMarginLoss(reducer=MeanReducer())`` for
    ``"batch_hard"`` (``soft_margin`` is its ``smooth_loss``; with another distance,
    give its miner the same one: ``BatchHardMiner(distance=...)``).

    ``last_stats``: ``num_triplets`` (valid mined triplets), ``active_triplet_fraction``
    (share with ℓ > 0 — near 1 with a loss near the margin means collapse),
    ``num_positive_pairs``, ``num_negative_pairs``, ``mean_positive_distance``,
    ``mean_negative_distance``.
    """

    hyper_parameters: ClassVar[HyperChecks] = {
        # A negative margin asks for nothing (every triplet already satisfies it).
        "margin": partial(check_real, name="margin", low=0.0),
        "mining": partial(check_choice, name="mining", choices=MININGS),
        "distance": partial(check_choice, name="distance", choices=DISTANCES),
        "normalize": partial(check_bool, name="normalize"),
        "soft_margin": partial(check_bool, name="soft_margin"),
    }

    def __init__(
        self,
        margin: float = 0.2,
        *,
        mining: Mining = "batch_all",
        distance: Distance = "euclidean",
        normalize: bool = True,
        soft_margin: bool = False,
    ) -> None:
        super().__init__()
        # Each assignment is checked by ``hyper_parameters`` (here and after construction).
        self.margin: float = margin
        self.mining: str = mining
        self.distance: Distance = distance
        self.normalize: bool = normalize
        self.soft_margin: bool = soft_margin

    def _hinge(self, violation: Tensor) -> Tensor:
        return F.softplus(violation) if self.soft_margin else torch.relu(violation)

    def compute(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor | float]]:
        d = pairwise_distance(
            batch.embeddings, None if batch.is_self else batch.ref_embeddings,
            metric=self.distance, normalize=self.normalize,
        )  # fmt: skip
        pos, neg = batch.positive_mask, batch.negative_mask
        if self.mining in ("all", "batch_all"):
            total, num_active, num_triplets = self._all_triplets(d, pos, neg)
            divisor = num_active if self.mining == "batch_all" else num_triplets
            loss = total / divisor.clamp_min(1)
        else:
            if self.mining == "batch_hard":
                d_ap, d_an, valid = hardest_pairs(d, pos, neg)
            else:
                d_an, valid = semi_hard_negatives(d, pos, neg)
                d_ap = d
            per_triplet = self._hinge(d_ap - d_an + self.margin)
            loss = masked_mean(per_triplet, valid)
            num_triplets = valid.sum()
            num_active = (valid & (per_triplet > 0)).sum()
        if not bool(num_triplets > 0):
            loss = self._zero(batch.embeddings)
        with torch.no_grad():
            stats = self.pair_counts(batch)
            stats.update(
                num_triplets=num_triplets,
                active_triplet_fraction=num_active / num_triplets.clamp_min(1),
                mean_positive_distance=masked_mean(d, pos),
                mean_negative_distance=masked_mean(d, neg),
            )
        return loss, stats

    def _all_triplets(self, d: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sum of the loss over every valid triplet, the number active, and the number valid."""
        num_neg = neg.sum(dim=1)
        num_triplets = (pos.sum(dim=1) * num_neg).sum()
        if self.soft_margin:
            return self._soft_all_triplets(d, pos, neg), num_triplets, num_triplets
        # Σ_n [d_ap + m - d_an]_+ = c·(d_ap + m) - Σ_{the c negatives below d_ap + m} d_an,
        # read off each anchor's sorted negatives and their prefix sums.
        values, _ = sorted_negatives(d, neg)
        finite = torch.where(torch.isinf(values), torch.zeros_like(values), values)
        prefix = F.pad(finite.cumsum(dim=1), (1, 0))
        threshold = d + self.margin
        below = torch.searchsorted(values, threshold.detach().contiguous(), right=False)
        below = torch.minimum(below, num_neg[:, None])
        per_pair = below * threshold - prefix.gather(1, below)
        total = torch.where(pos, per_pair, torch.zeros_like(per_pair)).sum()
        num_active = torch.where(pos, below, torch.zeros_like(below)).sum()
        return total, num_active, num_triplets

    def _soft_all_triplets(self, d: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        """Σ softplus(d_ap - d_an + m) over valid triplets, in anchor blocks recomputed in backward."""

        def block_sum(d_block: Tensor, pos_block: Tensor, neg_block: Tensor) -> Tensor:
            violation = d_block[:, :, None] - d_block[:, None, :] + self.margin
            valid = pos_block[:, :, None] & neg_block[:, None, :]
            per = F.softplus(violation)
            return torch.where(valid, per, torch.zeros_like(per)).sum()

        m = d.shape[1]
        step = max(1, _BLOCK_ELEMENTS // max(m * m, 1))
        total = d.new_zeros(())
        for start in range(0, d.shape[0], step):
            rows = slice(start, start + step)
            part = checkpoint(block_sum, d[rows], pos[rows], neg[rows], use_reentrant=False)
            total = total + part
        return total

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin:g}, mining={self.mining!r}, distance={self.distance!r}, "
            f"normalize={self.normalize}, soft_margin={self.soft_margin}"
        )
