"""Synthetic fixed-camera sequences: relevant moving objects among irrelevant motion, with ground truth.

A fixed camera watches a scene (case study 05's alarm set-up). Each sequence holds:

* a static background: smooth colour fields, a few rectangular structures and a
  ground shading, drawn once per sequence;
* relevant motion: zero to ``max_objects`` objects (people, vehicles: ellipses of
  their own size, colour and stripe texture) crossing the scene at constant velocity,
  in front of everything else;
* irrelevant motion, each source independently present or not:

  - swaying texture (foliage): a region whose fine texture oscillates by about a
    pixel from frame to frame;
  - flicker (a lamp, a screen): a region whose brightness switches on and off at
    random frames;
  - illumination change: a slow global gain drift, and in some sequences a sudden
    step (lights switched, a cloud);
  - sensor noise: Gaussian, of a per-sequence strength, fresh in every frame.

The per-pixel ground truth ``relevant`` is exactly the footprint of the objects in
each frame (they are drawn with hard edges, so a pixel is either object or not);
``distractors`` marks where the swaying and flickering regions show, and
``lighting_changes`` the frames with a sudden illumination step. So plain frame
differencing fires on objects *and* on the distractors, the steps and the noise:
the false positives that a relevance model has to learn to ignore.

Each nuisance draws from its own random stream (derived from ``seed``), so changing
``max_objects`` leaves the background, distractors, lighting and noise unchanged and
changes only the pixels the objects cover — which is how the tests prove the ground
truth exact. Everything is vectorised in torch on the CPU, in blocks of sequences so
memory stays bounded: 200 sequences of eight 64×64 frames take a few seconds on two CPU cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_int, check_real, check_row_index, describe

__all__ = ["CameraSequences", "synthetic_sequences"]

#: Sequences rendered together: bounds the (block, objects, frames, H, W) masks.
_BLOCK = 64
#: Random streams, one per part of the scene: changing one part leaves the others alone.
_STREAMS = ("background", "sway", "flicker", "lighting", "noise", "objects")


@dataclass(frozen=True)
class CameraSequences:
    """Frames of fixed-camera sequences with per-pixel ground truth of relevant motion.

    Attributes
    ----------
    frames : Tensor of shape (n_sequences, n_frames, 3, height, width)
        float32 RGB values in [0, 1].
    relevant : Tensor of shape (n_sequences, n_frames, height, width)
        bool; True exactly on the pixels a relevant moving object covers in that frame.
    distractors : Tensor of shape (n_sequences, n_frames, height, width)
        bool; True where a swaying or flickering region shows (not hidden by an object).
    lighting_changes : Tensor of shape (n_sequences, n_frames)
        bool; True at frame ``t`` when the illumination stepped between ``t - 1`` and ``t``.
    num_objects : Tensor of shape (n_sequences,)
        int64; relevant objects in each sequence (0 for a sequence of irrelevant motion only).
    sequence_ids : ndarray of str, shape (n_sequences,)
        A unique name per sequence (``"seq00007"``).
    """

    frames: Tensor
    relevant: Tensor
    distractors: Tensor
    lighting_changes: Tensor
    num_objects: Tensor
    sequence_ids: np.ndarray

    def __post_init__(self) -> None:
        if (
            not isinstance(self.frames, Tensor)
            or self.frames.ndim != 5
            or not self.frames.is_floating_point()
        ):
            raise TypeError(
                "frames must be a floating-point tensor of shape (n_sequences, n_frames, 3, height, width); "
                f"got {describe(self.frames)}"
            )
        n, t, _, h, w = self.frames.shape
        for name, shape in (("relevant", (n, t, h, w)), ("distractors", (n, t, h, w))):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.dtype != torch.bool or tuple(value.shape) != shape:
                raise ValueError(f"{name} must be a bool tensor of shape {shape}; got {describe(value)}")
        changes = self.lighting_changes
        if not isinstance(changes, Tensor) or changes.dtype != torch.bool or tuple(changes.shape) != (n, t):
            raise ValueError(
                f"lighting_changes must be a bool tensor of shape ({n}, {t}); got {describe(changes)}"
            )
        count = self.num_objects
        if not isinstance(count, Tensor) or count.dtype != torch.int64 or tuple(count.shape) != (n,):
            raise ValueError(f"num_objects must be an int64 tensor of shape ({n},); got {describe(count)}")
        if not isinstance(self.sequence_ids, np.ndarray) or self.sequence_ids.shape != (n,):
            raise ValueError(
                f"sequence_ids must be a numpy array of shape ({n},); got {describe(self.sequence_ids)}"
            )
        if np.unique(self.sequence_ids).size != n:
            raise ValueError("sequence_ids must be unique: splits by sequence rely on them")

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def num_frames(self) -> int:
        """Frames per sequence."""
        return int(self.frames.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the frames."""
        return int(self.frames.shape[3]), int(self.frames.shape[4])

    def subset(self, index: Any) -> CameraSequences:
        """The sequences at ``index``.

        Parameters
        ----------
        index : ndarray, Tensor or sequence of int, or a boolean mask of shape (n_sequences,)
            Sequences to keep, in that order.

        Returns
        -------
        CameraSequences
        """
        rows = check_row_index(index, len(self))
        return CameraSequences(
            self.frames[rows],
            self.relevant[rows],
            self.distractors[rows],
            self.lighting_changes[rows],
            self.num_objects[rows],
            self.sequence_ids[rows.numpy()],
        )


