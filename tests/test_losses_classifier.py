"""Classifier losses (margin-softmax heads, Proxy-Anchor): reductions, kept logits, compile.

The fused cross-entropy of the margin-softmax losses is checked here against the plain
definition, written as in the papers (normalise, take cosines, change the target, scale,
``F.cross_entropy``), per row; tests/test_losses_reference.py ties the mean to
pytorch-metric-learning.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F

import embedkit as ek
from _loss_helpers import assert_close, one_thread  # noqa: F401 (an autouse fixture)

MARGIN_SOFTMAX = {
    "normalized_softmax": lambda c, d, **kw: ek.NormalizedSoftmaxLoss(c, d, **kw),
    "cosface": lambda c, d, **kw: ek.CosFaceLoss(c, d, **kw),
    "arcface": lambda c, d, **kw: ek.ArcFaceLoss(c, d, **kw),
    "arcface-large-margin": lambda c, d, **kw: ek.ArcFaceLoss(c, d, margin=1.2, scale=16.0, **kw),
    "subcenter_arcface": lambda c, d, **kw: ek.SubCenterArcFaceLoss(c, d, **kw),
}
NUM_CLASSES, DIM = 7, 5


def _batch(
    n: int = 24, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=g, dtype=dtype), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _head(name: str, dtype: torch.dtype = torch.float64, **kwargs) -> ek.losses.margin_softmax.ArcFaceLoss:
    loss = MARGIN_SOFTMAX[name](NUM_CLASSES, DIM, **kwargs).to(dtype)
    with torch.no_grad():
        loss.weight.copy_(torch.randn(loss.weight.shape, generator=torch.Generator().manual_seed(1)))
    return loss


def reference_rows(
    loss, embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Per-row cross-entropy as the papers write it: cosines, margin on the target, scale, softmax."""
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).T
    if loss.sub_centers > 1:
        cos = cos.view(len(embeddings), loss.num_classes, loss.sub_centers).max(dim=2).values
    target = cos.gather(1, labels[:, None]).squeeze(1)
    if isinstance(loss, ek.ArcFaceLoss):
        theta = torch.acos(target)
        changed = torch.where(
            theta <= math.pi - loss.margin,
            torch.cos(theta + loss.margin),
            target - loss.margin * math.sin(loss.margin),
        )
    elif isinstance(loss, ek.CosFaceLoss):
        changed = target - loss.margin
    else:
        changed = target
    one_hot = F.one_hot(labels, loss.num_classes).bool()
    logits = torch.where(one_hot, changed[:, None], cos) * (loss.scale / loss.temperature)
    return F.cross_entropy(logits, labels, reduction="none")


# -- reduction ------------------------------------------------------------------------


@pytest.mark.parametrize("name", MARGIN_SOFTMAX)
def test_reduction_none_is_the_per_row_cross_entropy(name: str) -> None:
    x, y = _batch()
    loss = _head(name, reduction="none")
    rows = loss(x, y)
    assert rows.shape == (len(y),)
    assert_close(rows, reference_rows(loss, x, y, loss.weight).detach(), f"{name} per-row values")
    assert loss.last_value == pytest.approx(float(rows.detach().mean()))


@pytest.mark.parametrize("name", MARGIN_SOFTMAX)
def test_reduction_sum_and_mean_agree_with_none(name: str) -> None:
    x, y = _batch()
    rows = _head(name, reduction="none")(x, y).detach()
    total = _head(name, reduction="sum")(x, y).detach()
    mean = _head(name, reduction="mean")(x, y).detach()
    assert_close(total, rows.sum(), "sum == sum of none")
    assert_close(mean, rows.mean(), "mean == mean of none")
    assert_close(mean, _head(name)(x, y).detach(), "mean is the default")


