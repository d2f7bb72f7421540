"""Property tests for every loss: what must hold for *any* labelled batch.

Batches come from :func:`tests._factories.labelled_batches`: single-class,
all-distinct, P×K and random label layouts, with zero rows and duplicate rows
(possibly carrying different labels) mixed in. Everything runs in float64 so that
the comparisons below test the definitions, not rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from _factories import (
    CONTINUOUS_LOSSES,
    LOSSES,
    MARGIN_SOFTMAX_LOSSES,
    PAIR_LOSSES,
    is_classifier,
    labelled_batches,
    make_loss,
    one_cpu_thread,
)

_threads = pytest.fixture(autouse=True, scope="module")(one_cpu_thread)

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None)


def _has_distance_ties(embeddings, labels):
    """Whether an anchor is (nearly) equidistant from a positive and a negative.

    Semi-hard mining keeps the nearest negative *strictly* farther than the
    positive, so at such a tie its choice (and the loss) jumps with the last bit of
    the matmul, and BLAS rounds identical columns differently depending on where
    they sit in the matrix. Permutation invariance can only hold away from ties.
    """
    unit = embeddings / embeddings.norm(dim=1, keepdim=True).clamp_min(1e-300)
    d = torch.cdist(unit, unit)
    positive = labels[:, None] == labels[None, :]
    gap = (d[:, :, None] - d[:, None, :]).abs()
    mixed = positive[:, :, None] & ~positive[:, None, :]
    return bool((mixed & (gap < 1e-9)).any())


def _check_stats(name, stats, num_rows):
    for key, value in stats.items():
        assert type(value) is float, f"{name}: last_stats[{key!r}] is {type(value).__name__}"
        assert math.isfinite(value), f"{name}: last_stats[{key!r}] = {value}"
        if key.endswith("_fraction") or key == "accuracy":
            assert 0.0 <= value <= 1.0, f"{name}: {key} = {value}"
        elif key.startswith("num_"):
            assert value >= 0 and value == int(value), f"{name}: {key} = {value}"
        elif key.endswith(("_similarity", "_cosine")):
            assert -1.0 - 1e-9 <= value <= 1.0 + 1e-9, f"{name}: {key} = {value}"
        elif key.endswith("_distance"):
            assert value >= 0.0, f"{name}: {key} = {value}"
    if "num_positive_pairs" in stats:
        assert stats["num_positive_pairs"] + stats["num_negative_pairs"] == num_rows * (num_rows - 1)


def _value_and_grad(loss, embeddings, labels):
    embeddings = embeddings.clone().requires_grad_(True)
    value = loss(embeddings, labels)
    value.backward()
    return value.detach(), embeddings.grad


@pytest.mark.parametrize("name", list(LOSSES))
@PROPERTY_SETTINGS
@given(batch=labelled_batches())
def test_finite_non_negative_with_finite_gradient_and_sane_stats(name, batch):
    """Duplicates, one-class batches and zero vectors give a finite, non-negative loss and gradient.

    ``last_stats`` are floats: fractions and accuracies in [0, 1], counts whole,
    similarities in [-1, 1], distances ≥ 0, pair counts as counted by hand.
    """
    embeddings, labels = batch
    loss = make_loss(name, dtype=torch.float64)
    value, grad = _value_and_grad(loss, embeddings, labels)
    assert loss.last_value == value.item()
    stats = loss.last_stats
    assert stats, f"{name} recorded no statistics"
    _check_stats(name, stats, len(labels))
    if name in PAIR_LOSSES:
        same = labels[:, None] == labels[None, :]
        assert stats["num_positive_pairs"] == same.sum().item() - len(labels)
    assert value.shape == ()
    assert torch.isfinite(value), f"{name} gave {value.item()} on labels {labels.tolist()}"
    # Every loss here is a hinge, a softplus, log(1 + Σ exp) or -log(probability).
    assert value.item() >= -1e-12, f"{name} is negative: {value.item()}"
    assert grad is not None and torch.isfinite(grad).all(), f"{name}: non-finite gradient {grad}"
    if is_classifier(loss):
        centres = next(iter(loss.parameters()))
        assert centres.grad is not None and torch.isfinite(centres.grad).all()


@pytest.mark.parametrize("name", list(LOSSES))
@PROPERTY_SETTINGS
@given(batch=labelled_batches(), data=st.data())
def test_invariant_to_permuting_the_batch(name, batch, data):
    """Shuffling rows together with their labels changes neither the loss nor its statistics."""
    embeddings, labels = batch
    if name == "triplet_semi_hard":
        assume(not _has_distance_ties(embeddings, labels))
    order = torch.tensor(data.draw(st.permutations(range(len(labels)))), dtype=torch.long)
    loss = make_loss(name, dtype=torch.float64)
    value = loss(embeddings, labels).item()
    stats = loss.last_stats
    permuted = loss(embeddings[order], labels[order]).item()
    assert permuted == pytest.approx(value, rel=1e-9, abs=1e-12)
    assert loss.last_stats == pytest.approx(stats, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
@PROPERTY_SETTINGS
@given(batch=labelled_batches(), exponent=st.integers(-6, 6))
def test_power_of_two_scaling_changes_nothing(name, batch, exponent):
    """Every loss here normalises its embeddings; scaling by 2**k is exact, so the value is identical."""
    embeddings, labels = batch
    loss = make_loss(name, dtype=torch.float64)
    value = loss(embeddings, labels).item()
    scaled = loss(embeddings * 2.0**exponent, labels).item()
    assert scaled == pytest.approx(value, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", CONTINUOUS_LOSSES)
@PROPERTY_SETTINGS
@given(batch=labelled_batches(), scale=st.floats(0.01, 100.0))
def test_invariant_to_scaling_the_embeddings(name, batch, scale):
    """Losses on normalised embeddings do not change when every embedding is scaled by c > 0."""
    embeddings, labels = batch
    loss = make_loss(name, dtype=torch.float64)
    value = loss(embeddings, labels).item()
    scaled = loss(embeddings * scale, labels).item()
    assert scaled == pytest.approx(value, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("name", PAIR_LOSSES)
@PROPERTY_SETTINGS
@given(batch=labelled_batches())
def test_pair_losses_with_a_reference_set_stay_finite(name, batch):
    """Queries against a separate reference set (duplicates across the two sets included)."""
    embeddings, labels = batch
    half = max(1, len(labels) // 2)
    queries, query_labels = embeddings[:half].clone().requires_grad_(True), labels[:half]
    reference, reference_labels = embeddings[half - 1 :], labels[half - 1 :]
    loss = make_loss(name, dtype=torch.float64)
    value = loss(queries, query_labels, ref_embeddings=reference, ref_labels=reference_labels)
    value.backward()
    assert torch.isfinite(value) and value.item() >= -1e-12
    assert torch.isfinite(queries.grad).all()
    stats = loss.last_stats
    same = query_labels[:, None] == reference_labels[None, :]
    assert stats["num_positive_pairs"] == same.sum().item()


@pytest.mark.parametrize("name", MARGIN_SOFTMAX_LOSSES)
@PROPERTY_SETTINGS
@given(batch=labelled_batches())
def test_classifier_logits_are_bounded_by_the_scale(name, batch):
    """``logits()`` (for monitors) are ``scale * cos / temperature``: finite and within ±scale/T."""
    embeddings, labels = batch
    loss = make_loss(name, dtype=torch.float64)
    logits = loss.logits(embeddings)
    bound = loss.scale / loss.temperature
    assert logits.shape == (len(labels), loss.num_classes)
    assert torch.isfinite(logits).all()
    assert (logits.abs() <= bound * (1 + 1e-12)).all()
