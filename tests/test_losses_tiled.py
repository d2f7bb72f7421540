"""The memory-linear SupCon / NT-Xent kernels against the dense losses, block by block."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import embedkit as ek
from embedkit import tiled
from embedkit.similarity import BLOCK_BYTES, l2_normalize

FAST = settings(max_examples=25, deadline=None)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # About 7 rows per block at m = 64: every test crosses several block boundaries.
    monkeypatch.setattr(tiled, "_BYTES_PER_ENTRY", BLOCK_BYTES // (7 * 64))


def _both(kind: str, z, y, rz=None, ry=None):
    """(dense value, dense grads, tiled value, tiled grads)."""
    inputs = [z] if rz is None else [z, rz]
    dense = ek.SupConLoss(0.1) if kind == "supcon" else ek.NTXentLoss(0.07)
    a = dense(z, y) if rz is None else dense(z, y, ref_embeddings=rz, ref_labels=ry)
    grads_a = torch.autograd.grad(a, inputs, allow_unused=True)
    q = l2_normalize(z)
    r = q if rz is None else l2_normalize(rz)
    codes_q, codes_r, classes = tiled.class_codes(y, y if ry is None else ry)
    counts = tiled.pair_statistics(q.detach(), r.detach(), codes_q, codes_r, classes, rz is None)
    # The tiled functions return per-anchor terms; the losses' mean divides their total by
    # the anchors with a positive (SupCon) or by the positive pairs (NT-Xent).
    if kind == "supcon":
        per_anchor = tiled.tiled_supcon(q, r, codes_q, codes_r, classes, 0.1, rz is None)
        b = per_anchor.sum() / counts["num_anchors"].clamp_min(1)
    else:
        per_anchor = tiled.tiled_ntxent(q, r, codes_q, codes_r, 0.07, rz is None)
        b = per_anchor.sum() / counts["num_positive_pairs"].clamp_min(1)
    grads_b = torch.autograd.grad(b, inputs)
    return (
        a,
        grads_a,
        b,
        grads_b,
        dense.last_stats,
        tiled.pair_statistics(q.detach(), r.detach(), codes_q, codes_r, classes, rz is None),
    )


@FAST
@given(
    kind=st.sampled_from(["supcon", "ntxent"]),
    n=st.integers(2, 64),
    classes=st.integers(2, 70),
    with_ref=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_value_gradient_and_statistics_equal_the_dense_loss(kind, n, classes, with_ref, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, classes, (n,), generator=gen)
    rz = ry = None
    if with_ref:
        rz = torch.randn(64, 8, generator=gen, dtype=torch.float64, requires_grad=True)
        ry = torch.randint(0, classes, (64,), generator=gen)
    a, grads_a, b, grads_b, stats_a, stats_b = _both(kind, z, y, rz, ry)
    positives, negatives = int(stats_a["num_positive_pairs"]), int(stats_a["num_negative_pairs"])
    if positives and negatives:  # otherwise the dense loss returns 0 and so does the caller
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        for ga, gb in zip(grads_a, grads_b, strict=True):
            torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-12)
    for key, value in stats_a.items():
        torch.testing.assert_close(torch.as_tensor(stats_b[key]).double(), torch.as_tensor(value).double())


def test_float32_matches_within_float_rounding() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(200, 32, generator=gen, requires_grad=True)
    y = torch.arange(200) % 50
    for kind in ("supcon", "ntxent"):
        a, grads_a, b, grads_b, _, _ = _both(kind, z, y)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads_b[0], grads_a[0], rtol=1e-4, atol=1e-6)


def test_zero_rows_get_zero_gradient_not_nan() -> None:
    z = torch.randn(12, 4, dtype=torch.float64)
    z[3] = 0.0
    z.requires_grad_(True)
    y = torch.arange(12) % 3
    for kind in ("supcon", "ntxent"):
        _, grads_a, b, grads_b, _, _ = _both(kind, z, y)
        assert torch.isfinite(b) and torch.isfinite(grads_b[0]).all()
        torch.testing.assert_close(grads_b[0], grads_a[0])


def test_blocks_cover_every_row_once() -> None:
    blocks = tiled._blocks(100, 64)
    assert blocks[0][0] == 0 and blocks[-1][1] == 100
    assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))


@pytest.mark.parametrize("loss_class", [ek.SupConLoss, ek.NTXentLoss])
@pytest.mark.parametrize("with_ref", [False, True])
def test_the_losses_tiled_flag_gives_the_dense_value_gradient_and_stats(loss_class, with_ref) -> None:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(48, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.arange(48) % 6
    extra = {}
    if with_ref:
        extra = {
            "ref_embeddings": torch.randn(64, 8, generator=gen, dtype=torch.float64),
            "ref_labels": torch.arange(64) % 9,
        }
    results = []
    for tiled_flag in (False, True):
        loss = loss_class(tiled=tiled_flag)
        value = loss(z, y, **extra)
        (grad,) = torch.autograd.grad(value, z)
        results.append((value, grad, loss.last_stats))
    (dense, dense_grad, dense_stats), (tiled_value, tiled_grad, tiled_stats) = results
    torch.testing.assert_close(tiled_value, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tiled_grad, dense_grad, rtol=1e-10, atol=1e-12)
    assert set(tiled_stats) == set(dense_stats)
    for key, value in dense_stats.items():
        torch.testing.assert_close(
            torch.as_tensor(tiled_stats[key]).double(), torch.as_tensor(value).double()
        )


def test_large_batches_are_tiled_without_building_the_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    import embedkit.losses.base as base
    import embedkit.losses.infonce as infonce

    def no_masks(*args, **kwargs):
        raise AssertionError("the tiled path built the N×M pair masks")

    monkeypatch.setattr(infonce, "TILED_ABOVE", 100)  # 16 × 16 = 256 pairs is "large"
    monkeypatch.setattr(base, "pair_masks", no_masks)
    z = torch.randn(16, 4, requires_grad=True)
    for loss in (ek.SupConLoss(), ek.NTXentLoss()):
        value = loss(z, torch.arange(16) % 4)
        value.backward()
        assert torch.isfinite(value) and value > 0
    # One class only: no negative pair, nothing to contrast, 0 as the dense loss gives.
    assert ek.SupConLoss(tiled=True)(z, torch.zeros(16, dtype=torch.int64)).item() == 0.0


def test_tiled_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="tiled must be True or False; got int"):
        ek.SupConLoss(tiled=1)
