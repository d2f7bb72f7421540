"""Memory-linear SupCon and NT-Xent: the N×M similarity matrix is never held.

Both losses need, per anchor, a log-sum-exp over a whole row of the similarity matrix.
Forward computes the rows a block at a time and keeps one number per anchor; backward
recomputes each block from the unit embeddings and turns it straight into gradient
contributions. Everything that is a sum over *positives* (SupCon's numerator, the
statistics) comes from per-class sums of embeddings, in O((N + M) d). Peak memory is
the embeddings plus one block of ``rows × M`` scores (and its temporaries), whatever N.

The functions here take unit-norm embeddings (normalise with
:func:`~embedkit.similarity.l2_normalize` first, so its gradient applies) and labels
already mapped to class codes. Like :mod:`embedkit.similarity`, this is shared math that
the losses call (:class:`~embedkit.losses.SupConLoss`, :class:`~embedkit.losses.NTXentLoss`),
not a loss itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .similarity import _full_precision, rows_per_block

__all__ = ["class_codes", "pair_statistics", "tiled_ntxent", "tiled_supcon"]

#: Scores per block: ``rows × M`` entries, a few float32 temporaries each.
_BYTES_PER_ENTRY = 16


def class_codes(labels: Tensor, ref_labels: Tensor) -> tuple[Tensor, Tensor, int]:
    """Labels of queries and references as codes ``0 .. C-1`` of one shared class list."""
    classes, codes = torch.unique(torch.cat([labels, ref_labels]), return_inverse=True)
    n = labels.shape[0]
    return codes[:n], codes[n:], int(classes.shape[0])


def _positive_sums(
    q: Tensor, r: Tensor, codes_q: Tensor, codes_r: Tensor, num_classes: int, is_self: bool
) -> tuple[Tensor, Tensor]:
    """For every query, the sum of its positives' embeddings and their number.

    A positive of query ``i`` is a reference of the same class, ``i`` itself excluded when
    the batch is compared with itself.
    """
    class_sum = torch.zeros(num_classes, r.shape[1], dtype=r.dtype, device=r.device)
    class_sum.index_add_(0, codes_r, r)
    class_count = torch.bincount(codes_r, minlength=num_classes)
    positive_sum = class_sum[codes_q]
    positive_count = class_count[codes_q]
    if is_self:
        positive_sum = positive_sum - q
        positive_count = positive_count - 1
    return positive_sum, positive_count


def _blocks(n: int, m: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the row blocks of an (n, m) score matrix within the memory budget."""
    step = rows_per_block(m, bytes_per_entry=_BYTES_PER_ENTRY)
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def _scaled_block(q: Tensor, r: Tensor, start: int, stop: int, inv_tau: float, is_self: bool) -> Tensor:
    """Rows ``start:stop`` of ``q @ r.T / τ``, the self-pairs set to -inf."""
    block = (q[start:stop] @ r.T) * inv_tau
    if is_self:
        rows = torch.arange(stop - start, device=q.device)
        block[rows, rows + start] = float("-inf")
    return block


