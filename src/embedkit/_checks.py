"""Input validation shared by every public entry point.

Every public function and module calls these helpers first, so a user who passes
the wrong thing gets one kind of message everywhere: the argument's name, what was
seen, and what was expected. Nothing downstream re-checks what was checked here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "as_label_array",
    "check_choice",
    "check_class_labels",
    "check_embeddings",
    "check_int",
    "check_ks",
    "check_labels",
    "check_matching_dim",
    "check_real",
    "check_row_index",
    "count_nonfinite",
    "describe",
]


def describe(value: Any) -> str:
    """A short description of ``value`` (type, shape, dtype) for error messages."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}" if _is_scalar(value) else type(value).__name__


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (numbers.Number, str)) or value is None


def check_embeddings(embeddings: Any, name: str = "embeddings", *, check_finite: bool = True) -> Tensor:
    """Check that ``embeddings`` is a non-empty 2-D floating tensor of finite values.

    Parameters
    ----------
    embeddings : Tensor of shape (batch_size, embedding_dim)
        The value to check.
    name : str
        The argument's name, used in error messages.
    check_finite : bool
        Also reject NaN and infinite values (one device-to-host sync).

    Returns
    -------
    Tensor of shape (batch_size, embedding_dim)
        ``embeddings`` unchanged.

    Raises
    ------
    TypeError
        If it is not a floating-point ``torch.Tensor``.
    ValueError
        If it is not 2-D, is empty, or holds non-finite values.
    """
    if not isinstance(embeddings, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (batch_size, embedding_dim); got {describe(embeddings)}"
        )
    if embeddings.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D, of shape (batch_size, embedding_dim); got shape {tuple(embeddings.shape)}"
        )
    if not embeddings.is_floating_point():
        raise TypeError(
            f"{name} must have a floating-point dtype (float16, bfloat16, float32 or "
            f"float64); got {embeddings.dtype}"
        )
    if embeddings.shape[0] == 0:
        raise ValueError(
            f"{name} is an empty batch (shape {tuple(embeddings.shape)}); expected at least one row"
        )
    if embeddings.shape[1] == 0:
        raise ValueError(
            f"{name} has embedding_dim 0 (shape {tuple(embeddings.shape)}); expected at least one column"
        )
    if check_finite:
        finite = torch.isfinite(embeddings)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(
                f"{name} contains {bad} non-finite value(s) (NaN or inf) out of "
                f"{embeddings.numel()}; expected only finite values. Check the model's "
                "output (a diverged step, fp16 overflow, or a division by zero norm)."
            )
    return embeddings


def check_labels(
    labels: Any,
    num_rows: int,
    name: str = "labels",
    *,
    device: torch.device | None = None,
    rows_name: str = "embeddings",
) -> Tensor:
    """Check and convert class labels for a batch of ``num_rows`` embeddings.

    Parameters
    ----------
    labels : Tensor, ndarray or sequence of int, of shape (num_rows,)
        Integer class labels. Floating or boolean labels are rejected rather than
        rounded, because a float cast silently merges large identity ids.
    num_rows : int
        The number of embeddings the labels belong to.
    name : str
        The argument's name, used in error messages.
    device : torch.device, optional
        Move the labels to this device (usually the embeddings' device).
    rows_name : str
        The name of the embeddings argument, used in error messages.

    Returns
    -------
    Tensor of shape (num_rows,) and dtype int64
    """
    if not isinstance(labels, Tensor):
        if isinstance(labels, (str, bytes)) or not isinstance(labels, (Collection, np.ndarray)):
            raise TypeError(f"{name} must be a 1-D integer tensor, array or sequence; got {describe(labels)}")
        array = np.asarray(labels)
        if array.dtype.kind not in "iu" and array.size > 0:
            raise TypeError(f"{name} must hold integers; got {describe(array)}")
        labels = torch.as_tensor(array.astype(np.int64, copy=False))
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"{name} must have an integer dtype (e.g. torch.int64); got {labels.dtype}. "
            "Floating labels are not rounded: identity ids above 2**24 would collide."
        )
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, of shape ({num_rows},); got shape {tuple(labels.shape)}")
    if labels.shape[0] != num_rows:
        raise ValueError(
            f"{name} has {labels.shape[0]} entries but {rows_name} has {num_rows} rows; "
            "expected one label per embedding"
        )
    # int64 whatever integer dtype came in: cross_entropy, gather and one_hot take
    # no other index dtype.
    return labels.to(device=labels.device if device is None else device, dtype=torch.int64)


