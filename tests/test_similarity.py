"""embedkit.similarity against plain definitions, and its numerical promises.

* cosine, dot, euclidean and squared euclidean equal explicit loops / ``torch.cdist``
  in float64;
* duplicates and ``x == y`` give a distance of exactly 0 with a finite (zero) gradient;
* zero vectors have cosine 0 to everything and never produce NaN;
* float16/bfloat16 inputs and autocast regions are computed in float32.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from _factories import one_cpu_thread
from embedkit.similarity import (
    METRICS,
    l2_normalize,
    pairwise_distance,
    pairwise_similarity,
    working_dtype,
)

_threads = pytest.fixture(autouse=True, scope="module")(one_cpu_thread)


def _gaussian(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _loop(x: torch.Tensor, y: torch.Tensor, pair) -> torch.Tensor:
    """An N×M matrix filled one entry at a time from a function of two vectors."""
    return torch.tensor([[pair(a, b) for b in y] for a in x], dtype=torch.float64)


def _cosine(a, b):
    na, nb = math.sqrt(float((a * a).sum())), math.sqrt(float((b * b).sum()))
    return 0.0 if na == 0 or nb == 0 else float((a * b).sum()) / (na * nb)


# == against the definitions ===============================================================
@pytest.mark.parametrize("same", [False, True], ids=["x-vs-y", "x-vs-itself"])
def test_metrics_match_their_definitions_in_float64(same):
    x = _gaussian(7, 5, 0) * 3
    y = x if same else _gaussian(4, 5, 1)
    other = None if same else y
    cdist = torch.cdist(x, y)

    torch.testing.assert_close(pairwise_similarity(x, other, metric="cosine"), _loop(x, y, _cosine))
    torch.testing.assert_close(
        pairwise_similarity(x, other, metric="dot"), _loop(x, y, lambda a, b: float((a * b).sum()))
    )
    torch.testing.assert_close(pairwise_distance(x, other, metric="euclidean"), cdist, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        pairwise_distance(x, other, metric="squared_euclidean"), cdist**2, rtol=1e-12, atol=1e-12
    )
    # Similarities are higher-is-closer versions of the distances and vice versa.
    torch.testing.assert_close(
        pairwise_similarity(x, other, metric="euclidean"), -cdist, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        pairwise_similarity(x, other, metric="squared_euclidean"), -(cdist**2), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(pairwise_distance(x, other, metric="cosine"), 1 - _loop(x, y, _cosine))
    torch.testing.assert_close(pairwise_distance(x, other, metric="dot"), -(x @ y.T))


def test_normalized_euclidean_is_the_chord_of_the_cosine():
    x, y = _gaussian(6, 4, 2) * 10, _gaussian(5, 4, 3) / 10
    unit = lambda v: v / v.norm(dim=1, keepdim=True)  # noqa: E731
    expected = torch.cdist(unit(x), unit(y))
    torch.testing.assert_close(pairwise_distance(x, y, normalize=True), expected, rtol=1e-12, atol=1e-12)
    chord = (2 - 2 * pairwise_similarity(x, y)).clamp_min(0).sqrt()
    torch.testing.assert_close(pairwise_distance(x, y, normalize=True), chord, rtol=1e-9, atol=1e-9)


def test_default_is_cosine_similarity_and_euclidean_distance():
    x, y = _gaussian(3, 4, 4), _gaussian(2, 4, 5)
    assert torch.equal(pairwise_similarity(x, y), pairwise_similarity(x, y, metric="cosine"))
    assert torch.equal(pairwise_distance(x, y), pairwise_distance(x, y, metric="euclidean"))


@settings(max_examples=30, deadline=None)
@given(
    x=hnp.arrays(float, st.tuples(st.integers(1, 6), st.just(3)), elements=st.floats(-100, 100)),
    y=hnp.arrays(float, st.tuples(st.integers(1, 6), st.just(3)), elements=st.floats(-100, 100)),
)
def test_random_inputs_match_cdist_and_stay_bounded(x, y):
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    cos = pairwise_similarity(x, y)
    assert torch.isfinite(cos).all() and (cos.abs() <= 1 + 1e-12).all()
    torch.testing.assert_close(cos, pairwise_similarity(y, x).T)
    d = pairwise_distance(x, y)
    assert (d >= 0).all()
    cosine_distance = pairwise_distance(x, y, metric="cosine")
    assert ((cosine_distance >= 0) & (cosine_distance <= 2)).all()
    scale = 1 + x.norm(dim=1)[:, None] + y.norm(dim=1)[None, :]
    # The |x|²+|y|²-2x·y expansion is accurate to ~sqrt(eps)·(|x|+|y|) in absolute terms.
    assert ((d - torch.cdist(x, y)).abs() <= 1e-7 * scale).all()


# == duplicates and x == y =================================================================
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean"])
def test_duplicates_are_at_exactly_zero_distance_with_zero_gradient(metric, norm, dtype):
    base = _gaussian(4, 16, 6, dtype) * norm
    x = torch.cat([base, base[:2]]).requires_grad_(True)  # rows 4, 5 duplicate rows 0, 1
    d = pairwise_distance(x, metric=metric)
    assert torch.equal(d.diagonal(), torch.zeros(6, dtype=dtype))
    assert d[0, 4] == 0 and d[4, 0] == 0 and d[1, 5] == 0
    assert (d[0, 1:4] > 0).all()
    # The gradient of the zero entries alone is zero, not NaN/inf from sqrt at 0.
    zero_entries = d.diagonal().sum() + d[0, 4] + d[1, 5]
    (grad,) = torch.autograd.grad(zero_entries, x, retain_graph=True)
    assert torch.equal(grad, torch.zeros_like(grad))
    d.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean"])
def test_x_equal_to_y_has_zero_distance_and_finite_gradients_for_both(metric):
    y = _gaussian(5, 8, 7, torch.float32).requires_grad_(True)
    x = y.detach().clone().requires_grad_(True)
    d = pairwise_distance(x, y, metric=metric)
    assert torch.equal(d.diagonal(), torch.zeros(5))
    d.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


@pytest.mark.parametrize("metric", METRICS)
def test_normalized_duplicates_and_parallel_rows_are_at_zero_distance(metric):
    """With normalize=True, rows pointing the same way (any positive scale) coincide."""
    x = _gaussian(3, 8, 8, torch.float32)
    scaled = torch.cat([x, 2.5 * x, 1e-3 * x])
    d = pairwise_distance(scaled, normalize=True)
    assert d[0, 3] == 0 and d[0, 6] == 0 and d[3, 6] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_distance_of_duplicates_is_never_negative(dtype):
    """Rounding puts cos(x, x) a few ulp above 1; the distance 1 - cos is clamped to [0, 2].

    (Found by hypothesis: this row gave a cosine distance of -2.2e-16 in float64.)
    """
    row = torch.tensor([[1.0] + [0.25] * 7], dtype=dtype)
    x = torch.cat([row, row, -row])
    d = pairwise_distance(x, metric="cosine")
    assert (d >= 0).all() and (d <= 2).all()
    assert d[0, 1].item() == pytest.approx(0.0, abs=1e-6) and d[0, 2].item() == pytest.approx(2.0, abs=1e-6)


# == zero vectors ===========================================================================
def test_zero_vectors_have_cosine_zero_and_no_nan():
    x = _gaussian(4, 6, 9, torch.float32)
    x[1] = 0.0
    x = x.requires_grad_(True)
    cos = pairwise_similarity(x)
    assert torch.isfinite(cos).all()
    assert torch.equal(cos[1], torch.zeros(4)) and torch.equal(cos[:, 1], torch.zeros(4))
    torch.testing.assert_close(cos.diagonal()[[0, 2, 3]], torch.ones(3))
    cos.sum().backward()
    assert torch.isfinite(x.grad).all()
    # The zero row's direction is undefined: it gets no gradient (not ~1/eps).
    assert torch.equal(x.grad[1], torch.zeros(6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_zero_vector_gradient_stays_finite_in_half_precision(dtype):
    """A zero row once got a gradient of ~1e12 (F.normalize divides by eps): inf in float16."""
    x = torch.zeros(3, 4, dtype=dtype, requires_grad=True)
    centres = _gaussian(2, 4, 10, torch.float32)
    pairwise_similarity(x, centres).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_all_zero_inputs_give_zero_cosine_and_distance():
    zeros = torch.zeros(3, 5)
    assert torch.equal(pairwise_similarity(zeros), torch.zeros(3, 3))
    assert torch.equal(pairwise_distance(zeros), torch.zeros(3, 3))
    assert torch.equal(pairwise_distance(zeros, normalize=True), torch.zeros(3, 3))
    assert torch.equal(pairwise_distance(zeros, metric="cosine"), torch.ones(3, 3))


def test_l2_normalize_gives_unit_rows_and_keeps_zero_rows_zero():
    x = _gaussian(5, 7, 11)
    x[2] = 0.0
    x[3] *= 1e-9 / x[3].norm()  # small, but above the 1e-12 cut-off: still a direction
    x[4] *= 1e-13 / x[4].norm()  # below it: treated as zero, as the module documents
    x.requires_grad_(True)
    unit = l2_normalize(x)
    torch.testing.assert_close(unit[:4].norm(dim=1), torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64))
    assert torch.equal(unit[4], torch.zeros(7, dtype=torch.float64))
    torch.testing.assert_close(unit[[0, 1, 3]], x[[0, 1, 3]] / x[[0, 1, 3]].norm(dim=1, keepdim=True))
    unit.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[[2, 4]], torch.zeros(2, 7, dtype=torch.float64))


# == precision ==============================================================================
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
def test_half_precision_inputs_are_computed_in_float32(metric, dtype):
    x = (_gaussian(6, 32, 12, torch.float32) * 100).to(dtype)  # squared norms overflow float16
    y = (_gaussian(5, 32, 13, torch.float32) * 100).to(dtype)
    result = pairwise_similarity(x, y, metric=metric)
    assert result.dtype == torch.float32
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result, pairwise_similarity(x.float(), y.float(), metric=metric))
    distance = pairwise_distance(x, y, metric=metric)
    assert distance.dtype == torch.float32
    torch.testing.assert_close(distance, pairwise_distance(x.float(), y.float(), metric=metric))


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (torch.float16, torch.float16, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float16, torch.float64, torch.float64),
        (torch.float32, torch.float64, torch.float64),
        (torch.float64, torch.float64, torch.float64),
    ],
)
def test_result_dtype_is_the_working_dtype(a, b, expected):
    x, y = torch.randn(2, 3).to(a), torch.randn(4, 3).to(b)
    assert pairwise_similarity(x, y).dtype == expected
    assert pairwise_distance(x, y).dtype == expected
    assert working_dtype(torch.promote_types(a, b)) == expected


@pytest.mark.parametrize("metric", METRICS)
def test_cpu_bfloat16_autocast_computes_in_float32(metric):
    x, y = _gaussian(16, 64, 14, torch.float32), _gaussian(9, 64, 15, torch.float32)
    expected = pairwise_similarity(x, y, metric=metric)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = pairwise_similarity(x, y, metric=metric)
        distance = pairwise_distance(x, y, metric=metric)
    assert result.dtype == torch.float32 and distance.dtype == torch.float32
    # bf16 matmuls would be off by ~1e-2; float32 ones agree to rounding.
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(distance, pairwise_distance(x, y, metric=metric), rtol=1e-6, atol=1e-6)
    # Autocast is switched off only inside the call.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pairwise_similarity(x, y)
        assert (x @ y.T).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
def test_cuda_autocast_computes_in_float32(metric, dtype):
    x, y = _gaussian(16, 64, 14, torch.float32).cuda(), _gaussian(9, 64, 15, torch.float32).cuda()
    expected = pairwise_similarity(x, y, metric=metric)
    with torch.autocast("cuda", dtype=dtype):
        result = pairwise_similarity(x, y, metric=metric)
    assert result.dtype == torch.float32
    # TF32 may be enabled for float32 matmuls on the device; allow for it.
    torch.testing.assert_close(result, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cosine_of_half_precision_rows_stays_within_one(dtype):
    x = (_gaussian(32, 128, 16, torch.float32) * 50).to(dtype)
    x = torch.cat([x, x, -x])
    cos = pairwise_similarity(x)
    assert (cos.abs() <= 1 + 4 * torch.finfo(torch.float32).eps).all()


def test_near_duplicates_are_resolved_in_float64():
    """The exact-zero rule only absorbs cancellation noise: close, distinct rows keep their distance."""
    x = torch.tensor([[1.0, 0.0], [1.0, 1e-6]], dtype=torch.float64)
    assert pairwise_distance(x)[0, 1].item() == pytest.approx(1e-6, rel=1e-3)


@pytest.mark.xfail(
    strict=True,
    reason="known limit: in float32 the exact-zero rule (squared <= 8·eps·(|x|²+|y|²)) reports distances "
    "below ~1.4e-3·|x| as exactly 0 with zero gradient; torch.cdist resolves them",
)
def test_near_duplicates_are_resolved_in_float32():
    x = torch.tensor([[1.0, 0.0], [1.0, 1e-3]])
    assert pairwise_distance(x)[0, 1].item() == pytest.approx(1e-3, rel=0.1)


# Finite float32 rows with |x| above ~1.8e19 overflow |x|² unless scaled first (they did
# before the exact power-of-two scaling): zero rows after normalising, inf - inf = NaN distances.


def test_huge_finite_rows_normalise_to_unit_rows():
    x = _gaussian(4, 8, 17, torch.float32) * 1e20
    torch.testing.assert_close(l2_normalize(x).norm(dim=1), torch.ones(4))


def test_huge_finite_rows_give_no_nan_distance():
    x = _gaussian(4, 8, 17, torch.float32) * 1e20
    assert not torch.isnan(pairwise_distance(x)).any()


def test_huge_and_tiny_rows_give_scaled_distances():
    """Scaling by a power of two is exact, so the distance scales exactly with the input."""
    x = _gaussian(6, 8, 3, torch.float32)
    y = _gaussian(5, 8, 4, torch.float32)
    for factor in (2.0**70, 2.0**-70):
        torch.testing.assert_close(
            pairwise_distance(x * factor, y * factor), pairwise_distance(x, y) * factor
        )
    # Rows below a norm of 1e-12 are zero by definition, so only huge rows here.
    torch.testing.assert_close(l2_normalize(x * 2.0**70), l2_normalize(x))


# == errors =================================================================================
@pytest.mark.parametrize("function", [pairwise_similarity, pairwise_distance])
def test_bad_inputs_are_rejected_with_clear_messages(function):
    x = torch.randn(3, 4)
    with pytest.raises(
        ValueError,
        match=r"metric must be one of 'cosine', 'dot', 'euclidean', "
        r"'squared_euclidean'; got 'manhattan'",
    ):
        function(x, metric="manhattan")
    with pytest.raises(ValueError, match=r"x must be 2-D.*got shape \(4,\)"):
        function(x[0])
    with pytest.raises(ValueError, match=r"y must be 2-D.*got shape \(2, 3, 4\)"):
        function(x, torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"x has embedding_dim 4 but y has 5"):
        function(x, torch.randn(2, 5))
    with pytest.raises(TypeError, match=r"x must have a floating-point dtype.*got torch\.int64"):
        function(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"y must be a torch\.Tensor.*got list"):
        function(x, [[1.0, 2.0, 3.0, 4.0]])
    with pytest.raises(ValueError, match=r"x is an empty batch"):
        function(torch.empty(0, 4))


# == the fused euclidean distance's hand-written backward ===================================
@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("same", [False, True], ids=["x-vs-y", "x-vs-itself"])
def test_euclidean_backward_passes_gradcheck(metric, normalize, same):
    x = (_gaussian(6, 3, 4) * 3).requires_grad_()
    y = _gaussian(5, 3, 5).requires_grad_()
    weights = _gaussian(6, 6 if same else 5, 6)  # a non-uniform upstream gradient

    def distances(*inputs):
        other = None if same else inputs[1]
        return pairwise_distance(inputs[0], other, metric=metric, normalize=normalize) * weights

    assert torch.autograd.gradcheck(distances, (x,) if same else (x, y))


def test_euclidean_backward_of_huge_rows_matches_the_scaled_problem():
    # Rows near 1e20 are divided by a power of two before squaring; the gradient must be
    # the one of the unscaled distance (it is scale-free: (x - y) / d).
    x, y = _gaussian(5, 3, 7), _gaussian(4, 3, 8)
    big_x, big_y = (x * 2.0**66).requires_grad_(), (y * 2.0**66).requires_grad_()
    small_x, small_y = x.clone().requires_grad_(), y.clone().requires_grad_()
    pairwise_distance(big_x, big_y).sum().backward()
    pairwise_distance(small_x, small_y).sum().backward()
    torch.testing.assert_close(big_x.grad, small_x.grad)
    torch.testing.assert_close(big_y.grad, small_y.grad)
