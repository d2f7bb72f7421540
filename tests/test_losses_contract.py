"""The losses contract: input checks, empty selections, algebra, statistics, and layering.

* bad input gets a ``ValueError``/``TypeError`` naming the argument and what was seen;
* a batch with no positive pair gives exactly 0 (with a working ``backward()``), never NaN;
* ``a + b``, ``w * a``, ``a / w``, ``-a``, ``a - b``, ``sum([...])`` are losses whose
  value is the weighted sum of the terms computed separately;
* ``last_value``/``last_stats`` describe the last call;
* no loss computes its own similarities or validates its own inputs: a source scan
  of ``src/embedkit/losses/`` finds no matrix products, norms or finiteness checks.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import embedkit.losses
from _factories import (
    CLASSIFIER_LOSSES,
    DIM,
    LOSSES,
    PAIR_LOSSES,
    class_parameter,
    make_loss,
    one_cpu_thread,
    pk_labels,
    random_batch,
)
from embedkit.losses import (
    ArcFaceLoss,
    ContrastiveLoss,
    CosFaceLoss,
    Loss,
    LossSum,
    MultiSimilarityLoss,
    ProxyAnchorLoss,
    SupConLoss,
    TripletMarginLoss,
)
from embedkit.similarity import pairwise_distance

_threads = pytest.fixture(autouse=True, scope="module")(one_cpu_thread)


def _batch(n: int = 8, *, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """8 Gaussian rows, labels [0, 0, 1, 1, 2, 2, 3, 3]."""
    return random_batch(n, DIM, num_classes=4, dtype=dtype)


# == input checks =====================================================================
BAD_EMBEDDINGS = [
    pytest.param(lambda x: x.tolist(), TypeError, r"embeddings must be a torch\.Tensor.*got list", id="list"),
    pytest.param(
        lambda x: x.numpy(),
        TypeError,
        r"embeddings must be a torch\.Tensor.*array of shape \(8, 8\)",
        id="numpy",
    ),
    pytest.param(lambda x: x[0], ValueError, r"embeddings must be 2-D.*got shape \(8,\)", id="1-D"),
    pytest.param(
        lambda x: x[:, :, None], ValueError, r"embeddings must be 2-D.*got shape \(8, 8, 1\)", id="3-D"
    ),
    pytest.param(
        lambda x: x.long(),
        TypeError,
        r"embeddings must have a floating-point dtype.*got torch\.int64",
        id="integer",
    ),
    pytest.param(
        lambda x: x.bool(), TypeError, r"embeddings must have a floating-point dtype.*torch\.bool", id="bool"
    ),
    pytest.param(
        lambda x: x.index_fill(1, torch.tensor([3]), float("nan")),
        ValueError,
        r"embeddings contains 8 non-finite value\(s\)",
        id="nan",
    ),
    pytest.param(
        lambda x: x.index_fill(0, torch.tensor([2]), float("-inf")),
        ValueError,
        r"embeddings contains 8 non-finite value\(s\) \(NaN or inf\) out of 64",
        id="inf",
    ),
]


@pytest.mark.parametrize(("corrupt", "error", "message"), BAD_EMBEDDINGS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_bad_embeddings_are_rejected_with_a_clear_message(name, corrupt, error, message):
    x, labels = _batch()
    with pytest.raises(error, match=message):
        make_loss(name, 4)(corrupt(x), labels)


@pytest.mark.parametrize("name", list(LOSSES))
def test_empty_batch_is_rejected(name):
    with pytest.raises(ValueError, match=r"embeddings is an empty batch \(shape \(0, 8\)\)"):
        make_loss(name, 4)(torch.empty(0, DIM), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"embeddings has embedding_dim 0"):
        make_loss(name, 4)(torch.empty(3, 0), torch.zeros(3, dtype=torch.long))


BAD_LABELS = [
    pytest.param(
        lambda y: y.float(), TypeError, r"labels must have an integer dtype.*got torch\.float32", id="float"
    ),
    pytest.param(
        lambda y: y.bool(), TypeError, r"labels must have an integer dtype.*got torch\.bool", id="bool"
    ),
    pytest.param(
        lambda y: y.numpy().astype(float),
        TypeError,
        r"labels must hold integers.*dtype float64",
        id="numpy-float",
    ),
    pytest.param(lambda y: [0.0, 1.5] * 4, TypeError, r"labels must hold integers", id="list-of-floats"),
    pytest.param(lambda y: None, TypeError, r"labels must be a 1-D integer tensor.*got NoneType", id="none"),
    pytest.param(
        lambda y: "00112233", TypeError, r"labels must be a 1-D integer tensor.*got str", id="string"
    ),
    pytest.param(
        lambda y: y[:, None], ValueError, r"labels must be 1-D, of shape \(8,\); got shape \(8, 1\)", id="2-D"
    ),
    pytest.param(
        lambda y: y[:5], ValueError, r"labels has 5 entries but embeddings has 8 rows", id="too-short"
    ),
    pytest.param(
        lambda y: torch.cat([y, y]),
        ValueError,
        r"labels has 16 entries but embeddings has 8 rows",
        id="too-long",
    ),
]


@pytest.mark.parametrize(("corrupt", "error", "message"), BAD_LABELS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_bad_labels_are_rejected_with_a_clear_message(name, corrupt, error, message):
    x, labels = _batch()
    with pytest.raises(error, match=message):
        make_loss(name, 4)(x, corrupt(labels))


@pytest.mark.parametrize("name", CLASSIFIER_LOSSES)
@pytest.mark.parametrize(("bad", "shown"), [(4, "found 4"), (-1, "found -1"), (1000, "found 1000")])
def test_classifier_labels_must_be_in_range(name, bad, shown):
    x, labels = _batch()
    labels = labels.clone()
    labels[3] = bad
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, num_classes\) = \[0, 4\); {shown}"):
        make_loss(name, 4)(x, labels)


@pytest.mark.parametrize("name", CLASSIFIER_LOSSES)
def test_classifier_checks_embedding_dim_and_rejects_a_reference_set(name):
    x, labels = _batch()
    loss = make_loss(name, 4)
    with pytest.raises(
        ValueError,
        match=rf"embeddings has embedding_dim 5 but {type(loss).__name__} was built "
        r"with embedding_dim=8",
    ):
        loss(x[:, :5], labels)
    with pytest.raises(TypeError, match=r"takes no ref_embeddings, ref_labels"):
        loss(x, labels, ref_embeddings=x, ref_labels=labels)


@pytest.mark.parametrize("name", list(LOSSES))
def test_any_integer_label_type_gives_the_same_value(name):
    """Tensors of any integer dtype, numpy arrays and lists are all accepted labels.

    (int32 labels once crashed the classifier losses inside cross_entropy/one_hot.)
    """
    x, labels = _batch()
    loss = make_loss(name, 4)
    expected = loss(x, labels).item()
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert loss(x, labels.to(dtype)).item() == expected, dtype
    assert loss(x, labels.numpy().astype(np.int32)).item() == expected
    assert loss(x, labels.tolist()).item() == expected


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_reference_set_is_checked(name):
    x, labels = _batch()
    loss = make_loss(name)
    with pytest.raises(
        ValueError,
        match=r"ref_embeddings and ref_labels must be given together; got only "
        r"ref_embeddings",
    ):
        loss(x, labels, ref_embeddings=x)
    with pytest.raises(ValueError, match=r"got only ref_labels"):
        loss(x, labels, ref_labels=labels)
    with pytest.raises(ValueError, match=r"embeddings has embedding_dim 8 but ref_embeddings has 3"):
        loss(x, labels, ref_embeddings=x[:, :3], ref_labels=labels)
    with pytest.raises(ValueError, match=r"ref_labels has 7 entries but ref_embeddings has 8 rows"):
        loss(x, labels, ref_embeddings=x, ref_labels=labels[:7])
    with pytest.raises(ValueError, match=r"ref_embeddings contains 1 non-finite"):
        loss(
            x,
            labels,
            ref_embeddings=x.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(np.inf)),
            ref_labels=labels,
        )
    with pytest.raises(TypeError, match=r"ref_labels must have an integer dtype"):
        loss(x, labels, ref_embeddings=x, ref_labels=labels.double())


CONSTRUCTOR_ERRORS = [
    pytest.param(
        lambda: ArcFaceLoss(4, 8, margin=28.6),
        ValueError,
        r"margin is in radians.*got 28\.6.*math\.radians",
        id="arcface-degrees",
    ),
    pytest.param(
        lambda: ArcFaceLoss(4, 8, margin=-0.1), ValueError, r"margin is in radians", id="arcface-negative"
    ),
    pytest.param(
        lambda: CosFaceLoss(0, 8), ValueError, r"num_classes must lie in \[1, inf\); got 0", id="classes-0"
    ),
    pytest.param(
        lambda: CosFaceLoss(2.5, 8),
        TypeError,
        r"num_classes must be an integer; got float 2\.5",
        id="classes-float",
    ),
    pytest.param(
        lambda: CosFaceLoss(4, 0), ValueError, r"embedding_dim must lie in \[1, inf\); got 0", id="dim-0"
    ),
    pytest.param(
        lambda: CosFaceLoss(4, 8, scale=0.0), ValueError, r"scale must lie in \(0, inf", id="scale-0"
    ),
    pytest.param(
        lambda: CosFaceLoss(4, 8, scale=True),
        TypeError,
        r"scale must be a real number; got bool True",
        id="scale-bool",
    ),
    pytest.param(
        lambda: CosFaceLoss(4, 8, temperature=-1.0),
        ValueError,
        r"temperature must lie in \(0, inf",
        id="temperature-negative",
    ),
    pytest.param(
        lambda: CosFaceLoss(4, 8, margin=float("nan")),
        ValueError,
        r"margin must be finite; got nan",
        id="margin-nan",
    ),
    pytest.param(
        lambda: ArcFaceLoss(4, 8, sub_centers=0),
        ValueError,
        r"sub_centers must lie in \[1, inf\)",
        id="sub-centers-0",
    ),
    pytest.param(
        lambda: SupConLoss(temperature=0), ValueError, r"temperature must lie in \(0, inf", id="supcon-t0"
    ),
    pytest.param(
        lambda: SupConLoss(temperature="0.1"),
        TypeError,
        r"temperature must be a real number; got str",
        id="supcon-t-str",
    ),
    pytest.param(
        lambda: TripletMarginLoss(mining="hard"),
        ValueError,
        r"mining must be one of 'all', 'batch_all', 'batch_hard', 'semi_hard'; got 'hard'",
        id="mining",
    ),
    pytest.param(
        lambda: TripletMarginLoss(distance="dot"),
        ValueError,
        r"distance must be one of .*got 'dot'",
        id="triplet-distance",
    ),
    pytest.param(
        lambda: ContrastiveLoss(distance="manhattan"),
        ValueError,
        r"distance must be one of",
        id="contrastive-distance",
    ),
    pytest.param(
        lambda: MultiSimilarityLoss(alpha=0), ValueError, r"alpha must lie in \(0, inf", id="ms-alpha"
    ),
    pytest.param(
        lambda: MultiSimilarityLoss(epsilon=-0.1),
        ValueError,
        r"epsilon must lie in \[0, inf",
        id="ms-epsilon",
    ),
    pytest.param(
        lambda: ProxyAnchorLoss(4, 8, alpha=-1.0), ValueError, r"alpha must lie in \(0, inf", id="pa-alpha"
    ),
]


@pytest.mark.parametrize(("build", "error", "message"), CONSTRUCTOR_ERRORS)
def test_bad_hyper_parameters_are_rejected(build, error, message):
    with pytest.raises(error, match=message):
        build()


# == batches without positive pairs ======================================================
# A positive pair is what these losses learn from (an anchor and its positive);
# without one there is nothing to contrast: exactly 0, with a gradient of 0.
NEED_A_POSITIVE = [
    name
    for name in PAIR_LOSSES
    if name not in {"contrastive", "contrastive_cosine", "multi_similarity_no_mining"}
]


@pytest.mark.parametrize("layout", ["all_distinct", "single_row"])
@pytest.mark.parametrize("name", NEED_A_POSITIVE)
def test_no_positive_pair_gives_exactly_zero(name, layout):
    x, _ = _batch()
    labels = torch.arange(8)
    if layout == "single_row":
        x, labels = x[:1], labels[:1]
    x = x.clone().requires_grad_(True)
    loss = make_loss(name)
    value = loss(x, labels)
    assert value.item() == 0.0 and not math.isnan(value.item())
    assert value.dtype == torch.float32
    value.backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))
    assert loss.last_value == 0.0
    assert loss.last_stats["num_positive_pairs"] == 0
    if "num_triplets" in loss.last_stats:
        assert loss.last_stats["num_triplets"] == 0
        assert loss.last_stats["active_triplet_fraction"] == 0.0


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_single_row_batch_gives_exactly_zero(name):
    """One row: no pair of any kind, so every pair loss is exactly 0 (never NaN)."""
    x = torch.randn(1, DIM, requires_grad=True)
    loss = make_loss(name)
    value = loss(x, torch.tensor([3]))
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert loss.last_stats["num_positive_pairs"] == 0 and loss.last_stats["num_negative_pairs"] == 0


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_one_class_batch_has_no_negatives_and_stays_finite(name):
    x, _ = _batch()
    x.requires_grad_(True)
    loss = make_loss(name)
    value = loss(x, torch.zeros(8, dtype=torch.long))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    assert loss.last_stats["num_negative_pairs"] == 0
    assert loss.last_stats["num_positive_pairs"] == 8 * 7


def test_contrastive_without_positive_pairs_keeps_only_its_negative_term():
    """Contrastive loss has independent pull and push terms (Hadsell et al.; as in
    pytorch-metric-learning), so with no positive pair the push term remains:
    mean over active negative pairs of [m- - d]_+. The positive term is exactly 0."""
    x, _ = _batch()
    x = x.clone().requires_grad_(True)
    loss = ContrastiveLoss(0.0, 1.5)
    value = loss(x, torch.arange(8))
    d = pairwise_distance(x.detach(), normalize=True)
    off_diagonal = ~torch.eye(8, dtype=torch.bool)
    push = torch.relu(1.5 - d)[off_diagonal]
    expected = push[push > 0].mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    assert torch.isfinite(x.grad).all()
    assert loss.last_stats["num_positive_pairs"] == 0
    assert loss.last_stats["active_positive_fraction"] == 0.0


# == statistics ==========================================================================
def test_statistics_are_empty_before_the_first_call():
    loss = TripletMarginLoss()
    assert loss.last_value is None and loss.last_stats == {}


@pytest.mark.parametrize("mining", ["all", "batch_all", "batch_hard", "semi_hard"])
@pytest.mark.parametrize("margin", [0.2, 0.05, 1.0])
def test_collapsed_embeddings_read_as_loss_at_the_margin(mining, margin):
    """Case study 04: every embedding identical ⇒ every triplet active, loss flat at the margin."""
    loss = TripletMarginLoss(margin, mining=mining)
    value = loss(torch.full((12, DIM), 0.3), pk_labels(4, 3))
    stats = loss.last_stats
    assert value.item() == pytest.approx(margin, abs=1e-6)
    assert stats["active_triplet_fraction"] == 1.0
    assert stats["mean_positive_distance"] == 0.0 and stats["mean_negative_distance"] == 0.0
    expected_triplets = {"batch_hard": 12, "semi_hard": 12 * 2}.get(mining, 12 * 2 * 9)
    assert stats["num_triplets"] == expected_triplets


def test_well_separated_classes_have_no_active_triplets():
    centres = torch.eye(DIM)[:4] * 10
    x = centres.repeat_interleave(3, dim=0) + 0.01 * torch.randn(
        12, DIM, generator=torch.Generator().manual_seed(1)
    )
    loss = TripletMarginLoss(0.2, mining="all")
    assert loss(x, pk_labels(4, 3)).item() == 0.0
    assert loss.last_stats["active_triplet_fraction"] == 0.0
    assert loss.last_stats["num_triplets"] == 12 * 2 * 9


@pytest.mark.parametrize("name", CLASSIFIER_LOSSES)
def test_classifier_accuracy_counts_correct_predictions(name):
    """Embeddings on their own class centre: accuracy 1; on another class's centre: 0."""
    loss = make_loss(name, 4)
    centres = class_parameter(loss).detach()
    if hasattr(loss, "sub_centers"):
        centres = centres[:: loss.sub_centers]
    labels = torch.arange(4)
    loss(centres.clone(), labels)
    if "accuracy" in loss.last_stats:
        assert loss.last_stats["accuracy"] == 1.0
        loss(centres.clone(), labels.roll(1))
        assert loss.last_stats["accuracy"] == 0.0
        assert loss.logits(centres).argmax(dim=1).tolist() == labels.tolist()
    else:
        assert loss.last_stats["num_positive_proxies"] == 4