@pytest.mark.parametrize("name", MARGIN_SOFTMAX)
def test_weighted_per_row_values_have_the_hand_weighted_gradient(name: str) -> None:
    x, y = _batch(seed=3)
    w = torch.rand(len(y), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    loss = _head(name, reduction="none")
    ours_x = x.clone().requires_grad_(True)
    (loss(ours_x, y) * w).sum().backward()
    ref_x = x.clone().requires_grad_(True)
    ref_w = loss.weight.detach().clone().requires_grad_(True)
    (reference_rows(loss, ref_x, y, ref_w) * w).sum().backward()
    assert_close(ours_x.grad, ref_x.grad, f"{name} gradient w.r.t. embeddings")
    assert_close(loss.weight.grad, ref_w.grad, f"{name} gradient w.r.t. class centres")


def test_reduction_is_checked_on_assignment() -> None:
    loss = ek.ArcFaceLoss(3, 4)
    loss.reduction = "sum"
    assert loss(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])).dim() == 0
    with pytest.raises(ValueError, match="reduction"):
        loss.reduction = "average"
    assert "reduction='sum'" in repr(loss)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_proxy_anchor_refuses_per_sample_reductions(reduction: str) -> None:
    with pytest.raises(ValueError, match="per proxy"):
        ek.ProxyAnchorLoss(5, 4, reduction=reduction)
    loss = ek.ProxyAnchorLoss(5, 4)
    with pytest.raises(ValueError, match="per proxy"):
        loss.reduction = reduction
    assert loss.reduction == "mean"
    with pytest.raises(ValueError, match="reduction"):
        loss.reduction = "average"


# -- the fused cross-entropy ------------------------------------------------------------


@pytest.mark.parametrize("name", ["cosface", "arcface", "subcenter_arcface"])
def test_saturated_scale_64_head_in_float32_equals_the_float64_definition(name: str) -> None:
    # Embeddings near their centres at scale 64: most softmax terms are below e^-87, where
    # exp gives subnormals. Terms below eps**4 are read as eps**4; nothing visible changes.
    loss = _head(name, dtype=torch.float32)
    y = torch.arange(NUM_CLASSES).repeat(4)
    g = torch.Generator().manual_seed(5)
    centres = loss.weight.detach()[y * loss.sub_centers]
    x = centres + 0.05 * torch.randn(centres.shape, generator=g)
    xo = x.clone().requires_grad_(True)
    value = loss(xo, y)
    value.backward()
    x64 = x.double().requires_grad_(True)
    w64 = loss.weight.detach().double().requires_grad_(True)
    expected = reference_rows(loss, x64, y, w64).mean()
    expected.backward()
    logits = loss.last_logits
    assert logits is not None
    assert (logits - logits.amax(dim=1, keepdim=True) < -87.4).any(), "no term in the subnormal range"
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xo.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_accuracy_counts_ties_as_misses() -> None:
    # Zero embeddings give every class the same logit: no class is predicted, nothing scores.
    loss = ek.ArcFaceLoss(4, 3)
    loss(torch.zeros(6, 3), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert loss.last_stats["accuracy"] == 0.0
    assert loss.last_stats["accuracy_hits"] == 0.0


def test_a_second_backward_through_the_same_graph_raises() -> None:
    # backward forms the gradient in place in the saved exponentials: it runs once.
    for loss in (ek.ArcFaceLoss(4, 3), ek.ProxyAnchorLoss(4, 3)):
        value = loss(torch.randn(6, 3, requires_grad=True), torch.tensor([0, 1, 2, 3, 0, 1]))
        value.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            value.backward()


# -- kept logits -----------------------------------------------------------------------


@pytest.mark.parametrize("name", MARGIN_SOFTMAX)
def test_last_logits_are_the_margin_free_logits_of_the_last_call(name: str) -> None:
    x, y = _batch(dtype=torch.float32)
    loss = _head(name, dtype=torch.float32, temperature=2.0)
    assert loss.last_logits is None
    loss(x.requires_grad_(True), y).backward()
    kept = loss.last_logits
    assert kept is not None and not kept.requires_grad
    assert kept.shape == (len(y), NUM_CLASSES)
    assert torch.equal(kept, loss.logits(x.detach()))
    cos = loss.cosine(x.detach())
    torch.testing.assert_close(kept, cos * loss.scale / 2.0, rtol=1e-5, atol=1e-5)


def test_keep_logits_false_keeps_nothing() -> None:
    x, y = _batch(dtype=torch.float32)
    loss = ek.CosFaceLoss(NUM_CLASSES, DIM, keep_logits=False)
    loss(x, y)
    assert loss.last_logits is None
    assert "keep_logits=False" in repr(loss)
    loss.keep_logits = True
    loss(x, y)
    assert loss.last_logits is not None
    loss.keep_logits = False  # frees them at once
    assert loss.last_logits is None
    with pytest.raises(TypeError, match="keep_logits"):
        ek.CosFaceLoss(NUM_CLASSES, DIM, keep_logits="no")  # type: ignore[arg-type]


def test_collapse_monitor_fed_from_last_logits_equals_recomputed_logits() -> None:
    loss = ek.ArcFaceLoss(NUM_CLASSES, DIM, scale=8.0)
    kept, recomputed = ek.ClassCollapseMonitor(NUM_CLASSES), ek.ClassCollapseMonitor(NUM_CLASSES)
    for seed in range(3):
        x, y = _batch(seed=seed, dtype=torch.float32)
        loss(x, y)
        kept.update(loss.last_logits, y)
        recomputed.update(loss.logits(x).detach(), y)
    assert dict(kept.compute()) == dict(recomputed.compute())


def test_collapse_monitor_names_a_missing_last_logits() -> None:
    loss = ek.ArcFaceLoss(NUM_CLASSES, DIM)
    with pytest.raises(TypeError, match="before its first call"):
        ek.ClassCollapseMonitor(NUM_CLASSES).update(loss.last_logits, torch.zeros(3, dtype=torch.long))


# -- torch.compile ---------------------------------------------------------------------

CLASSIFIERS = {
    **{name: make for name, make in MARGIN_SOFTMAX.items() if name != "arcface-large-margin"},
    "proxy_anchor": lambda c, d, **kw: ek.ProxyAnchorLoss(c, d, **kw),
}


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_compiled_loss_gives_the_eager_value_and_gradient(name: str) -> None:
    # aot_eager traces what inductor would (dynamo, the autograd Functions, AOT autograd)
    # without generating C++, which takes a minute per loss on CPU.
    torch._dynamo.reset()
    loss = CLASSIFIERS[name](NUM_CLASSES, DIM)
    x, y = _batch(dtype=torch.float32)
    eager_x, compiled_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager = loss(eager_x, y)
    eager.backward()
    eager_grad = [p.grad.clone() for p in loss.parameters()]
    loss.zero_grad()
    compiled = torch.compile(loss, backend="aot_eager")(compiled_x, y)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)
    for p, g in zip(loss.parameters(), eager_grad, strict=True):
        torch.testing.assert_close(p.grad, g)


