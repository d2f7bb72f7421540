"""The one container every identity-image source returns: images, labels, image ids, names.

Synthetic identities (:mod:`embedkit.datasets.synthetic`) and real folders
(:mod:`embedkit.datasets.folder`) both give an :class:`IdentityImages`, so an example or
a test splits, degrades and feeds them the same way whatever their origin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._checks import check_row_index, describe

__all__ = ["IdentityImages"]


@dataclass(frozen=True)
class IdentityImages:
    """Images with an identity label and a unique id each.

    Attributes
    ----------
    images : Tensor of shape (n_images, 3, height, width)
        float32 RGB values in [0, 1].
    labels : Tensor of shape (n_images,)
        int64 identity index into ``identity_names``.
    image_ids : ndarray of str, shape (n_images,)
        A unique name per image (a relative file path, or ``"<identity>/<index>"`` for
        synthetic images); evaluation uses them to prove that gallery and probe images
        are disjoint.
    identity_names : tuple of str
        The name of identity ``i`` (a folder name, or ``"id00042"``).
    """

    images: Tensor
    labels: Tensor
    image_ids: np.ndarray
    identity_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or not self.images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor; got {describe(self.images)}")
        if not isinstance(self.image_ids, np.ndarray):
            raise TypeError(f"image_ids must be a numpy array of str; got {describe(self.image_ids)}")
        if not isinstance(self.identity_names, tuple):
            raise TypeError(f"identity_names must be a tuple of str; got {describe(self.identity_names)}")
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"images must be a tensor of shape (n_images, 3, height, width); got {describe(self.images)}"
            )
        n = self.images.shape[0]
        if (
            not isinstance(self.labels, Tensor)
            or self.labels.shape != (n,)
            or self.labels.dtype != torch.int64
        ):
            raise ValueError(f"labels must be an int64 tensor of shape ({n},); got {describe(self.labels)}")
        if self.image_ids.shape != (n,):
            raise ValueError(f"image_ids must have shape ({n},); got {describe(self.image_ids)}")
        if np.unique(self.image_ids).size != n:
            raise ValueError(
                "image_ids must be unique: they are what proves gallery and probe images disjoint"
            )
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.identity_names)):
            raise ValueError(
                f"labels must lie in [0, {len(self.identity_names)}) (one per identity name); got "
                f"[{int(self.labels.min())}, {int(self.labels.max())}]"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_identities(self) -> int:
        """Number of distinct identities among the images."""
        return int(torch.unique(self.labels).numel())

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the images."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, index: Any, *, relabel: bool = False) -> IdentityImages:
        """The images at ``index``.

        Parameters
        ----------
        index : ndarray, Tensor or sequence of int, or a boolean mask of shape (n_images,)
            Rows to keep, in that order.
        relabel : bool
            Renumber the identities that remain as ``0..C-1`` (in order of their old
            label) and keep only their names: what a classification head over the
            subset needs.

        Returns
        -------
        IdentityImages
        """
        rows = check_row_index(index, len(self))
        labels = self.labels[rows]
        names = self.identity_names
        if relabel:
            kept, labels = torch.unique(labels, return_inverse=True)
            names = tuple(self.identity_names[i] for i in kept.tolist())
        return IdentityImages(self.images[rows], labels, self.image_ids[rows.numpy()], names)
