"""Leak-free splits (split_identities, split_images) and IdentityImages.subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedkit.datasets.base import IdentityImages
from embedkit.datasets.splits import split_identities, split_images


def labels_10() -> np.ndarray:
    """10 identities with non-contiguous ids, 2..11 images each, shuffled."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10) * 7 + 3, np.arange(2, 12))
    return rng.permutation(labels)


def identities_of(labels: np.ndarray, rows: np.ndarray) -> set[int]:
    return set(np.unique(labels[rows]).tolist())


def check_sorted_int64(parts: tuple[np.ndarray, ...]) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert (np.diff(part) > 0).all()


# --------------------------------------------------------------------------- split_identities


def test_split_identities_disjoint_and_covering_with_rest() -> None:
    labels = labels_10()
    a, b = split_identities(labels, [3, None], seed=1)
    check_sorted_int64((a, b))
    assert len(identities_of(labels, a)) == 3
    assert len(identities_of(labels, b)) == 7
    assert identities_of(labels, a).isdisjoint(identities_of(labels, b))
    assert np.array_equal(np.sort(np.concatenate([a, b])), np.arange(labels.size))
    for part in (a, b):  # every image of a chosen identity goes with it
        for identity in identities_of(labels, part):
            assert set(np.flatnonzero(labels == identity).tolist()) <= set(part.tolist())


def test_split_identities_without_rest_leaves_identities_out() -> None:
    labels = labels_10()
    parts = split_identities(labels, [2, 3, 0], seed=0)
    assert [len(identities_of(labels, p)) for p in parts] == [2, 3, 0]
    assert parts[2].size == 0
    seen = [identities_of(labels, p) for p in parts[:2]]
    assert seen[0].isdisjoint(seen[1])
    assert sum(p.size for p in parts) < labels.size


def test_split_identities_rest_may_come_first() -> None:
    labels = labels_10()
    rest, four = split_identities(labels, [None, 4], seed=2)
    assert len(identities_of(labels, four)) == 4 and len(identities_of(labels, rest)) == 6


