"""Edges of the loss API: tensor weights, checkpoints, checked assignment, PML keyword names."""

from __future__ import annotations

import math

import pytest
import torch

from embedkit.losses import (
    ArcFaceLoss,
    CircleLoss,
    ContrastiveLoss,
    CosFaceLoss,
    MultiSimilarityLoss,
    NTXentLoss,
    ProxyAnchorLoss,
    SupConLoss,
    TripletMarginLoss,
)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(12, 8, generator=generator), torch.arange(4).repeat_interleave(3)


def test_a_zero_d_tensor_weight_is_a_live_schedule() -> None:
    embeddings, labels = _batch()
    weight = torch.tensor(0.5)
    loss = SupConLoss()
    scheduled = weight * loss + TripletMarginLoss()
    base = SupConLoss()(embeddings, labels) + TripletMarginLoss()(embeddings, labels)
    first = scheduled(embeddings, labels)
    torch.testing.assert_close(
        first, 0.5 * SupConLoss()(embeddings, labels) + TripletMarginLoss()(embeddings, labels)
    )
    weight.fill_(1.0)  # the schedule moves; the sum reads the same tensor
    torch.testing.assert_close(scheduled(embeddings, labels), base)
    torch.testing.assert_close((loss * weight)(embeddings, labels), SupConLoss()(embeddings, labels))
    torch.testing.assert_close(
        (loss / torch.tensor(4.0))(embeddings, labels), SupConLoss()(embeddings, labels) / 4
    )


@pytest.mark.parametrize(
    ("weight", "error"),
    [
        (torch.tensor([1.0, 2.0]), ValueError),
        (torch.tensor(float("nan")), ValueError),
        (torch.tensor(True), TypeError),
    ],
)
def test_bad_tensor_weights_are_named(weight: torch.Tensor, error: type[Exception]) -> None:
    with pytest.raises(error, match="weight"):
        SupConLoss() * weight


def test_dividing_by_a_zero_tensor_raises() -> None:
    with pytest.raises(ZeroDivisionError):
        SupConLoss() / torch.tensor(0.0)


def test_loss_sum_weights_and_hyper_parameters_are_in_the_state_dict() -> None:
    saved = 0.5 * ArcFaceLoss(4, 8, margin=0.3) + SupConLoss(temperature=0.2)
    state = saved.state_dict()
    same = 0.5 * ArcFaceLoss(4, 8, margin=0.3) + SupConLoss(temperature=0.2)
    same.load_state_dict(state)
    torch.testing.assert_close(same.losses[0].weight, saved.losses[0].weight)
    with pytest.raises(ValueError, match="weights"):
        (0.25 * ArcFaceLoss(4, 8, margin=0.3) + SupConLoss(temperature=0.2)).load_state_dict(state)
    with pytest.raises(ValueError, match="margin"):
        (0.5 * ArcFaceLoss(4, 8, margin=0.4) + SupConLoss(temperature=0.2)).load_state_dict(state)
    with pytest.raises(ValueError, match="temperature"):
        (0.5 * ArcFaceLoss(4, 8, margin=0.3) + SupConLoss(temperature=0.1)).load_state_dict(state)


def test_a_single_loss_checkpoint_keeps_its_hyper_parameters() -> None:
    state = TripletMarginLoss(0.3, mining="batch_hard").state_dict()
    TripletMarginLoss(0.3, mining="batch_hard").load_state_dict(state)
    with pytest.raises(ValueError, match="mining"):
        TripletMarginLoss(0.3, mining="semi_hard").load_state_dict(state)


@pytest.mark.parametrize(
    ("make", "name", "bad", "error"),
    [
        (lambda: ArcFaceLoss(4, 8), "margin", 2.0, ValueError),
        (lambda: ArcFaceLoss(4, 8), "scale", 0.0, ValueError),
        (lambda: CosFaceLoss(4, 8), "temperature", -1.0, ValueError),
        (lambda: SupConLoss(), "temperature", 0.0, ValueError),
        (lambda: NTXentLoss(), "temperature", "0.1", TypeError),
        (lambda: TripletMarginLoss(), "margin", -0.1, ValueError),
        (lambda: TripletMarginLoss(), "mining", "hardest", ValueError),
        (lambda: ContrastiveLoss(), "neg_margin", float("inf"), ValueError),
        (lambda: MultiSimilarityLoss(), "epsilon", -1.0, ValueError),
        (lambda: CircleLoss(), "gamma", 0.0, ValueError),
        (lambda: ProxyAnchorLoss(4, 8), "alpha", -2.0, ValueError),
    ],
)
def test_hyper_parameters_are_checked_on_assignment(make, name: str, bad: object, error: type) -> None:
    loss = make()
    before = getattr(loss, name)
    with pytest.raises(error, match=name):
        setattr(loss, name, bad)
    assert getattr(loss, name) == before


def test_a_valid_assignment_is_stored_checked() -> None:
    loss = ArcFaceLoss(4, 8)
    loss.margin = 0.25
    assert loss.margin == 0.25
    loss.scale = 30  # an int is stored as the float the check returns
    assert type(loss.scale) is float


def test_arcface_margin_in_degrees_is_caught_after_construction_too() -> None:
    loss = ArcFaceLoss(4, 8)
    with pytest.raises(ValueError, match=r"radians"):
        loss.margin = 28.6
    loss.margin = math.radians(28.6)


def test_triplet_rejects_a_negative_margin() -> None:
    with pytest.raises(ValueError, match="margin"):
        TripletMarginLoss(margin=-1)
    TripletMarginLoss(margin=0.0, soft_margin=True)


@pytest.mark.parametrize(
    "loss", [SupConLoss(), TripletMarginLoss(), 0.5 * SupConLoss() + TripletMarginLoss()]
)
def test_pml_ref_emb_keyword_names_ref_embeddings(loss) -> None:
    embeddings, labels = _batch()
    with pytest.raises(TypeError, match=r"ref_emb.*ref_embeddings="):
        loss(embeddings, labels, ref_emb=embeddings, ref_labels=labels)


def test_classifier_losses_name_the_keyword_they_refuse() -> None:
    embeddings, labels = _batch()
    with pytest.raises(TypeError, match=r"ref_emb"):
        ArcFaceLoss(4, 8)(embeddings, labels, ref_emb=embeddings)