def test_stats_are_detached_and_read_as_floats():
    x, labels = _batch()
    x.requires_grad_(True)
    loss = SupConLoss()
    loss(x, labels)
    assert all(type(v) is float for v in loss.last_stats.values())
    assert all(not v.requires_grad for v in loss._last_stats.values() if isinstance(v, torch.Tensor))
    assert type(loss.last_value) is float


# == algebra =============================================================================
@pytest.fixture
def terms():
    """Three losses of different kinds: a classifier, a pair loss and a triplet loss."""
    return make_loss("arcface", 4), SupConLoss(), TripletMarginLoss(mining="all")


def _separate(losses, x, labels):
    return [loss(x, labels).item() for loss in losses]


@pytest.mark.parametrize(
    ("build", "weights"),
    [
        pytest.param(lambda a, b, c: a + b, (1.0, 1.0, 0.0), id="a+b"),
        pytest.param(lambda a, b, c: 0.3 * a, (0.3, 0.0, 0.0), id="w*a"),
        pytest.param(lambda a, b, c: a * 0.3, (0.3, 0.0, 0.0), id="a*w"),
        pytest.param(lambda a, b, c: a / 4, (0.25, 0.0, 0.0), id="a/w"),
        pytest.param(lambda a, b, c: -a, (-1.0, 0.0, 0.0), id="-a"),
        pytest.param(lambda a, b, c: a - b, (1.0, -1.0, 0.0), id="a-b"),
        pytest.param(lambda a, b, c: sum([a, b, c]), (1.0, 1.0, 1.0), id="sum"),
        pytest.param(lambda a, b, c: 0.5 * (a + b) + c, (0.5, 0.5, 1.0), id="nested"),
        pytest.param(lambda a, b, c: 2 * (a - 0.5 * (b - c)) / 4, (0.5, -0.25, 0.25), id="deep"),
        pytest.param(lambda a, b, c: a + 0.5 * b, (1.0, 0.5, 0.0), id="design-doc"),
    ],
)
def test_combinations_equal_the_weighted_sum_of_their_terms(terms, build, weights):
    x, labels = _batch()
    combined = build(*terms)
    assert isinstance(combined, Loss)
    assert isinstance(combined, LossSum)
    # Flattened: each term appears once per occurrence, with its total weight.
    expected_terms = [(w, t) for w, t in zip(weights, terms, strict=True) if w != 0]
    assert [(pytest.approx(w), id(t)) for w, t in combined.terms] == [(w, id(t)) for w, t in expected_terms]

    x_sum = x.clone().requires_grad_(True)
    value = combined(x_sum, labels)
    separate = _separate(terms, x, labels)
    expected = sum(w * v for w, v in zip(weights, separate, strict=True))
    assert value.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert combined.last_value == pytest.approx(expected, rel=1e-6, abs=1e-6)

    # Each term's own record is the value it contributed; the sum lists them by position.
    for i, (_, term) in enumerate(combined.terms):
        j = next(k for k, t in enumerate(terms) if t is term)
        assert term.last_value == pytest.approx(separate[j], rel=1e-6)
        prefix = f"{i}.{type(term).__name__}"
        assert combined.last_stats[f"{prefix}.loss"] == pytest.approx(separate[j], rel=1e-6)
        for key, stat in term.last_stats.items():
            assert combined.last_stats[f"{prefix}.{key}"] == stat

    # Gradients add up as the values do.
    value.backward()
    expected_grad = torch.zeros_like(x)
    for w, term in zip(weights, terms, strict=True):
        if w:
            xi = x.clone().requires_grad_(True)
            (w * term(xi, labels)).backward()
            expected_grad += xi.grad
    torch.testing.assert_close(x_sum.grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_sum_of_one_loss_is_that_loss():
    loss = SupConLoss()
    assert sum([loss]) is loss


def test_sum_stats_keys_name_position_and_class(terms):
    a, b, c = terms
    combined = 0.5 * (a + b) + c
    combined(*_batch())
    keys = set(combined.last_stats)
    assert {"0.ArcFaceLoss.loss", "1.SupConLoss.loss", "2.TripletMarginLoss.loss"} <= keys
    assert "0.ArcFaceLoss.accuracy" in keys
    assert "1.SupConLoss.num_positive_pairs" in keys
    assert "2.TripletMarginLoss.active_triplet_fraction" in keys
    assert all(type(v) is float for v in combined.last_stats.values())


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda a: a + 1, id="a+1"),
        pytest.param(lambda a: 1 + a, id="1+a"),
        pytest.param(lambda a: a * "2", id="a*str"),
        pytest.param(lambda a: a * True, id="a*bool"),
        pytest.param(lambda a: a - 1, id="a-1"),
        pytest.param(lambda a: a / "2", id="a/str"),
    ],
)
def test_algebra_rejects_non_losses_and_non_numbers(bad):
    with pytest.raises(TypeError):
        bad(SupConLoss())


