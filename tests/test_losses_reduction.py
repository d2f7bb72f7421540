"""``reduction="none" | "sum" | "mean"`` on every pair loss, read against plain loops.

* ``"none"`` is each anchor's term as its docstring defines it, checked here by a loop
  over the anchor's pairs or triplets written as the paper states the loss;
* ``"sum"`` is the sum of ``"none"``, and ``"mean"`` that sum over the documented count
  (active triplets, anchors with a positive, positive pairs, ...) and unchanged from the
  default;
* the gradient of a weighted sum of the ``"none"`` values is the weighted sum of each
  anchor's gradient (nothing couples the anchors beyond the definition);
* a :class:`~embedkit.losses.LossSum` of ``"none"`` terms returns the weighted per-anchor sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import embedkit as ek
from _loss_helpers import make_batch, one_thread  # noqa: F401 (an autouse fixture)

N, D = 12, 5


def _distances(x: torch.Tensor) -> list[list[float]]:
    unit = [row / math.sqrt(float((row * row).sum())) for row in x]
    return [[math.sqrt(float(((a - b) ** 2).sum())) for b in unit] for a in unit]


def _cosines(x: torch.Tensor) -> list[list[float]]:
    unit = [row / math.sqrt(float((row * row).sum())) for row in x]
    return [[float((a * b).sum()) for b in unit] for a in unit]


def _pairs(labels: list[int], i: int) -> tuple[list[int], list[int]]:
    positives = [j for j in range(len(labels)) if j != i and labels[j] == labels[i]]
    negatives = [j for j in range(len(labels)) if labels[j] != labels[i]]
    return positives, negatives


def _softplus(v: float) -> float:
    return v if v > 20 else math.log1p(math.exp(v))


# -- each anchor's term, as the docstrings define it ----------------------------------------
def contrastive_terms(x, labels, pos_margin=0.0, neg_margin=1.0):
    d = _distances(x)
    terms = []
    for i in range(len(labels)):
        positives, negatives = _pairs(labels, i)
        terms.append(
            sum(max(d[i][p] - pos_margin, 0.0) for p in positives)
            + sum(max(neg_margin - d[i][n], 0.0) for n in negatives)
        )
    return terms


def triplet_terms(x, labels, mining, margin=0.2, soft=False):
    d = _distances(x)
    hinge = _softplus if soft else (lambda v: max(v, 0.0))
    terms = []
    for i in range(len(labels)):
        positives, negatives = _pairs(labels, i)
        if mining in ("all", "batch_all"):
            terms.append(sum(hinge(d[i][p] - d[i][n] + margin) for p in positives for n in negatives))
        elif mining == "batch_hard":
            if positives and negatives:
                far = max(d[i][p] for p in positives)
                near = min(d[i][n] for n in negatives)
                terms.append(hinge(far - near + margin))
            else:
                terms.append(0.0)
        else:  # semi_hard: the nearest negative farther than p, else the farthest
            total = 0.0
            for p in positives:
                if not negatives:
                    continue
                farther = [d[i][n] for n in negatives if d[i][n] > d[i][p]]
                chosen = min(farther) if farther else max(d[i][n] for n in negatives)
                total += hinge(d[i][p] - chosen + margin)
            terms.append(total)
    return terms


def supcon_terms(x, labels, temperature=0.1):
    s = _cosines(x)
    terms = []
    for i in range(len(labels)):
        positives, _ = _pairs(labels, i)
        if not positives:
            terms.append(0.0)
            continue
        others = [j for j in range(len(labels)) if j != i]
        log_denominator = math.log(sum(math.exp(s[i][a] / temperature) for a in others))
        terms.append(-sum(s[i][p] / temperature - log_denominator for p in positives) / len(positives))
    return terms


def ntxent_terms(x, labels, temperature=0.07):
    s = _cosines(x)
    terms = []
    for i in range(len(labels)):
        positives, negatives = _pairs(labels, i)
        total = 0.0
        for p in positives:
            numerator = math.exp(s[i][p] / temperature)
            denominator = numerator + sum(math.exp(s[i][n] / temperature) for n in negatives)
            total += -math.log(numerator / denominator)
        terms.append(total)
    return terms


def multi_similarity_terms(x, labels, alpha=2.0, beta=50.0, base=0.5):
    s = _cosines(x)
    terms = []
    for i in range(len(labels)):
        positives, negatives = _pairs(labels, i)
        pos = math.log1p(sum(math.exp(-alpha * (s[i][p] - base)) for p in positives)) / alpha
        neg = math.log1p(sum(math.exp(beta * (s[i][n] - base)) for n in negatives)) / beta
        terms.append(pos + neg)
    return terms


def circle_terms(x, labels, m=0.4, gamma=80.0):
    s = _cosines(x)
    terms = []
    for i in range(len(labels)):
        positives, negatives = _pairs(labels, i)
        if not positives or not negatives:
            terms.append(0.0)
            continue
        pos = sum(math.exp(-gamma * max(1 + m - s[i][p], 0.0) * (s[i][p] - 1 + m)) for p in positives)
        neg = sum(math.exp(gamma * max(s[i][n] + m, 0.0) * (s[i][n] - m)) for n in negatives)
        terms.append(math.log1p(pos * neg))
    return terms


# name -> (factory taking reduction=, per-anchor reference, divisor of the mean from last_stats)
Divisor = Callable[[dict[str, float], int], float]
CASES: dict[str, tuple[Callable[..., ek.losses.Loss], Callable, Divisor | None]] = {
    "contrastive": (lambda **kw: ek.ContrastiveLoss(**kw), contrastive_terms, None),
    "triplet_all": (
        lambda **kw: ek.TripletMarginLoss(mining="all", **kw),
        lambda x, y: triplet_terms(x, y, "all"),
        lambda s, n: s["num_triplets"],
    ),
    "triplet_batch_all": (
        lambda **kw: ek.TripletMarginLoss(**kw),
        lambda x, y: triplet_terms(x, y, "batch_all"),
        lambda s, n: round(s["active_triplet_fraction"] * s["num_triplets"]),
    ),
    "triplet_all_soft": (
        lambda **kw: ek.TripletMarginLoss(mining="all", soft_margin=True, **kw),
        lambda x, y: triplet_terms(x, y, "all", soft=True),
        lambda s, n: s["num_triplets"],
    ),
    "triplet_batch_hard": (
        lambda **kw: ek.TripletMarginLoss(mining="batch_hard", **kw),
        lambda x, y: triplet_terms(x, y, "batch_hard"),
        lambda s, n: s["num_triplets"],
    ),
    "triplet_semi_hard": (
        lambda **kw: ek.TripletMarginLoss(mining="semi_hard", **kw),
        lambda x, y: triplet_terms(x, y, "semi_hard"),
        lambda s, n: s["num_triplets"],
    ),
    "supcon": (lambda **kw: ek.SupConLoss(**kw), supcon_terms, lambda s, n: s["num_anchors"]),
    "supcon_tiled": (
        lambda **kw: ek.SupConLoss(tiled=True, **kw),
        supcon_terms,
        lambda s, n: s["num_anchors"],
    ),
    "ntxent": (lambda **kw: ek.NTXentLoss(**kw), ntxent_terms, lambda s, n: s["num_positive_pairs"]),
    "ntxent_tiled": (
        lambda **kw: ek.NTXentLoss(tiled=True, **kw),
        ntxent_terms,
        lambda s, n: s["num_positive_pairs"],
    ),
    "multi_similarity": (
        lambda **kw: ek.MultiSimilarityLoss(mining=False, **kw),
        multi_similarity_terms,
        lambda s, n: n,
    ),
    "circle": (lambda **kw: ek.CircleLoss(**kw), circle_terms, lambda s, n: s["num_anchors"]),
}


def _batch(layout: str = "pk", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x, labels = make_batch(layout, N, D, seed)
    return x, labels


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("layout", ["pk", "long_tailed"])
def test_none_gives_each_anchors_term_and_sum_and_mean_follow(name: str, layout: str) -> None:
    factory, reference, divisor = CASES[name]
    x, labels = _batch(layout)
    per_anchor = factory(reduction="none")(x, labels)
    assert per_anchor.shape == (x.shape[0],)
    expected = torch.tensor(reference(x, labels.tolist()), dtype=torch.float64)
    torch.testing.assert_close(per_anchor, expected, rtol=1e-7, atol=1e-9)

    total = factory(reduction="sum")(x, labels)
    torch.testing.assert_close(total, per_anchor.sum(), rtol=1e-10, atol=1e-12)

    default, mean = factory(), factory(reduction="mean")
    torch.testing.assert_close(mean(x, labels), default(x, labels), rtol=0, atol=0)
    if divisor is not None:
        count = divisor(default.last_stats, x.shape[0])
        torch.testing.assert_close(
            default(x, labels), per_anchor.sum() / max(count, 1), rtol=1e-10, atol=1e-12
        )


def test_contrastive_mean_is_the_two_active_pair_means() -> None:
    x, labels = _batch()
    d = _distances(x)
    pos, neg = [], []
    for i in range(len(labels)):
        positives, negatives = _pairs(labels.tolist(), i)
        pos += [d[i][p] for p in positives if d[i][p] > 0.0]
        neg += [1.0 - d[i][n] for n in negatives if d[i][n] < 1.0]
    expected = sum(pos) / max(len(pos), 1) + sum(neg) / max(len(neg), 1)
    assert ek.ContrastiveLoss(reduction="mean")(x, labels).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("name", CASES)
def test_gradient_of_a_weighted_sum_of_none_is_the_weighted_sum_of_anchor_gradients(name: str) -> None:
    factory, _, _ = CASES[name]
    x, labels = _batch(seed=3)
    weights = torch.linspace(0.5, 2.0, x.shape[0], dtype=torch.float64)
    loss = factory(reduction="none")

    leaf = x.clone().requires_grad_()
    (weights * loss(leaf, labels)).sum().backward()

    by_hand = torch.zeros_like(x)
    for i in range(x.shape[0]):
        one = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(loss(one, labels)[i], one)
        by_hand += weights[i] * grad
    torch.testing.assert_close(leaf.grad, by_hand, rtol=1e-9, atol=1e-12)


def test_loss_sum_of_none_terms_is_the_weighted_per_anchor_sum() -> None:
    x, labels = _batch()
    a, b = ek.ContrastiveLoss(reduction="none"), ek.SupConLoss(reduction="none")
    both = a + 0.5 * b
    expected = a(x, labels) + 0.5 * b(x, labels)
    torch.testing.assert_close(both(x, labels), expected)
    assert both.last_value == pytest.approx(expected.mean().item())
    with pytest.raises(ValueError, match="share one reduction"):
        (a + ek.SupConLoss())(x, labels)


def test_none_with_a_reference_set_has_one_value_per_query() -> None:
    x, labels = _batch()
    ref, ref_labels = x[:7] * 2, labels[:7]
    for name, (factory, _, _) in CASES.items():
        value = factory(reduction="none")(x, labels, ref_embeddings=ref, ref_labels=ref_labels)
        assert value.shape == (x.shape[0],), name
        total = factory(reduction="sum")(x, labels, ref_embeddings=ref, ref_labels=ref_labels)
        torch.testing.assert_close(total, value.sum(), msg=name)


@pytest.mark.parametrize("value", ["avg", None, "Mean"])
def test_reduction_is_checked_in_the_constructor_and_on_assignment(value) -> None:
    with pytest.raises((ValueError, TypeError), match="reduction"):
        ek.TripletMarginLoss(reduction=value)
    loss = ek.CircleLoss()
    with pytest.raises((ValueError, TypeError), match="reduction"):
        loss.reduction = value