def _uniform(g: torch.Generator, *shape: int, low: float = -1.0, high: float = 1.0) -> Tensor:
    return torch.rand(*shape, generator=g) * (high - low) + low


def _pixel_grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates ``(x, y)`` in pixels, each of shape (size, size)."""
    axis = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def _smooth_field(g: torch.Generator, n: int, cells: int, size: int) -> Tensor:
    """Smooth random RGB field of shape (n, 3, size, size), bicubic from a cells×cells grid."""
    coarse = torch.randn(n, 3, cells, cells, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def _boxes(g: torch.Generator, n: int, size: int, low: float, high: float) -> tuple[Tensor, Tensor]:
    """Random axis-aligned boxes: corners (n, 2) and sides (n, 2) in pixels, inside the image."""
    side = _uniform(g, n, 2, low=low, high=high) * size
    corner = torch.rand(n, 2, generator=g) * (size - side)
    return corner, side


def _inside(corner: Tensor, side: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """(n, H, W) bool: pixel centres inside each box."""
    cx, cy = corner[:, 0, None, None], corner[:, 1, None, None]
    return (x >= cx) & (x < cx + side[:, 0, None, None]) & (y >= cy) & (y < cy + side[:, 1, None, None])


def _background(g: torch.Generator, n: int, size: int) -> Tensor:
    """Static scene of shape (n, 3, size, size): colour fields, structures, ground shading."""
    x, y = _pixel_grid(size)
    base = _uniform(g, n, 3, 1, 1, low=0.25, high=0.7)
    image = base + 0.08 * _smooth_field(g, n, 3, size) + 0.03 * _smooth_field(g, n, 8, size)
    # Structures (walls, windows): flat boxes of their own colour.
    for _ in range(3):
        corner, side = _boxes(g, n, size, 0.1, 0.4)
        colour = _uniform(g, n, 3, 1, 1, low=0.1, high=0.9)
        image = torch.where(_inside(corner, side, x, y)[:, None], colour, image)
    # Ground: brighter or darker towards the bottom of the frame.
    image = image * (1 + _uniform(g, n, 1, 1, 1, low=-0.2, high=0.2) * (y / size - 0.5))
    return image


def _sway(g: torch.Generator, n: int, t: int, size: int, chance: float) -> tuple[Tensor, Tensor]:
    """Swaying texture: RGB layer (n, T, 3, S, S) and its region (n, S, S) (empty where absent).

    The texture is a sum of fine sinusoids evaluated at coordinates shifted by an
    oscillating displacement: exact sub-pixel motion, no resampling.
    """
    x, y = _pixel_grid(size)
    present = torch.rand(n, generator=g) < chance
    corner, side = _boxes(g, n, size, 0.2, 0.4)
    region = _inside(corner, side, x, y) & present[:, None, None]
    waves = 4
    frequency = _uniform(g, n, waves, low=0.5, high=1.2)  # radians per pixel: a period of 5-12 px
    direction = _uniform(g, n, waves, low=0.0, high=math.pi)
    phase = _uniform(g, n, waves, low=0.0, high=2 * math.pi)
    colour = _uniform(g, n, 3, low=0.15, high=0.55)
    amplitude = _uniform(g, n, 2, low=0.6, high=1.6)  # pixels, along x and y
    rate = _uniform(g, n, low=0.8, high=2.0)  # radians per frame
    start = _uniform(g, n, low=0.0, high=2 * math.pi)
    steps = torch.arange(t, dtype=torch.float32)
    shift = amplitude[:, None, :] * torch.sin(
        rate[:, None, None] * steps[None, :, None] + start[:, None, None]
    )
    xs = x[None, None] + shift[..., 0, None, None]  # (n, T, S, S)
    ys = y[None, None] + shift[..., 1, None, None]
    along = (
        direction.cos()[:, None, :, None, None] * xs[:, :, None]
        + direction.sin()[:, None, :, None, None] * ys[:, :, None]
    )  # (n, T, waves, S, S)
    pattern = torch.sin(frequency[:, None, :, None, None] * along + phase[:, None, :, None, None]).mean(2)
    layer = colour[:, None, :, None, None] * (1 + 0.9 * pattern[:, :, None])
    return layer, region


def _flicker(g: torch.Generator, n: int, t: int, size: int, chance: float) -> tuple[Tensor, Tensor]:
    """Flickering region: additive brightness (n, T, 1, S, S) and its region (n, S, S)."""
    x, y = _pixel_grid(size)
    present = torch.rand(n, generator=g) < chance
    corner, side = _boxes(g, n, size, 0.1, 0.3)
    region = _inside(corner, side, x, y) & present[:, None, None]
    # On/off state: toggles at each frame with a per-sequence probability.
    toggle = torch.rand(n, t, generator=g) < _uniform(g, n, 1, low=0.2, high=0.5)
    toggle[:, 0] = torch.rand(n, generator=g) < 0.5  # the state at frame 0
    on = (toggle.long().cumsum(1) % 2).float()
    strength = _uniform(g, n, low=0.15, high=0.35)
    light = (on * strength[:, None])[:, :, None, None, None] * region[:, None, None].float()
    return light, region


def _lighting(g: torch.Generator, n: int, t: int, chance: float) -> tuple[Tensor, Tensor]:
    """Global gain (n, T) — a slow drift times an optional sudden step — and the step frames (n, T)."""
    steps = torch.arange(t, dtype=torch.float32)
    drift = 1 + _uniform(g, n, 1, low=-0.1, high=0.1) * steps / max(t - 1, 1)
    stepped = torch.rand(n, generator=g) < chance
    at = torch.randint(1, max(t, 2), (n,), generator=g)
    size = _uniform(g, n, low=0.1, high=0.25) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    after = (steps[None] >= at[:, None]) & stepped[:, None]
    gain = drift * (1 + size[:, None] * after.float())
    changes = after & (steps[None] == at[:, None])
    return gain, changes


def _objects(
    g: torch.Generator, n: int, t: int, size: int, max_objects: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Relevant objects: footprints (n, K, T, S, S), RGB (n, K, T, 3, S, S) and counts (n,)."""
    k = max_objects
    count = torch.randint(0, k + 1, (n,), generator=g)
    exists = torch.arange(k)[None] < count[:, None]  # (n, K)
    x, y = _pixel_grid(size)
    # Half-axes in pixels: upright people to wide vehicles.
    upright = torch.rand(n, k, generator=g) < 0.6
    half_w = torch.where(
        upright, _uniform(g, n, k, low=0.03, high=0.06), _uniform(g, n, k, low=0.08, high=0.14)
    )
    half_h = torch.where(
        upright, _uniform(g, n, k, low=0.08, high=0.15), _uniform(g, n, k, low=0.04, high=0.07)
    )
    axes = torch.stack([half_w, half_h], -1) * size  # (n, K, 2)
    start = _uniform(g, n, k, 2, low=0.15, high=0.85) * size
    speed = _uniform(g, n, k, low=0.02, high=0.05) * size  # pixels per frame
    heading = _uniform(g, n, k, low=0.0, high=2 * math.pi)
    velocity = torch.stack([heading.cos(), heading.sin() * 0.5], -1) * speed[..., None]  # mostly sideways
    steps = torch.arange(t, dtype=torch.float32) - (t - 1) / 2  # centred: objects cross the middle
    centre = start[:, :, None] + velocity[:, :, None] * steps[None, None, :, None]  # (n, K, T, 2)
    dx = (x - centre[..., 0, None, None]) / axes[:, :, None, 0, None, None]
    dy = (y - centre[..., 1, None, None]) / axes[:, :, None, 1, None, None]
    footprint = (dx**2 + dy**2 < 1) & exists[:, :, None, None, None]  # (n, K, T, S, S)
    # Colour and stripes that move with the object: frame differencing sees its inside too.
    colour = _uniform(g, n, k, 3, low=0.05, high=0.95)
    stripes = torch.sin(_uniform(g, n, k, low=2.0, high=4.0)[:, :, None, None, None] * dy)
    rgb = colour[:, :, None, :, None, None] * (1 + 0.3 * stripes[:, :, :, None])
    return footprint, rgb, count