def check_class_labels(labels: Tensor, num_classes: int, name: str = "labels") -> Tensor:
    """Check that integer ``labels`` lie in ``[0, num_classes)``.

    On the CPU the check reads the labels' range and raises a ``ValueError`` naming it.
    On an accelerator it is queued with ``torch._assert_async`` instead of reading the
    range back (a host sync every step): a label out of range then stops the device's
    work with an error carrying the same message, as the indexing that follows would.

    Parameters
    ----------
    labels : Tensor of shape (batch_size,)
        Already checked by :func:`check_labels`.
    num_classes : int
        The number of classes of the classifier or proxy set.
    name : str
        The argument's name, used in error messages.
    """
    if labels.numel() == 0:
        return labels
    if labels.device.type != "cpu":
        in_range = ((labels >= 0) & (labels < num_classes)).all()
        message = f"{name} must lie in [0, num_classes) = [0, {num_classes})"
        try:
            torch._assert_async(in_range, message)
        except TypeError:  # torch < 2.2 takes no message
            torch._assert_async(in_range)
        return labels
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name} must lie in [0, num_classes) = [0, {num_classes}); found {bad} "
            f"(labels span [{low}, {high}]). Map identities to 0..num_classes-1 first."
        )
    return labels


def count_nonfinite(tensor: Tensor) -> Tensor:
    """The number of NaN and infinite entries of ``tensor``, as a 0-d int64 tensor.

    Stays on the tensor's device (no host sync): for losses that let non-finite
    inputs through (``nonfinite="propagate"``) and record how many there were.
    """
    return torch.count_nonzero(~torch.isfinite(tensor))


def check_matching_dim(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Check that two embedding matrices have the same number of columns."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} has embedding_dim {a.shape[1]} but {name_b} has {b.shape[1]}; "
            "expected the same embedding dimension"
        )


def check_real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Check that ``value`` is a finite real number in the given range.

    Returns
    -------
    float
        ``value`` as a Python float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        left = "[" if low_inclusive and low is not None else "("
        right = "]" if high_inclusive and high is not None else ")"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must lie in {left}{lo}, {hi}{right}; got {value:g}")
    return value


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """Check that ``value`` is an integer (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {describe(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "(-inf" if low is None else f"[{low}"
        hi = "inf)" if high is None else f"{high}]"
        raise ValueError(f"{name} must lie in {lo}, {hi}; got {value}")
    return value


def check_row_index(index: Any, length: int, name: str = "index") -> Tensor:
    """Rows of a collection of ``length`` items picked by integer positions or a boolean mask.

    Parameters
    ----------
    index : ndarray, Tensor or sequence of int, or a boolean mask of shape (length,)
    length : int
        The number of items the positions refer to.
    name : str
        The argument's name, used in error messages.

    Returns
    -------
    Tensor of shape (n_picked,) and dtype int64
        Positions in ``[0, length)``, in the order given.
    """
    rows = torch.as_tensor(np.asarray(index))
    if rows.dtype == torch.bool:
        if rows.shape != (length,):
            raise ValueError(f"a boolean {name} must have shape ({length},); got {tuple(rows.shape)}")
        rows = rows.nonzero().squeeze(1)
    if rows.ndim != 1 or (rows.numel() and rows.dtype not in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be 1-D integers or a boolean mask; got {describe(index)}")
    rows = rows.long()
    if rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < length):
        raise ValueError(
            f"{name} must lie in [0, {length}); got values in [{int(rows.min())}, {int(rows.max())}]"
        )
    return rows


def check_bool(value: Any, name: str) -> bool:
    """Check that ``value`` is ``True`` or ``False`` (a Python or NumPy bool, not 0/1 or a string)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {describe(value)}")
    return bool(value)


def check_choice(value: Any, name: str, choices: Collection[str]) -> str:
    """Check that ``value`` is one of the allowed string ``choices``."""
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}; got {value!r}")
    return value


