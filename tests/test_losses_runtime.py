"""How the losses behave inside a training step: non-finite inputs, statistics, compile.

* ``nonfinite``: plain CPU eager raises on NaN/inf embeddings; ``"propagate"`` (and
  ``"auto"`` under autocast) returns NaN, counts the bad entries in ``last_stats`` and
  lets ``torch.amp.GradScaler`` skip the step;
* ``record_stats=False`` changes nothing but the statistics;
* one validation pass per call: the value checks run once, in the entry point;
* ``torch.compile(loss)`` gives the eager value (one loss here: compiling is slow).
"""

from __future__ import annotations

import math

import pytest
import torch

import embedkit as ek
from _loss_helpers import make_batch, one_thread  # noqa: F401 (an autouse fixture)
from embedkit import _checks

PAIR_LOSSES = {
    "contrastive": lambda **kw: ek.ContrastiveLoss(**kw),
    "triplet": lambda **kw: ek.TripletMarginLoss(**kw),
    "triplet_soft": lambda **kw: ek.TripletMarginLoss(mining="all", soft_margin=True, **kw),
    "triplet_hard": lambda **kw: ek.TripletMarginLoss(mining="batch_hard", **kw),
    "supcon": lambda **kw: ek.SupConLoss(**kw),
    "supcon_tiled": lambda **kw: ek.SupConLoss(tiled=True, **kw),
    "ntxent": lambda **kw: ek.NTXentLoss(**kw),
    "multi_similarity": lambda **kw: ek.MultiSimilarityLoss(**kw),
    "circle": lambda **kw: ek.CircleLoss(**kw),
}


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x, labels = make_batch("pk", 16, 6, seed)
    return x.float(), labels


def _with_inf(x: torch.Tensor) -> torch.Tensor:
    bad = x.clone()
    bad[2, 1] = float("inf")
    bad[5, 0] = float("nan")
    return bad


# -- non-finite inputs -----------------------------------------------------------------------
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_plain_cpu_eager_raises_on_non_finite_embeddings(name: str) -> None:
    x, labels = _batch()
    with pytest.raises(ValueError, match=r"embeddings contains 2 non-finite value\(s\)"):
        PAIR_LOSSES[name]()(_with_inf(x), labels)