def _render_block(
    generators: dict[str, torch.Generator],
    n: int,
    t: int,
    size: int,
    max_objects: int,
    noise: float,
    sway: float,
    flicker: float,
    lighting: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    background = _background(generators["background"], n, size)  # (n, 3, S, S)
    sway_rgb, sway_region = _sway(generators["sway"], n, t, size, sway)
    light, flicker_region = _flicker(generators["flicker"], n, t, size, flicker)
    gain, changes = _lighting(generators["lighting"], n, t, lighting)
    footprint, object_rgb, count = _objects(generators["objects"], n, t, size, max_objects)
    frames = background[:, None].expand(n, t, 3, size, size)
    frames = torch.where(sway_region[:, None, None], sway_rgb, frames)
    frames = frames + light
    # Objects in front of everything: later objects over earlier ones.
    for i in range(max_objects):
        frames = torch.where(footprint[:, i, :, None], object_rgb[:, i], frames)
    relevant = footprint.any(dim=1) if max_objects else torch.zeros(n, t, size, size, dtype=torch.bool)
    frames = frames * gain[:, :, None, None, None]
    sigma = _uniform(generators["noise"], n, 1, 1, 1, 1, low=0.2 * noise, high=noise)
    frames = frames + torch.randn(frames.shape, generator=generators["noise"]) * sigma
    distractors = (sway_region | flicker_region)[:, None] & ~relevant
    return frames.clamp(0, 1), relevant, distractors, changes, count


def synthetic_sequences(
    num_sequences: int,
    num_frames: int = 8,
    *,
    size: int = 64,
    seed: int = 0,
    max_objects: int = 3,
    noise: float = 0.05,
    sway: float = 0.6,
    flicker: float = 0.5,
    lighting: float = 0.3,
) -> CameraSequences:
    """Fixed-camera sequences with relevant and irrelevant motion, deterministic for the arguments.

    Parameters
    ----------
    num_sequences : int
        Number of sequences (at least 1); each has its own scene.
    num_frames : int
        Frames per sequence (at least 2: motion needs two frames).
    size : int
        Height and width of the frames in pixels (at least 16).
    seed : int
        Seed of every random draw: the same arguments give the same sequences, bit for
        bit, on the CPU. Each part of the scene has its own stream, so ``max_objects``
        changes only the object pixels.
    max_objects : int
        Relevant objects per sequence are uniform in ``0..max_objects`` (at least 0).
    noise : float
        Largest standard deviation of the sensor noise; each sequence draws its own in
        ``[0.2 · noise, noise]`` (at least 0).
    sway : float
        Probability that a sequence has a swaying-texture region (in [0, 1]).
    flicker : float
        Probability that a sequence has a flickering region (in [0, 1]).
    lighting : float
        Probability that a sequence has a sudden illumination step (in [0, 1]); every
        sequence has a slow gain drift of up to ±10 %.

    Returns
    -------
    CameraSequences
        ``frames`` of shape (num_sequences, num_frames, 3, size, size) in [0, 1], the
        masks ``relevant`` and ``distractors`` of shape (num_sequences, num_frames,
        size, size), ``lighting_changes`` (num_sequences, num_frames),
        ``num_objects`` and ids ``"seq00007"``.

    Examples
    --------
    >>> data = synthetic_sequences(10, 8, size=64, seed=0)
    >>> tuple(data.frames.shape), tuple(data.relevant.shape)
    ((10, 8, 3, 64, 64), (10, 8, 64, 64))
    """
    n = check_int(num_sequences, "num_sequences", low=1)
    t = check_int(num_frames, "num_frames", low=2)
    size = check_int(size, "size", low=16)
    seed = check_int(seed, "seed", low=0)
    max_objects = check_int(max_objects, "max_objects", low=0)
    noise = check_real(noise, "noise", low=0.0)
    sway = check_real(sway, "sway", low=0.0, high=1.0)
    flicker = check_real(flicker, "flicker", low=0.0, high=1.0)
    lighting = check_real(lighting, "lighting", low=0.0, high=1.0)
    states = np.random.SeedSequence(seed).generate_state(len(_STREAMS), dtype=np.uint64)
    generators = {
        name: torch.Generator().manual_seed(int(state) >> 1)
        for name, state in zip(_STREAMS, states, strict=True)
    }
    parts = [
        _render_block(generators, min(_BLOCK, n - i), t, size, max_objects, noise, sway, flicker, lighting)
        for i in range(0, n, _BLOCK)
    ]
    frames, relevant, distractors, changes, count = (torch.cat(p) for p in zip(*parts, strict=True))
    ids = np.array([f"seq{i:05d}" for i in range(n)])
    return CameraSequences(frames.contiguous(), relevant, distractors, changes, count, ids)