def test_algebra_rejects_bad_weights():
    loss = SupConLoss()
    with pytest.raises(ValueError, match=r"weight must be finite; got nan"):
        _ = loss * float("nan")
    with pytest.raises(ValueError, match=r"weight must be finite; got inf"):
        _ = float("inf") * loss
    with pytest.raises(ZeroDivisionError, match=r"cannot divide a loss by 0"):
        _ = loss / 0
    with pytest.raises(ValueError, match=r"needs at least one term"):
        LossSum([])
    with pytest.raises(TypeError, match=r"each term must be an embedkit Loss; got Linear"):
        LossSum([(1.0, torch.nn.Linear(2, 2))])


def test_classifier_parameters_belong_to_the_sum_and_move_with_it():
    arcface, proxies = make_loss("arcface", 4), make_loss("proxy_anchor", 4)
    combined = arcface + 0.5 * SupConLoss() + 0.1 * proxies
    params = list(combined.parameters())
    assert len(params) == 2
    assert any(p is arcface.weight for p in params) and any(p is proxies.proxies for p in params)
    combined.to(torch.float64)
    assert arcface.weight.dtype == torch.float64 and proxies.proxies.dtype == torch.float64
    x, labels = _batch(dtype=torch.float64)
    value = combined(x, labels)
    assert value.dtype == torch.float64
    value.backward()
    assert arcface.weight.grad is not None and proxies.proxies.grad is not None


