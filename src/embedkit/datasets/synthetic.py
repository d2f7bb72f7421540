"""Synthetic identity images: procedural "faces", generated from a seed, no download.

Each identity is a template drawn once: a face region (an ellipse of its own shape and
colour) carrying its own structure at several scales — coloured anisotropic blobs
(coarse features such as eyes or marks) and two sinusoidal gratings (a coarse and a
fine texture) — over a transparent surround. Each *image* of an identity then sees
that template through the nuisances a camera adds:

* pose: a random affine map (rotation, scale, shift, shear);
* expression: a smooth random local deformation;
* lighting: a per-image gain, colour tint and a linear shading gradient;
* a per-image background colour behind the face;
* occlusion: with some probability a rectangle of random colour hides part of the image;
* sensor noise.

So two images of one identity differ in many pixels ("same image" and "same identity"
are different things) and a network must learn the template, not the pixels: a linear
classifier on raw pixels is far from perfect (see the tests). Everything is vectorised
in torch on the CPU: thousands of 32×32 images per second.

:func:`very_low_resolution` makes the very-low-resolution (VLR) probes of case study 03
from high-resolution images: blur, downsample, noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_int, check_real, describe
from .base import IdentityImages

__all__ = ["Nuisance", "synthetic_identities", "very_low_resolution"]

# Template structure (per identity).
_BLOBS = 7
_GRATINGS = 2


@dataclass(frozen=True)
class Nuisance:
    """How much the images of one identity vary. Every field is a spread, 0 turns it off.

    Attributes
    ----------
    rotation : float
        Largest rotation, in degrees (uniform in ±rotation).
    scale : float
        Largest relative zoom (uniform in 1 ± scale).
    shift : float
        Largest shift, as a fraction of the image half-width.
    shear : float
        Largest shear factor.
    deformation : float
        Amplitude of the smooth local deformation ("expression"), in half-widths.
    gain : float
        Largest relative brightness change (uniform in 1 ± gain).
    tint : float
        Largest per-channel colour change (uniform in 1 ± tint).
    shading : float
        Largest amplitude of the linear shading gradient across the image.
    occlusion : float
        Probability that a rectangle hides part of the image.
    noise : float
        Largest standard deviation of the additive Gaussian noise (uniform in [0, noise]).
    """

    rotation: float = 20.0
    scale: float = 0.15
    shift: float = 0.15
    shear: float = 0.1
    deformation: float = 0.08
    gain: float = 0.35
    tint: float = 0.15
    shading: float = 0.4
    occlusion: float = 0.4
    noise: float = 0.05

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            check_real(value, f"nuisance.{name}", low=0.0)
        check_real(self.occlusion, "nuisance.occlusion", low=0.0, high=1.0)
        check_real(self.scale, "nuisance.scale", low=0.0, high=1.0, high_inclusive=False)


def _grid(size: int) -> Tensor:
    """Pixel-centre coordinates in [-1, 1], shape (size, size, 2) as (x, y)."""
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x, y], dim=-1)


def _uniform(g: torch.Generator, *shape: int, low: float = -1.0, high: float = 1.0) -> Tensor:
    return torch.rand(*shape, generator=g) * (high - low) + low


def _templates(num: int, size: int, g: torch.Generator) -> Tensor:
    """RGBA templates of ``num`` identities, shape (num, 4, size, size); alpha is the face mask."""
    xy = _grid(size)  # (S, S, 2)
    x, y = xy[..., 0], xy[..., 1]
    # Face region: an ellipse of the identity's own proportions, soft edge.
    axes = torch.stack([_uniform(g, num, low=0.55, high=0.75), _uniform(g, num, low=0.7, high=0.9)], 1)
    radius = (x / axes[:, 0, None, None]) ** 2 + (y / axes[:, 1, None, None]) ** 2
    alpha = torch.sigmoid((1 - radius) * 12)
    # Identities share a population look (a skin-like colour) and differ around it, so
    # that colour alone does not name them.
    skin = torch.tensor([0.72, 0.55, 0.45]) + _uniform(g, num, 3, low=-0.12, high=0.12)
    rgb = skin[:, :, None, None].expand(num, 3, size, size).clone()
    # Coarse structure: anisotropic coloured blobs inside the face.
    centre = _uniform(g, num, _BLOBS, 2, low=-0.5, high=0.5)
    sigma = _uniform(g, num, _BLOBS, 2, low=0.06, high=0.22)
    angle = _uniform(g, num, _BLOBS, low=0.0, high=math.pi)
    colour = _uniform(g, num, _BLOBS, 1, low=-0.5, high=0.3) + _uniform(
        g, num, _BLOBS, 3, low=-0.15, high=0.15
    )
    dx = x[None, None] - centre[..., 0, None, None]  # (num, B, S, S)
    dy = y[None, None] - centre[..., 1, None, None]
    cos, sin = angle.cos()[..., None, None], angle.sin()[..., None, None]
    u = (cos * dx + sin * dy) / sigma[..., 0, None, None]
    v = (-sin * dx + cos * dy) / sigma[..., 1, None, None]
    bumps = torch.exp(-0.5 * (u**2 + v**2))  # (num, B, S, S)
    rgb = rgb + torch.einsum("nbc,nbhw->nchw", colour, bumps)
    # Texture at two scales: a coarse and a fine grating, each with its own colour.
    frequency = torch.stack([_uniform(g, num, low=1.5, high=3.0), _uniform(g, num, low=4.0, high=7.0)], 1)
    direction = _uniform(g, num, _GRATINGS, low=0.0, high=math.pi)
    phase = _uniform(g, num, _GRATINGS, low=0.0, high=2 * math.pi)
    amplitude = _uniform(g, num, _GRATINGS, 3, low=-0.15, high=0.15)
    along = direction.cos()[..., None, None] * x + direction.sin()[..., None, None] * y
    waves = torch.sin(math.pi * frequency[..., None, None] * along + phase[..., None, None])
    rgb = rgb + torch.einsum("ngc,nghw->nchw", amplitude, waves)
    return torch.cat([rgb.clamp(0, 1), alpha[:, None]], dim=1)


def _render(templates: Tensor, size: int, nuisance: Nuisance, g: torch.Generator) -> Tensor:
    """One image per template row, each under its own random nuisances: (n, 3, size, size)."""
    n = templates.shape[0]
    # Pose: sampling grid = A · output coordinates + t (the inverse map of the image warp).
    angle = _uniform(g, n) * math.radians(nuisance.rotation)
    zoom = 1 + _uniform(g, n) * nuisance.scale
    shear = _uniform(g, n) * nuisance.shear
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    theta = torch.stack(
        [
            torch.stack([cos, -sin + shear, _uniform(g, n) * nuisance.shift], 1),
            torch.stack([sin, cos, _uniform(g, n) * nuisance.shift], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, [n, 4, size, size], align_corners=False)
    # Expression: a smooth displacement field, upsampled from a 4×4 grid of random offsets.
    coarse = torch.randn(n, 2, 4, 4, generator=g) * nuisance.deformation
    grid = grid + F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).permute(
        0, 2, 3, 1
    )
    warped = F.grid_sample(templates, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    rgb, alpha = warped[:, :3], warped[:, 3:]
    background = _uniform(g, n, 3, 1, 1, low=0.0, high=1.0)
    image = alpha * rgb + (1 - alpha) * background
    # Lighting: gain, colour tint and a linear shading gradient in a random direction.
    gain = 1 + _uniform(g, n, 1, 1, 1) * nuisance.gain
    tint = 1 + _uniform(g, n, 3, 1, 1) * nuisance.tint
    xy = _grid(size)
    direction = _uniform(g, n, low=0.0, high=2 * math.pi)
    ramp = direction.cos()[:, None, None] * xy[..., 0] + direction.sin()[:, None, None] * xy[..., 1]
    shading = 1 + _uniform(g, n, 1, 1) * nuisance.shading * ramp
    image = image * gain * tint * shading[:, None]
    # Occlusion: a rectangle of random colour over part of the image.
    occluded = torch.rand(n, generator=g) < nuisance.occlusion
    half = _uniform(g, n, 2, low=0.15, high=0.45)
    centre = _uniform(g, n, 2, low=-0.8, high=0.8)
    inside = ((xy[None] - centre[:, None, None]).abs() < half[:, None, None]).all(dim=-1)
    mask = (inside & occluded[:, None, None])[:, None]
    image = torch.where(mask, _uniform(g, n, 3, 1, 1, low=0.0, high=1.0), image)
    # Sensor noise.
    image = image + torch.randn(image.shape, generator=g) * _uniform(
        g, n, 1, 1, 1, low=0.0, high=nuisance.noise
    )
    return image.clamp(0, 1)


def synthetic_identities(
    num_identities: int,
    images_per_identity: int,
    *,
    size: int = 32,
    seed: int = 0,
    nuisance: Nuisance | None = None,
) -> IdentityImages:
    """Images of procedurally generated identities, deterministic for the arguments.

    Parameters
    ----------
    num_identities : int
        Number of identities (at least 2).
    images_per_identity : int
        Images of each identity (at least 1), each under its own pose, expression,
        lighting, background, occlusion and noise.
    size : int
        Height and width of the images in pixels (at least 8).
    seed : int
        Seed of every random draw: the same arguments give the same images, bit for bit,
        on the CPU.
    nuisance : Nuisance, optional
        How much the images of an identity vary (default :class:`Nuisance()`).

    Returns
    -------
    IdentityImages
        ``images`` of shape (num_identities · images_per_identity, 3, size, size) in
        [0, 1], grouped by identity; ``labels`` 0..num_identities-1; image ids
        ``"id00007/003"``; identity names ``"id00007"``. Split them without leakage with
        :func:`~embedkit.datasets.splits.split_identities` (disjoint people) and
        :func:`~embedkit.datasets.splits.split_images` (disjoint pictures).

    Examples
    --------
    >>> data = synthetic_identities(100, 10, size=32, seed=0)
    >>> data.images.shape, data.num_identities
    (torch.Size([1000, 3, 32, 32]), 100)
    """
    num = check_int(num_identities, "num_identities", low=2)
    per = check_int(images_per_identity, "images_per_identity", low=1)
    size = check_int(size, "size", low=8)
    g = torch.Generator().manual_seed(check_int(seed, "seed", low=0))
    if nuisance is None:
        nuisance = Nuisance()
    elif not isinstance(nuisance, Nuisance):
        raise TypeError(f"nuisance must be an embedkit.datasets.Nuisance; got {describe(nuisance)}")
    # Templates at twice the image size, so that warping them does not alias the fine texture.
    templates = _templates(num, 2 * size, g)
    labels = torch.arange(num).repeat_interleave(per)
    # Render in blocks: memory stays bounded for any number of images.
    block = 4096
    images = torch.cat(
        [
            _render(templates[labels[i : i + block]], size, nuisance, g)
            for i in range(0, labels.numel(), block)
        ]
    )
    names = tuple(f"id{i:05d}" for i in range(num))
    image_ids = np.array([f"{names[i]}/{j:03d}" for i in range(num) for j in range(per)])
    return IdentityImages(images, labels, image_ids, names)


def _downsampling_matrix(length: int, size: int, blur: float, like: Tensor) -> Tensor:
    """(size, length) matrix: Gaussian blur (σ = blur output pixels, edges replicated), then area means."""
    blurring = torch.eye(length, dtype=torch.float64)
    if blur > 0:
        sigma = blur * length / size  # in input pixels
        radius = max(1, math.ceil(3 * sigma))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = kernel / kernel.sum()
        source = (torch.arange(length)[:, None] + torch.arange(-radius, radius + 1)).clamp(0, length - 1)
        blurring = torch.zeros(length, length, dtype=torch.float64)
        blurring.scatter_add_(1, source, kernel.expand(length, -1).contiguous())
    # Area averaging: output pixel i covers input interval [i·L/size, (i+1)·L/size).
    edges = torch.arange(size + 1, dtype=torch.float64) * length / size
    left, right = edges[:-1, None], edges[1:, None]
    pixel = torch.arange(length, dtype=torch.float64)
    overlap = (torch.minimum(right, pixel + 1) - torch.maximum(left, pixel)).clamp_min(0)
    area = overlap / overlap.sum(dim=1, keepdim=True)
    return (area @ blurring).to(dtype=like.dtype, device=like.device)


def very_low_resolution(
    images: Tensor,
    size: int = 8,
    *,
    blur: float = 0.5,
    noise: float = 0.02,
    seed: int = 0,
) -> Tensor:
    """Degrade images to very low resolution: Gaussian blur, area downsampling, noise.

    Parameters
    ----------
    images : Tensor of shape (n, channels, height, width)
        Floating-point images in [0, 1].
    size : int
        Output height and width (at least 2, at most the input's).
    blur : float
        Standard deviation of the Gaussian blur before downsampling, in *output* pixels
        (0 for none): the default 0.5 adds the softness of optics and motion to the
        averaging of the downsampling.
    noise : float
        Standard deviation of the additive Gaussian noise after downsampling.
    seed : int
        Seed of the noise.

    Returns
    -------
    Tensor of shape (n, channels, size, size)
        Clamped to [0, 1].
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise TypeError(
            "images must be a floating-point tensor of shape (n, channels, height, width); "
            f"got {describe(images)}"
        )
    size = check_int(size, "size", low=2, high=min(images.shape[2], images.shape[3]))
    blur = check_real(blur, "blur", low=0.0)
    noise = check_real(noise, "noise", low=0.0)
    # Blur and area downsampling are both linear along each axis: one (size, height)
    # matrix per axis applies them together, as two batched matrix products.
    rows = _downsampling_matrix(images.shape[2], size, blur, images)
    cols = _downsampling_matrix(images.shape[3], size, blur, images)
    x = rows @ images @ cols.T
    if noise > 0:
        g = torch.Generator().manual_seed(check_int(seed, "seed", low=0))
        x = x + (torch.randn(x.shape, generator=g) * noise).to(x.device, x.dtype)
    return x.clamp(0, 1)
