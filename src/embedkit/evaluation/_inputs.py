"""Converting evaluation inputs once: numpy arrays or torch tensors on any device.

Every evaluation entry point (k-NN search, retrieval metrics, the gallery) calls these
helpers first. Embeddings become a torch tensor on the device they came on (a numpy
array is wrapped without a copy); labels become an ``int64`` numpy array, never
through a float cast; image ids become a 1-D numpy array that keeps their types. ``.npz``
and ``.npy`` files are read here too, with errors that name the file and the key.
Validation itself lives in :mod:`embedkit._checks`.
"""

from __future__ import annotations

import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._checks import as_label_array, check_embeddings, check_labels, describe

__all__ = [
    "as_embeddings",
    "as_image_ids",
    "as_labels",
    "progress_bar",
    "read_npy",
    "read_npz",
    "repeated_ids",
    "shared_ids",
    "to_numpy",
]


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
    """Validate image identifiers (integers, strings or bytes), one per embedding, keeping their types.

    A sequence of Python values is not passed through ``np.asarray`` as it is, since numpy
    would turn ``[1, "a"]`` into the strings ``["1", "a"]``: all-integer ids become an
    ``int64`` array, all-string ids a string array, and mixed ids an object array of the
    values themselves. Ids are compared by value *and* type (:func:`shared_ids`): the
    integer ``1`` and the string ``"1"`` are different images.

    Parameters
    ----------
    image_ids : ndarray, Tensor or sequence of shape (num_rows,)
        File names, integer ids, or a mix of them.
    num_rows : int
        The number of embeddings the ids belong to.
    name, rows_name : str
        Argument names used in error messages.

    Returns
    -------
    ndarray of shape (num_rows,)
        Integer, string or bytes dtype, or object dtype holding such values.
    """
    if isinstance(image_ids, Tensor):
        image_ids = image_ids.detach().cpu().numpy()
    if isinstance(image_ids, (str, bytes)) or not isinstance(image_ids, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a 1-D array or sequence of ids; got {describe(image_ids)}")
    if isinstance(image_ids, np.ndarray):
        array = image_ids
    else:
        array = np.empty(len(image_ids), dtype=object)
        array[:] = list(image_ids)  # element by element: no conversion of the values
    if array.ndim != 1 or array.shape[0] != num_rows:
        raise ValueError(
            f"{name} must have shape ({num_rows},), one id per row of {rows_name}; got shape {array.shape}"
        )
    if array.dtype == object:
        kinds = {_id_kind(value) for value in array.tolist()}
        if None in kinds:
            bad = next(i for i, value in enumerate(array.tolist()) if _id_kind(value) is None)
            raise TypeError(
                f"{name} must hold integers, strings or bytes; {name}[{bad}] is {describe(array[bad])}"
            )
        if kinds == {"int"}:
            return array.astype(np.int64)
        if kinds == {"str"}:
            return array.astype(str)
        return array
    if array.dtype.kind not in "iuSU":
        raise TypeError(f"{name} must hold integers, strings or bytes; got dtype {array.dtype}")
    return array


def _id_kind(value: Any) -> str | None:
    """``"int"``, ``"str"`` or ``"bytes"`` for a valid image id, ``None`` otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes):
        return "bytes"
    return None


def _id_values(ids: np.ndarray) -> list[Any]:
    """Ids as Python values, so that equality keeps types (``1 != "1"``, ``"a" != b"a"``)."""
    return ids.tolist()


def first_few(values: Sequence[Any] | np.ndarray, limit: int = 5, render: Callable[[Any], str] = repr) -> str:
    """The first ``limit`` values for an error message or note, then "..." when there are more."""
    return ", ".join(render(v) for v in values[:limit]) + (", ..." if len(values) > limit else "")


def shared_ids(a: np.ndarray, b: np.ndarray) -> list[Any]:
    """The ids in both ``a`` and ``b``, compared by value and type.

    ``np.intersect1d`` would first cast an integer and a string array to one string dtype
    and report ``1`` and ``"1"`` as shared; here they are not.

    Parameters
    ----------
    a, b : ndarray of shape (n_a,) and (n_b,)
        Ids from :func:`as_image_ids`.

    Returns
    -------
    list
        Each shared id once, as a Python value.
    """
    if a.dtype != object and b.dtype != object:
        if a.dtype.kind == b.dtype.kind:
            return np.intersect1d(a, b).tolist()  # one kind on both sides: numpy is exact
        if not (a.dtype.kind in "iu" and b.dtype.kind in "iu"):
            return []  # integers against strings, or strings against bytes: never equal
        # signed against unsigned: numpy would compare through float64; Python ints are exact
    other = set(_id_values(b))
    seen: dict[Any, None] = {}
    for value in _id_values(a):
        if value in other:
            seen[value] = None
    return list(seen)


def repeated_ids(ids: np.ndarray) -> list[Any]:
    """The ids that occur more than once in ``ids`` (by value and type), each once."""
    if ids.dtype != object:
        unique, counts = np.unique(ids, return_counts=True)
        return unique[counts > 1].tolist()
    seen: set[Any] = set()
    repeats: dict[Any, None] = {}
    for value in _id_values(ids):
        if value in seen:
            repeats[value] = None
        seen.add(value)
    return list(repeats)


def read_npy(path: str | Path, what: str = "array") -> np.ndarray:
    """Read one ``.npy`` array without unpickling, with errors that name the file.

    Parameters
    ----------
    path : str or Path
    what : str
        What the array holds (``"labels"``), for error messages.

    Returns
    -------
    ndarray
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} ({what}) does not exist or is not a file")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"cannot read {what} from {path}: {_load_problem(error)}") from error
    except (OSError, EOFError) as error:
        raise ValueError(f"cannot read {what} from {path}: not a valid .npy file ({error})") from error


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read every array of a ``.npz`` without unpickling, with errors naming the file and key.

    Parameters
    ----------
    path : str or Path
        A ``.npz`` archive (as written by ``np.savez``).

    Returns
    -------
    dict of str to ndarray
        Each array under its name in the archive.

    Raises
    ------
    ValueError
        When the file is not a zip archive, or an array cannot be read: object arrays
        (pickled Python objects, e.g. ids saved from a list of mixed types) are refused,
        and the message says which key and how to save it instead.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a .npz archive (not a zip file); write it with "
            "np.savez(path, embeddings=..., labels=...)"
        )
    arrays: dict[str, np.ndarray] = {}
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"cannot open {path} as a .npz archive: {error}") from error
    with data:
        for key in data.files:
            try:
                arrays[key] = data[key]
            except ValueError as error:
                raise ValueError(f"cannot read array {key!r} of {path}: {_load_problem(error)}") from error
            except (OSError, EOFError, zipfile.BadZipFile) as error:
                raise ValueError(
                    f"cannot read array {key!r} of {path}: the archive is damaged ({error})"
                ) from error
    return arrays


def _load_problem(error: ValueError) -> str:
    """numpy's refusal of a pickled array, explained; other load errors as they are."""
    if "allow_pickle" in str(error):
        return (
            "it holds Python objects (dtype object), which are not unpickled for safety; save ids as "
            "strings (np.asarray(ids, dtype=str)) or integers"
        )
    return str(error)


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