def test_an_optimizer_over_the_sum_trains_the_class_centres():
    arcface = make_loss("arcface", 4)
    combined = arcface + SupConLoss()
    optimizer = torch.optim.SGD(combined.parameters(), lr=0.1)
    before = arcface.weight.detach().clone()
    x, labels = _batch()
    combined(x, labels).backward()
    optimizer.step()
    assert not torch.equal(before, arcface.weight.detach())


def test_reference_set_is_routed_only_to_pair_terms():
    x, labels = _batch()
    reference, reference_labels = random_batch(12, DIM, num_classes=4, seed=3)
    arcface, supcon, triplet = make_loss("arcface", 4), SupConLoss(), TripletMarginLoss(mining="all")
    combined = arcface + 0.5 * supcon + triplet
    value = combined(x, labels, ref_embeddings=reference, ref_labels=reference_labels)
    expected = (
        make_loss("arcface", 4)(x, labels)
        + 0.5 * SupConLoss()(x, labels, ref_embeddings=reference, ref_labels=reference_labels)
        + TripletMarginLoss(mining="all")(x, labels, ref_embeddings=reference, ref_labels=reference_labels)
    )
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    # The pair terms counted pairs against the 12 references, not the batch.
    assert supcon.last_stats["num_positive_pairs"] + supcon.last_stats["num_negative_pairs"] == 8 * 12