@pytest.mark.parametrize("name", PAIR_LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_propagate_returns_nan_with_nan_gradients_and_counts_the_bad_entries(
    name: str, reduction: str
) -> None:
    x, labels = _batch()
    loss = PAIR_LOSSES[name](nonfinite="propagate", reduction=reduction)
    leaf = _with_inf(x).requires_grad_()
    value = loss(leaf, labels)
    assert torch.isnan(value).all()
    value.sum().backward()
    assert leaf.grad is not None and torch.isnan(leaf.grad).all()
    assert loss.last_stats["nonfinite_inputs"] == 2.0


def test_propagate_counts_non_finite_reference_embeddings_too() -> None:
    x, labels = _batch()
    loss = ek.ContrastiveLoss(nonfinite="propagate")
    value = loss(x, labels, ref_embeddings=_with_inf(x), ref_labels=labels)
    assert math.isnan(value.item()) and loss.last_stats["nonfinite_inputs"] == 2.0


@pytest.mark.parametrize("name", ["contrastive", "supcon", "triplet"])
def test_propagate_on_finite_input_changes_nothing_and_records_zero(name: str) -> None:
    x, labels = _batch()
    strict, lenient = PAIR_LOSSES[name](), PAIR_LOSSES[name](nonfinite="propagate")
    assert lenient(x, labels).item() == strict(x, labels).item()
    stats = lenient.last_stats
    assert stats.pop("nonfinite_inputs") == 0.0
    assert stats == strict.last_stats


def test_nonfinite_is_checked_on_assignment() -> None:
    loss = ek.SupConLoss()
    with pytest.raises(ValueError, match="nonfinite"):
        loss.nonfinite = "ignore"
    with pytest.raises(ValueError, match="nonfinite"):
        ek.CircleLoss(nonfinite="warn")  # type: ignore[arg-type]
    loss.nonfinite = "raise"
    assert loss.nonfinite == "raise"


def test_auto_propagates_under_cpu_autocast() -> None:
    x, labels = _batch()
    loss = ek.TripletMarginLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(_with_inf(x), labels)
    assert math.isnan(value.item()) and loss.last_stats["nonfinite_inputs"] == 2.0
    with pytest.raises(ValueError, match="non-finite"):
        loss(_with_inf(x), labels)  # autocast is off again


def _cpu_grad_scaler() -> object:
    scaler_type = getattr(getattr(torch, "amp", None), "GradScaler", None)
    if scaler_type is None:
        pytest.skip("torch.amp.GradScaler needs torch >= 2.3")
    try:
        return scaler_type("cpu", init_scale=2.0**8)
    except (RuntimeError, TypeError, ValueError) as error:  # no CPU support in this torch
        pytest.skip(f"no CPU GradScaler here: {error}")


def test_grad_scaler_skips_a_step_with_an_overflow_and_takes_the_next() -> None:
    """A mixed-precision step with an inf in the embeddings is skipped, not a crash."""
    scaler = _cpu_grad_scaler()
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = ek.SupConLoss() + ek.ContrastiveLoss()
    x, labels = _batch()

    def step(overflow: bool) -> None:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embeddings = model(x)
            if overflow:  # what an fp16/bf16 overflow in the model looks like
                embeddings = embeddings.index_fill(0, torch.tensor([3]), float("inf"))
            value = loss_fn(embeddings, labels)
        scaler.scale(value).backward()  # type: ignore[attr-defined]
        scaler.step(optimizer)  # type: ignore[attr-defined]
        scaler.update()  # type: ignore[attr-defined]

    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()  # type: ignore[attr-defined]
    step(overflow=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert scaler.get_scale() < scale  # type: ignore[attr-defined]
    assert loss_fn.last_stats["0.SupConLoss.nonfinite_inputs"] == 4.0
    step(overflow=False)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# -- statistics --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_record_stats_false_changes_only_the_statistics(name: str) -> None:
    x, labels = _batch()
    with_stats, without = PAIR_LOSSES[name](), PAIR_LOSSES[name](record_stats=False)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    value_a, value_b = with_stats(a, labels), without(b, labels)
    value_a.backward()
    value_b.backward()
    assert value_a.item() == value_b.item()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    assert without.last_stats == {} and with_stats.last_stats
    without.record_stats = True
    without(x, labels)
    assert without.last_stats == with_stats.last_stats


# -- one validation pass ----------------------------------------------------------------------
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_values_are_checked_once_per_call(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    original = _checks.check_embeddings

    def counting(embeddings, name="embeddings", *, check_finite=True):
        calls.append(check_finite)
        return original(embeddings, name, check_finite=check_finite)

    for module in ("embedkit.losses.base", "embedkit.similarity", "embedkit.tiled"):
        if hasattr(__import__(module, fromlist=["_"]), "check_embeddings"):
            monkeypatch.setattr(f"{module}.check_embeddings", counting)
    x, labels = _batch()
    PAIR_LOSSES[name]()(x, labels)
    assert calls.count(True) == 1, calls


# -- torch.compile ------------------------------------------------------------------------------
def test_compiled_contrastive_loss_equals_eager_without_graph_breaks() -> None:
    """The other pair losses are measured (not tested) in docs/guides/choosing-a-loss.rst."""
    dynamo = pytest.importorskip("torch._dynamo")
    x, labels = _batch()
    loss = ek.ContrastiveLoss(nonfinite="propagate")
    eager = loss(x, labels)
    dynamo.reset()
    explanation = dynamo.explain(loss)(x, labels)
    # Counts are documented for torch >= 2.4; older dynamo breaks on the stats dict update.
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 4):
        assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    dynamo.reset()
    compiled = torch.compile(loss, backend="eager")(x, labels)
    torch.testing.assert_close(compiled, eager)
