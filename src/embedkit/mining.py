"""Pair and triplet mining as pure tensor functions.

Miners look at a batch's distance or similarity matrix (from
:mod:`embedkit.similarity`) and its label masks, and say which pairs or triplets
a loss should use. They return masks or selected values, never Python lists, and
work on the N×M matrix without building N×M×M cubes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compiling() -> bool:
    """Whether torch.compile is tracing (data-dependent shapes would break its graph)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if is_compiling is None:  # torch < 2.3
        is_compiling = getattr(getattr(torch, "_dynamo", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


__all__ = [
    "hardest_pairs",
    "multi_similarity_pairs",
    "pair_masks",
    "positive_indices",
    "semi_hard_negatives",
    "sorted_negatives",
]


def pair_masks(labels: Tensor, ref_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Positive and negative pair masks between a batch and a reference set.

    Parameters
    ----------
    labels : Tensor of shape (n,)
        Integer labels of the queries.
    ref_labels : Tensor of shape (m,), optional
        Labels of the references. Without it the batch is its own reference and
        each item is not its own positive.

    Returns
    -------
    positive_mask, negative_mask : Tensor of shape (n, m) and dtype bool
    """
    same_set = ref_labels is None
    ref = labels if ref_labels is None else ref_labels
    positive = labels[:, None] == ref[None, :]
    negative = ~positive
    if same_set:
        positive.fill_diagonal_(False)
    return positive, negative


def positive_indices(positive_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each anchor's positives as a padded index list.

    A PK batch has only K-1 positives per anchor: working on ``(n, k_max)`` positive
    columns instead of the whole ``(n, m)`` mask keeps per-positive work small.

    Parameters
    ----------
    positive_mask : Tensor of shape (n, m) and dtype bool

    Returns
    -------
    index : Tensor of shape (n, k_max) and dtype int64
        Column of each anchor's positives, in ascending order, padded with 0.
    valid : Tensor of shape (n, k_max) and dtype bool
        Which entries of ``index`` are real positives.

    Notes
    -----
    ``k_max`` (the most positives of any anchor) is a shape, so it is read back to the
    host (one sync on an accelerator).
    """
    n = positive_mask.shape[0]
    counts = torch.count_nonzero(positive_mask, dim=1)
    k_max = int(counts.max()) if n > 0 else 0
    rows, cols = positive_mask.nonzero(as_tuple=True)  # row-major: grouped by anchor
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(rows.shape[0], device=rows.device) - starts[rows]
    index = torch.zeros(n, k_max, dtype=torch.int64, device=positive_mask.device)
    valid = torch.zeros(n, k_max, dtype=torch.bool, device=positive_mask.device)
    index[rows, slots] = cols
    valid[rows, slots] = True
    return index, valid


def hardest_pairs(
    distance: Tensor, positive_mask: Tensor, negative_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch-hard mining (Hermans et al., 2017): each anchor's farthest positive and nearest negative.

    Parameters
    ----------
    distance : Tensor of shape (n, m)
        Lower is closer.
    positive_mask, negative_mask : Tensor of shape (n, m) and dtype bool

    Returns
    -------
    hardest_positive : Tensor of shape (n,)
        The largest anchor-positive distance (0 where there is none).
    hardest_negative : Tensor of shape (n,)
        The smallest anchor-negative distance (0 where there is none).
    valid : Tensor of shape (n,) and dtype bool
        Anchors with at least one positive and one negative.

    Notes
    -----
    When several pairs tie for hardest (exactly repeated rows), the gradient is split
    evenly among them rather than sent to one arbitrary index. Outside ``torch.compile``
    the hardest positive is taken over each anchor's gathered positives
    (:func:`positive_indices`), which reads the most positives of any anchor back to the
    host; under compile, over the masked N×M matrix.
    """
    low = torch.finfo(distance.dtype).min
    high = torch.finfo(distance.dtype).max
    if _compiling():
        # A scalar fill, not full_like: one N×M temporary per side instead of two.
        hardest_positive = torch.where(positive_mask, distance, low).amax(dim=1)
    else:
        # On each anchor's gathered positives (K-1 in a PK batch) instead of the N×M mask: the
        # max and its backward (which splits the gradient among ties) touch (N, P) entries.
        index, valid = positive_indices(positive_mask)
        if index.shape[1] == 0:  # no anchor has a positive
            hardest_positive = distance.new_full((distance.shape[0],), low)
        else:
            hardest_positive = torch.where(valid, distance.gather(1, index), low).amax(dim=1)
    # A scalar fill, not full_like: one N×M temporary instead of two.
    hardest_negative = torch.where(negative_mask, distance, high).amin(dim=1)
    valid = positive_mask.any(dim=1) & negative_mask.any(dim=1)
    return (
        torch.where(valid, hardest_positive, 0.0),
        torch.where(valid, hardest_negative, 0.0),
        valid,
    )


def sorted_negatives(distance: Tensor, negative_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each anchor's negative distances in ascending order, padded with +inf.

    Parameters
    ----------
    distance : Tensor of shape (n, m)
    negative_mask : Tensor of shape (n, m) and dtype bool

    Returns
    -------
    values : Tensor of shape (n, m)
        Sorted negative distances; entries past ``count`` are ``+inf``. Differentiable
        with respect to ``distance``.
    count : Tensor of shape (n,)
        The number of negatives of each anchor.
    """
    padded = torch.where(negative_mask, distance, float("inf"))
    values, _ = torch.sort(padded, dim=1)
    return values, torch.count_nonzero(negative_mask, dim=1)


def semi_hard_negatives(
    distance: Tensor, positive_mask: Tensor, negative_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Semi-hard negative for each anchor-positive pair (Schroff et al., 2015).

    For a pair (a, p) the chosen negative is the nearest negative of ``a`` that is
    farther from ``a`` than ``p`` is; when no negative is farther, the farthest
    negative is used (the rule of TensorFlow Addons' ``triplet_semihard_loss``).

    Parameters
    ----------
    distance : Tensor of shape (n, m)
    positive_mask, negative_mask : Tensor of shape (n, m) and dtype bool

    Returns
    -------
    negative_distance : Tensor of shape (n, m)
        The chosen negative's distance for each pair (0 outside ``valid``).
    valid : Tensor of shape (n, m) and dtype bool
        Positive pairs whose anchor has at least one negative.
    """
    values, count = sorted_negatives(distance, negative_mask)
    valid = positive_mask & (count > 0)[:, None]
    # First negative strictly farther than the positive, else the last (farthest) one.
    first_farther = torch.searchsorted(values, distance.detach().contiguous(), right=True)
    last = (count - 1).clamp_min(0)[:, None].expand_as(first_farther)
    index = torch.where(first_farther < count[:, None], first_farther, last)
    chosen = values.gather(1, index.clamp_max(values.shape[1] - 1))
    return torch.where(valid, chosen, torch.zeros_like(chosen)), valid


def multi_similarity_pairs(
    similarity: Tensor, positive_mask: Tensor, negative_mask: Tensor, epsilon: float = 0.1
) -> tuple[Tensor, Tensor]:
    """Multi-similarity pair mining (Wang et al., 2019, eq. 5–6).

    Keeps a negative pair when ``s_an + epsilon > min_p s_ap`` and a positive pair
    when ``s_ap - epsilon < max_n s_an`` (both over the same anchor).

    Parameters
    ----------
    similarity : Tensor of shape (n, m)
        Higher is closer.
    positive_mask, negative_mask : Tensor of shape (n, m) and dtype bool
    epsilon : float
        The mining margin.

    Returns
    -------
    positive_mask, negative_mask : Tensor of shape (n, m) and dtype bool
        The kept pairs. An anchor without positives keeps no negatives and vice versa.
    """
    s = similarity.detach()
    hardest_positive = torch.where(positive_mask, s, float("inf")).amin(dim=1, keepdim=True)
    hardest_negative = torch.where(negative_mask, s, float("-inf")).amax(dim=1, keepdim=True)
    keep_negative = negative_mask & (s + epsilon > hardest_positive)
    keep_positive = positive_mask & (s - epsilon < hardest_negative)
    return keep_positive, keep_negative