def test_split_identities_is_deterministic_per_seed() -> None:
    labels = labels_10()
    first = split_identities(labels, [4, None], seed=5)
    again = split_identities(labels, [4, None], seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    draws = {tuple(split_identities(labels, [4, None], seed=s)[0].tolist()) for s in range(8)}
    assert len(draws) > 1  # other seeds draw other identities


def test_split_identities_accepts_strings_and_tensors() -> None:
    names = np.array(["ann", "bo", "ann", "cy", "bo", "dee", "cy"])
    a, b = split_identities(names, [2, None], seed=0)
    assert set(names[a].tolist()).isdisjoint(names[b].tolist())
    assert len(set(names[a].tolist())) == 2
    assert len(set(names[b].tolist())) == 2
    from_list = split_identities(names.tolist(), [2, None], seed=0)
    assert all(np.array_equal(x, y) for x, y in zip((a, b), from_list, strict=True))
    ints = torch.tensor([5, 5, 9, 9, 1])
    c, d = split_identities(ints, [1, None], seed=0)
    assert np.array_equal(np.sort(np.concatenate([c, d])), np.arange(5))


def test_split_identities_errors() -> None:
    labels = labels_10()
    with pytest.raises(ValueError, match="ask for 11 identities but labels hold only 10"):
        split_identities(labels, [5, 6])
    with pytest.raises(ValueError, match="at most one None"):
        split_identities(labels, [None, None])
    with pytest.raises(TypeError, match="sizes must be a sequence"):
        split_identities(labels, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sizes must be a sequence"):
        split_identities(labels, [])
    with pytest.raises(TypeError, match=r"sizes\[1\] must be an integer"):
        split_identities(labels, [1, 2.5])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"sizes\[0\] must lie"):
        split_identities(labels, [-1, None])
    with pytest.raises(TypeError, match="labels must hold integers"):
        split_identities(np.array([0.0, 1.0]), [1, None])
    with pytest.raises(ValueError, match="labels must be 1-D"):
        split_identities(np.zeros((2, 2), dtype=int), [1, None])
    with pytest.raises(TypeError, match="seed must be an integer"):
        split_identities(labels, [1, None], seed=0.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- split_images


def test_split_images_exact_counts_and_rest() -> None:
    labels = labels_10()
    train, gallery, probe = split_images(labels, [1, 1, None], seed=3)
    check_sorted_int64((train, gallery, probe))
    identities, counts = np.unique(labels, return_counts=True)
    for part, expected in (
        (train, np.ones_like(counts)),
        (gallery, np.ones_like(counts)),
        (probe, counts - 2),
    ):
        seen = np.array([(labels[part] == i).sum() for i in identities])
        assert np.array_equal(seen, expected)
    assert not (set(train.tolist()) & set(gallery.tolist()) | set(train.tolist()) & set(probe.tolist()))
    assert set(gallery.tolist()).isdisjoint(probe.tolist())
    assert np.array_equal(np.sort(np.concatenate([train, gallery, probe])), np.arange(labels.size))


def test_split_images_without_rest_leaves_images_out() -> None:
    labels = labels_10()
    a, b = split_images(labels, [2, 0], seed=0)
    assert a.size == 2 * 10 and b.size == 0
    assert identities_of(labels, a) == set(np.unique(labels).tolist())


def test_split_images_is_deterministic_per_seed() -> None:
    labels = labels_10()
    first = split_images(labels, [1, None], seed=11)
    again = split_images(labels, [1, None], seed=11)
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    other = split_images(labels, [1, None], seed=12)
    assert not np.array_equal(first[0], other[0])


def test_split_images_string_labels() -> None:
    names = ["ann", "bo", "ann", "bo", "ann", "cy", "cy"]
    a, b = split_images(names, [1, None], seed=0)
    assert sorted(np.asarray(names)[a].tolist()) == ["ann", "bo", "cy"]
    assert sorted(np.asarray(names)[b].tolist()) == ["ann", "ann", "bo", "cy"]


def test_split_images_names_identities_with_too_few_images() -> None:
    with pytest.raises(
        ValueError, match=r"needs 2 images of every identity, but 1 identities have fewer: 'bo' \(1\)"
    ):
        split_images(["ann", "ann", "bo", "cy", "cy"], [1, 1])
    with pytest.raises(ValueError, match=r"fewer: 4 \(1\)$"):  # plain ids, not np.int64(4)
        split_images([3, 3, 4], [2])
    many = np.repeat(np.arange(8), [1] * 7 + [3])
    with pytest.raises(ValueError, match=r"7 identities have fewer: 0 \(1\), 1 \(1\), .*, \.\.\.$"):
        split_images(many, [2, None])


def test_split_images_errors() -> None:
    with pytest.raises(ValueError, match="at most one None"):
        split_images([0, 0, 1, 1], [None, None])
    with pytest.raises(TypeError, match="per_identity must be a sequence"):
        split_images([0, 0, 1, 1], "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"per_identity\[0\] must be an integer"):
        split_images([0, 0, 1, 1], [True, None])
    with pytest.raises(ValueError, match="labels is empty"):
        split_images([], [1])
    with pytest.raises(TypeError, match="labels must"):
        split_images(torch.tensor([0.5, 1.5]), [1])


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(-3, 4), min_size=1, max_size=40),
    data=st.data(),
)
def test_split_images_property(labels: list[int], data: st.DataObject) -> None:
    values = np.asarray(labels)
    identities, counts = np.unique(values, return_counts=True)
    smallest = int(counts.min())
    fixed = data.draw(
        st.lists(st.integers(0, smallest), min_size=0, max_size=3).filter(lambda s: sum(s) <= smallest)
    )
    with_rest = data.draw(st.booleans()) or not fixed
    sizes: list[int | None] = list(fixed)
    if with_rest:
        sizes.insert(data.draw(st.integers(0, len(fixed))), None)
    seed = data.draw(st.integers(0, 2**32 - 1))

    parts = split_images(values, sizes, seed=seed)

    assert len(parts) == len(sizes)
    check_sorted_int64(parts)
    rows = np.concatenate(parts)
    assert np.unique(rows).size == rows.size  # disjoint
    for part, size in zip(parts, sizes, strict=True):
        per_identity = np.array([(values[part] == i).sum() for i in identities])
        expected = counts - sum(fixed) if size is None else np.full_like(counts, size)
        assert np.array_equal(per_identity, expected)
    if with_rest:
        assert np.array_equal(np.sort(rows), np.arange(values.size))
    assert all(
        np.array_equal(x, y) for x, y in zip(parts, split_images(values, sizes, seed=seed), strict=True)
    )


# --------------------------------------------------------------------------- IdentityImages.subset


def small() -> IdentityImages:
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 2, 2) / 10
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    ids = np.array([f"{n}/{k}.png" for n in "abc" for k in range(2)])
    return IdentityImages(images.contiguous(), labels, ids, ("a", "b", "c"))