def test_sum_of_classifier_losses_rejects_a_reference_set():
    x, labels = _batch()
    combined = make_loss("arcface", 4) + make_loss("proxy_anchor", 4)
    with pytest.raises(
        TypeError, match=r"none of the terms \(ArcFaceLoss, ProxyAnchorLoss\) accepts ref_embeddings"
    ):
        combined(x, labels, ref_embeddings=x, ref_labels=labels)
    with pytest.raises(TypeError, match=r"accepts ref_embeddings/ref_labels"):
        combined(x, labels, ref_labels=labels)


def test_state_dict_round_trips():
    source = make_loss("arcface", 4, seed=1) + 0.5 * make_loss("proxy_anchor", 4, seed=2) + SupConLoss()
    target = make_loss("arcface", 4, seed=3) + 0.5 * make_loss("proxy_anchor", 4, seed=4) + SupConLoss()
    x, labels = _batch()
    assert source(x, labels).item() != target(x, labels).item()
    state = source.state_dict()
    # Parameters, plus each term's hyper-parameters and the sum's weights (checked on load).
    assert set(state) == {
        "losses.0.weight",
        "losses.1.proxies",
        "_extra_state",
        "losses.0._extra_state",
        "losses.1._extra_state",
        "losses.2._extra_state",
    }
    target.load_state_dict(state)
    assert target(x, labels).item() == source(x, labels).item()


