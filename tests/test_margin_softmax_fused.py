"""The fused cosine scores of the margin-softmax heads (``embedkit.similarity._scaled_cosine``).

The heads normalise embeddings and class centres outside autograd, take the sub-centre
maximum elementwise over contiguous blocks and write the backward out; these tests hold
values and gradients to the plain autograd formulation (l2_normalize, one matmul,
``max`` over sub-centres, cross-entropy on the margin logits).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import embedkit as ek
from embedkit.similarity import _scaled_cosine, pairwise_similarity

HEADS = {
    "normalized_softmax": lambda c, d, **kw: ek.NormalizedSoftmaxLoss(c, d, **kw),
    "cosface": lambda c, d, **kw: ek.CosFaceLoss(c, d, **kw),
    "arcface": lambda c, d, **kw: ek.ArcFaceLoss(c, d, **kw),
    "subcenter_arcface": lambda c, d, **kw: ek.SubCenterArcFaceLoss(c, d, **kw),
}


def _reference_loss(loss: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss through autograd only: cosine matrix, sub-centre max, margin, cross-entropy."""
    cos = pairwise_similarity(x, loss.weight, metric="cosine")
    k = loss.sub_centers
    if k > 1:
        cos = cos.view(cos.shape[0], loss.num_classes, k).max(dim=2).values
    target = cos.gather(1, labels[:, None]).squeeze(1)
    if isinstance(loss, ek.ArcFaceLoss):
        m = loss.margin
        angle = torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7))
        changed = torch.where(target >= -math.cos(m), torch.cos(angle + m), target - m * math.sin(m))
    elif isinstance(loss, ek.CosFaceLoss):
        changed = target - loss.margin
    else:
        changed = target
    logits = cos.scatter(1, labels[:, None], changed[:, None]) * (loss.scale / loss.temperature)
    return F.cross_entropy(logits, labels)


def _close_to(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Within a few rounding units of the largest entry (float32 against a float64 truth)."""
    eps = torch.finfo(dtype).eps
    atol = 16 * eps * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got.double(), expected.double(), rtol=16 * eps, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("batch", [6, 40])  # scale on the embeddings (6 <= classes), then on the centres
def test_value_and_gradients_match_the_autograd_formulation(name, batch, dtype):
    torch.manual_seed(0)
    loss = HEADS[name](12, 16, temperature=1.5).to(dtype)
    x = torch.randn(batch, 16, dtype=dtype)
    x[1] = 0.0  # a zero embedding: cosine 0, zero gradient
    labels = torch.randint(0, 12, (batch,))
    # The reference runs in float64 on the same values: the truth both should be near.
    reference = loss.__class__(12, 16, temperature=1.5, **_sub(loss)).double()
    reference.weight.data.copy_(loss.weight.data)

    ours_x = x.clone().requires_grad_()
    value = loss(ours_x, labels)
    value.backward()
    ref_x = x.double().requires_grad_()
    expected = _reference_loss(reference, ref_x, labels)
    expected.backward()

    _close_to(value, expected, dtype)
    _close_to(ours_x.grad, ref_x.grad, dtype)
    _close_to(loss.weight.grad, reference.weight.grad, dtype)
    assert torch.equal(ours_x.grad[1], torch.zeros(16, dtype=dtype))


def _sub(loss: torch.nn.Module) -> dict[str, int]:
    return {"sub_centers": loss.sub_centers} if isinstance(loss, ek.ArcFaceLoss) else {}


@pytest.mark.parametrize("group", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaled_cosine_matches_pairwise_similarity(group, dtype):
    torch.manual_seed(1)
    x = torch.randn(9, 8, dtype=dtype, requires_grad=True)
    y = torch.randn(4 * group, 8, dtype=dtype)
    y[2] = 0.0  # a zero row
    y.requires_grad_()
    grad = torch.randn(9, 4, dtype=dtype)

    (gx, gy) = torch.autograd.grad(_scaled_cosine(x, y, x_scale=3.0, y_scale=0.5, group=group), (x, y), grad)
    cos = pairwise_similarity(x, y, metric="cosine") * 1.5
    expected = cos.view(9, 4, group).max(dim=2).values
    (ex, ey) = torch.autograd.grad(expected, (x, y), grad)

    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}
    torch.testing.assert_close(_scaled_cosine(x, y, x_scale=3.0, y_scale=0.5, group=group), expected, **tol)
    torch.testing.assert_close(gx, ex, **tol)
    torch.testing.assert_close(gy, ey, **tol)
    assert torch.equal(gy[2], torch.zeros(8, dtype=dtype))


def test_a_tie_between_sub_centres_sends_the_gradient_to_the_first():
    loss = ek.SubCenterArcFaceLoss(3, 4, sub_centers=3)
    with torch.no_grad():
        loss.weight.copy_(torch.randn(3, 1, 4).expand(3, 3, 4).reshape(9, 4))  # three equal sub-centres
    x = torch.randn(5, 4)
    loss(x, torch.tensor([0, 1, 2, 0, 1])).backward()
    grad = loss.weight.grad.view(3, 3, 4)
    assert grad[:, 0].abs().sum() > 0
    assert torch.equal(grad[:, 1:], torch.zeros(3, 2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_finite_rows_do_not_overflow(dtype):
    big = 1e30 if dtype == torch.float32 else 1e200
    torch.manual_seed(2)
    x = torch.randn(4, 8, dtype=dtype)
    y = torch.randn(6, 8, dtype=dtype)
    scores = _scaled_cosine(x * big, y * big, group=2)
    torch.testing.assert_close(scores, _scaled_cosine(x, y, group=2))


def test_no_gradient_is_computed_for_inputs_that_do_not_need_one():
    loss = ek.ArcFaceLoss(10, 8)
    loss.weight.requires_grad_(False)
    x = torch.randn(6, 8, requires_grad=True)
    loss(x, torch.randint(0, 10, (6,))).backward()
    assert x.grad is not None and loss.weight.grad is None


def test_logits_under_cpu_autocast_are_float32_and_equal():
    torch.manual_seed(3)
    loss = ek.SubCenterArcFaceLoss(7, 16)
    x = torch.randn(5, 16)
    expected = loss.logits(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss.logits(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_last_logits_are_the_margin_free_logits(name):
    torch.manual_seed(4)
    loss = HEADS[name](11, 8)
    x, labels = torch.randn(7, 8), torch.randint(0, 11, (7,))
    loss(x, labels)
    torch.testing.assert_close(loss.last_logits, loss.logits(x))
    scale = loss.scale / loss.temperature
    cos = pairwise_similarity(x, loss.weight, metric="cosine")
    if loss.sub_centers > 1:
        cos = cos.view(7, 11, loss.sub_centers).amax(dim=2)
    torch.testing.assert_close(loss.last_logits, scale * cos)
