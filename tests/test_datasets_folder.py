"""load_image_folder: layout, order, ids, pixels, resizing, min_images and every error it names."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from embedkit.datasets.folder import load_image_folder  # noqa: E402
from embedkit.datasets.splits import split_images  # noqa: E402

BILINEAR = getattr(Image, "Resampling", Image).BILINEAR

RED = (255, 0, 0)
GREY = 128
BLUE_RGBA = (0, 0, 255, 10)


def _noise(height: int, width: int, seed: int) -> Any:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)  # (h, w, 3) uint8: RGB


@pytest.fixture
def faces(tmp_path: Path) -> Path:
    """3 identities with 3, 2 and 4 images of different sizes and modes, plus things to ignore."""
    root = tmp_path / "faces"
    alice, bob, carol = root / "alice", root / "bob", root / "carol"
    for folder in (alice, bob, carol, alice / "nested", root / ".cache"):
        folder.mkdir(parents=True)
    Image.new("RGB", (40, 30), RED).save(alice / "a1.png")
    Image.new("L", (20, 20), GREY).save(alice / "a2.png")  # grayscale
    _noise(17, 23, seed=1).save(alice / "a3.PNG")  # upper-case suffix still counts
    (alice / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8), RED).save(alice / ".hidden.png")  # hidden: ignored
    Image.new("RGB", (8, 8), RED).save(alice / "nested" / "deep.png")  # nested: ignored
    Image.new("RGBA", (10, 50), BLUE_RGBA).save(bob / "b1.png")  # alpha is dropped
    Image.new("RGB", (64, 48), (0, 255, 0)).save(bob / "b2.jpg", quality=95)
    for k in range(4):
        _noise(12 + 5 * k, 30 - 4 * k, seed=10 + k).save(carol / f"c{k + 1}.png")
    Image.new("RGB", (8, 8), RED).save(root / ".cache" / "x.png")  # hidden identity folder
    Image.new("RGB", (8, 8), RED).save(root / "loose.png")  # directly in root: ignored
    return root


def _reference(path: Path, height: int, width: int) -> torch.Tensor:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB").resize((width, height), resample=BILINEAR))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


def test_shapes_dtype_range(faces: Path) -> None:
    data = load_image_folder(faces)
    assert data.images.shape == (9, 3, 32, 32)
    assert data.images.dtype == torch.float32
    assert data.images.is_contiguous()
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    assert data.labels.dtype == torch.int64 and data.labels.shape == (9,)
    assert data.image_ids.shape == (9,) and data.image_ids.dtype.kind == "U"
    assert data.image_size == (32, 32)
    assert data.num_identities == 3


def test_labels_names_and_ids_in_sorted_order(faces: Path) -> None:
    data = load_image_folder(str(faces))  # a str root works as well as a Path
    assert data.identity_names == ("alice", "bob", "carol")
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert data.image_ids.tolist() == [
        "alice/a1.png",
        "alice/a2.png",
        "alice/a3.PNG",
        "bob/b1.png",
        "bob/b2.jpg",
        "carol/c1.png",
        "carol/c2.png",
        "carol/c3.png",
        "carol/c4.png",
    ]
    assert len(set(data.image_ids.tolist())) == len(data)


def test_pixels_modes_and_resize_match_pillow(faces: Path) -> None:
    data = load_image_folder(faces, size=(6, 10))
    assert data.images.shape == (9, 3, 6, 10)
    ids = data.image_ids.tolist()
    red = data.images[ids.index("alice/a1.png")]
    assert torch.allclose(red, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 6, 10))
    grey = data.images[ids.index("alice/a2.png")]
    assert torch.allclose(grey, torch.full((3, 6, 10), GREY / 255))  # one channel replicated to three
    blue = data.images[ids.index("bob/b1.png")]
    assert torch.allclose(blue, torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 6, 10))
    green = data.images[ids.index("bob/b2.jpg")]
    assert torch.allclose(green, torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 6, 10), atol=0.03)
    for name in ("alice/a3.PNG", "carol/c1.png", "carol/c4.png"):  # textured: bilinear as Pillow does it
        expected = _reference(faces / name, 6, 10)
        assert torch.allclose(data.images[ids.index(name)], expected, atol=1e-6), name


def test_square_int_size(faces: Path) -> None:
    data = load_image_folder(faces, size=8)
    assert data.images.shape == (9, 3, 8, 8)
    assert data.image_size == (8, 8)


def test_extensions_are_matched_case_insensitively(faces: Path) -> None:
    data = load_image_folder(faces, extensions=("PNG",))  # no dot and upper case still mean ".png"
    assert "bob/b2.jpg" not in data.image_ids.tolist()
    assert "alice/a3.PNG" in data.image_ids.tolist()
    assert len(data) == 8
    single = load_image_folder(faces, extensions=".png")  # one string is one extension
    assert single.image_ids.tolist() == data.image_ids.tolist()


def test_min_images_drops_identities_with_a_warning(faces: Path) -> None:
    with pytest.warns(UserWarning, match=r"dropped 1 of 3 identities .*min_images=3.*'bob'"):
        data = load_image_folder(faces, min_images=3)
    assert data.identity_names == ("alice", "carol")
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert not any(i.startswith("bob/") for i in data.image_ids.tolist())


def test_no_warning_when_nothing_is_dropped(faces: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image_folder(faces, min_images=2)


def test_min_images_leaving_one_identity_is_an_error(faces: Path) -> None:
    with (
        pytest.warns(UserWarning, match="dropped 2 of 3"),
        pytest.raises(ValueError, match=r"only one identity \('carol'\).*min_images=4.*at least two"),
    ):
        load_image_folder(faces, min_images=4)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="holds no identity with at least"):
        load_image_folder(faces, min_images=5)


def test_empty_identity_folder_is_dropped(faces: Path) -> None:
    (faces / "dave").mkdir()
    (faces / "dave" / "readme.txt").write_text("no pictures")
    with pytest.warns(UserWarning, match="'dave'"):
        data = load_image_folder(faces)
    assert data.identity_names == ("alice", "bob", "carol")


def test_progress_bar_with_and_without_tqdm(faces: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with_bar = load_image_folder(faces, size=4, progress=True)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    without = load_image_folder(faces, size=4, progress=True)
    assert torch.equal(with_bar.images, without.images)


def test_result_splits_without_leakage(faces: Path) -> None:
    data = load_image_folder(faces, size=4)
    train, probe = split_images(data.labels, [1, None], seed=0)
    a, b = data.subset(train), data.subset(probe)
    assert set(a.image_ids.tolist()).isdisjoint(b.image_ids.tolist())
    assert a.labels.tolist() == [0, 1, 2]


# --------------------------------------------------------------------------- errors


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist"):
        load_image_folder(missing)


def test_file_as_root(tmp_path: Path) -> None:
    file = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(file)
    with pytest.raises(NotADirectoryError, match=r"photo\.png.*not a directory"):
        load_image_folder(file)


def test_empty_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no identity folders"):
        load_image_folder(tmp_path)


def test_images_directly_in_root(tmp_path: Path) -> None:
    for k in range(3):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{k}.png")
    with pytest.raises(ValueError, match=r"no identity folders.*3 image file.*directly"):
        load_image_folder(tmp_path)


def test_folders_without_images(tmp_path: Path) -> None:
    for name in ("alice", "bob"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("text")
        (tmp_path / name / "nested").mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / name / "nested" / "deep.png")
    with pytest.raises(ValueError, match=r"2 identity folder\(s\) but no image files.*\.jpg.*\.png.*\.webp"):
        load_image_folder(tmp_path)


def test_one_identity(tmp_path: Path) -> None:
    (tmp_path / "alice").mkdir()
    for k in range(3):
        Image.new("RGB", (4, 4)).save(tmp_path / "alice" / f"{k}.png")
    with pytest.raises(
        ValueError, match=r"only one identity \('alice'\).*metric learning needs at least two"
    ):
        load_image_folder(tmp_path)


def test_corrupt_file_is_named(faces: Path) -> None:
    (faces / "bob" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"broken\.png.*identity 'bob'") as info:
        load_image_folder(faces)
    assert info.value.__cause__ is not None  # Pillow's own exception is chained


def test_truncated_file_is_named(faces: Path) -> None:
    whole = (faces / "carol" / "c1.png").read_bytes()
    (faces / "carol" / "c0.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"c0\.png") as info:
        load_image_folder(faces)
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize(
    ("size", "error", "match"),
    [
        (0, ValueError, "size must lie"),
        (-3, ValueError, "size must lie"),
        ((32, 0), ValueError, r"size\[1\] \(width\)"),
        ((0, 32), ValueError, r"size\[0\] \(height\)"),
        ((32,), TypeError, "size must be a positive int or a pair.*length 1"),
        ((1, 2, 3), TypeError, "size must be a positive int or a pair"),
        ("32", TypeError, "size must be a positive int or a pair"),
        (3.5, TypeError, "size must be a positive int or a pair"),
        (True, TypeError, "size must be a positive int or a pair"),
        ((32.0, 32), TypeError, r"size\[0\] \(height\) must be an integer"),
    ],
)
def test_bad_size(faces: Path, size: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        load_image_folder(faces, size=size)  # type: ignore[arg-type]


def test_bad_arguments(faces: Path) -> None:
    with pytest.raises(ValueError, match="min_images"):
        load_image_folder(faces, min_images=0)
    with pytest.raises(TypeError, match="min_images"):
        load_image_folder(faces, min_images=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="extensions is empty"):
        load_image_folder(faces, extensions=())
    with pytest.raises(TypeError, match=r"extensions\[1\]"):
        load_image_folder(faces, extensions=(".png", 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"extensions\[0\]"):
        load_image_folder(faces, extensions=("",))
    with pytest.raises(TypeError, match="progress"):
        load_image_folder(faces, progress=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="root must be a path"):
        load_image_folder(3)  # type: ignore[arg-type]


def test_without_pillow(faces: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"pip install embedkit\[datasets\].*pip install pillow"):
        load_image_folder(faces)