def test_the_same_loss_twice_counts_twice():
    loss = SupConLoss()
    x, labels = _batch()
    single = loss(x, labels).item()
    assert (loss + loss)(x, labels).item() == pytest.approx(2 * single, rel=1e-6)
    assert (loss - loss)(x, labels).item() == pytest.approx(0.0, abs=1e-6)


# == layering: losses call the shared modules ===========================================
LOSSES_DIR = Path(embedkit.losses.__file__).parent

# Calls that compute pairwise similarities or norms, or validate values, which
# belong in embedkit.similarity / embedkit._checks. Matched on the called name
# (``torch.mm(...)``, ``x.mm(...)``, ``mm(...)`` alike).
FORBIDDEN_CALLS = {
    "matmul": "matrix product: use embedkit.similarity.pairwise_similarity",
    "mm": "matrix product: use embedkit.similarity.pairwise_similarity",
    "bmm": "matrix product: use embedkit.similarity.pairwise_similarity",
    "mv": "matrix product: use embedkit.similarity.pairwise_similarity",
    "einsum": "matrix product: use embedkit.similarity.pairwise_similarity",
    "tensordot": "matrix product: use embedkit.similarity.pairwise_similarity",
    "inner": "matrix product: use embedkit.similarity.pairwise_similarity",
    "linear": "F.linear is a matrix product: use embedkit.similarity.pairwise_similarity",
    "cdist": "pairwise distance: use embedkit.similarity.pairwise_distance",
    "dist": "distance: use embedkit.similarity.pairwise_distance",
    "cosine_similarity": "use embedkit.similarity.pairwise_similarity(metric='cosine')",
    "normalize": "normalisation: use embedkit.similarity (pairwise_* or l2_normalize)",
    "norm": "norms: use embedkit.similarity",
    "vector_norm": "norms: use embedkit.similarity",
    "matrix_norm": "norms: use embedkit.similarity",
    "isfinite": "input validation: use embedkit._checks.check_embeddings",
    "isnan": "input validation: use embedkit._checks.check_embeddings",
}
# torch's F.pairwise_distance (not embedkit's, which the losses import by bare name).
FORBIDDEN_ATTRIBUTE_CALLS = {"pairwise_distance": "torch's pairwise_distance: use embedkit.similarity"}