class _SupCon(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        r: Tensor,
        codes_q: Tensor,
        codes_r: Tensor,
        num_classes: int,
        inv_tau: float,
        is_self: bool,
    ) -> Tensor:
        positive_sum, positive_count = _positive_sums(q, r, codes_q, codes_r, num_classes, is_self)
        anchors = positive_count > 0
        # Per anchor: log Σ_{a≠i} e^{s_ia/τ} − (1/|P(i)|) Σ_{p∈P(i)} s_ip/τ.
        denominator = torch.empty(q.shape[0], dtype=q.dtype, device=q.device)
        for start, stop in _blocks(q.shape[0], r.shape[0]):
            denominator[start:stop] = torch.logsumexp(_scaled_block(q, r, start, stop, inv_tau, is_self), 1)
        numerator = inv_tau * (q * positive_sum).sum(1) / positive_count.clamp_min(1)
        per_anchor = torch.where(anchors, denominator - numerator, 0.0)
        ctx.save_for_backward(q, r, codes_q, codes_r, denominator, positive_sum, positive_count)
        ctx.constants = (num_classes, inv_tau, is_self)
        return per_anchor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, r, codes_q, codes_r, denominator, positive_sum, positive_count = ctx.saved_tensors
        num_classes, inv_tau, is_self = ctx.constants
        anchors = positive_count > 0
        weight = torch.where(anchors, grad, 0.0)  # dL / d(per_anchor_i)
        # Numerator: −(w_i / |P(i)| τ) Σ_{p∈P(i)} q_i·r_p.
        c = weight * inv_tau / positive_count.clamp_min(1)
        grad_q = -c[:, None] * positive_sum
        weighted_q = c[:, None] * q
        class_q = torch.zeros(num_classes, q.shape[1], dtype=q.dtype, device=q.device)
        class_q.index_add_(0, codes_q, weighted_q)
        grad_r = -class_q[codes_r]
        if is_self:
            grad_r = grad_r + weighted_q
        # Denominator: w_i softmax_ia / τ, recomputed block by block.
        safe = torch.where(anchors, denominator, torch.zeros_like(denominator))
        scale = weight * inv_tau
        for start, stop in _blocks(q.shape[0], r.shape[0]):
            block = _scaled_block(q, r, start, stop, inv_tau, is_self)
            keep = anchors[start:stop, None]
            p = torch.where(keep, torch.exp(block - safe[start:stop, None]), torch.zeros_like(block))
            p = p * scale[start:stop, None]
            grad_q[start:stop] += p @ r
            grad_r += p.T @ q[start:stop]
        return grad_q, grad_r, None, None, None, None, None


class _NTXent(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, q: Tensor, r: Tensor, codes_q: Tensor, codes_r: Tensor, inv_tau: float, is_self: bool
    ) -> Tensor:
        n = q.shape[0]
        negatives = torch.empty(n, dtype=q.dtype, device=q.device)
        per_anchor = torch.empty(n, dtype=q.dtype, device=q.device)
        for start, stop in _blocks(n, r.shape[0]):
            block = _scaled_block(q, r, start, stop, inv_tau, is_self)
            same = codes_q[start:stop, None] == codes_r[None, :]
            positive = same & torch.isfinite(block)  # the -inf self-pairs are not positives
            lse = torch.logsumexp(torch.where(same, torch.full_like(block, float("-inf")), block), 1)
            negatives[start:stop] = lse
            # −log(e^{s_ap} / (e^{s_ap} + Σ_n e^{s_an})) for every positive pair (a, p).
            terms = torch.logaddexp(block, lse[:, None]) - block
            per_anchor[start:stop] = torch.where(positive, terms, 0.0).sum(1)
        ctx.save_for_backward(q, r, codes_q, codes_r, negatives)
        ctx.constants = (inv_tau, is_self)
        return per_anchor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, r, codes_q, codes_r, negatives = ctx.saved_tensors
        inv_tau, is_self = ctx.constants
        scale = grad * inv_tau  # per anchor
        grad_q = torch.zeros_like(q)
        grad_r = torch.zeros_like(r)
        for start, stop in _blocks(q.shape[0], r.shape[0]):
            block = _scaled_block(q, r, start, stop, inv_tau, is_self)
            same = codes_q[start:stop, None] == codes_r[None, :]
            positive = same & torch.isfinite(block)
            lse = negatives[start:stop, None]
            # d term(a,p) / d s_ap = −σ(L_a − s_ap);
            # Σ_p d term(a,p) / d s_an = e^{s_an − L_a} Σ_p σ(L_a − s_ap).
            pull = torch.where(positive, torch.sigmoid(lse - block), torch.zeros_like(block))
            push = torch.where(same, torch.zeros_like(block), torch.exp(block - lse)) * pull.sum(
                1, keepdim=True
            )
            d = (push - pull) * scale[start:stop, None]
            grad_q[start:stop] += d @ r
            grad_r += d.T @ q[start:stop]
        return grad_q, grad_r, None, None, None, None


