"""Triplet margin loss with online mining: all, batch-all, batch-hard and semi-hard triplets."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_bool, check_choice, check_real
from ..mining import hardest_pairs, positive_indices, semi_hard_negatives, sorted_negatives
from ..similarity import pairwise_distance
from .base import HyperChecks, NonFinite, PairBatch, PairLoss, Reduction
from .contrastive import DISTANCES, Distance

__all__ = ["TripletMarginLoss"]

Mining = Literal["all", "batch_all", "batch_hard", "semi_hard"]
MININGS = ("all", "batch_all", "batch_hard", "semi_hard")

# Soft-margin triplets are summed over anchor blocks of (anchors, positives, negatives)
# entries: at most N×M / 2 entries per block (two such temporaries: never more than the
# N×M distance matrix itself) and at most this many.
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
    each anchor's negatives once and reading, for each of its positives, how many
    negatives violate the margin and their sum (O(N·M log M) time and O(N·M) memory, no
    N×M×M cube). With ``soft_margin`` (no such shortcut) each anchor's positives are
    gathered and paired with its negatives, (anchors, positives, M) a block at a time
    within N×M entries and recomputed in backward: O(N·P·M) time for P positives per
    anchor (K-1 in a PK batch), memory never above the N×M distance matrix.

    ``reduction="none"`` gives each anchor's sum over its triplets (batch-hard: its one
    triplet; semi-hard: one per positive); ``"sum"`` their total; ``"mean"`` divides that
    total by the number the mining averages over (active triplets for "batch_all", valid
    triplets for "all", anchors with a triplet for "batch_hard", positive pairs with a
    negative for "semi_hard").

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
    reduction, nonfinite, record_stats
        As for every loss (:mod:`embedkit.losses.base`).

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
        reduction: Reduction = "mean",
        nonfinite: NonFinite = "auto",
        record_stats: bool = True,
    ) -> None:
        super().__init__(reduction=reduction, nonfinite=nonfinite, record_stats=record_stats)
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
            per_anchor, num_active, num_triplets = self._all_triplets(d, pos, neg)
            divisor = num_active if self.mining == "batch_all" else num_triplets
        elif self.mining == "batch_hard":
            d_ap, d_an, valid = hardest_pairs(d, pos, neg)
            per_anchor = torch.where(valid, self._hinge(d_ap - d_an + self.margin), 0.0)
            num_triplets = torch.count_nonzero(valid)
            num_active = torch.count_nonzero(per_anchor > 0)
            divisor = num_triplets
        else:
            d_an, valid = semi_hard_negatives(d, pos, neg)
            per_pair = torch.where(valid, self._hinge(d - d_an + self.margin), 0.0)
            per_anchor = per_pair.sum(dim=1)
            num_triplets = torch.count_nonzero(valid)
            num_active = torch.count_nonzero(per_pair > 0)
            divisor = num_triplets
        # Without any triplet every sum is an (attached) 0 and so is the mean.
        loss = self._reduce(per_anchor, per_anchor.sum() / divisor.clamp_min(1))
        stats: dict[str, Tensor | float] = {}
        if self.record_stats:
            with torch.no_grad():
                mean_positive, mean_negative = self.pair_means(batch, d)
                stats = self.pair_counts(batch)
                stats.update(
                    num_triplets=num_triplets,
                    active_triplet_fraction=num_active / num_triplets.clamp_min(1),
                    mean_positive_distance=mean_positive,
                    mean_negative_distance=mean_negative,
                )
        return loss, stats

    def _all_triplets(self, d: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each anchor's loss summed over its valid triplets, the number active, the number valid."""
        index, valid = positive_indices(pos)
        d_ap = d.gather(1, index)  # (N, P): each anchor's positive distances
        num_pos = torch.count_nonzero(valid, dim=1)
        num_neg = torch.count_nonzero(neg, dim=1)
        num_triplets = (num_pos * num_neg).sum()
        if self.soft_margin:
            per_anchor = _SoftTriplets.apply(
                torch.where(valid, d_ap, float("-inf")), torch.where(neg, d, float("inf")), self.margin
            )
            return per_anchor, num_triplets, num_triplets
        # Σ_n [d_ap + m - d_an]_+ = c·(d_ap + m) - (the sum of the c negatives below d_ap + m),
        # read off each anchor's sorted negatives (padded with +inf) and their prefix sums.
        values, _ = sorted_negatives(d, neg)
        threshold = d_ap + self.margin
        below = torch.searchsorted(values, threshold.detach().contiguous(), right=False)
        below = torch.where(valid, torch.minimum(below, num_neg[:, None]), 0)
        # prefix(c) = Σ_{k<c} values_k; only c <= num_neg is read, so the +inf padding never is.
        prefix = values.cumsum(dim=1).gather(1, (below - 1).clamp_min(0))
        prefix = torch.where(below > 0, prefix, 0.0)
        per_pair = below * threshold - prefix
        per_anchor = torch.where(valid, per_pair, 0.0).sum(dim=1)
        return per_anchor, below.sum(), num_triplets

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin:g}, mining={self.mining!r}, distance={self.distance!r}, "
            f"normalize={self.normalize}, soft_margin={self.soft_margin}"
        )