def find_layering_violations(source: str, filename: str = "<string>") -> list[str]:
    """Places in ``source`` that compute similarities/norms or check finiteness themselves.

    Works on the syntax tree, so docstrings, comments and keyword names such as
    ``normalize=True`` are not matched, and decorators are not mistaken for ``@``.
    """
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            problems.append(f"{where}: `@` (matrix product): use embedkit.similarity.pairwise_similarity")
        elif isinstance(node, ast.AugAssign) and isinstance(node.op, ast.MatMult):
            problems.append(f"{where}: `@=` (matrix product): use embedkit.similarity.pairwise_similarity")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in FORBIDDEN_CALLS:
                problems.append(f"{where}: `{ast.unparse(func)}(...)` — {FORBIDDEN_CALLS[name]}")
            elif isinstance(func, ast.Attribute) and name in FORBIDDEN_ATTRIBUTE_CALLS:
                problems.append(f"{where}: `{ast.unparse(func)}(...)` — {FORBIDDEN_ATTRIBUTE_CALLS[name]}")
    return problems


LOSS_MODULES = sorted(p for p in LOSSES_DIR.glob("*.py"))


@pytest.mark.parametrize("path", LOSS_MODULES, ids=lambda p: p.name)
def test_losses_compute_no_similarities_and_check_no_inputs_themselves(path):
    """No loss computes its own pairwise similarities or validates its own inputs.

    base.py is scanned too: its validation plumbing only *calls* embedkit._checks.
    """
    problems = find_layering_violations(path.read_text(), f"src/embedkit/losses/{path.name}")
    assert not problems, (
        "Losses must get similarities, distances and norms from embedkit.similarity and input "
        "checks from embedkit._checks (see STYLE.md), but found:\n  " + "\n  ".join(problems)
    )


