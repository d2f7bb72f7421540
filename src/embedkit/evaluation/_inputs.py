"""Converting evaluation inputs once: numpy arrays or torch tensors on any device.

Every evaluation entry point (k-NN search, retrieval metrics, the gallery) calls these
helpers first. Embeddings become a torch tensor on the device they came on (a numpy
array is wrapped without a copy); labels become an ``int64`` numpy array, never
through a float cast; image ids become a 1-D numpy array. Validation itself lives in
:mod:`embedkit._checks`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._checks import as_label_array, check_embeddings, check_labels, describe

__all__ = ["as_embeddings", "as_image_ids", "as_labels", "progress_bar", "to_numpy"]


def as_embeddings(embeddings: Any, name: str = "embeddings") -> Tensor:
    """Validate embeddings and return them as a tensor on their own device.

    Parameters
    ----------
    embeddings : ndarray or Tensor of shape (n, d)
        Floating-point embeddings; a numpy array is wrapped without a copy.
    name : str
        The argument's name, used in error messages.

    Returns
    -------
    Tensor of shape (n, d)
        Detached from any autograd graph.
    """
    if isinstance(embeddings, np.ndarray):
        if embeddings.dtype.kind != "f":
            raise TypeError(
                f"{name} must be a floating-point array of shape (n, d); got {describe(embeddings)}"
            )
        embeddings = torch.from_numpy(np.ascontiguousarray(embeddings))
    elif not isinstance(embeddings, Tensor):
        raise TypeError(
            f"{name} must be a numpy array or torch tensor of shape (n, d); got {describe(embeddings)}"
        )
    return check_embeddings(embeddings.detach(), name)


def as_labels(
    labels: Any, num_rows: int, name: str = "labels", *, rows_name: str = "embeddings"
) -> np.ndarray:
    """Validate integer labels, one per embedding, and return them as ``int64`` numpy.

    Parameters
    ----------
    labels : ndarray, Tensor or sequence of int, of shape (num_rows,)
        Integer labels of any size that fits in int64; floats are rejected, never rounded.
    num_rows : int
        The number of embeddings the labels belong to.
    name, rows_name : str
        Argument names used in error messages.

    Returns
    -------
    ndarray of shape (num_rows,) and dtype int64
    """
    array = as_label_array(labels, name)
    check_labels(torch.from_numpy(array), num_rows, name, rows_name=rows_name)
    return array


def as_image_ids(image_ids: Any, num_rows: int, name: str = "image_ids", *, rows_name: str) -> np.ndarray:
    """Validate image identifiers (integers or strings), one per embedding.

    Parameters
    ----------
    image_ids : ndarray, Tensor or sequence of shape (num_rows,)
        Any hashable scalar ids: file names, integer ids.
    num_rows : int
        The number of embeddings the ids belong to.

    Returns
    -------
    ndarray of shape (num_rows,)
    """
    if isinstance(image_ids, Tensor):
        image_ids = image_ids.detach().cpu().numpy()
    if isinstance(image_ids, (str, bytes)) or not isinstance(image_ids, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a 1-D array or sequence of ids; got {describe(image_ids)}")
    array = np.asarray(image_ids)
    if array.ndim != 1 or array.shape[0] != num_rows:
        raise ValueError(
            f"{name} must have shape ({num_rows},), one id per row of {rows_name}; got shape {array.shape}"
        )
    if array.dtype.kind == "f":
        raise TypeError(f"{name} must hold integers or strings; got dtype {array.dtype}")
    return array


def to_numpy(x: Tensor) -> np.ndarray:
    """A tensor on any device as a numpy array (a view when it already lives on the CPU)."""
    return x.detach().cpu().numpy()


@contextmanager
def progress_bar(total: int, description: str, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A progress callback ``update(rows_done)``: tqdm when installed, else plain lines.

    Yields ``None`` when ``enabled`` is false, so hot loops skip the call entirely.
    """
    if not enabled:
        yield None
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        done = [0, 0]  # rows finished, last tenth printed

        def update(rows: int) -> None:
            done[0] += rows
            tenth = 10 * done[0] // max(total, 1)
            if tenth > done[1]:
                done[1] = tenth
                print(f"{description}: {done[0]}/{total} ({10 * tenth}%)", file=sys.stderr, flush=True)

        yield update
        return
    with tqdm(total=total, desc=description, unit="query", leave=False) as bar:
        yield bar.update