def tiled_supcon(
    q: Tensor,
    r: Tensor,
    codes_q: Tensor,
    codes_r: Tensor,
    num_classes: int,
    temperature: float,
    is_self: bool,
) -> Tensor:
    """SupCon (:math:`L^{sup}_{out}`) from unit embeddings without the N×M matrix.

    Parameters
    ----------
    q : Tensor of shape (n, d)
        Unit-norm query embeddings (rows may be zero).
    r : Tensor of shape (m, d)
        Unit-norm references; pass ``q`` itself with ``is_self=True``.
    codes_q, codes_r : Tensor of shape (n,) and (m,), int64
        Class codes in ``[0, num_classes)`` (see :func:`class_codes`).
    num_classes : int
    temperature : float
    is_self : bool
        ``r`` is ``q``: an item is neither its own positive nor in its own denominator.

    Returns
    -------
    Tensor of shape (n,)
        Each anchor's term (0 for an anchor without positives); the loss is their sum over
        the number of anchors with a positive. The caller returns 0 for a batch without
        any negative pair, as the dense loss does.
    """
    with _full_precision(q.device):
        return _SupCon.apply(q, r, codes_q, codes_r, num_classes, 1.0 / temperature, is_self)


def tiled_ntxent(
    q: Tensor, r: Tensor, codes_q: Tensor, codes_r: Tensor, temperature: float, is_self: bool
) -> Tensor:
    """NT-Xent from unit embeddings without the N×M matrix; arguments as :func:`tiled_supcon`.

    Returns
    -------
    Tensor of shape (n,)
        Each anchor's sum over its positive pairs of
        ``−log(e^{s_ap/τ} / (e^{s_ap/τ} + Σ_n e^{s_an/τ}))``; the loss is their total over
        the number of positive pairs.
    """
    with _full_precision(q.device):
        return _NTXent.apply(q, r, codes_q, codes_r, 1.0 / temperature, is_self)


@torch.no_grad()
def pair_statistics(
    q: Tensor,
    r: Tensor,
    codes_q: Tensor,
    codes_r: Tensor,
    num_classes: int,
    is_self: bool,
    *,
    similarities: bool = True,
) -> dict[str, Tensor]:
    """Pair counts and mean positive / negative cosine from class sums, in O((n + m) d).

    Returns
    -------
    dict with ``num_positive_pairs``, ``num_negative_pairs``, ``num_anchors`` (int64 scalars)
    and, unless ``similarities=False``, ``mean_positive_similarity``,
    ``mean_negative_similarity`` (0 where there is no pair).
    """
    if not similarities:
        class_count = torch.bincount(codes_r, minlength=num_classes)
        positive_count = class_count[codes_q] - (1 if is_self else 0)
        positives = positive_count.sum()
        pairs = q.shape[0] * r.shape[0] - (q.shape[0] if is_self else 0)
        return {
            "num_positive_pairs": positives,
            "num_negative_pairs": pairs - positives,
            "num_anchors": torch.count_nonzero(positive_count > 0),
        }
    q64, r64 = q.double(), r.double()
    positive_sum, positive_count = _positive_sums(q64, r64, codes_q, codes_r, num_classes, is_self)
    positives = positive_count.sum()
    pairs = q.shape[0] * r.shape[0] - (q.shape[0] if is_self else 0)
    negatives = pairs - positives
    similar = (q64 * positive_sum).sum()
    everything = q64.sum(0) @ r64.sum(0) - (q64.square().sum() if is_self else 0.0)
    return {
        "num_positive_pairs": positives,
        "num_negative_pairs": negatives,
        "num_anchors": (positive_count > 0).sum(),
        "mean_positive_similarity": (similar / positives.clamp_min(1)).to(q.dtype),
        "mean_negative_similarity": ((everything - similar) / negatives.clamp_min(1)).to(q.dtype),
    }
