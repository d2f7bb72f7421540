"""Real identity images from a folder tree: one sub-folder per identity, the layout of face datasets.

The layout is the one face and re-identification datasets ship in (LFW, CASIA-WebFace,
VGGFace2, ...)::

    root/
        alice/
            0001.jpg
            0002.jpg
        bob/
            0001.png
            ...

:func:`load_image_folder` reads every image into memory, resized to one size, and
returns an :class:`~embedkit.datasets.base.IdentityImages` — the same container the
synthetic identities of :mod:`embedkit.datasets.synthetic` come in, so examples and
tests use real and synthetic data the same way:

* ``labels`` number the identities ``0..C-1`` in the sorted order of their folder names,
  and ``identity_names`` holds those folder names;
* ``image_ids`` are the POSIX paths relative to ``root`` (``"alice/0001.jpg"``), unique
  per image, so evaluation can prove that gallery and probe images are disjoint.

The loader does not split. Split the result without leakage with
:func:`embedkit.datasets.split_identities` (parts with disjoint *people*, e.g. pretraining
and fine-tuning identities) or :func:`embedkit.datasets.split_images` (parts with the same
people and disjoint *pictures*, e.g. training, gallery and probe images), then take each
part with :meth:`IdentityImages.subset`.

Pillow is an optional dependency: ``pip install embedkit[datasets]`` (or ``pip install
pillow``). tqdm, when installed, draws a progress bar for ``progress=True``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._checks import check_bool, check_int, describe
from .base import IdentityImages

__all__ = ["load_image_folder"]

_DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_SHOWN_NAMES = 5  # identity names quoted in a warning or an error


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    size: int | tuple[int, int] = (32, 32),
    extensions: Sequence[str] = _DEFAULT_EXTENSIONS,
    min_images: int = 1,
    progress: bool = False,
) -> IdentityImages:
    """Read ``root/<identity>/<image>`` into memory as identity-labelled images.

    Parameters
    ----------
    root : str or path-like
        The folder that holds one sub-folder per identity. Files directly in ``root``,
        hidden entries (names starting with ``"."``) and folders nested inside an
        identity folder are ignored.
    size : int or (int, int)
        ``(height, width)`` every image is resized to (an int means a square). Images are
        resized with Pillow's bilinear filter, which antialiases when it shrinks.
    extensions : sequence of str
        File suffixes that count as images, matched case-insensitively (``".JPG"`` is a
        ``".jpg"``); other files are ignored.
    min_images : int
        Identities with fewer images are dropped (with a warning that names them), e.g.
        ``min_images=2`` keeps only identities that can give both a gallery and a probe
        image.
    progress : bool
        Show a progress bar while reading (needs tqdm; without it, no bar).

    Returns
    -------
    IdentityImages
        ``images`` : float32 tensor of shape (n_images, 3, height, width) in [0, 1], RGB
        (grayscale is replicated to three channels, an alpha channel is dropped, the
        EXIF orientation of photographs is applied);
        ``labels`` : int64 tensor of shape (n_images,), identities numbered ``0..C-1`` in
        the sorted order of their folder names;
        ``image_ids`` : str array of shape (n_images,), ``"<identity>/<file name>"``;
        ``identity_names`` : the ``C`` folder names. Images are in identity order, then
        sorted by file name within each identity.

    Raises
    ------
    ImportError
        If Pillow is not installed.
    FileNotFoundError
        If ``root`` does not exist.
    NotADirectoryError
        If ``root`` is not a directory.
    ValueError
        If ``root`` holds no identity folder, no image with one of ``extensions``, fewer
        than two identities (after dropping those under ``min_images``), or an image file
        Pillow cannot read (the error names the file and chains Pillow's exception).
    TypeError
        If an argument has the wrong type.

    Examples
    --------
    >>> data = load_image_folder("lfw", size=64, min_images=2)  # doctest: +SKIP
    >>> train, probe = split_images(data.labels, [1, None], seed=0)  # doctest: +SKIP
    >>> data.subset(train).images.shape  # doctest: +SKIP
    torch.Size([..., 3, 64, 64])
    """
    height, width = _check_size(size)
    suffixes = _check_extensions(extensions)
    min_images = check_int(min_images, "min_images", low=1)
    progress = check_bool(progress, "progress")
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path (str or os.PathLike); got {describe(root)}")
    try:
        from PIL import Image, ImageOps
    except ImportError as error:
        raise ImportError(
            "load_image_folder reads images with Pillow, which is not installed: "
            "pip install embedkit[datasets] (or pip install pillow)"
        ) from error

    folder = Path(root)
    identities = _scan(folder, suffixes)
    kept = [(name, files) for name, files in identities if len(files) >= min_images]
    dropped = [name for name, files in identities if len(files) < min_images]
    dropped_note = ""
    if dropped:
        shown = ", ".join(repr(name) for name in dropped[:_SHOWN_NAMES])
        more = ", ..." if len(dropped) > _SHOWN_NAMES else ""
        dropped_note = (
            f"dropped {len(dropped)} of {len(identities)} identities with fewer than "
            f"min_images={min_images} images: {shown}{more}"
        )
        warnings.warn(f"load_image_folder({str(folder)!r}): {dropped_note}", stacklevel=2)
    if len(kept) < 2:
        found = "no identity" if not kept else f"only one identity ({kept[0][0]!r})"
        why = f" with at least min_images={min_images} images ({dropped_note})" if dropped else " with images"
        raise ValueError(
            f"image folder {str(folder)!r} holds {found}{why}; metric learning needs at least two "
            "identities (one sub-folder of images per identity) to have pairs of different identities"
            + ("; lower min_images to keep more identities" if dropped else "")
        )

    files = [(label, name, path) for label, (name, paths) in enumerate(kept) for path in paths]
    resample = getattr(Image, "Resampling", Image).BILINEAR  # Image.Resampling since Pillow 9.1
    pixels = np.empty((len(files), height, width, 3), dtype=np.uint8)
    bar = _progress_bar(len(files), f"reading {folder.name or folder}", progress)
    try:
        for row, (_, name, path) in enumerate(files):
            try:
                with Image.open(path) as image:
                    rgb = ImageOps.exif_transpose(image).convert("RGB")
                    pixels[row] = np.asarray(rgb.resize((width, height), resample=resample), dtype=np.uint8)
            except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, ... per format
                raise ValueError(
                    f"could not read the image file {str(path)!r} (identity {name!r}): "
                    f"{type(error).__name__}: {error}. Remove or replace the file, or leave its "
                    "extension out of extensions"
                ) from error
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255.0)
    labels = torch.tensor([label for label, _, _ in files], dtype=torch.int64)
    image_ids = np.array([f"{name}/{path.name}" for _, name, path in files], dtype=str)
    return IdentityImages(images, labels, image_ids, tuple(name for name, _ in kept))


def _check_size(size: Any) -> tuple[int, int]:
    """``size`` as ``(height, width)`` of positive ints."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        side = check_int(size, "size", low=1)
        return side, side
    if isinstance(size, (str, bytes)) or not isinstance(size, (Sequence, np.ndarray)) or len(size) != 2:
        raise TypeError(
            f"size must be a positive int or a pair (height, width) of positive ints; got {describe(size)}"
            + (f" of length {len(size)}" if isinstance(size, (Sequence, np.ndarray)) else "")
        )
    return check_int(size[0], "size[0] (height)", low=1), check_int(size[1], "size[1] (width)", low=1)


def _check_extensions(extensions: Any) -> frozenset[str]:
    """``extensions`` as lower-case suffixes with a leading dot; a single string is one extension."""
    if isinstance(extensions, str):
        extensions = (extensions,)
    if not isinstance(extensions, (Sequence, frozenset, set)) or isinstance(extensions, bytes):
        raise TypeError(
            "extensions must be a sequence of file suffixes such as ('.png', '.jpg'); "
            f"got {describe(extensions)}"
        )
    if len(extensions) == 0:
        raise ValueError("extensions is empty; expected at least one file suffix such as '.png'")
    suffixes = set()
    for k, extension in enumerate(extensions):
        if not isinstance(extension, str):
            raise TypeError(
                f"extensions[{k}] must be a file suffix (str) such as '.png'; got {describe(extension)}"
            )
        if extension.strip(".") == "":
            raise ValueError(
                f"extensions[{k}] must be a non-empty file suffix such as '.png'; got {extension!r}"
            )
        suffixes.add("." + extension.lower().lstrip("."))
    return frozenset(suffixes)


def _scan(folder: Path, suffixes: frozenset[str]) -> list[tuple[str, list[Path]]]:
    """``(identity name, sorted image paths)`` per identity folder, sorted by name."""
    if not folder.exists():
        raise FileNotFoundError(
            f"image folder {str(folder)!r} does not exist; expected root/<identity>/<image> "
            "with one sub-folder per identity"
        )
    if not folder.is_dir():
        raise NotADirectoryError(
            f"image folder {str(folder)!r} is not a directory; expected root/<identity>/<image> "
            "with one sub-folder per identity"
        )
    entries = sorted((entry for entry in folder.iterdir() if not entry.name.startswith(".")), key=_name)
    identity_folders = [entry for entry in entries if entry.is_dir()]
    looked_for = ", ".join(sorted(suffixes))
    if not identity_folders:
        loose = sum(entry.is_file() and entry.suffix.lower() in suffixes for entry in entries)
        hint = (
            f"; it holds {loose} image file(s) directly: move them into one sub-folder per identity"
            if loose
            else ""
        )
        raise ValueError(
            f"image folder {str(folder)!r} holds no identity folders; expected root/<identity>/<image> "
            f"with one sub-folder per identity{hint}"
        )
    identities = []
    for identity in identity_folders:
        images = sorted(
            (
                entry
                for entry in identity.iterdir()
                if not entry.name.startswith(".") and entry.suffix.lower() in suffixes and entry.is_file()
            ),
            key=_name,
        )
        identities.append((identity.name, images))
    if not any(images for _, images in identities):
        raise ValueError(
            f"image folder {str(folder)!r} holds {len(identity_folders)} identity folder(s) but no image "
            f"files in them; looked for files ending in {looked_for} (case-insensitive) directly inside "
            "each identity folder"
        )
    return identities


def _name(path: Path) -> str:
    return path.name


def _progress_bar(total: int, description: str, enabled: bool) -> Any:
    """A tqdm bar, or ``None`` when disabled or tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description, unit="image", leave=False)
