"""Every loss stays finite, with finite gradients, in half precision and at the edges.

* under ``torch.autocast`` (bfloat16 on CPU; float16 and bfloat16 on CUDA, skipped
  without a GPU), with the embeddings produced inside the autocast region;
* for float16/bfloat16 *inputs* without autocast;
* for awkward batches: identical embeddings (complete collapse), zero vectors,
  antipodal pairs, large and tiny norms;
* margin-softmax losses at cos = ±1 (an embedding equal to a class centre or its
  negation), where ``acos``-based implementations produce NaN (pytorch-metric-learning
  #209, #530; insightface #2200, #1715).

In every case the loss is also compared with the same loss computed in float32 on
the same (rounded) embeddings: half precision may change the inputs, but not the
arithmetic done on them.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _factories import (
    DIM,
    LOSSES,
    MARGIN_SOFTMAX_LOSSES,
    class_parameter,
    is_classifier,
    make_loss,
    one_cpu_thread,
    pk_labels,
)
from embedkit.losses import TripletMarginLoss

_threads = pytest.fixture(autouse=True, scope="module")(one_cpu_thread)

NUM_CLASSES = 4
LABELS = pk_labels(NUM_CLASSES, 2)  # 8 rows: [0, 0, 1, 1, 2, 2, 3, 3]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _base(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 embeddings and labels for one awkward batch."""
    generator = torch.Generator().manual_seed(7)
    gaussian = torch.randn(len(LABELS), DIM, generator=generator)
    labels = LABELS
    if case == "random":
        x = gaussian
    elif case == "identical":
        x = torch.ones(len(LABELS), DIM)
    elif case == "identical_one_class":
        x, labels = torch.ones(len(LABELS), DIM), torch.zeros_like(LABELS)
    elif case == "zeros":
        x = torch.zeros(len(LABELS), DIM)
    elif case == "some_zero_rows":
        x = gaussian.clone()
        x[::3] = 0.0
    elif case == "antipodal":
        x = gaussian[:1].repeat(len(LABELS), 1) * torch.tensor([1.0, -1.0]).repeat(4)[:, None]
    elif case == "large":
        x = gaussian * 2000.0  # squared norms overflow float16 (max 65504)
    elif case == "tiny":
        x = gaussian * 1e-3  # squares underflow float16
    else:  # pragma: no cover
        raise AssertionError(case)
    return x, labels


CASES = [
    "random",
    "identical",
    "identical_one_class",
    "zeros",
    "some_zero_rows",
    "antipodal",
    "large",
    "tiny",
]


def _run(name: str, case: str, mode: str, device: str = "cpu") -> None:
    x, labels = _base(case)
    x, labels = x.to(device), labels.to(device)
    loss = make_loss(name, NUM_CLASSES).to(device)
    if mode.endswith("_input"):
        dtype = torch.float16 if mode == "float16_input" else torch.bfloat16
        leaf = x.to(dtype).requires_grad_(True)
        embeddings = leaf
        value = loss(embeddings, labels)
    else:
        dtype = torch.float16 if mode == "float16_autocast" else torch.bfloat16
        # A linear layer inside autocast hands the loss half-precision embeddings,
        # as a backbone would.
        leaf = x.clone().requires_grad_(True)
        layer = torch.nn.Linear(DIM, DIM, bias=False).to(device)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(DIM))
        with torch.autocast(device_type=device, dtype=dtype):
            embeddings = layer(leaf)
            assert embeddings.dtype == dtype
            value = loss(embeddings, labels)
    value.backward()

    context = f"{name} on {case!r} batch in {mode}: loss={value.item()}, stats={loss.last_stats}"
    assert value.dtype == torch.float32, context
    assert torch.isfinite(value), context
    assert torch.isfinite(leaf.grad).all(), f"non-finite gradient: {context}"
    if is_classifier(loss):
        assert torch.isfinite(class_parameter(loss).grad).all(), f"non-finite centre gradient: {context}"
    assert all(math.isfinite(v) for v in loss.last_stats.values()), context

    # The same embeddings, upcast, outside autocast: half precision changes the inputs only.
    expected = make_loss(name, NUM_CLASSES).to(device)(embeddings.detach().float(), labels)
    torch.testing.assert_close(value.detach(), expected, rtol=1e-5, atol=1e-5, msg=context)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_finite_under_cpu_bfloat16_autocast(name, case):
    _run(name, case, "bfloat16_autocast")


