"""Every embedkit loss equals pytorch-metric-learning (PML) 2.9 in value and gradient.

Each case pairs an embedkit loss with the PML configuration its docstring names
("Notes"), and both are run in float64 on the same random batches: several seeds,
sizes and label layouts (PK, long-tailed, and degenerate batches), in self mode and
with a reference set. Values and gradients (w.r.t. embeddings, reference embeddings,
class centres and proxies) must agree to 1e-5 relative.

Where the conventions differ the test converts: ArcFace margins are radians here
and degrees in PML; NormalizedSoftmax's ``scale`` is PML's ``1 / temperature``; a
cosine-distance contrastive margin ``a`` is PML's cosine-similarity margin ``1 - a``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

import embedkit as ek
from _loss_helpers import (
    DEGENERATE_LAYOUTS,
    LAYOUTS,
    SEEDS,
    SIZES,
    assert_close,
    duplicate_groups,
    make_batch,
    make_reference_set,
    one_thread,  # noqa: F401 (an autouse fixture)
    value_and_grads,
)

if os.environ.get("CI"):
    # The dev extra installs PML: in CI a missing or broken install must fail this file,
    # not skip every equivalence test in it.
    import pytorch_metric_learning.losses as pml_losses
    import pytorch_metric_learning.miners as pml_miners
else:
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.reducers import MeanReducer
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

# -- pair losses -------------------------------------------------------------------


@dataclass
class PairCase:
    """An embedkit pair loss and the PML loss (+ miner) its docstring says it equals."""

    name: str
    ours: Callable[[], ek.losses.Loss]
    pml_loss: Callable[[], Any]
    pml_miner: Callable[[], Any] | None = None
    # Selection by max/min: ties between exactly equal rows may send the gradient to
    # either copy (PML: one index; ours: split evenly), so with duplicate rows only
    # the gradient summed over each group of equal rows is compared.
    selects_by_max: bool = False
    # Largest batch to run PML on (its NT-Xent builds a positive-pairs x negative-pairs
    # matrix, seconds per call on a long-tailed batch of 96; soft-margin triplets over
    # all N^3 triplets are the next slowest).
    max_n: int = 1000

    def run_pml(self, x, y, r=None, ry=None):
        loss, miner = self.pml_loss(), self.pml_miner() if self.pml_miner else None
        indices = None if miner is None else miner(x, y, r, ry)
        return loss(x, y, indices, ref_emb=r, ref_labels=ry)

    def __repr__(self) -> str:
        return self.name


def _triplet(margin, **kwargs):
    return lambda: pml_losses.TripletMarginLoss(margin, **kwargs)


PAIR_CASES = [
    PairCase("contrastive", lambda: ek.ContrastiveLoss(), lambda: pml_losses.ContrastiveLoss()),
    PairCase(
        "contrastive-margins",
        lambda: ek.ContrastiveLoss(0.3, 0.9),
        lambda: pml_losses.ContrastiveLoss(pos_margin=0.3, neg_margin=0.9),
    ),
    PairCase(
        # ours: distance 1 - cos with margins a, b; PML: similarity with margins 1 - a, 1 - b.
        "contrastive-cosine",
        lambda: ek.ContrastiveLoss(0.2, 0.7, distance="cosine"),
        lambda: pml_losses.ContrastiveLoss(pos_margin=0.8, neg_margin=0.3, distance=CosineSimilarity()),
    ),
    PairCase(
        "contrastive-unnormalized",
        lambda: ek.ContrastiveLoss(0.5, 3.0, normalize=False),
        lambda: pml_losses.ContrastiveLoss(0.5, 3.0, distance=LpDistance(normalize_embeddings=False)),
    ),
    PairCase(
        "contrastive-squared",
        lambda: ek.ContrastiveLoss(0.1, 1.5, distance="squared_euclidean"),
        lambda: pml_losses.ContrastiveLoss(0.1, 1.5, distance=LpDistance(power=2)),
    ),
    PairCase("triplet-batch_all", lambda: ek.TripletMarginLoss(0.2), _triplet(0.2)),
    PairCase("triplet-batch_all-m0", lambda: ek.TripletMarginLoss(0.0), _triplet(0.0)),
    PairCase(
        "triplet-all", lambda: ek.TripletMarginLoss(0.2, mining="all"), _triplet(0.2, reducer=MeanReducer())
    ),
    PairCase(
        "triplet-all-soft",
        lambda: ek.TripletMarginLoss(0.1, mining="all", soft_margin=True),
        _triplet(0.1, smooth_loss=True, reducer=MeanReducer()),
        max_n=64,
    ),
    PairCase(
        "triplet-batch_all-soft",
        lambda: ek.TripletMarginLoss(0.0, soft_margin=True),
        _triplet(0.0, smooth_loss=True),
        max_n=64,
    ),
    PairCase(
        "triplet-batch_all-cosine",
        lambda: ek.TripletMarginLoss(0.3, distance="cosine"),
        _triplet(0.3, distance=CosineSimilarity()),
    ),
    PairCase(
        "triplet-all-unnormalized",
        lambda: ek.TripletMarginLoss(1.0, mining="all", normalize=False),
        _triplet(1.0, reducer=MeanReducer(), distance=LpDistance(normalize_embeddings=False)),
    ),
    PairCase(
        "triplet-batch_hard",
        lambda: ek.TripletMarginLoss(0.2, mining="batch_hard"),
        _triplet(0.2, reducer=MeanReducer()),
        lambda: pml_miners.BatchHardMiner(),
        selects_by_max=True,
    ),
    PairCase(
        "triplet-batch_hard-soft",
        lambda: ek.TripletMarginLoss(0.0, mining="batch_hard", soft_margin=True),
        _triplet(0.0, reducer=MeanReducer(), smooth_loss=True),
        lambda: pml_miners.BatchHardMiner(),
        selects_by_max=True,
    ),
    PairCase(
        "triplet-batch_hard-squared",
        lambda: ek.TripletMarginLoss(0.5, mining="batch_hard", distance="squared_euclidean"),
        _triplet(0.5, reducer=MeanReducer(), distance=LpDistance(power=2)),
        lambda: pml_miners.BatchHardMiner(distance=LpDistance(power=2)),
        selects_by_max=True,
    ),
    PairCase(
        "triplet-batch_hard-cosine",
        lambda: ek.TripletMarginLoss(0.2, mining="batch_hard", distance="cosine"),
        _triplet(0.2, reducer=MeanReducer(), distance=CosineSimilarity()),
        lambda: pml_miners.BatchHardMiner(distance=CosineSimilarity()),
        selects_by_max=True,
    ),
    PairCase("supcon", lambda: ek.SupConLoss(0.1), lambda: pml_losses.SupConLoss(0.1)),
    PairCase("supcon-t0.7", lambda: ek.SupConLoss(0.7), lambda: pml_losses.SupConLoss(0.7)),
    PairCase("ntxent", lambda: ek.NTXentLoss(0.07), lambda: pml_losses.NTXentLoss(0.07), max_n=64),
    PairCase("ntxent-t0.5", lambda: ek.NTXentLoss(0.5), lambda: pml_losses.NTXentLoss(0.5), max_n=64),
    PairCase(
        "multi_similarity",
        lambda: ek.MultiSimilarityLoss(mining=False),
        lambda: pml_losses.MultiSimilarityLoss(),
    ),
    PairCase(
        "multi_similarity-params",
        lambda: ek.MultiSimilarityLoss(1.0, 10.0, 0.3, mining=False),
        lambda: pml_losses.MultiSimilarityLoss(1.0, 10.0, 0.3),
    ),
    PairCase(
        "multi_similarity-mined",
        lambda: ek.MultiSimilarityLoss(),
        lambda: pml_losses.MultiSimilarityLoss(),
        lambda: pml_miners.MultiSimilarityMiner(0.1),
    ),
    PairCase(
        "multi_similarity-mined-eps0.3",
        lambda: ek.MultiSimilarityLoss(2.0, 20.0, 0.4, epsilon=0.3),
        lambda: pml_losses.MultiSimilarityLoss(2.0, 20.0, 0.4),
        lambda: pml_miners.MultiSimilarityMiner(0.3),
    ),
    PairCase("circle", lambda: ek.CircleLoss(), lambda: pml_losses.CircleLoss()),
    PairCase(
        "circle-face", lambda: ek.CircleLoss(0.25, 256.0), lambda: pml_losses.CircleLoss(m=0.25, gamma=256)
    ),
]


def _compare_pair(case: PairCase, x, y, r=None, ry=None, *, group_duplicates: bool = False) -> None:
    tensors = (x,) if r is None else (x, r)

    def ours_fn(*t):
        if r is None:
            return case.ours()(t[0], y)
        return case.ours()(t[0], y, ref_embeddings=t[1], ref_labels=ry)

    def pml_fn(*t):
        return case.run_pml(t[0], y) if r is None else case.run_pml(t[0], y, t[1], ry.clone())

    ours, ours_grads = value_and_grads(ours_fn, *tensors)
    pml, pml_grads = value_and_grads(pml_fn, *tensors)
    assert_close(ours, pml, f"{case.name} value")
    for name, t, g_ours, g_pml in zip(
        ("embeddings", "ref_embeddings")[: len(tensors)], tensors, ours_grads, pml_grads, strict=True
    ):
        if group_duplicates and case.selects_by_max:
            groups = duplicate_groups(t)
            g_ours, g_pml = groups.T @ g_ours, groups.T @ g_pml
        assert_close(g_ours, g_pml, f"{case.name} gradient w.r.t. {name}")


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"N{s[0]}-D{s[1]}")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", PAIR_CASES, ids=repr)
def test_pair_loss_equals_pml(case: PairCase, layout: str, size: tuple[int, int]) -> None:
    n, d = min(size[0], case.max_n), size[1]
    for seed in SEEDS:
        x, y = make_batch(layout, n, d, seed)
        _compare_pair(case, x, y)


@pytest.mark.parametrize("case", PAIR_CASES, ids=repr)
def test_pair_loss_equals_pml_at_training_size(case: PairCase) -> None:
    # A PK batch (K=4) of N=256 in d=128, as trained: the fast paths (fused distances,
    # gathered positives, blocked soft-margin triplets) at the size they are tuned for.
    # PML's NT-Xent (a positive-pairs x negative-pairs matrix, 25 s at 256) runs at 128.
    n = 256 if case.max_n >= 256 else 128
    x, y = make_batch("pk", n, 128, 0)
    _compare_pair(case, x, y)


@pytest.mark.parametrize("layout", DEGENERATE_LAYOUTS)
@pytest.mark.parametrize("case", PAIR_CASES, ids=repr)
def test_pair_loss_equals_pml_on_degenerate_batches(case: PairCase, layout: str) -> None:
    for seed in SEEDS:
        x, y = make_batch(layout, 12, 4, seed)
        _compare_pair(case, x, y, group_duplicates=True)


@pytest.mark.parametrize("case", PAIR_CASES, ids=repr)
def test_pair_loss_equals_pml_on_tiny_batches(case: PairCase) -> None:
    # Two to six items in one to three dimensions, three labels: many rows with no
    # positive or no negative, and (in one dimension, normalised) many exact ties. Every
    # other batch has a reference set of one to four items. Batches where PML takes its
    # "at most one pair of each kind" shortcut are left to the hand-made tests below.
    rng = np.random.default_rng(7)
    compared = 0
    while compared < 8:
        n, d = int(rng.integers(2, 7)), int(rng.integers(1, 4))
        y = torch.as_tensor(rng.integers(0, 3, n))
        x = torch.as_tensor(rng.standard_normal((n, d)))
        r = ry = None
        if compared % 2:
            m = int(rng.integers(1, 5))
            ry = torch.as_tensor(rng.integers(0, 3, m))
            r = torch.as_tensor(rng.standard_normal((m, d)))
        pairs = case.pml_miner()(x, y, r, ry) if case.pml_miner else lmu.get_all_pairs_indices(y, ry)
        if all(len(t) <= 1 for t in pairs):
            continue
        _compare_pair(case, x, y, r, ry, group_duplicates=True)
        compared += 1


@pytest.mark.parametrize(
    "case",
    [c for c in PAIR_CASES if c.name.split("-")[0] in ("triplet", "supcon", "ntxent", "circle")],
    ids=repr,
)
def test_pair_loss_without_pairs_is_an_attached_zero(case: PairCase) -> None:
    # With no positive or no negative pair there is nothing to contrast: PML returns 0
    # and so do we, with the zero kept on the graph so backward() works. (Contrastive
    # and multi-similarity losses have separate positive and negative terms: one kind
    # of pair alone still gives a loss, also in PML; the degenerate tests cover them.)
    for layout in ("one_class", "all_distinct", "two_same", "two_different"):
        x, y = make_batch(layout, 6, 3, 0)
        x.requires_grad_(True)
        value = case.ours()(x, y)
        assert value.item() == 0.0
        value.backward()
        assert x.grad is not None and not x.grad.any()


@pytest.mark.parametrize("size", ((8, 4), (33, 16)), ids=lambda s: f"N{s[0]}-D{s[1]}")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", PAIR_CASES, ids=repr)
def test_pair_loss_with_reference_set_equals_pml(case: PairCase, layout: str, size: tuple[int, int]) -> None:
    n, d = size
    for seed in SEEDS:
        x, y = make_batch(layout, n, d, seed)
        r, ry = make_reference_set(y, n + 5, d, seed)
        _compare_pair(case, x, y, r, ry)


def test_multi_similarity_miner_with_reference_set_keeps_the_same_pairs() -> None:
    for seed in SEEDS:
        x, y = make_batch("pk", 20, 8, seed)
        r, ry = make_reference_set(y, 25, 8, seed)
        miner = pml_miners.MultiSimilarityMiner(0.1)
        a1, p, a2, n = miner(x, y, r, ry)
        cos = ek.similarity.pairwise_similarity(x, r)
        pos, neg = ek.mining.pair_masks(y, ry)
        keep_pos, keep_neg = ek.mining.multi_similarity_pairs(cos, pos, neg, 0.1)
        expected_pos = torch.zeros_like(keep_pos)
        expected_pos[a1, p] = True
        expected_neg = torch.zeros_like(keep_neg)
        expected_neg[a2, n] = True
        assert torch.equal(keep_pos, expected_pos)
        assert torch.equal(keep_neg, expected_neg)


def test_single_pair_reference_batch_is_not_zero() -> None:
    # Convention difference: PML returns 0 whenever it has at most one positive and at
    # most one negative pair (GenericPairLoss: ``all(len(x) <= 1 ...)``), which only a
    # reference set can produce. We compute the documented formula for that pair.
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    r = torch.tensor([[0.6, 0.8], [0.8, -0.6]], dtype=torch.float64)
    y, ry = torch.tensor([0]), torch.tensor([0, 1])
    assert float(pml_losses.ContrastiveLoss(0.0, 1.0)(x, y, ref_emb=r, ref_labels=ry)) == 0.0
    d_ap, d_an = math.dist((1, 0), (0.6, 0.8)), math.dist((1, 0), (0.8, -0.6))
    ours = ek.ContrastiveLoss(0.0, 1.5)(x, y, ref_embeddings=r, ref_labels=ry)
    assert ours.item() == pytest.approx(d_ap + (1.5 - d_an), rel=1e-12)


def test_multi_similarity_mining_one_pair_of_each_kind_is_not_zero() -> None:
    # The same PML shortcut in self mode: mining is not symmetric, so it can keep just
    # one positive pair (0, 1) and one negative pair (0, 2); PML then returns 0. We
    # compute the formula: anchor 0's two terms, averaged over the 3 anchors.
    angles = torch.tensor([0.0, 0.5, -0.55], dtype=torch.float64)
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    y = torch.tensor([0, 0, 1])
    mined = pml_miners.MultiSimilarityMiner(0.1)(x, y)
    assert [t.tolist() for t in mined] == [[0], [1], [0], [2]]
    assert float(pml_losses.MultiSimilarityLoss()(x, y, mined)) == 0.0
    s_ap, s_an = math.cos(0.5), math.cos(0.55)
    anchor_0 = math.log1p(math.exp(-2 * (s_ap - 0.5))) / 2 + math.log1p(math.exp(50 * (s_an - 0.5))) / 50
    expected = anchor_0 / 3
    assert ek.MultiSimilarityLoss()(x, y).item() == pytest.approx(expected, rel=1e-12)


def test_batch_given_as_its_own_reference_set_keeps_self_pairs() -> None:
    # Convention difference: with ref_embeddings given, every (query, reference) pair
    # counts, so passing the batch as its own reference set pairs each item with itself.
    # PML decides by object identity instead (``ref_labels is labels`` drops the
    # diagonal from the pairs, ``embeddings is ref_emb`` from MultiSimilarityMiner's
    # choice), so it matches us only when given copies.
    x, y = make_batch("pk", 12, 4, 0)
    for case in PAIR_CASES:
        ours = case.ours()(x, y, ref_embeddings=x, ref_labels=y)
        assert_close(ours, case.run_pml(x, y, x.clone(), y.clone()).detach(), case.name)


# -- classifier losses (class centres and proxies) -----------------------------------


@dataclass
class ClassifierCase:
    """An embedkit classifier loss and the PML loss it equals, sharing the same parameters."""

    name: str
    ours: Callable[[int, int], Any]
    pml: Callable[[int, int], Any]

    def build(self, num_classes: int, dim: int, seed: int):
        ours = self.ours(num_classes, dim).double()
        pml = self.pml(num_classes, dim).double()
        ours_param = ours.proxies if isinstance(ours, ek.ProxyAnchorLoss) else ours.weight
        g = torch.Generator().manual_seed(seed)
        ours_param.data = torch.randn(ours_param.shape, generator=g, dtype=torch.float64)
        if hasattr(pml, "W"):
            pml.W.data = ours_param.data.T.clone()  # PML stores W as (dim, classes)
        else:
            pml.proxies.data = ours_param.data.clone()
        return ours, pml

    def __repr__(self) -> str:
        return self.name


CLASSIFIER_CASES = [
    ClassifierCase(
        "arcface",
        lambda c, d: ek.ArcFaceLoss(c, d),
        lambda c, d: pml_losses.ArcFaceLoss(c, d, margin=math.degrees(0.5)),
    ),
    ClassifierCase(
        "arcface-small",
        lambda c, d: ek.ArcFaceLoss(c, d, margin=0.2, scale=10.0),
        lambda c, d: pml_losses.ArcFaceLoss(c, d, margin=math.degrees(0.2), scale=10.0),
    ),
    ClassifierCase(
        # A large margin sends many targets into the θ > π - m fallback branch.
        "arcface-large",
        lambda c, d: ek.ArcFaceLoss(c, d, margin=1.2, scale=16.0),
        lambda c, d: pml_losses.ArcFaceLoss(c, d, margin=math.degrees(1.2), scale=16.0),
    ),
    ClassifierCase(
        "cosface",
        lambda c, d: ek.CosFaceLoss(c, d),
        lambda c, d: pml_losses.CosFaceLoss(c, d),
    ),
    ClassifierCase(
        "cosface-small",
        lambda c, d: ek.CosFaceLoss(c, d, margin=0.1, scale=8.0),
        lambda c, d: pml_losses.CosFaceLoss(c, d, margin=0.1, scale=8.0),
    ),
    ClassifierCase(
        "normalized_softmax",
        lambda c, d: ek.NormalizedSoftmaxLoss(c, d),
        lambda c, d: pml_losses.NormalizedSoftmaxLoss(c, d, temperature=0.05),
    ),
    ClassifierCase(
        "normalized_softmax-s5",
        lambda c, d: ek.NormalizedSoftmaxLoss(c, d, scale=5.0),
        lambda c, d: pml_losses.NormalizedSoftmaxLoss(c, d, temperature=1 / 5.0),
    ),
    ClassifierCase(
        "subcenter_arcface",
        lambda c, d: ek.SubCenterArcFaceLoss(c, d),
        lambda c, d: pml_losses.SubCenterArcFaceLoss(
            num_classes=c, embedding_size=d, margin=math.degrees(0.5)
        ),
    ),
    ClassifierCase(
        "subcenter_arcface-k2",
        lambda c, d: ek.SubCenterArcFaceLoss(c, d, sub_centers=2, margin=0.3, scale=30.0),
        lambda c, d: pml_losses.SubCenterArcFaceLoss(
            num_classes=c, embedding_size=d, sub_centers=2, margin=math.degrees(0.3), scale=30.0
        ),
    ),
    ClassifierCase(
        "proxy_anchor",
        lambda c, d: ek.ProxyAnchorLoss(c, d),
        lambda c, d: pml_losses.ProxyAnchorLoss(c, d),
    ),
    ClassifierCase(
        "proxy_anchor-params",
        lambda c, d: ek.ProxyAnchorLoss(c, d, margin=0.3, alpha=8.0),
        lambda c, d: pml_losses.ProxyAnchorLoss(c, d, margin=0.3, alpha=8.0),
    ),
]


def _compare_classifier(case: ClassifierCase, x, y, num_classes: int, seed: int) -> None:
    ours, pml = case.build(num_classes, x.shape[1], seed)
    xo = x.clone().requires_grad_(True)
    xp = x.clone().requires_grad_(True)
    value_ours = ours(xo, y)
    value_pml = pml(xp, y)
    value_ours.backward()
    value_pml.backward()
    assert_close(value_ours.detach(), value_pml.detach(), f"{case.name} value")
    assert_close(xo.grad, xp.grad, f"{case.name} gradient w.r.t. embeddings")
    if hasattr(pml, "W"):
        assert_close(ours.weight.grad, pml.W.grad.T, f"{case.name} gradient w.r.t. class centres")
    else:
        assert_close(ours.proxies.grad, pml.proxies.grad, f"{case.name} gradient w.r.t. proxies")


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"N{s[0]}-D{s[1]}")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CLASSIFIER_CASES, ids=repr)
def test_classifier_loss_equals_pml(case: ClassifierCase, layout: str, size: tuple[int, int]) -> None:
    n, d = size
    for seed in SEEDS:
        x, y = make_batch(layout, n, d, seed, contiguous=True)
        # Two classes more than the batch shows: absent classes (proxies) matter too.
        _compare_classifier(case, x, y, int(y.max()) + 3, seed)


@pytest.mark.parametrize("layout", DEGENERATE_LAYOUTS)
@pytest.mark.parametrize("case", CLASSIFIER_CASES, ids=repr)
def test_classifier_loss_equals_pml_on_degenerate_batches(case: ClassifierCase, layout: str) -> None:
    for seed in SEEDS:
        x, y = make_batch(layout, 12, 4, seed, contiguous=True)
        _compare_classifier(case, x, y, int(y.max()) + 1, seed)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CLASSIFIER_CASES, ids=repr)
def test_classifier_loss_equals_pml_at_benchmark_size(case: ClassifierCase, layout: str) -> None:
    # The size benchmarks/bench_losses.py times (N=256, d=128), where the fused
    # cross-entropy and proxy terms work on whole (N, C) rows: labels spread over 1,000
    # classes, most absent from the batch. Not skipped for speed (well under a second).
    x, y = make_batch(layout, 256, 128, seed=0)
    spread = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    _compare_classifier(case, x, spread[y], 1000, seed=0)


@pytest.mark.parametrize(
    "cls", [ek.ArcFaceLoss, ek.CosFaceLoss, ek.NormalizedSoftmaxLoss, ek.SubCenterArcFaceLoss]
)
@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_margin_softmax_temperature_divides_the_scale(cls, temperature: float) -> None:
    # Our ``temperature`` has no PML equivalent: temperature T with scale s must equal
    # temperature 1 with scale s / T (which the cases above tie to PML).
    for seed in SEEDS:
        x, y = make_batch("long_tailed", 33, 8, seed, contiguous=True)
        c = int(y.max()) + 2
        tempered = cls(c, 8, scale=16.0, temperature=temperature).double()
        plain = cls(c, 8, scale=16.0 / temperature).double()
        g = torch.Generator().manual_seed(seed)
        tempered.weight.data = torch.randn(tempered.weight.shape, generator=g, dtype=torch.float64)
        plain.weight.data = tempered.weight.data.clone()
        v_t, (g_t, w_t) = value_and_grads(_with_weight(tempered, y), x, tempered.weight)
        v_p, (g_p, w_p) = value_and_grads(_with_weight(plain, y), x, plain.weight)
        assert_close(v_t, v_p, "value")
        assert_close(g_t, g_p, "gradient w.r.t. embeddings")
        assert_close(w_t, w_p, "gradient w.r.t. class centres")


def _with_weight(loss, labels):
    """``(embeddings, weight) -> loss`` with the ``weight`` parameter passed in (for autograd.grad)."""

    def call(embeddings, weight):
        return torch.func.functional_call(loss, {"weight": weight}, (embeddings, labels))

    return call


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["cos=+1", "cos=-1"])
def test_arcface_at_cos_plus_minus_one(sign: float) -> None:
    # Embeddings exactly on (or opposite to) their class centre: the value equals PML's;
    # PML's gradient through acos is NaN there, ours is finite (documented: the margin is
    # computed without acos). At cos = -1 (the θ > π - m branch, f = cos θ - m sin m) the
    # loss is CosFace with margin m sin m, gradient included.
    case = CLASSIFIER_CASES[0]
    ours, pml = case.build(3, 4, 0)
    x = sign * ours.weight.detach()[[0, 1, 2]]
    y = torch.tensor([0, 1, 2])
    xo, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    value_ours, value_pml = ours(xo, y), pml(xp, y)
    value_ours.backward()
    value_pml.backward()
    assert_close(value_ours.detach(), value_pml.detach(), "value")
    assert torch.isfinite(xo.grad).all() and torch.isfinite(ours.weight.grad).all()
    if sign < 0:
        cosface = ek.CosFaceLoss(3, 4, margin=0.5 * math.sin(0.5), scale=64.0).double()
        cosface.weight.data = ours.weight.detach().clone()
        _, (g_x, g_w) = value_and_grads(_with_weight(cosface, y), x, cosface.weight)
        assert_close(xo.grad, g_x, "gradient w.r.t. embeddings")
        assert_close(ours.weight.grad, g_w, "gradient w.r.t. class centres")