def as_label_array(labels: Any, name: str = "labels", *, allow_empty: bool = False) -> np.ndarray:
    """Convert labels (list, numpy array or tensor) to a 1-D ``int64`` numpy array.

    Integers of any size that fit in int64 are kept exactly; floating and boolean
    labels are rejected, never rounded.

    Parameters
    ----------
    labels : array-like of shape (n_samples,)
        Integer labels.
    name : str
        The argument's name, used in error messages.
    allow_empty : bool
        Accept a zero-length array.

    Returns
    -------
    ndarray of shape (n_samples,) and dtype int64
    """
    if isinstance(labels, Tensor):
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"{name} must have an integer dtype; got {labels.dtype}")
        array = labels.detach().cpu().numpy()
    elif isinstance(labels, (np.ndarray, Collection)) and not isinstance(labels, (str, bytes)):
        array = np.asarray(labels)
    else:
        raise TypeError(f"{name} must be a 1-D integer array, tensor or sequence; got {describe(labels)}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, of shape (n_samples,); got shape {array.shape}")
    if array.size == 0:
        if not allow_empty:
            raise ValueError(f"{name} is empty; expected at least one label")
        return array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise TypeError(
            f"{name} must hold integers; got dtype {array.dtype}. Floating labels are not "
            "rounded: identity ids above 2**24 would collide."
        )
    # int(): numpy < 2 compares uint64 with a Python int in float64, where 2**63 == 2**63 - 1.
    if array.dtype == np.uint64 and int(array.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds values above 2**63 - 1; expected labels that fit in int64")
    return array.astype(np.int64, copy=False)


def _to_numpy(values: Any, name: str, expected: str) -> np.ndarray:
    """A tensor (any device, detached) or array-like as a numpy array, without copying numpy input."""
    if isinstance(values, Tensor):
        values = values.detach()
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        return values.cpu().numpy()
    if isinstance(values, np.ndarray):
        return values
    if isinstance(values, (str, bytes)) or not isinstance(values, Collection):
        raise TypeError(f"{name} must be {expected}; got {describe(values)}")
    return np.asarray(values)


def as_float_array(values: Any, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """Convert 1-D real values (list, numpy array or tensor on any device) to a finite numpy array.

    float32 stays float32 (half precision becomes float32); every other real dtype,
    integers included, becomes float64. Booleans are rejected: they are labels, not values.

    Parameters
    ----------
    values : array-like of shape (n,)
        The values to check (e.g. verification scores or distances).
    name : str
        The argument's name, used in error messages.
    allow_empty : bool
        Accept a zero-length array.

    Returns
    -------
    ndarray of shape (n,) and dtype float32 or float64
    """
    array = _to_numpy(values, name, "a 1-D array, tensor or sequence of real numbers")
    if array.dtype == np.bool_ or array.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers (float or int); got {describe(array)}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, of shape (n,); got shape {array.shape}")
    if array.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty; expected at least one value")
    array = array.astype(np.float32 if array.dtype in (np.float16, np.float32) else np.float64, copy=False)
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf) out of {array.size}")
    return array


def as_bool_array(
    values: Any, name: str, *, length: int | None = None, length_name: str | None = None
) -> np.ndarray:
    """Convert 1-D binary flags (bool, or integers that are all 0 or 1) to a numpy bool array.

    Parameters
    ----------
    values : array-like of shape (n,)
        Booleans, or integers holding only 0 and 1. Floats are rejected, never rounded.
    name : str
        The argument's name, used in error messages.
    length : int, optional
        The length ``values`` must have.
    length_name : str, optional
        The argument whose length ``values`` must match, used in error messages.

    Returns
    -------
    ndarray of shape (n,) and dtype bool
    """
    array = _to_numpy(values, name, "a 1-D boolean array, tensor or sequence")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, of shape (n,); got shape {array.shape}")
    if length is not None and array.shape[0] != length:
        other = f"{length_name} has {length}" if length_name else f"expected {length}"
        raise ValueError(f"{name} has {array.shape[0]} entries but {other}; expected one per entry")
    if array.dtype == np.bool_:
        return array
    if array.dtype.kind not in "iu" and array.size > 0:
        raise TypeError(f"{name} must hold booleans (or integers 0/1); got {describe(array)}")
    if array.size and not np.isin(array, (0, 1)).all():
        seen = np.unique(array[(array != 0) & (array != 1)])[:5].tolist()
        raise ValueError(f"{name} must hold only 0/1 (or booleans); found other values such as {seen}")
    return array.astype(bool)


__all__ += ["as_bool_array", "as_float_array"]


def check_rate_targets(targets: Any, name: str) -> tuple[float, ...]:
    """Check operating-point targets (FAR, FPIR, ...): one rate or a non-empty sequence in (0, 1].

    Parameters
    ----------
    targets : float or sequence of float
        The target rates.
    name : str
        The argument's name, used in error messages (``far_targets[1] must lie in ...``).

    Returns
    -------
    tuple of float
        The targets as Python floats, in the order given.
    """
    if isinstance(targets, numbers.Real):
        targets = (targets,)
    if isinstance(targets, (str, bytes)) or not isinstance(targets, (Collection, np.ndarray)):
        raise TypeError(f"{name} must be a sequence of floats in (0, 1]; got {describe(targets)}")
    if len(targets) == 0:
        raise ValueError(f"{name} is empty; expected at least one target rate in (0, 1]")
    return tuple(
        check_real(t, f"{name}[{k}]", low=0.0, high=1.0, low_inclusive=False) for k, t in enumerate(targets)
    )


__all__ += ["check_rate_targets"]


def check_ks(ks: Any, name: str = "ks") -> tuple[int, ...]:
    """Check a cut-off list such as ``ks=(1, 5, 10)`` or ``ranks=...``.

    Parameters
    ----------
    ks : int or sequence of int
        One positive integer, or a non-empty sequence or 1-D array of them.
    name : str
        The argument's name, used in error messages.

    Returns
    -------
    tuple of int
        Sorted, without duplicates.
    """
    if isinstance(ks, (int, np.integer)) and not isinstance(ks, bool):
        ks = (ks,)
    if isinstance(ks, (str, bytes)) or not isinstance(ks, (Sequence, np.ndarray)) or len(ks) == 0:
        raise TypeError(
            f"{name} must be a positive integer or a non-empty sequence of them; got {describe(ks)}"
        )
    return tuple(sorted({check_int(k, name, low=1) for k in ks}))