@pytest.mark.parametrize("mode", ["float16_input", "bfloat16_input"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_finite_for_half_precision_inputs(name, case, mode):
    _run(name, case, mode)


@requires_cuda
@pytest.mark.parametrize("mode", ["float16_autocast", "bfloat16_autocast", "float16_input"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_finite_under_cuda_autocast(name, mode):
    for case in CASES:  # each failure message names its case
        _run(name, case, mode, device="cuda")


# -- margin-softmax losses at cos = ±1 ----------------------------------------------
def _centre_batch(loss, sign: float, dtype: torch.dtype, device: str = "cpu"):
    """Embeddings equal to ``sign`` × their class centre, with class 1's centre = -class 0's."""
    weight, k = class_parameter(loss), loss.sub_centers
    with torch.no_grad():
        weight[:k] = weight[0]  # every sub-centre of class 0 is the same vector
        weight[k : 2 * k] = -weight[0]  # ... and class 1 points exactly the other way
    centres = torch.stack([weight[0], weight[k]]).detach()
    embeddings = (sign * centres).repeat(2, 1).to(device=device, dtype=dtype)
    return embeddings.requires_grad_(True), torch.tensor([0, 1, 0, 1], device=device)


@pytest.mark.parametrize(
    "mode", ["float32", "float64", "float16_input", "bfloat16_input", "bfloat16_autocast"]
)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["cos=+1", "cos=-1"])
@pytest.mark.parametrize("name", MARGIN_SOFTMAX_LOSSES)
def test_margin_softmax_finite_at_cos_plus_minus_one(name, sign, mode):
    loss = make_loss(name, NUM_CLASSES, dtype=torch.float64 if mode == "float64" else torch.float32)
    dtype = {"float64": torch.float64, "float16_input": torch.float16, "bfloat16_input": torch.bfloat16}
    embeddings, labels = _centre_batch(loss, sign, dtype.get(mode, torch.float32))
    if mode == "bfloat16_autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(embeddings, labels)
    else:
        value = loss(embeddings, labels)
    value.backward()
    cos = loss.cosine(embeddings.detach())
    assert cos.gather(1, labels[:, None]).sub(sign).abs().max() < 1e-2, "the batch is not at cos = ±1"
    assert torch.isfinite(value), f"{name} at cos={sign:+g} in {mode}: {value.item()}"
    assert torch.isfinite(embeddings.grad).all(), f"{name}: embedding gradient {embeddings.grad}"
    assert torch.isfinite(loss.weight.grad).all(), f"{name}: centre gradient {loss.weight.grad}"
    stats = loss.last_stats
    assert stats["mean_target_cosine"] == pytest.approx(sign, abs=1e-2)
    assert stats["accuracy"] == (1.0 if sign > 0 else 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["cos=+1", "cos=-1"])
def test_arcface_value_at_cos_plus_minus_one(sign, dtype):
    """Two classes with opposite centres, each embedding on (or opposite) its own centre.

    cos θ_y = +1: target logit s·cos(m), other class s·(-1).
    cos θ_y = -1: θ_y + m passes π, so the target logit is s·(-1 - m·sin m); other class s·(+1).
    """
    margin, scale = 0.5, 4.0
    loss = make_loss("arcface", 2, DIM, dtype=dtype)
    loss.margin, loss.scale = margin, scale
    with torch.no_grad():
        loss.weight[1] = -loss.weight[0]
    embeddings = (sign * loss.weight.detach()).clone().requires_grad_(True)
    value = loss(embeddings, torch.tensor([0, 1]))
    target = math.cos(margin) if sign > 0 else -1.0 - margin * math.sin(margin)
    other = -sign
    expected = F.softplus(torch.tensor(scale * (other - target), dtype=torch.float64)).item()
    # sin θ is clamped at sqrt(eps) at cos = ±1, a shift of sqrt(eps)·sin(m) in the target cosine.
    tolerance = 4 * scale * math.sqrt(torch.finfo(dtype).eps)
    assert value.item() == pytest.approx(expected, abs=tolerance)
    value.backward()
    assert torch.isfinite(embeddings.grad).all()


@pytest.mark.parametrize("name", MARGIN_SOFTMAX_LOSSES)
def test_margin_softmax_finite_with_float16_parameters(name):
    """``loss.half()`` (centres in float16) still computes cosines and logits in float32."""
    loss = make_loss(name, NUM_CLASSES, dtype=torch.float16)
    x, _ = _base("large")
    embeddings = x[:4].half().requires_grad_(True)
    value = loss(embeddings, torch.tensor([0, 1, 2, 3]))
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(loss.weight.grad).all()


@pytest.mark.parametrize("name", list(LOSSES))
def test_identical_embeddings_in_bfloat16_autocast_and_float64_agree(name):
    """Complete collapse: the bf16-autocast value equals the float64 value (both well defined)."""
    x, labels = _base("identical")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = make_loss(name, NUM_CLASSES)(x.bfloat16(), labels)
    reference = make_loss(name, NUM_CLASSES, dtype=torch.float64)(x.double(), labels)
    assert value.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-5)


# Finite float32 rows around 1e20 used to overflow |x|² (NaN loss); similarity.py now scales
# by an exact power of two first.
def test_huge_finite_embeddings_do_not_give_nan():
    x, labels = _base("random")
    loss = TripletMarginLoss(normalize=False)
    assert not torch.isnan(loss(x * 1e20, labels))
