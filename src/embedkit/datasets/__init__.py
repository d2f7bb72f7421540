"""Data for examples and tests, made here or read from disk: nothing is downloaded.

* :func:`synthetic_identities` — procedural identity images from a seed (pose,
  expression, lighting, background, occlusion and noise vary per image);
* :func:`very_low_resolution` — the blur, downsampling and noise of a VLR probe;
* :func:`load_image_folder` — a real ``root/<identity>/<image>`` folder (needs Pillow:
  ``pip install embedkit[datasets]``);
* :func:`split_identities` and :func:`split_images` — splits with disjoint people or
  disjoint pictures, never leaking one into the other;
* :class:`IdentityImages` — what each source returns;
* :func:`synthetic_sequences` — fixed-camera sequences with relevant moving objects
  among irrelevant motion, and per-pixel ground truth (:class:`CameraSequences`).
"""

from .base import IdentityImages
from .folder import load_image_folder
from .sequences import CameraSequences, synthetic_sequences
from .splits import split_identities, split_images
from .synthetic import Nuisance, synthetic_identities, very_low_resolution

__all__ = [
    "CameraSequences",
    "IdentityImages",
    "Nuisance",
    "load_image_folder",
    "split_identities",
    "split_images",
    "synthetic_identities",
    "synthetic_sequences",
    "very_low_resolution",
]
