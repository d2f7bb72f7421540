"""Labels of any type as contiguous integer codes, mapped once at the public boundary.

Identities in a notebook are names, file-derived strings or integers of any dtype. The
evaluation entry points and :class:`~embedkit.PKSampler` accept all of them, the way
scikit-learn's metrics do: they call :func:`encode_labels` once and work on the codes,
and reports translate a code back to the original label where they name one. Losses
keep integer tensors (their labels index class centres); encode names with this
function first.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Hashable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import as_label_array, describe

__all__ = ["encode_label_sets", "encode_labels"]


def encode_labels(
    labels: Any, name: str = "labels", *, allow_empty: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Map labels of any hashable type to contiguous integer codes.

    Parameters
    ----------
    labels : list, tuple, ndarray or Tensor of shape (n_samples,)
        Integers of any dtype, strings, or a numpy object array (or list) of hashable
        ids such as tuples. Floating-point and boolean labels are rejected, never
        rounded: a float cast silently merges identity ids above 2**24.
    name : str
        The argument's name, used in error messages.
    allow_empty : bool
        Accept a zero-length input.

    Returns
    -------
    codes : ndarray of shape (n_samples,) and dtype int64
        ``codes[i]`` is the index of ``labels[i]`` in ``classes``; codes run over
        ``0 .. len(classes) - 1``.
    classes : ndarray of shape (n_classes,)
        The distinct labels, so that ``classes[codes]`` gives the labels back. Sorted
        ascending when the labels can be ordered (integers, strings: the codes then do
        not depend on the order of the rows); in order of first appearance otherwise
        (e.g. integers mixed with strings).

    Raises
    ------
    TypeError
        If ``labels`` is not a 1-D sequence, or holds floats, booleans or unhashable items.
    ValueError
        If ``labels`` is not 1-D, or is empty and ``allow_empty`` is False.

    Examples
    --------
    >>> codes, classes = encode_labels(["bob", "alice", "bob"])
    >>> codes, classes
    (array([1, 0, 1]), array(['alice', 'bob'], dtype=object))
    """
    if isinstance(labels, Tensor) or (isinstance(labels, np.ndarray) and labels.dtype.kind in "iufcb"):
        ints = as_label_array(labels, name, allow_empty=allow_empty)
        classes, codes = np.unique(ints, return_inverse=True)
        return codes.astype(np.int64, copy=False), classes
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (np.ndarray, Collection)):
        raise TypeError(
            f"{name} must be a 1-D sequence of labels (integers, strings or other hashable ids); "
            f"got {describe(labels)}"
        )
    array = labels if isinstance(labels, np.ndarray) else _as_array(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, of shape (n_samples,); got shape {array.shape}")
    if array.size == 0:
        if not allow_empty:
            raise ValueError(f"{name} is empty; expected at least one label")
        return np.zeros(0, dtype=np.int64), array[:0]
    if array.dtype.kind in "iufcb":  # a list of numbers became a numeric array
        return encode_labels(array, name, allow_empty=allow_empty)
    if array.dtype.kind in "US":
        classes, codes = np.unique(array, return_inverse=True)
        return codes.astype(np.int64, copy=False), classes
    return _encode_objects(array, name)


def _as_array(labels: Collection[Any]) -> np.ndarray:
    """A sequence as an array without numpy's coercions: ``[1, "1"]`` stays two distinct labels."""
    try:
        array = np.asarray(labels)
    except ValueError:  # ragged items, e.g. [[1], "a"]: each is checked as an object below
        array = np.empty(0, dtype=object)
    if array.ndim == 1 and array.dtype.kind in "iufb":
        return array
    if array.ndim > 1 and not all(isinstance(item, tuple) for item in labels):
        return array  # nested lists: reported as not 1-D
    # Strings, mixed types and tuples stay Python objects: numpy would turn 1 and "1" into the
    # same string, and drops trailing NUL characters from its fixed-width strings.
    objects = np.empty(len(labels), dtype=object)
    for i, item in enumerate(labels):
        objects[i] = item
    return objects


def _encode_objects(array: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    for i, item in enumerate(array):
        # Python's 1 == 1.0 == True would merge these ids silently; say so instead.
        if isinstance(item, (bool, np.bool_)) or (
            isinstance(item, numbers.Real) and not isinstance(item, numbers.Integral)
        ):
            raise TypeError(
                f"{name}[{i}] is {describe(item)}; expected integer, string or other non-float hashable "
                "labels (floats are not rounded: ids above 2**24 would collide)"
            )
        if not isinstance(item, Hashable) or isinstance(item, torch.Tensor):
            raise TypeError(f"{name}[{i}] is {describe(item)}, which is not a hashable label")
    try:
        classes, codes = np.unique(array, return_inverse=True)
        return codes.astype(np.int64, copy=False), classes
    except TypeError:  # mixed types cannot be ordered: first appearance fixes the codes
        index: dict[Any, int] = {}
        codes = np.fromiter((index.setdefault(item, len(index)) for item in array), np.int64, array.size)
        classes = np.empty(len(index), dtype=object)
        classes[:] = list(index)
        return codes, classes


def encode_label_sets(
    label_sets: Sequence[Any], names: Sequence[str], sizes: Sequence[int] | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Several label arrays as codes of one shared class list (e.g. queries and references).

    Parameters
    ----------
    label_sets : sequence of array-like, each of shape (n_k,)
        Labels of any type accepted by :func:`encode_labels`.
    names : sequence of str
        The arguments' names, for error messages.
    sizes : sequence of int, optional
        The number of rows each label array must have (one label per embedding).

    Returns
    -------
    codes : list of ndarray of shape (n_k,) and dtype int64
        Equal labels get equal codes across the sets.
    classes : ndarray of shape (n_classes,)
        The distinct labels of all sets; ``classes[codes[k]]`` gives set ``k`` back.

    Raises
    ------
    TypeError, ValueError
        As :func:`encode_labels`, naming the set; ``ValueError`` when a set's length is not
        its ``sizes`` entry.
    """
    encoded = [encode_labels(labels, name) for labels, name in zip(label_sets, names, strict=True)]
    for (codes, _), name, size in zip(encoded, names, sizes or [-1] * len(names), strict=True):
        if size >= 0 and codes.shape[0] != size:
            raise ValueError(
                f"{name} has {codes.shape[0]} entries but there are {size} embeddings; "
                "expected one label per embedding"
            )
    kinds = {classes.dtype.kind for _, classes in encoded}
    if kinds <= set("iu") or kinds <= set("US"):
        pooled = np.concatenate([classes for _, classes in encoded])
    else:  # mixed types: objects, so that 1 and "1" stay apart
        pooled = np.concatenate([classes.astype(object) for _, classes in encoded])
    class_codes, classes = encode_labels(pooled, "labels")
    offsets = np.cumsum([0] + [c.shape[0] for _, c in encoded])
    return [
        class_codes[offset + codes] for (codes, _), offset in zip(encoded, offsets, strict=False)
    ], classes
