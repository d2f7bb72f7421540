"""InfoNCE-style losses: supervised contrastive (multi-positive) and NT-Xent."""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import check_bool, check_real
from ..similarity import l2_normalize, pairwise_similarity, working_dtype
from ..tiled import class_codes, pair_statistics, tiled_ntxent, tiled_supcon
from .base import HyperChecks, NonFinite, PairBatch, PairLoss, Reduction, attached_zero_unless

__all__ = ["NTXentLoss", "SupConLoss"]


def _similarity_stats(
    batch: PairBatch, cos: Tensor, positive_sum: Tensor | None = None
) -> dict[str, Tensor | float]:
    stats = PairLoss.pair_counts(batch)
    positive, negative = PairLoss.pair_means(batch, cos, positive_sum)
    stats["mean_positive_similarity"] = positive
    stats["mean_negative_similarity"] = negative
    return stats


def _has_pairs(batch: PairBatch) -> Tensor:
    """Whether the batch has a positive and a negative pair, as a tensor (no host sync)."""
    return (batch.num_positive_pairs > 0) & (batch.num_negative_pairs > 0)


def _logits_without_self_pairs(cos: Tensor, temperature: float, is_self: bool) -> Tensor:
    """``cos / τ`` with each item's pair with itself at the lowest float (out of every sum)."""
    logits = cos / temperature
    if is_self:
        logits.diagonal().fill_(torch.finfo(logits.dtype).min)
    return logits


#: Above this many (query, reference) pairs the losses take the tiled path by default: the
#: dense N×M matrices then cost more than 0.5 GB (measured: 518 MB at 4,096², 8 GB at 16,384²).
TILED_ABOVE = 4096 * 4096


def _check_tiled(tiled: bool | None) -> bool | None:
    return None if tiled is None else check_bool(tiled, "tiled")


def _use_tiled(tiled: bool | None, batch: PairBatch) -> bool:
    pairs = batch.embeddings.shape[0] * batch.ref_embeddings.shape[0]
    return pairs > TILED_ABOVE if tiled is None else tiled


def _tiled_inputs(
    batch: PairBatch, similarities: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor, int, dict[str, Tensor]]:
    """Unit embeddings in the working dtype, class codes and the pair statistics, without N×M.

    ``similarities=False`` leaves out the mean similarities (only the counts the loss needs).
    """
    dtype = working_dtype(torch.promote_types(batch.embeddings.dtype, batch.ref_embeddings.dtype))
    q = l2_normalize(batch.embeddings.to(dtype))
    r = q if batch.is_self else l2_normalize(batch.ref_embeddings.to(dtype))
    codes_q, codes_r, num_classes = class_codes(batch.labels, batch.ref_labels)
    stats = pair_statistics(
        q.detach(), r.detach(), codes_q, codes_r, num_classes, batch.is_self, similarities=similarities
    )
    return q, r, codes_q, codes_r, num_classes, stats


class SupConLoss(PairLoss):
    r"""Supervised contrastive loss (Khosla et al., 2020, :math:`L^{sup}_{out}`): multi-positive InfoNCE.

    .. math:: L = \frac{1}{|A|}\sum_{i\in A} \frac{-1}{|P(i)|}\sum_{p\in P(i)}
              \log\frac{e^{s_{ip}/\tau}}{\sum_{a\ne i} e^{s_{ia}/\tau}}

    with ``s`` the cosine similarity, ``P(i)`` the other items of ``i``'s class and
    ``A`` the anchors with at least one positive. With ``ref_embeddings`` the
    denominator runs over the whole reference set.

    Parameters
    ----------
    temperature : float
        ``τ`` (default 0.1, as in pytorch-metric-learning; the paper used 0.1 too).
    tiled : bool, optional
        Compute the loss a block of rows at a time (:mod:`embedkit.tiled`): memory linear
        in the batch, the same value and gradient. ``None`` (default) tiles batches of more
        than ``4096 × 4096`` (query, reference) pairs.

    reduction, nonfinite, record_stats
        As for every loss (:mod:`embedkit.losses.base`). ``"none"`` gives each anchor's
        term (0 for an anchor without positives); ``"mean"`` averages it over the anchors
        with a positive, so it is ``sum / num_anchors``, not the mean over the batch.

    Notes
    -----
    Equal to pytorch-metric-learning's ``SupConLoss(temperature)``. A batch with no
    positive pair or no negative pair at all gives 0 (nothing to contrast).
    ``last_stats``: ``num_positive_pairs``, ``num_negative_pairs``,
    ``num_anchors``, ``mean_positive_similarity``, ``mean_negative_similarity``.
    """

    hyper_parameters: ClassVar[HyperChecks] = {
        "temperature": partial(check_real, name="temperature", low=0.0, low_inclusive=False)
    }

    def __init__(
        self,
        temperature: float = 0.1,
        *,
        tiled: bool | None = None,
        reduction: Reduction = "mean",
        nonfinite: NonFinite = "auto",
        record_stats: bool = True,
    ) -> None:
        super().__init__(reduction=reduction, nonfinite=nonfinite, record_stats=record_stats)
        self.temperature = check_real(temperature, "temperature", low=0.0, low_inclusive=False)
        self.tiled = _check_tiled(tiled)

    def compute(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor | float]]:
        if _use_tiled(self.tiled, batch):
            q, r, codes_q, codes_r, num_classes, tiled_stats = _tiled_inputs(batch, self.record_stats)
            per_anchor = tiled_supcon(q, r, codes_q, codes_r, num_classes, self.temperature, batch.is_self)
            has_pairs = (tiled_stats["num_positive_pairs"] > 0) & (tiled_stats["num_negative_pairs"] > 0)
            per_anchor = attached_zero_unless(has_pairs, per_anchor)
            num_anchors = tiled_stats["num_anchors"]
            loss = self._reduce(per_anchor, per_anchor.sum() / num_anchors.clamp_min(1))
            return loss, dict(tiled_stats) if self.record_stats else {}
        cos = pairwise_similarity(batch.embeddings, None if batch.is_self else batch.ref_embeddings)
        pos = batch.positive_mask
        num_pos = torch.count_nonzero(pos, dim=1)
        anchors = num_pos > 0
        # -(1/|P(i)|) Σ_p log(e^{s_ip/τ} / Σ_{a≠i} e^{s_ia/τ}) = lse_i - (Σ_p s_ip/τ) / |P(i)|.
        logits = _logits_without_self_pairs(cos, self.temperature, batch.is_self)
        denominator = torch.logsumexp(logits, dim=1)
        positive_logits = torch.where(pos, logits, 0.0).sum(dim=1)
        per_anchor = torch.where(anchors, denominator - positive_logits / num_pos.clamp_min(1), 0.0)
        per_anchor = attached_zero_unless(_has_pairs(batch), per_anchor)
        num_anchors = torch.count_nonzero(anchors)
        loss = self._reduce(per_anchor, per_anchor.sum() / num_anchors.clamp_min(1))
        stats: dict[str, Tensor | float] = {}
        if self.record_stats:
            with torch.no_grad():
                stats = _similarity_stats(batch, cos, positive_logits.sum() * self.temperature)
                stats["num_anchors"] = num_anchors
        return loss, stats

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}"