def test_subset_keeps_order_and_names() -> None:
    data = small()
    part = data.subset([5, 0, 3])
    assert part.labels.tolist() == [2, 0, 1]
    assert part.image_ids.tolist() == ["c/1.png", "a/0.png", "b/1.png"]
    assert torch.equal(part.images, data.images[[5, 0, 3]])
    assert part.identity_names == data.identity_names
    assert len(data) == 6  # the original is untouched


def test_subset_relabel_gives_consecutive_labels_and_their_names() -> None:
    data = small()
    part = data.subset(np.array([4, 2, 5, 3]), relabel=True)
    assert part.labels.tolist() == [1, 0, 1, 0]
    assert part.identity_names == ("b", "c")
    assert part.num_identities == 2
    assert [part.identity_names[i] for i in part.labels.tolist()] == [s[0] for s in part.image_ids.tolist()]


def test_subset_boolean_masks() -> None:
    data = small()
    mask = np.array([True, False, False, True, True, False])
    for index in (mask, torch.from_numpy(mask), mask.tolist()):
        part = data.subset(index, relabel=True)
        assert part.image_ids.tolist() == ["a/0.png", "b/1.png", "c/0.png"]
        assert part.labels.tolist() == [0, 1, 2]
        assert part.identity_names == ("a", "b", "c")
    with pytest.raises(ValueError, match=r"boolean index must have shape \(6,\)"):
        data.subset(mask[:4])


def test_subset_with_split_indices_and_tensor_index() -> None:
    data = small()
    a, b = split_identities(data.labels, [1, None], seed=0)
    left, right = data.subset(a, relabel=True), data.subset(torch.from_numpy(b), relabel=True)
    assert left.labels.tolist() == [0, 0] and right.labels.tolist() == [0, 0, 1, 1]
    assert set(left.identity_names).isdisjoint(right.identity_names)
    assert len(left.identity_names) + len(right.identity_names) == 3


def test_subset_errors_and_empty() -> None:
    data = small()
    with pytest.raises(TypeError, match="index must be 1-D integers or a boolean mask"):
        data.subset([0.5, 1.0])
    with pytest.raises(TypeError, match="index must be 1-D integers or a boolean mask"):
        data.subset(np.zeros((2, 2), dtype=np.int64))
    empty = data.subset([], relabel=True)
    assert len(empty) == 0 and empty.identity_names == ()


def test_identity_images_validation() -> None:
    data = small()
    with pytest.raises(ValueError, match="images must be a tensor of shape"):
        IdentityImages(data.images[:, :1], data.labels, data.image_ids, data.identity_names)
    with pytest.raises(ValueError, match="labels must be an int64 tensor"):
        IdentityImages(data.images, data.labels.int(), data.image_ids, data.identity_names)
    with pytest.raises(ValueError, match="image_ids must have shape"):
        IdentityImages(data.images, data.labels, data.image_ids[:3], data.identity_names)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        IdentityImages(data.images, data.labels, data.image_ids, ("a", "b"))
