"""LossMonitor and TrainingHistory: loss signals over many steps.

* a triplet loss flat at its margin on collapsed embeddings (case study 04);
* batches without positive pairs, triplets that are all satisfied or none valid;
* a loss that keeps falling while the accuracy stays at chance (case study 01);
* healthy training, where nothing may fire;
* the history: series, CSV, TensorBoard, lazy reads of tensor values.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedkit.evaluation.report import Rate
from embedkit.losses import ArcFaceLoss, SupConLoss, TripletMarginLoss
from embedkit.monitors import LossMonitor, TrainingHistory
from test_monitors_collapse import _no_host_reads

FAST = settings(max_examples=8, deadline=None)
PK_LABELS = torch.arange(8).repeat_interleave(4)  # 8 classes x 4 samples


def _collapsed(gen: torch.Generator) -> torch.Tensor:
    return torch.ones(32, 16) + 1e-4 * torch.randn(32, 16, generator=gen)


def _learning(gen: torch.Generator, spread: float) -> torch.Tensor:
    centres = torch.randn(8, 16, generator=gen)
    return centres[PK_LABELS] + spread * torch.randn(32, 16, generator=gen)


# ----------------------------------------------------------------------------- loss at margin
@FAST
@given(
    seed=st.integers(0, 2**16),
    margin=st.sampled_from([0.1, 0.2, 0.5]),
    mining=st.sampled_from(["batch_all", "all", "batch_hard"]),
)
def test_triplet_loss_flat_at_its_margin_is_loss_at_margin(seed: int, margin: float, mining: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    loss_fn = TripletMarginLoss(margin, mining=mining)  # type: ignore[arg-type]
    monitor = LossMonitor(window=10)
    for step in range(12):
        loss_fn(_collapsed(gen), PK_LABELS)
        monitor.update(step, loss_fn)
    report = monitor.compute()
    diagnosis = report.diagnosis("loss_at_margin")
    assert diagnosis is not None and diagnosis.severity == "error"
    assert diagnosis.evidence["margin"] == margin
    assert diagnosis.evidence["mean_active_triplet_fraction"] >= 0.9
    assert report["loss"] == pytest.approx(margin, rel=1e-3)


def test_loss_at_margin_inside_a_loss_sum_names_the_term() -> None:
    gen = torch.Generator().manual_seed(0)
    loss_fn = TripletMarginLoss(0.2) + 0.5 * SupConLoss(0.1)
    monitor = LossMonitor(window=5)
    for step in range(5):
        loss_fn(_collapsed(gen), PK_LABELS)
        monitor.update(step, loss_fn)
    diagnosis = monitor.compute().diagnosis("loss_at_margin")
    assert diagnosis is not None and diagnosis.evidence["loss"] == "0.TripletMarginLoss"


def test_statistics_dict_with_a_margin_argument() -> None:
    monitor = LossMonitor(window=5, margin=0.2)
    for step in range(5):
        monitor.update(step, {"loss": 0.2 + 0.001 * (-1) ** step, "active_triplet_fraction": 1.0})
    assert "loss_at_margin" in monitor.compute().codes


def test_a_loss_near_the_margin_with_few_active_triplets_is_not_at_margin() -> None:
    # batch_all averages over active triplets only: sitting near the margin is normal
    # when only a few triplets are still active.
    monitor = LossMonitor(window=5, margin=0.2)
    for step in range(5):
        monitor.update(step, {"loss": 0.2, "active_triplet_fraction": 0.3})
    assert "loss_at_margin" not in monitor.compute().codes


# ----------------------------------------------------------------------------- pairs and triplets
def test_batches_without_positive_pairs() -> None:
    loss_fn = SupConLoss(0.1)
    monitor = LossMonitor(window=4)
    for step in range(4):
        loss_fn(torch.randn(16, 8), torch.arange(16))
        monitor.update(step, loss_fn)
    diagnosis = monitor.compute().diagnosis("no_positive_pairs")
    assert diagnosis is not None and diagnosis.severity == "error"


def test_one_batch_with_positives_in_the_window_is_enough() -> None:
    loss_fn = SupConLoss(0.1)
    monitor = LossMonitor(window=4)
    for step in range(4):
        loss_fn(torch.randn(16, 8), torch.arange(16) // (2 if step == 2 else 1))
        monitor.update(step, loss_fn)
    assert "no_positive_pairs" not in monitor.compute().codes


def test_every_triplet_satisfied_is_no_active_triplets() -> None:
    gen = torch.Generator().manual_seed(0)
    loss_fn = TripletMarginLoss(0.2)
    monitor = LossMonitor(window=5)
    for step in range(5):
        loss_fn(_learning(gen, spread=0.001), PK_LABELS)
        monitor.update(step, loss_fn)
    diagnosis = monitor.compute().diagnosis("no_active_triplets")
    assert diagnosis is not None and "satisfied the margin" in diagnosis.message


def test_no_valid_triplet_is_no_active_triplets() -> None:
    loss_fn = TripletMarginLoss(0.2)
    monitor = LossMonitor(window=3)
    for step in range(3):
        loss_fn(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))  # one class: no negatives
        monitor.update(step, loss_fn)
    diagnosis = monitor.compute().diagnosis("no_active_triplets")
    assert diagnosis is not None and "no valid triplet" in diagnosis.message


# ----------------------------------------------------------------------------- falling at chance
@FAST
@given(seed=st.integers(0, 2**16), window=st.integers(4, 30))
def test_loss_falling_while_accuracy_stays_at_chance(seed: int, window: int) -> None:
    rng = np.random.default_rng(seed)
    monitor = LossMonitor(window=window)
    for step in range(window):
        loss = 14.52 - 0.15 * step + 0.001 * rng.standard_normal()  # case study 01: 14.52 -> 13.89
        monitor.update(step, loss, metrics={"top1": Rate(45, 25729, chance=1 / 518)})
    report = monitor.compute()
    diagnosis = report.diagnosis("loss_falling_at_chance")
    assert diagnosis is not None and diagnosis.severity == "warning"
    assert "45/25729" in diagnosis.message
    assert report["loss_window_change"] < 0


def test_falling_loss_with_accuracy_above_chance_is_fine() -> None:
    monitor = LossMonitor(window=6)
    for step in range(6):
        monitor.update(step, torch.tensor(3.0 - 0.1 * step), metrics={"top1": Rate(400, 1000, chance=0.01)})
    assert monitor.compute().diagnoses == ()


def test_flat_loss_at_chance_is_not_falling() -> None:
    monitor = LossMonitor(window=6)
    for step in range(6):
        monitor.update(step, 3.0, metrics={"top1": Rate(10, 1000, chance=0.01)})
    assert "loss_falling_at_chance" not in monitor.compute().codes


# ----------------------------------------------------------------------------- healthy and other
@FAST
@given(seed=st.integers(0, 2**16))
def test_nothing_fires_while_a_triplet_loss_learns(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    loss_fn = TripletMarginLoss(0.2) + ArcFaceLoss(8, 16)
    monitor = LossMonitor(window=8)
    for step in range(10):
        embeddings = _learning(gen, spread=0.6)
        loss_fn(embeddings, PK_LABELS)
        monitor.update(step, loss_fn, metrics={"top1": Rate(30, 32, chance=1 / 8)})
    report = monitor.compute()
    assert report.diagnoses == (), report.codes


def test_fewer_steps_than_a_window_gives_a_note_not_a_verdict() -> None:
    monitor = LossMonitor(window=10, margin=0.2)
    for step in range(9):
        monitor.update(step, {"loss": 0.2, "active_triplet_fraction": 1.0})
    report = monitor.compute()
    assert report.diagnoses == ()
    assert "9 of the 10 steps" in report.notes[0]


def test_non_finite_loss() -> None:
    monitor = LossMonitor(window=3)
    for step, value in enumerate([1.0, float("nan"), 0.9]):
        monitor.update(step, value)
    diagnosis = monitor.compute().diagnosis("non_finite")
    assert diagnosis is not None and diagnosis.evidence["non_finite"] == 1


def test_update_reads_nothing_back_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    loss_fn = TripletMarginLoss(0.2)
    monitor = LossMonitor(window=2)
    loss_fn(torch.randn(32, 16), PK_LABELS)
    with _no_host_reads(monkeypatch):
        monitor.update(0, loss_fn)
        monitor.update(1, loss_fn)
    assert monitor.compute()["steps"] == 2


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="window"):
        LossMonitor(window=1)
    monitor = LossMonitor()
    with pytest.raises(ValueError, match="before any update"):
        monitor.compute()
    with pytest.raises(ValueError, match="has not been called yet"):
        monitor.update(0, TripletMarginLoss(0.2))
    with pytest.raises(ValueError, match="must include 'loss'"):
        monitor.update(0, {"accuracy": 0.5})
    with pytest.raises(TypeError, match="loss must be an embedkit Loss"):
        monitor.update(0, "0.5")  # type: ignore[arg-type]
    monitor.update(3, 1.0)
    with pytest.raises(ValueError, match="step 2 is before the last recorded step 3"):
        monitor.update(2, 1.0)


# ----------------------------------------------------------------------------- history
def test_history_series_merges_steps_and_keeps_rates() -> None:
    history = TrainingHistory()
    history.record(0, {"loss": torch.tensor(2.5), "top1": Rate(3, 100, chance=0.01)})
    history.record(0, {"lr": 0.1})
    history.record(5, {"loss": 2.0})
    assert history.steps == [0, 5]
    assert history.keys == ["loss", "top1", "lr"]
    steps, values = history.series("loss")
    assert steps.tolist() == [0, 5] and values.tolist() == [2.5, 2.0]
    assert history.latest("top1") == Rate(3, 100, chance=0.01)
    assert history.series("loss", last=1)[1].tolist() == [2.0]
    with pytest.raises(KeyError, match="'acc' was never recorded"):
        history.series("acc")
    with pytest.raises(ValueError, match="must be a scalar"):
        history.record(6, {"x": torch.zeros(3)})
    with pytest.raises(TypeError, match="must be a number"):
        history.record(6, {"x": "high"})


def test_many_tensor_values_are_read_back_in_batches() -> None:
    history = TrainingHistory()
    for step in range(3000):
        history.record(step, {"loss": torch.tensor(float(step))})
    assert history._pending < 1024
    assert history.series("loss")[1][-1] == 2999.0


def test_history_to_csv(tmp_path: pytest.TempPathFactory) -> None:
    history = TrainingHistory()
    history.record(0, {"loss": 1.5, "top1": Rate(1, 4, chance=0.25)})
    history.record(1, {"loss": 1.25})
    path = history.to_csv(tmp_path / "history.csv")  # type: ignore[operator]
    with path.open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["step", "loss", "top1", "top1.hits", "top1.total"]
    assert rows[1] == ["0", "1.5", "0.25", "1", "4"]
    assert rows[2] == ["1", "1.25", "", "", ""]


class _Writer:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((tag, value, global_step))


def test_history_to_tensorboard() -> None:
    history = TrainingHistory()
    history.record(0, {"loss": 1.5})
    history.record(7, {"loss": 1.0, "auc": math.nan, "top1": Rate(1, 2, chance=0.5)})
    writer = _Writer()
    assert history.log_to_tensorboard(writer, prefix="train/") == 2  # NaN skipped
    assert writer.scalars == [("train/loss", 1.0, 7), ("train/top1", 0.5, 7)]
    assert history.log_to_tensorboard(writer, step=0) == 1
    with pytest.raises(TypeError, match="add_scalar"):
        history.log_to_tensorboard(object())
    with pytest.raises(ValueError, match="step 3 was never recorded"):
        history.log_to_tensorboard(writer, step=3)