# Graph-break counts are documented for the torch this project develops on; older dynamo
# (torch < 2.4) breaks in more places, while compiled values stay equal (tested above).
OLD_DYNAMO = tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 4)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_compute_has_no_graph_break(name: str) -> None:
    # The breaks torch._dynamo.explain finds in loss(x, y) all come from the input checks
    # of ClassifierLoss.forward (host syncs); compute() itself traces as one graph.
    torch._dynamo.reset()
    loss = CLASSIFIERS[name](NUM_CLASSES, DIM)
    x, y = _batch(dtype=torch.float32)
    explanation = torch._dynamo.explain(loss.compute)(x, y)
    if OLD_DYNAMO:
        pytest.skip("dynamo before torch 2.4 breaks on `tensor is tensor` and autograd Functions")
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


# -- the comparison with pytorch-metric-learning must run in CI ------------------------


def test_reference_library_is_installed_in_ci() -> None:
    # tests/test_losses_reference.py skips itself without pytorch-metric-learning; in CI
    # that would hide the equivalence checks, so a missing install fails here instead.
    if not os.environ.get("CI"):
        pytest.skip("outside CI the pytorch-metric-learning comparisons may be skipped")
    assert importlib.util.find_spec("pytorch_metric_learning") is not None, (
        "CI is set but pytorch_metric_learning is not importable: tests/test_losses_reference.py "
        "was skipped; install the dev extras"
    )
