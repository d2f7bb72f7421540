"""Pair and triplet mining as pure tensor functions.

Miners look at a batch's distance or similarity matrix (from
:mod:`embedkit.similarity`) and its label masks, and say which pairs or triplets
a loss should use. They return masks or selected values, never Python lists, and
work on the N×M matrix without building N×M×M cubes.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "hardest_pairs",
    "multi_similarity_pairs",
    "pair_masks",
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
    evenly among them rather than sent to one arbitrary index.
    """
    low = torch.finfo(distance.dtype).min
    high = torch.finfo(distance.dtype).max
    hardest_positive = torch.where(positive_mask, distance, torch.full_like(distance, low)).amax(dim=1)
    hardest_negative = torch.where(negative_mask, distance, torch.full_like(distance, high)).amin(dim=1)
    valid = positive_mask.any(dim=1) & negative_mask.any(dim=1)
    zero = torch.zeros_like(hardest_positive)
    return (
        torch.where(valid, hardest_positive, zero),
        torch.where(valid, hardest_negative, zero),
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
    padded = torch.where(negative_mask, distance, torch.full_like(distance, float("inf")))
    values, _ = torch.sort(padded, dim=1)
    return values, negative_mask.sum(dim=1)


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
    inf = torch.full_like(s, float("inf"))
    hardest_positive = torch.where(positive_mask, s, inf).amin(dim=1, keepdim=True)
    hardest_negative = torch.where(negative_mask, s, -inf).amax(dim=1, keepdim=True)
    keep_negative = negative_mask & (s + epsilon > hardest_positive)
    keep_positive = positive_mask & (s - epsilon < hardest_negative)
    return keep_positive, keep_negative
