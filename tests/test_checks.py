"""embedkit._checks, the validation every public entry point calls first.

Each check either returns its (converted) input or raises a ``TypeError``/``ValueError``
whose message names the argument, shows what was seen and says what was expected.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _factories import one_cpu_thread
from embedkit._checks import (
    as_label_array,
    check_bool,
    check_choice,
    check_class_labels,
    check_embeddings,
    check_int,
    check_labels,
    check_matching_dim,
    check_real,
)

_threads = pytest.fixture(autouse=True, scope="module")(one_cpu_thread)


# == check_embeddings ========================================================================
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_check_embeddings_returns_valid_input_unchanged(dtype):
    x = torch.randn(3, 2).to(dtype)
    assert check_embeddings(x) is x


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (
            [[1.0, 2.0]],
            TypeError,
            r"queries must be a torch\.Tensor of shape \(batch_size, embedding_dim\); got list",
        ),
        (
            np.ones((2, 3)),
            TypeError,
            r"queries must be a torch\.Tensor.*an array of shape \(2, 3\) and dtype float64",
        ),
        (3.5, TypeError, r"queries must be a torch\.Tensor.*got float 3\.5"),
        (None, TypeError, r"queries must be a torch\.Tensor.*got NoneType None"),
        (
            torch.ones(3),
            ValueError,
            r"queries must be 2-D, of shape \(batch_size, embedding_dim\); got shape \(3,\)",
        ),
        (torch.tensor(1.0), ValueError, r"queries must be 2-D.*got shape \(\)"),
        (torch.ones(2, 3, 4), ValueError, r"got shape \(2, 3, 4\)"),
        (
            torch.ones(2, 3, dtype=torch.int32),
            TypeError,
            r"queries must have a floating-point dtype \(float16, bfloat16, float32 or float64\); "
            r"got torch\.int32",
        ),
        (torch.ones(2, 3, dtype=torch.complex64), TypeError, r"floating-point dtype.*got torch\.complex64"),
        (
            torch.empty(0, 3),
            ValueError,
            r"queries is an empty batch \(shape \(0, 3\)\); expected at least one row",
        ),
        (torch.empty(2, 0), ValueError, r"queries has embedding_dim 0 \(shape \(2, 0\)\)"),
    ],
)
def test_check_embeddings_messages(value, error, message):
    with pytest.raises(error, match=message):
        check_embeddings(value, "queries")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_check_embeddings_counts_non_finite_values(bad, dtype):
    x = torch.zeros(4, 5, dtype=dtype)
    x[1, 2] = bad
    x[3, 0] = bad
    with pytest.raises(
        ValueError, match=r"gallery contains 2 non-finite value\(s\) \(NaN or inf\) out of 20"
    ):
        check_embeddings(x, "gallery")
    assert check_embeddings(x, "gallery", check_finite=False) is x


def test_check_embeddings_defaults_to_the_name_embeddings():
    with pytest.raises(ValueError, match=r"^embeddings must be 2-D"):
        check_embeddings(torch.ones(3))


# == check_labels ==============================================================================
@pytest.mark.parametrize(
    "labels",
    [
        pytest.param(torch.tensor([3, 1, 3]), id="int64-tensor"),
        pytest.param(torch.tensor([3, 1, 3], dtype=torch.int32), id="int32-tensor"),
        pytest.param(torch.tensor([3, 1, 3], dtype=torch.uint8), id="uint8-tensor"),
        pytest.param(np.array([3, 1, 3]), id="numpy"),
        pytest.param(np.array([3, 1, 3], dtype=np.uint16), id="numpy-uint16"),
        pytest.param([3, 1, 3], id="list"),
        pytest.param((3, 1, 3), id="tuple"),
    ],
)
def test_check_labels_converts_any_integer_labels_to_int64(labels):
    checked = check_labels(labels, 3)
    assert isinstance(checked, torch.Tensor)
    assert checked.dtype == torch.int64, "losses index with labels: cross_entropy/gather/one_hot need int64"
    assert checked.tolist() == [3, 1, 3]


def test_check_labels_keeps_large_identity_ids_exact():
    ids = [2**40 + 1, 2**40, 2**62]
    assert check_labels(ids, 3).tolist() == ids
    assert check_labels(np.array(ids, dtype=np.int64), 3).tolist() == ids


def test_check_labels_moves_to_the_device():
    checked = check_labels([0, 1], 2, device=torch.device("cpu"))
    assert checked.device == torch.device("cpu")


@pytest.mark.parametrize(
    ("labels", "error", "message"),
    [
        (
            torch.tensor([0.0, 1.0]),
            TypeError,
            r"ids must have an integer dtype \(e\.g\. torch\.int64\); got torch\.float32\. "
            r"Floating labels are not rounded",
        ),
        (torch.tensor([True, False]), TypeError, r"ids must have an integer dtype.*got torch\.bool"),
        (
            np.array([0.5, 1.0]),
            TypeError,
            r"ids must hold integers; got an array of shape \(2,\) and dtype float64",
        ),
        (np.array([True, False]), TypeError, r"ids must hold integers.*dtype bool"),
        ([0, 1.5], TypeError, r"ids must hold integers"),
        (["a", "b"], TypeError, r"ids must hold integers.*dtype <U1"),
        ("ab", TypeError, r"ids must be a 1-D integer tensor, array or sequence; got str 'ab'"),
        (b"ab", TypeError, r"ids must be a 1-D integer tensor"),
        (None, TypeError, r"got NoneType None"),
        (7, TypeError, r"ids must be a 1-D integer tensor, array or sequence; got int 7"),
        (torch.tensor([[0, 1]]), ValueError, r"ids must be 1-D, of shape \(2,\); got shape \(1, 2\)"),
        (torch.tensor(1), ValueError, r"ids must be 1-D.*got shape \(\)"),
        ([0, 1, 2], ValueError, r"ids has 3 entries but images has 2 rows; expected one label per embedding"),
    ],
)
def test_check_labels_messages(labels, error, message):
    with pytest.raises(error, match=message):
        check_labels(labels, 2, "ids", rows_name="images")


# == check_class_labels =========================================================================
def test_check_class_labels_accepts_the_full_range():
    labels = torch.tensor([0, 4, 2])
    assert check_class_labels(labels, 5) is labels
    empty = torch.empty(0, dtype=torch.long)
    assert check_class_labels(empty, 5) is empty


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, 5, 2], r"targets must lie in \[0, num_classes\) = \[0, 5\); found 5 \(labels span \[0, 5\]\)"),
        ([-1, 2], r"found -1 \(labels span \[-1, 2\]\)\. Map identities to 0\.\.num_classes-1 first"),
        ([-3, 9], r"found -3"),
    ],
)
def test_check_class_labels_messages(labels, message):
    with pytest.raises(ValueError, match=message):
        check_class_labels(torch.tensor(labels), 5, "targets")


# == check_matching_dim ============================================================================
def test_check_matching_dim():
    check_matching_dim(torch.ones(2, 3), torch.ones(5, 3), "a", "b")
    with pytest.raises(ValueError, match=r"queries has embedding_dim 3 but gallery has 4; expected the same"):
        check_matching_dim(torch.ones(2, 3), torch.ones(2, 4), "queries", "gallery")


# == check_real / check_int / check_choice =======================================================
@pytest.mark.parametrize("value", [0.5, 1, np.float32(0.5), np.int64(1), np.float64(0.25)])
def test_check_real_accepts_real_numbers_and_returns_a_float(value):
    result = check_real(value, "margin")
    assert type(result) is float and result == float(value)


@pytest.mark.parametrize(
    ("value", "kwargs", "error", "message"),
    [
        (True, {}, TypeError, r"margin must be a real number; got bool True"),
        ("0.5", {}, TypeError, r"margin must be a real number; got str '0\.5'"),
        (None, {}, TypeError, r"margin must be a real number; got NoneType None"),
        (
            torch.tensor(0.5),
            {},
            TypeError,
            r"margin must be a real number; got a tensor of shape \(\) and dtype torch\.float32",
        ),
        (1 + 2j, {}, TypeError, r"margin must be a real number; got complex"),
        (float("nan"), {}, ValueError, r"margin must be finite; got nan"),
        (float("inf"), {}, ValueError, r"margin must be finite; got inf"),
        (-0.1, {"low": 0.0}, ValueError, r"margin must lie in \[0, inf\); got -0\.1"),
        (0.0, {"low": 0.0, "low_inclusive": False}, ValueError, r"margin must lie in \(0, inf\); got 0"),
        (2.0, {"high": 1.0}, ValueError, r"margin must lie in \(-inf, 1\]; got 2"),
        (
            1.0,
            {"low": 0.0, "high": 1.0, "high_inclusive": False},
            ValueError,
            r"margin must lie in \[0, 1\); got 1",
        ),
    ],
)
def test_check_real_messages(value, kwargs, error, message):
    with pytest.raises(error, match=message):
        check_real(value, "margin", **kwargs)


def test_check_real_bounds_are_inclusive_by_default():
    assert check_real(0.0, "x", low=0.0, high=1.0) == 0.0
    assert check_real(1.0, "x", low=0.0, high=1.0) == 1.0


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3)])
def test_check_int_accepts_integers_and_returns_an_int(value):
    result = check_int(value, "k", low=1, high=3)
    assert type(result) is int and result == 3


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (True, TypeError, r"k must be an integer; got bool True"),
        (2.0, TypeError, r"k must be an integer; got float 2\.0"),
        ("2", TypeError, r"k must be an integer; got str '2'"),
        (0, ValueError, r"k must lie in \[1, 10\]; got 0"),
        (11, ValueError, r"k must lie in \[1, 10\]; got 11"),
    ],
)
def test_check_int_messages(value, error, message):
    with pytest.raises(error, match=message):
        check_int(value, "k", low=1, high=10)


def test_check_int_open_bounds():
    assert check_int(-5, "k") == -5
    with pytest.raises(ValueError, match=r"k must lie in \(-inf, 3\]; got 4"):
        check_int(4, "k", high=3)


def test_check_bool():
    assert check_bool(True, "flag") is True
    assert check_bool(np.bool_(False), "flag") is False
    for value, seen in ((1, "int 1"), ("yes", "str 'yes'"), (None, "None")):
        with pytest.raises(TypeError, match=rf"flag must be True or False; got {seen}"):
            check_bool(value, "flag")


def test_check_choice():
    assert check_choice("cosine", "metric", ("cosine", "dot")) == "cosine"
    with pytest.raises(ValueError, match=r"metric must be one of 'cosine', 'dot'; got 'l1'"):
        check_choice("l1", "metric", ("cosine", "dot"))
    with pytest.raises(ValueError, match=r"metric must be one of 'cosine', 'dot'; got None"):
        check_choice(None, "metric", ("cosine", "dot"))
    with pytest.raises(ValueError, match=r"got 'COSINE'"):
        check_choice("COSINE", "metric", ("cosine", "dot"))


# == as_label_array =================================================================================
@pytest.mark.parametrize(
    "labels",
    [
        pytest.param([2, 0, 2], id="list"),
        pytest.param(np.array([2, 0, 2], dtype=np.int32), id="numpy-int32"),
        pytest.param(np.array([2, 0, 2], dtype=np.uint64), id="numpy-uint64"),
        pytest.param(torch.tensor([2, 0, 2]), id="tensor"),
        pytest.param(torch.tensor([2, 0, 2], dtype=torch.uint8), id="tensor-uint8"),
    ],
)
def test_as_label_array_returns_int64_numpy(labels):
    array = as_label_array(labels)
    assert isinstance(array, np.ndarray) and array.dtype == np.int64
    assert array.tolist() == [2, 0, 2]


def test_as_label_array_keeps_large_ids_exact():
    ids = [2**53 + 1, 2**53]
    assert as_label_array(ids).tolist() == ids
    assert as_label_array(torch.tensor(ids)).tolist() == ids


def test_as_label_array_empty():
    assert as_label_array([], allow_empty=True).shape == (0,)
    assert as_label_array([], allow_empty=True).dtype == np.int64
    with pytest.raises(ValueError, match=r"query_labels is empty; expected at least one label"):
        as_label_array([], "query_labels")


@pytest.mark.parametrize(
    ("labels", "error", "message"),
    [
        (torch.tensor([0.0, 1.0]), TypeError, r"query_labels must have an integer dtype; got torch\.float32"),
        (torch.tensor([True]), TypeError, r"got torch\.bool"),
        (
            np.array([0.5]),
            TypeError,
            r"query_labels must hold integers; got dtype float64\. Floating labels are not rounded",
        ),
        ([1.0, 2.0], TypeError, r"must hold integers; got dtype float64"),
        ("abc", TypeError, r"query_labels must be a 1-D integer array, tensor or sequence; got str 'abc'"),
        (5, TypeError, r"got int 5"),
        (
            np.ones((2, 2), dtype=int),
            ValueError,
            r"query_labels must be 1-D, of shape \(n_samples,\); got shape "
            r"\(2, 2\)",
        ),
        (np.array([2**63], dtype=np.uint64), ValueError, r"query_labels holds values above 2\*\*63 - 1"),
    ],
)
def test_as_label_array_messages(labels, error, message):
    with pytest.raises(error, match=message):
        as_label_array(labels, "query_labels")