@pytest.mark.parametrize(
    "path", [p for p in LOSS_MODULES if p.name not in {"__init__.py", "base.py"}], ids=lambda p: p.name
)
def test_every_loss_module_uses_the_shared_similarity_module(path):
    tree = ast.parse(path.read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "similarity" and node.level == 2
        for alias in node.names
    }
    assert imported & {"pairwise_similarity", "pairwise_distance"}, (
        f"{path.name} imports {imported or 'nothing'}"
    )


@pytest.mark.parametrize(
    "snippet",
    [
        "s = x @ y.T",
        "s @= w",
        "s = torch.matmul(x, y.T)",
        "s = x.mm(y.t())",
        "s = torch.bmm(a, b)",
        "s = torch.einsum('nd,md->nm', x, y)",
        "s = F.linear(F.normalize(x), F.normalize(w))",
        "d = torch.cdist(x, y)",
        "d = torch.nn.functional.pairwise_distance(x, y)",
        "s = F.cosine_similarity(x, y)",
        "n = x.norm(dim=1)",
        "n = torch.linalg.vector_norm(x, dim=1)",
        "x = normalize(x)",
        "assert torch.isfinite(x).all()",
        "bad = x.isnan().any()",
    ],
)
def test_layering_scan_catches_each_pattern(snippet):
    assert find_layering_violations(snippet)


def test_layering_scan_ignores_docstrings_keywords_decorators_and_shared_calls():
    clean = '''
class Loss:
    """Computes x @ y.T and torch.cdist(x, y) and F.normalize(x) in prose only."""

    @property
    def normalize(self):  # comment: torch.isfinite(x), x.norm()
        return self._normalize

    def compute(self, x):
        d = pairwise_distance(x, metric="euclidean", normalize=self.normalize)
        s = pairwise_similarity(x)
        check_embeddings(x, "embeddings")
        return torch.isinf(d).sum() + s.sum()
'''
    assert find_layering_violations(clean) == []
