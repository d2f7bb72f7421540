"""Synthetic identity images and the very-low-resolution degradation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from embedkit.datasets import Nuisance, split_images, synthetic_identities, very_low_resolution


@pytest.fixture(scope="module")
def faces():
    return synthetic_identities(30, 16, size=16, seed=3)


def test_shapes_labels_ids(faces) -> None:
    assert faces.images.shape == (480, 3, 16, 16)
    assert faces.images.dtype == torch.float32
    assert 0 <= float(faces.images.min()) and float(faces.images.max()) <= 1
    assert torch.equal(faces.labels, torch.arange(30).repeat_interleave(16))
    assert faces.identity_names[7] == "id00007"
    assert faces.image_ids[7 * 16 + 3] == "id00007/003"
    assert len(set(faces.image_ids.tolist())) == 480
    assert faces.num_identities == 30 and faces.image_size == (16, 16)


def test_deterministic_for_a_seed_and_different_across_seeds(faces) -> None:
    again = synthetic_identities(30, 16, size=16, seed=3)
    assert torch.equal(faces.images, again.images)
    other = synthetic_identities(30, 16, size=16, seed=4)
    assert not torch.allclose(faces.images, other.images)


def test_images_of_one_identity_differ(faces) -> None:
    # "Same image" and "same identity" are different things: no two images are alike.
    x = faces.images.flatten(1)
    distance = torch.cdist(x, x)
    distance.fill_diagonal_(float("inf"))
    assert float(distance.min()) > 1.0


def test_nuisance_off_gives_identical_images_per_identity() -> None:
    still = Nuisance(**{name: 0.0 for name in vars(Nuisance())})
    data = synthetic_identities(3, 4, size=16, seed=0, nuisance=still)
    first = data.images[data.labels == 1]
    # Only the background colour differs; the face pixels (alpha ~ 1 near the centre) agree.
    centre = first[:, :, 6:10, 6:10]
    assert torch.allclose(centre, centre[:1].expand_as(centre), atol=1e-3)


def test_identity_is_learnable_but_not_from_pixels_alone() -> None:
    """A linear classifier on raw pixels is well above chance but far from perfect."""
    data = synthetic_identities(20, 20, size=16, seed=1)
    train, test = split_images(data.labels, (14, None), seed=0)
    x, y = data.images.flatten(1).numpy(), data.labels.numpy()
    accuracy = LogisticRegression(max_iter=3000).fit(x[train], y[train]).score(x[test], y[test])
    assert 0.2 < accuracy < 0.85, accuracy  # chance is 0.05


def test_thousands_of_images_per_call() -> None:
    data = synthetic_identities(600, 10, size=32, seed=0)  # rendered in blocks, bounded memory
    assert data.images.shape == (6000, 3, 32, 32)
    assert torch.isfinite(data.images).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_identities": 1}, ValueError, "num_identities"),
        ({"images_per_identity": 0}, ValueError, "images_per_identity"),
        ({"size": 4}, ValueError, "size"),
        ({"seed": -1}, ValueError, "seed"),
        ({"nuisance": {"rotation": 5}}, TypeError, "nuisance"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    arguments = {"num_identities": 3, "images_per_identity": 2, **kwargs}
    with pytest.raises(error, match=match):
        synthetic_identities(**arguments)


def test_bad_nuisance() -> None:
    with pytest.raises(ValueError, match=r"nuisance\.occlusion"):
        Nuisance(occlusion=1.5)
    with pytest.raises(ValueError, match=r"nuisance\.rotation"):
        Nuisance(rotation=-1.0)


# ------------------------------------------------------------------------ very_low_resolution


def test_vlr_without_blur_or_noise_is_area_downsampling() -> None:
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = very_low_resolution(x, 8, blur=0.0, noise=0.0)
    assert torch.allclose(out, F.interpolate(x, size=(8, 8), mode="area"), atol=1e-6)


def test_vlr_blur_keeps_the_mean_and_removes_detail() -> None:
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sharp = very_low_resolution(x, 8, blur=0.0, noise=0.0)
    soft = very_low_resolution(x, 8, blur=1.0, noise=0.0)
    assert torch.allclose(soft.mean(dim=(2, 3)), sharp.mean(dim=(2, 3)), atol=0.02)
    assert float(soft.std(dim=(2, 3)).mean()) < float(sharp.std(dim=(2, 3)).mean())
    constant = torch.full((1, 3, 32, 32), 0.3)
    flat = very_low_resolution(constant, 8, blur=1.0, noise=0.0)
    assert torch.allclose(flat, torch.full((1, 3, 8, 8), 0.3))


def test_vlr_noise_is_seeded_and_clamped() -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    a, b = very_low_resolution(x, 4, seed=5), very_low_resolution(x, 4, seed=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, very_low_resolution(x, 4, seed=6))
    assert a.shape == (3, 3, 4, 4) and 0 <= float(a.min()) and float(a.max()) <= 1


def test_vlr_non_divisible_size_averages_areas_exactly() -> None:
    x = torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3) / 10
    out = very_low_resolution(x, 2, blur=0.0, noise=0.0)
    # Output pixel (0, 0) covers rows and columns [0, 1.5): weights 1, 0.5 on each axis.
    w = np.array([1.0, 0.5, 0.0]) / 1.5
    expected = w @ (x[0, 0].numpy()) @ w
    assert out[0, 0, 0, 0].item() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("images", "size", "error", "match"),
    [
        (np.zeros((1, 3, 8, 8)), 4, TypeError, "images"),
        (torch.zeros(3, 8, 8), 4, TypeError, "images"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.int64), 4, TypeError, "images"),
        (torch.zeros(1, 3, 8, 8), 16, ValueError, "size"),
        (torch.zeros(1, 3, 8, 8), 1, ValueError, "size"),
    ],
)
def test_vlr_bad_input(images, size, error, match) -> None:
    with pytest.raises(error, match=match):
        very_low_resolution(images, size)