class _SoftTriplets(torch.autograd.Function):
    """Σ over (p, n) of softplus(d_ap - d_an + m) for each anchor, a block of anchors at a time.

    Inputs are padded so that invalid entries vanish by themselves: ``d_ap`` is -inf at
    padding positives and ``d_an`` (the N×M distances) +inf at non-negatives, so their
    violation is -inf and softplus(-inf) = 0 with a zero gradient. Backward recomputes each
    block: ``∂/∂d_ap = Σ_n σ(v)`` and ``∂/∂d_an = -Σ_p σ(v)``, scaled by each anchor's
    incoming gradient. Nothing of size (N, P, M) is kept between the passes.
    """

    @staticmethod
    def forward(ctx: Any, d_ap: Tensor, d_an: Tensor, margin: float) -> Tensor:
        per_anchor = d_ap.new_zeros(d_ap.shape[0])
        for rows in _anchor_blocks(d_ap, d_an):
            violation = _violation(d_ap[rows], d_an[rows], margin)
            per_anchor[rows] = F.softplus(violation).sum(dim=(1, 2))
        ctx.save_for_backward(d_ap, d_an)
        ctx.margin = margin
        return per_anchor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        d_ap, d_an = ctx.saved_tensors
        grad_ap = torch.zeros_like(d_ap)
        grad_an = torch.zeros_like(d_an)
        for rows in _anchor_blocks(d_ap, d_an):
            slope = torch.sigmoid_(_violation(d_ap[rows], d_an[rows], ctx.margin))
            slope.mul_(grad[rows, None, None])
            grad_ap[rows] = slope.sum(dim=2)
            grad_an[rows] = -slope.sum(dim=1)
        # Padding entries had a zero slope; their +-inf inputs get a zero gradient.
        return grad_ap, grad_an, None


def _violation(d_ap: Tensor, d_an: Tensor, margin: float) -> Tensor:
    """(rows, P, M) violations d_ap - d_an + m, -inf wherever a side is padding."""
    violation = d_ap[:, :, None] - d_an[:, None, :]
    return violation.add_(margin)


def _anchor_blocks(d_ap: Tensor, d_an: Tensor) -> list[slice]:
    """Anchor slices with at most min(N·M / 2, _BLOCK_ELEMENTS) (anchor, positive, negative) entries."""
    n, p = d_ap.shape
    m = d_an.shape[1]
    budget = min(max(n * m // 2, 1), _BLOCK_ELEMENTS)
    step = max(1, budget // max(p * m, 1))
    return [slice(start, start + step) for start in range(0, n, step)]
