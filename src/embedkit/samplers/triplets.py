"""Offline triplet construction: (anchor, positive, negative) index triplets from labels.

The pool rule
-------------
Offline triplet training first turns each class's images into (anchor, positive)
pairs. Case study 04 drew an anchor and a positive from a class's pool and removed
*both* from the pool, so a class of ``n`` images gave only ``n // 2`` pairs; removing
only the anchor (the positive stays and becomes the next anchor) gives ``n - 1``
pairs from the same images — every image is an anchor once and a positive once,
except the two ends of the chain. With two to four images per identity that is a
third more triplets (see the guide).

* ``rule="one_removed"`` (default): shuffle each class and pair consecutive images,
  ``(x0, x1), (x1, x2), ..., (x[n-2], x[n-1])`` — ``n - 1`` distinct pairs.
* ``rule="both_removed"``: the old rule, ``(x0, x1), (x2, x3), ...`` — ``n // 2``
  pairs; kept to reproduce and compare.

Each pair gets one negative from another class: uniformly at random, or offline
semi-hard from a given embedding matrix (distances from
:func:`embedkit.similarity.pairwise_distance`, computed in row chunks so memory
stays bounded whatever the dataset size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._checks import as_label_array, check_choice, check_embeddings, check_int, check_real
from ..similarity import METRICS, Metric, pairwise_distance
from .pk import _draw_below, _shuffle_within

__all__ = ["PairRule", "TripletSet", "build_triplets", "count_triplets"]

PairRule = Literal["one_removed", "both_removed"]
NegativeRule = Literal["random", "semi_hard"]
_RULES = ("one_removed", "both_removed")
_NEGATIVES = ("random", "semi_hard")
# Elements of one (anchors × samples) distance block for semi-hard mining (16 MiB in float32).
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class TripletSet:
    """Triplets built by :func:`build_triplets` and the counts that describe them.

    Attributes
    ----------
    indices : ndarray of shape (num_triplets, 3) and dtype int64
        Dataset indices of (anchor, positive, negative), one row per triplet.
    rule : str
        The pool rule used, ``"one_removed"`` or ``"both_removed"``.
    negatives : str
        How negatives were chosen, ``"random"`` or ``"semi_hard"``.
    num_paired_classes : int
        Classes that gave at least one (anchor, positive) pair (two or more samples).
    num_unpaired : int
        Samples in classes of a single sample, which can never be anchor or positive.
    num_semi_hard : int
        Triplets whose negative lies in the semi-hard band
        ``d(a, p) < d(a, n) < d(a, p) + margin`` (0 for random negatives).
    """

    indices: np.ndarray
    rule: str
    negatives: str
    num_paired_classes: int
    num_unpaired: int
    num_semi_hard: int

    @property
    def num_triplets(self) -> int:
        """Number of triplets (rows of :attr:`indices`)."""
        return int(self.indices.shape[0])

    def __len__(self) -> int:
        return self.num_triplets

    def __repr__(self) -> str:
        semi = f", num_semi_hard={self.num_semi_hard}" if self.negatives == "semi_hard" else ""
        return (
            f"TripletSet(num_triplets={self.num_triplets}, rule={self.rule!r}, negatives={self.negatives!r}, "
            f"num_paired_classes={self.num_paired_classes}, num_unpaired={self.num_unpaired}{semi})"
        )


def count_triplets(labels: Any, rule: PairRule = "one_removed") -> int:
    """Number of triplets :func:`build_triplets` yields for ``labels`` under ``rule``.

    Parameters
    ----------
    labels : list, ndarray or Tensor of shape (n_samples,)
        Integer class labels.
    rule : {"one_removed", "both_removed"}
        ``"one_removed"`` gives ``n - 1`` triplets per class of ``n`` samples,
        ``"both_removed"`` gives ``n // 2``.

    Returns
    -------
    int
    """
    label_array = as_label_array(labels, "labels")
    check_choice(rule, "rule", _RULES)
    _, counts = np.unique(label_array, return_counts=True)
    per_class = counts - 1 if rule == "one_removed" else counts // 2
    return int(per_class.sum())


def build_triplets(
    labels: Any,
    *,
    rule: PairRule = "one_removed",
    negatives: NegativeRule = "random",
    embeddings: Tensor | np.ndarray | None = None,
    margin: float = 0.2,
    metric: Metric = "euclidean",
    seed: int = 0,
) -> TripletSet:
    """Enumerate (anchor, positive, negative) triplets for offline triplet training.

    Parameters
    ----------
    labels : list, ndarray or Tensor of shape (n_samples,)
        Integer class label of every sample.
    rule : {"one_removed", "both_removed"}
        The pool rule (see the module docstring): ``"one_removed"`` pairs consecutive
        samples of each shuffled class (``n - 1`` pairs), ``"both_removed"`` pairs them
        off two by two (``n // 2``).
    negatives : {"random", "semi_hard"}
        ``"random"``: a uniformly random sample of another class. ``"semi_hard"``
        (needs ``embeddings``): a random negative inside the band
        ``d(a, p) < d(a, n) < d(a, p) + margin`` (Schroff et al., 2015); where the band
        is empty, the nearest negative farther than the positive, else the farthest
        negative (the fallback of :func:`embedkit.mining.semi_hard_negatives`).
    embeddings : Tensor or ndarray of shape (n_samples, embedding_dim), optional
        Embeddings of every sample, for ``negatives="semi_hard"``; on any device.
    margin : float
        Width of the semi-hard band (> 0), in units of ``metric``.
    metric : {"euclidean", "squared_euclidean", "cosine", "dot"}
        Distance for semi-hard mining, as in :func:`embedkit.similarity.pairwise_distance`.
    seed : int
        Seed for the within-class shuffle and the negatives. The global RNG is never used.

    Returns
    -------
    TripletSet
        ``indices`` of shape (num_triplets, 3), grouped by class, plus counts.

    Raises
    ------
    TypeError
        If ``labels`` is not integer-valued, or ``embeddings`` is not a floating-point
        tensor or array.
    ValueError
        If ``labels`` is not 1-D or empty, no class has two samples, there is only
        one class, an option is unknown, ``embeddings`` is missing for
        ``negatives="semi_hard"``, given for ``negatives="random"``, or has the wrong
        number of rows.
    """
    label_array = as_label_array(labels, "labels")
    check_choice(rule, "rule", _RULES)
    check_choice(negatives, "negatives", _NEGATIVES)
    check_choice(metric, "metric", METRICS)
    margin = check_real(margin, "margin", low=0.0, low_inclusive=False)
    seed = check_int(seed, "seed", low=0)
    if negatives == "random" and embeddings is not None:
        raise ValueError("embeddings are only used with negatives='semi_hard'; got negatives='random'")
    embedding_tensor: Tensor | None = None
    if negatives == "semi_hard":
        if embeddings is None:
            raise ValueError(
                "negatives='semi_hard' needs embeddings of shape (n_samples, embedding_dim); got None"
            )
        if isinstance(embeddings, np.ndarray):
            embeddings = torch.from_numpy(np.ascontiguousarray(embeddings))
        embedding_tensor = check_embeddings(embeddings, "embeddings")
        if embedding_tensor.shape[0] != label_array.size:
            raise ValueError(
                f"embeddings has {embedding_tensor.shape[0]} rows but labels has {label_array.size} "
                "entries; expected one embedding per label"
            )

    # Group by class with a random order inside each class.
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(label_array, return_inverse=True, return_counts=True)
    if classes.size < 2:
        raise ValueError(
            f"labels hold a single class ({classes[0]}); a triplet needs a negative from another class"
        )
    if counts.max() < 2:
        raise ValueError(
            f"every one of the {classes.size} classes in labels has a single sample; a triplet needs "
            "an anchor and a positive of the same class"
        )
    grouped = _shuffle_within(inverse.astype(np.uint64) << np.uint64(32), rng)
    grouped_class = inverse[grouped]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

    # (anchor, positive) positions in the grouped order.
    same_next = grouped_class[:-1] == grouped_class[1:]
    first = np.flatnonzero(same_next)
    if rule == "both_removed":
        rank_in_class = first - starts[grouped_class[first]]
        first = first[rank_in_class % 2 == 0]
    anchors = grouped[first]
    positives = grouped[first + 1]
    anchor_class = grouped_class[first]

    if negatives == "random":
        # Uniform over the samples of every other class: skip the anchor's class block.
        n = label_array.size
        draw = _draw_below(rng, n - counts[anchor_class])
        draw += (draw >= starts[anchor_class]) * counts[anchor_class]
        negative = grouped[draw]
        num_semi_hard = 0
    else:
        assert embedding_tensor is not None
        negative, num_semi_hard = _semi_hard(
            embedding_tensor, inverse, anchors, positives, margin, metric, seed
        )

    indices = np.stack([anchors, positives, negative], axis=1).astype(np.int64, copy=False)
    return TripletSet(
        indices=indices,
        rule=rule,
        negatives=negatives,
        num_paired_classes=int((counts >= 2).sum()),
        num_unpaired=int(counts[counts == 1].sum()),
        num_semi_hard=num_semi_hard,
    )


def _semi_hard(
    embeddings: Tensor,
    class_index: np.ndarray,
    anchors: np.ndarray,
    positives: np.ndarray,
    margin: float,
    metric: Metric,
    seed: int,
) -> tuple[np.ndarray, int]:
    """One semi-hard negative per (anchor, positive), in row blocks of bounded size.

    For anchor ``a`` with positive ``p`` and the distances ``D[a, :]``:

    * band = negatives with ``D[a, p] < D[a, n] < D[a, p] + margin``: the band member
      with the largest random key (one key per (anchor, sample) entry, drawn row after
      row from a generator seeded with ``seed``, so the choice does not depend on the
      block size);
    * else the nearest negative farther than the positive (first index on ties);
    * else the farthest negative (first index on ties).

    Each block makes about six passes over its (rows, n) distances besides computing
    them and drawing the keys. Same-class entries are set to NaN by a scatter over
    the anchors' class members (a few per row), so the band and "farther" comparisons
    exclude them without a label comparison over the whole block, and the two
    fallbacks are computed only on the rows whose band is empty.
    """
    device = embeddings.device
    n = embeddings.shape[0]
    generator = torch.Generator(device=device).manual_seed(seed)
    # Blocks of about _BLOCK_ELEMENTS entries: large enough that per-call overhead is
    # small, small enough that the temporaries are reused from the allocator's cache.
    block = max(1, _BLOCK_ELEMENTS // n)
    chosen = np.empty(anchors.size, dtype=np.int64)
    num_semi_hard = 0
    # Every class's members, as slices of `members` (start, count per class).
    members = np.argsort(class_index, kind="stable")
    counts = np.bincount(class_index)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    with torch.no_grad():
        for begin in range(0, anchors.size, block):
            a_np = anchors[begin : begin + block]
            rows = a_np.size
            a = torch.from_numpy(a_np).to(device)
            pos = torch.from_numpy(positives[begin : begin + block]).to(device)
            distance = pairwise_distance(embeddings[a], embeddings, metric=metric)
            d_ap = distance.gather(1, pos[:, None])
            keys = torch.rand(distance.shape, generator=generator, device=device, dtype=distance.dtype)
            # Same-class entries (the anchor, its positive, the rest of its class) -> NaN:
            # every comparison with NaN is False, so none of them is ever "farther" or in the band.
            anchor_class = class_index[a_np]
            sizes = counts[anchor_class]
            row_of = np.repeat(np.arange(rows), sizes)
            offset = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            column_of = members[np.repeat(starts[anchor_class], sizes) + offset]
            distance[torch.from_numpy(row_of).to(device), torch.from_numpy(column_of).to(device)] = math.nan
            band = distance > d_ap
            band &= distance < d_ap + margin
            in_band = band.any(dim=1)
            # A random member of the band: the largest key among band entries.
            pick = keys.masked_fill_(band.logical_not_(), -1.0).argmax(dim=1)
            empty = torch.nonzero(~in_band).flatten()
            if empty.numel():
                pick[empty] = _semi_hard_fallback(distance[empty], d_ap[empty])
            chosen[begin : begin + rows] = pick.cpu().numpy()
            num_semi_hard += int(in_band.sum())
    return chosen, num_semi_hard


def _semi_hard_fallback(distance: Tensor, d_ap: Tensor) -> Tensor:
    """Nearest negative farther than the positive, else the farthest negative.

    ``distance`` (rows, n) holds NaN at same-class entries; ``d_ap`` is (rows, 1).
    """
    farther = distance > d_ap
    nearest_farther = distance.masked_fill(~farther, math.inf).argmin(dim=1)
    farthest = distance.nan_to_num(nan=-math.inf).argmax(dim=1)
    return torch.where(farther.any(dim=1), nearest_farther, farthest)
