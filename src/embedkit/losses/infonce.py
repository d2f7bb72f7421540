"""InfoNCE-style losses: supervised contrastive (multi-positive) and NT-Xent."""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import check_bool, check_real
from ..similarity import l2_normalize, pairwise_similarity, working_dtype
from ..tiled import class_codes, pair_statistics, tiled_ntxent, tiled_supcon
from .base import HyperChecks, PairBatch, PairLoss, masked_logsumexp, masked_mean

__all__ = ["NTXentLoss", "SupConLoss"]


def _similarity_stats(batch: PairBatch, cos: Tensor) -> dict[str, Tensor | float]:
    stats = PairLoss.pair_counts(batch)
    stats["mean_positive_similarity"] = masked_mean(cos, batch.positive_mask)
    stats["mean_negative_similarity"] = masked_mean(cos, batch.negative_mask)
    return stats


def _has_pairs(batch: PairBatch) -> bool:
    return bool(batch.positive_mask.any()) and bool(batch.negative_mask.any())


#: Above this many (query, reference) pairs the losses take the tiled path by default: the
#: dense N×M matrices then cost more than 0.5 GB (measured: 518 MB at 4,096², 8 GB at 16,384²).
TILED_ABOVE = 4096 * 4096


def _check_tiled(tiled: bool | None) -> bool | None:
    return None if tiled is None else check_bool(tiled, "tiled")


def _use_tiled(tiled: bool | None, batch: PairBatch) -> bool:
    pairs = batch.embeddings.shape[0] * batch.ref_embeddings.shape[0]
    return pairs > TILED_ABOVE if tiled is None else tiled


def _tiled_inputs(batch: PairBatch) -> tuple[Tensor, Tensor, Tensor, Tensor, int, dict[str, Tensor]]:
    """Unit embeddings in the working dtype, class codes and the pair statistics, without N×M."""
    dtype = working_dtype(torch.promote_types(batch.embeddings.dtype, batch.ref_embeddings.dtype))
    q = l2_normalize(batch.embeddings.to(dtype))
    r = q if batch.is_self else l2_normalize(batch.ref_embeddings.to(dtype))
    codes_q, codes_r, num_classes = class_codes(batch.labels, batch.ref_labels)
    stats = pair_statistics(q.detach(), r.detach(), codes_q, codes_r, num_classes, batch.is_self)
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

    def __init__(self, temperature: float = 0.1, *, tiled: bool | None = None) -> None:
        super().__init__()
        self.temperature = check_real(temperature, "temperature", low=0.0, low_inclusive=False)
        self.tiled = _check_tiled(tiled)

    def compute(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor | float]]:
        if _use_tiled(self.tiled, batch):
            q, r, codes_q, codes_r, num_classes, tiled_stats = _tiled_inputs(batch)
            if bool(tiled_stats["num_positive_pairs"] > 0) and bool(tiled_stats["num_negative_pairs"] > 0):
                loss = tiled_supcon(q, r, codes_q, codes_r, num_classes, self.temperature, batch.is_self)
            else:
                loss = self._zero(batch.embeddings)
            return loss, dict(tiled_stats)
        cos = pairwise_similarity(batch.embeddings, None if batch.is_self else batch.ref_embeddings)
        pos, neg = batch.positive_mask, batch.negative_mask
        anchors = pos.any(dim=1)
        if _has_pairs(batch):
            logits = cos / self.temperature
            denominator, _ = masked_logsumexp(logits, pos | neg, dim=1)
            log_prob = logits - denominator[:, None]
            per_anchor = -masked_mean(log_prob, pos, dim=1)
            loss = masked_mean(per_anchor, anchors)
        else:
            loss = self._zero(batch.embeddings)
        with torch.no_grad():
            stats = _similarity_stats(batch, cos)
            stats["num_anchors"] = anchors.sum()
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

    Notes
    -----
    Equal to pytorch-metric-learning's ``NTXentLoss(temperature)``. For SimCLR,
    give both views of an image the same label. A batch with no positive pair or no
    negative pair at all gives 0. ``last_stats`` as for :class:`SupConLoss`.
    """

    hyper_parameters: ClassVar[HyperChecks] = {
        "temperature": partial(check_real, name="temperature", low=0.0, low_inclusive=False)
    }

    def __init__(self, temperature: float = 0.07, *, tiled: bool | None = None) -> None:
        super().__init__()
        self.temperature = check_real(temperature, "temperature", low=0.0, low_inclusive=False)
        self.tiled = _check_tiled(tiled)

    def compute(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor | float]]:
        if _use_tiled(self.tiled, batch):
            q, r, codes_q, codes_r, _, tiled_stats = _tiled_inputs(batch)
            pair_stats: dict[str, Tensor | float] = {
                k: v for k, v in tiled_stats.items() if k != "num_anchors"
            }
            if bool(tiled_stats["num_positive_pairs"] > 0) and bool(tiled_stats["num_negative_pairs"] > 0):
                loss = tiled_ntxent(q, r, codes_q, codes_r, self.temperature, batch.is_self)
            else:
                loss = self._zero(batch.embeddings)
            return loss, pair_stats
        cos = pairwise_similarity(batch.embeddings, None if batch.is_self else batch.ref_embeddings)
        pos, neg = batch.positive_mask, batch.negative_mask
        if _has_pairs(batch):
            logits = cos / self.temperature
            negatives, has_negative = masked_logsumexp(logits, neg, dim=1)
            negatives = torch.where(has_negative, negatives, torch.full_like(negatives, float("-inf")))
            per_pair = torch.logaddexp(logits, negatives[:, None]) - logits
            loss = masked_mean(per_pair, pos)
        else:
            loss = self._zero(batch.embeddings)
        with torch.no_grad():
            stats = _similarity_stats(batch, cos)
        return loss, stats

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}"
