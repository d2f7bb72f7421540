"""encode_labels: any hashable labels to contiguous integer codes, and back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedkit.labels import encode_labels

FAST = settings(max_examples=50, deadline=None)


@pytest.mark.parametrize(
    "labels",
    [
        [3, 1, 3, 2],
        np.array([3, 1, 3, 2], dtype=np.uint8),
        np.array([3, 1, 3, 2], dtype=np.int16),
        torch.tensor([3, 1, 3, 2]),
        np.array([3, 1, 3, 2], dtype=object),
    ],
)
def test_integers_of_any_dtype_give_sorted_codes(labels) -> None:
    codes, classes = encode_labels(labels)
    np.testing.assert_array_equal(codes, [2, 0, 2, 1])
    np.testing.assert_array_equal(classes, [1, 2, 3])
    assert codes.dtype == np.int64


def test_strings_and_objects_round_trip() -> None:
    codes, classes = encode_labels(["bob", "alice", "bob"])
    np.testing.assert_array_equal(codes, [1, 0, 1])
    assert classes.tolist() == ["alice", "bob"]
    codes, classes = encode_labels([("cam", 2), ("cam", 1), ("cam", 2)])
    np.testing.assert_array_equal(codes, [1, 0, 1])
    assert classes.tolist() == [("cam", 1), ("cam", 2)]


def test_an_integer_and_its_string_are_different_labels() -> None:
    # numpy alone would turn [1, "1"] into two equal strings.
    codes, classes = encode_labels([1, "1", 1, "2"])
    np.testing.assert_array_equal(codes, [0, 1, 0, 2])  # unorderable: first appearance
    assert classes.tolist() == [1, "1", "2"]


@pytest.mark.parametrize(
    ("labels", "error", "pattern"),
    [
        ([0.5, 1.0], TypeError, "must hold integers; got dtype float64"),
        (["a", 1.5], TypeError, r"labels\[1\] is float 1.5"),
        (["a", True], TypeError, r"labels\[1\] is bool"),
        ([[1], "a"], TypeError, r"labels\[0\] is list, which is not a hashable label"),
        ("abc", TypeError, "must be a 1-D sequence of labels"),
        (7, TypeError, "must be a 1-D sequence of labels"),
        (np.zeros((2, 2), dtype=np.int64), ValueError, r"must be 1-D.*\(2, 2\)"),
        ([], ValueError, "is empty"),
    ],
)
def test_bad_labels_are_named(labels, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        encode_labels(labels)


def test_empty_labels_when_allowed() -> None:
    codes, classes = encode_labels([], allow_empty=True)
    assert codes.shape == (0,) and classes.shape == (0,)


@FAST
@given(
    names=st.lists(st.text(min_size=0, max_size=4), min_size=1, max_size=40),
    seed=st.integers(0, 2**16),
)
def test_codes_round_trip_and_do_not_depend_on_row_order(names: list[str], seed: int) -> None:
    codes, classes = encode_labels(names)
    assert classes[codes].tolist() == names
    assert sorted(set(codes.tolist())) == list(range(len(classes)))  # contiguous
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled_codes, shuffled_classes = encode_labels([names[i] for i in order])
    np.testing.assert_array_equal(shuffled_classes, classes)
    np.testing.assert_array_equal(shuffled_codes, codes[order])
