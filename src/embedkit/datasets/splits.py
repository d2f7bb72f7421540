"""Leak-free splits: by identity (disjoint people) and by image (disjoint pictures).

Both return row indices, so they apply to any labelled collection
(:meth:`IdentityImages.subset` takes them as they are).

* :func:`split_identities` — parts whose *identities* are disjoint, e.g. the people a
  backbone is pretrained on and the people it is fine-tuned on.
* :func:`split_images` — parts over the *same* identities whose *images* are disjoint,
  e.g. training images, gallery images and probe images of each person.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._checks import as_label_array, check_int, describe

__all__ = ["split_identities", "split_images"]


def _label_values(labels: Any) -> np.ndarray:
    """Labels as a 1-D array: strings (e.g. identity names) as they are, anything else as int64."""
    if isinstance(labels, (np.ndarray, Sequence)) and not isinstance(labels, (str, bytes)):
        array = np.asarray(labels)
        if array.ndim == 1 and array.size and array.dtype.kind in "US":
            return array
    return as_label_array(labels, "labels")


def _parts(sizes: Any, name: str) -> tuple[int | None, ...]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) < 1:
        raise TypeError(
            f"{name} must be a sequence of part sizes (int, or None for the rest); got {describe(sizes)}"
        )
    parts = tuple(None if s is None else check_int(s, f"{name}[{i}]", low=0) for i, s in enumerate(sizes))
    if sum(s is None for s in parts) > 1:
        raise ValueError(f"{name} may hold at most one None (the rest); got {list(sizes)}")
    return parts


def split_identities(labels: Any, sizes: Sequence[int | None], *, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Rows of disjoint sets of identities.

    Parameters
    ----------
    labels : ndarray, Tensor or sequence of int or str, shape (n_rows,)
        Identity of each row (integer ids or identity names).
    sizes : sequence of int or None
        Number of identities in each part; one ``None`` takes every identity left.
        Identities are drawn at random (from ``seed``) without replacement.
    seed : int
        Seed of the draw.

    Returns
    -------
    tuple of ndarray of int64
        One array of row indices per part, each sorted ascending. No identity appears
        in two parts.

    Raises
    ------
    ValueError
        When the parts ask for more identities than there are.
    """
    values = _label_values(labels)
    parts = _parts(sizes, "sizes")
    identities, inverse = np.unique(values, return_inverse=True)
    fixed = sum(s for s in parts if s is not None)
    if fixed > identities.size:
        raise ValueError(f"sizes ask for {fixed} identities but labels hold only {identities.size}")
    rest = identities.size - fixed
    order = np.random.default_rng(check_int(seed, "seed", low=0)).permutation(identities.size)
    part_of_identity = np.empty(identities.size, dtype=np.int64)
    start = 0
    for i, size in enumerate(parts):
        count = rest if size is None else size
        part_of_identity[order[start : start + count]] = i
        start += count
    part_of_identity[order[start:]] = -1  # identities no part asked for
    part_of_row = part_of_identity[inverse]
    return tuple(np.flatnonzero(part_of_row == i) for i in range(len(parts)))


def split_images(labels: Any, per_identity: Sequence[int | None], *, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Rows of disjoint image sets, each holding the same number of images of every identity.

    Parameters
    ----------
    labels : ndarray, Tensor or sequence of int or str, shape (n_rows,)
        Identity of each row (integer ids or identity names).
    per_identity : sequence of int or None
        Images of each identity that go to each part; one ``None`` takes the images
        left. Images are drawn at random within each identity (from ``seed``).
    seed : int
        Seed of the draw.

    Returns
    -------
    tuple of ndarray of int64
        One array of row indices per part, sorted ascending. No row appears in two
        parts; every fixed part holds exactly its count of every identity (the ``None``
        part holds whatever is left, which may be nothing for an identity).

    Raises
    ------
    ValueError
        When an identity has fewer images than the fixed parts need (the error names
        such identities: drop them first, or ask for fewer).
    """
    values = _label_values(labels)
    parts = _parts(per_identity, "per_identity")
    identities, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    fixed = sum(s for s in parts if s is not None)
    short = counts < max(fixed, 1)
    if short.any():
        shown = ", ".join(f"{identities[i].item()!r} ({counts[i]})" for i in np.flatnonzero(short)[:5])
        raise ValueError(
            f"per_identity needs {fixed} images of every identity, but {int(short.sum())} identities have "
            f"fewer: {shown}{', ...' if short.sum() > 5 else ''}"
        )
    # Shuffle the rows, then group them by identity (stable): each row's position
    # within its identity is a random rank 0..count-1.
    shuffled = np.random.default_rng(check_int(seed, "seed", low=0)).permutation(values.size)
    grouped = shuffled[np.argsort(inverse[shuffled], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(values.size, dtype=np.int64)
    rank[grouped] = np.arange(values.size) - np.repeat(starts, counts)
    result = []
    low = np.zeros(values.size, dtype=np.int64)
    for size in parts:
        if size is None:
            rest = counts[inverse] - fixed
            high = low + rest
        else:
            high = low + size
        result.append(np.flatnonzero((rank >= low) & (rank < high)))
        low = high
    return tuple(result)