class NTXentLoss(PairLoss):
    r"""NT-Xent / InfoNCE (Chen et al., 2020; van den Oord et al., 2018), one term per positive pair.

    .. math:: L = \frac{1}{|P|}\sum_{(a,p)\in P} -\log
              \frac{e^{s_{ap}/\tau}}{e^{s_{ap}/\tau} + \sum_{n\in N(a)} e^{s_{an}/\tau}}

    Computed from the N×M similarity matrix: the negatives' log-sum-exp is taken
    once per anchor, never per positive pair (no pairs×batch tensor).

    Parameters
    ----------
    temperature : float
        ``τ`` (default 0.07).
    tiled : bool, optional
        As for :class:`SupConLoss`.

    reduction, nonfinite, record_stats
        As for every loss (:mod:`embedkit.losses.base`). ``"none"`` gives each anchor's
        sum over its positive pairs; ``"mean"`` divides their total by the number of
        positive pairs (``sum / num_positive_pairs``).

    Notes
    -----
    Equal to pytorch-metric-learning's ``NTXentLoss(temperature)``. For SimCLR,
    give both views of an image the same label. A batch with no positive pair or no
    negative pair at all gives 0. ``last_stats`` as for :class:`SupConLoss`.
    """

    hyper_parameters: ClassVar[HyperChecks] = {
        "temperature": partial(check_real, name="temperature", low=0.0, low_inclusive=False)
    }

    def __init__(
        self,
        temperature: float = 0.07,
        *,
        tiled: bool | None = None,
        reduction: Reduction = "mean",
        nonfinite: NonFinite = "auto",
        record_stats: bool = True,
    ) -> None:
        super().__init__(reduction=reduction, nonfinite=nonfinite, record_stats=record_stats)
        self.temperature = check_real(temperature, "temperature", low=0.0, low_inclusive=False)
        self.tiled = _check_tiled(tiled)

    def compute(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor | float]]:
        if _use_tiled(self.tiled, batch):
            q, r, codes_q, codes_r, _, tiled_stats = _tiled_inputs(batch, self.record_stats)
            per_anchor = tiled_ntxent(q, r, codes_q, codes_r, self.temperature, batch.is_self)
            has_pairs = (tiled_stats["num_positive_pairs"] > 0) & (tiled_stats["num_negative_pairs"] > 0)
            per_anchor = attached_zero_unless(has_pairs, per_anchor)
            num_pairs = tiled_stats["num_positive_pairs"]
            loss = self._reduce(per_anchor, per_anchor.sum() / num_pairs.clamp_min(1))
            if not self.record_stats:
                return loss, {}
            return loss, {k: v for k, v in tiled_stats.items() if k != "num_anchors"}
        cos = pairwise_similarity(batch.embeddings, None if batch.is_self else batch.ref_embeddings)
        pos, neg = batch.positive_mask, batch.negative_mask
        logits = cos / self.temperature
        # The negatives' log-sum-exp once per anchor (-inf for an anchor without negatives).
        negatives = torch.logsumexp(torch.where(neg, logits, float("-inf")), dim=1)
        # Then one term per positive pair: -log(e^{s_ap} / (e^{s_ap} + e^{lse_a})), on the N×M
        # matrix with a mask (a gather of the positives would give torch.compile a shape
        # that depends on the data).
        per_pair = torch.logaddexp(logits, negatives[:, None]) - logits
        per_anchor = torch.where(pos, per_pair, 0.0).sum(dim=1)
        per_anchor = attached_zero_unless(_has_pairs(batch), per_anchor)
        loss = self._reduce(per_anchor, per_anchor.sum() / batch.num_positive_pairs.clamp_min(1))
        stats: dict[str, Tensor | float] = {}
        if self.record_stats:
            with torch.no_grad():
                stats = _similarity_stats(batch, cos)
        return loss, stats

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}"
