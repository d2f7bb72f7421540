"""Diagnoses at the boundary (issue 17): both sides of each threshold, batch size and order.

No error-severity diagnosis on an embedding whose same- vs different-identity AUC is
above 0.95; every planted failure still named, including its mirror image.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from embedkit.losses import ArcFaceLoss, ContrastiveLoss, TripletMarginLoss
from embedkit.monitors import ClassCollapseMonitor, EmbeddingHealthMonitor, LossMonitor, health
from embedkit.monitors._rows import spread_rows
from embedkit.monitors.cli import collect_reports
from embedkit.samplers import PKSampler

DEFAULTS = {
    "labels": None,
    "paired": None,
    "logits": None,
    "num_classes": None,
    "topk": [1, 5],
    "sample_size": 512,
    "seed": 0,
}

FAST = settings(max_examples=6, deadline=None)


def identities(seed: int, classes: int, per_class: int, dim: int, spread: float) -> tuple:
    """Unit class centres plus Gaussian noise of total variance spread² (P x K order)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    z = centres[labels] + spread / dim**0.5 * torch.randn(labels.shape[0], dim, generator=gen)
    return z, labels, gen


def feed(
    monitor: EmbeddingHealthMonitor, z: torch.Tensor, *args: torch.Tensor | None, batch: int = 64
) -> None:
    for start in range(0, z.shape[0], batch):
        monitor.update(
            z[start : start + batch], *(a if a is None else a[start : start + batch] for a in args)
        )


def errors(report: object) -> list[str]:
    return [d.code for d in report.diagnoses if d.severity == "error"]  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- paired shortcut
def test_a_good_embedding_with_close_pairs_is_not_a_shortcut_error() -> None:
    # Same-identity cosine about 0.4, different about 0, 1-NN perfect; pairs = row + small noise.
    z, labels, gen = identities(0, classes=40, per_class=6, dim=64, spread=1.2)
    paired = z + 0.05 * torch.randn(z.shape, generator=gen)
    monitor = EmbeddingHealthMonitor()
    feed(monitor, z, labels, paired)
    report = monitor.compute()
    assert report["auc"] > 0.95 and 0.25 < report["same_identity_similarity"] < 0.6
    shortcut = report.diagnosis("paired_shortcut")
    assert shortcut is not None and shortcut.severity == "info", report.codes
    assert errors(report) == []


def test_a_real_shortcut_with_no_identity_separation_is_an_error() -> None:
    # Mirror image: pairs match (0.99) but other images of the identity only 0.2, unseparated.
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(40).repeat_interleave(6)
    shared = torch.randn(1, 64, generator=gen) * 0.5
    z = shared + torch.randn(labels.shape[0], 64, generator=gen)
    paired = z + 0.05 * torch.randn(z.shape, generator=gen)
    monitor = EmbeddingHealthMonitor()
    feed(monitor, z, labels, paired)
    report = monitor.compute()
    assert 0.1 < report["same_identity_similarity"] < 0.35
    shortcut = report.diagnosis("paired_shortcut")
    assert shortcut is not None and shortcut.severity == "error"
    assert shortcut.evidence["cross_identity_auc"] < 0.75


# ----------------------------------------------------------------------------- complete collapse
@FAST
@given(seed=st.integers(0, 2**16), offset=st.floats(3.0, 30.0), batch=st.sampled_from([1, 7, 64, 240]))
def test_a_healthy_embedding_plus_an_offset_is_not_collapse(seed: int, offset: float, batch: int) -> None:
    z, labels, gen = identities(seed, classes=20, per_class=12, dim=32, spread=0.5)
    z = z + offset * torch.randn(1, 32, generator=gen)  # relative variance about 1/offset²
    order = torch.randperm(z.shape[0], generator=gen)
    monitor = EmbeddingHealthMonitor()
    feed(monitor, z[order], labels[order], batch=batch)
    report = monitor.compute()
    assert report["auc"] > 0.95
    assert "complete_collapse" not in report.codes and errors(report) == []
    if report["mean_pairwise_cosine"] >= 0.98:
        assert report.diagnosis("mean_offset") is not None


@FAST
@given(seed=st.integers(0, 2**16), offset=st.floats(0.0, 100.0), batch=st.sampled_from([1, 16, 64]))
def test_a_collapsed_run_with_an_offset_is_complete_collapse(seed: int, offset: float, batch: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    point = offset * torch.randn(1, 32, generator=gen) + torch.randn(1, 32, generator=gen)
    z = point + 1e-3 * point.norm() / 32**0.5 * torch.randn(300, 32, generator=gen)  # rel. variance 1e-6
    monitor = EmbeddingHealthMonitor()
    feed(monitor, z, torch.arange(300) % 10, batch=batch)
    report = monitor.compute()
    assert report.diagnosis("complete_collapse") is not None
    separation = report.diagnosis("no_separation")
    assert separation is None or "see complete_collapse" in separation.message


def test_zero_embeddings_are_named_zero() -> None:
    monitor = EmbeddingHealthMonitor()
    monitor.update(torch.zeros(32, 8))
    diagnosis = monitor.compute().diagnosis("complete_collapse")
    assert diagnosis is not None and "zero vectors" in diagnosis.message


def test_one_row_is_a_note_not_a_collapse() -> None:
    monitor = EmbeddingHealthMonitor()
    monitor.update(torch.randn(1, 16))
    report = monitor.compute()
    assert errors(report) == [] and "complete_collapse" not in report.codes
    assert any("single finite embedding" in note for note in report.notes)


# ----------------------------------------------------------------------------- dimensional collapse
def bottleneck(seed: int, classes: int, width: int, dim: int = 64, per_class: int = 20) -> tuple:
    """Classes separated inside a width-dimensional subspace of dim."""
    z, labels, gen = identities(seed, classes, per_class, width, spread=0.3)
    basis = torch.linalg.qr(torch.randn(dim, width, generator=gen)).Q.T
    return z @ basis, labels


@FAST
@given(seed=st.integers(0, 2**16), batch=st.sampled_from([20, 64, 200]))
def test_a_3d_bottleneck_of_10_and_of_100_classes_is_dimensional_collapse(seed: int, batch: int) -> None:
    for classes in (10, 100):
        z, labels = bottleneck(seed, classes, width=3)
        monitor = EmbeddingHealthMonitor(covariance_rows=None)
        feed(monitor, z, labels, batch=batch)  # P x K order: each class's rows together
        report = monitor.compute()
        assert report["effective_rank"] < 3.01
        assert report.diagnosis("dimensional_collapse") is not None, (classes, report["effective_rank"])


@FAST
@given(seed=st.integers(0, 2**16))
def test_10_classes_spread_over_9_or_more_dimensions_are_no_dimensional_collapse(seed: int) -> None:
    z, labels = bottleneck(seed, 10, width=9)
    monitor = EmbeddingHealthMonitor(covariance_rows=None)
    feed(monitor, z, labels)
    report = monitor.compute()
    assert report.diagnosis("dimensional_collapse") is None, report["effective_rank"]
    assert errors(report) == []


# ----------------------------------------------------------------------------- class collapse
def head(accuracy: float, n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits right for `accuracy` of the rows, a uniformly random class otherwise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    right = torch.rand(n, generator=gen) < accuracy
    predicted = torch.where(right, labels, torch.randint(0, classes, (n,), generator=gen))
    logits = torch.randn(n, classes, generator=gen)
    logits[torch.arange(n), predicted] += 20
    return logits, labels


@FAST
@given(seed=st.integers(0, 2**16), batch=st.sampled_from([1, 2, 3, 8]), accuracy=st.sampled_from([0.0, 0.3]))
def test_small_batches_of_a_healthy_or_random_head_are_not_class_collapse(
    seed: int, batch: int, accuracy: float
) -> None:
    logits, labels = head(accuracy, 600, 518, seed)
    monitor = ClassCollapseMonitor(518)
    for start in range(0, 600, batch):
        monitor.update(logits[start : start + batch], labels[start : start + batch])
    report = monitor.compute()
    assert "class_collapse" not in report.codes, report.diagnosis("class_collapse")


@FAST
@given(seed=st.integers(0, 2**16), batch=st.sampled_from([1, 2, 64]))
def test_a_real_class_collapse_fires_at_any_batch_size(seed: int, batch: int) -> None:
    logits, labels = head(0.0, 300, 518, seed)
    logits[:, 3] += 100  # every prediction is class 3
    monitor = ClassCollapseMonitor(518)
    for start in range(0, 300, batch):
        monitor.update(logits[start : start + batch], labels[start : start + batch])
    report = monitor.compute()
    assert report.diagnosis("class_collapse") is not None
    at_chance = report.diagnosis("at_chance")
    assert at_chance is None or "is learning" not in at_chance.message


def test_top_k_above_the_class_count_gets_a_note() -> None:
    monitor = ClassCollapseMonitor(4, topk=10)
    monitor.update(torch.randn(30, 4), torch.randint(0, 4, (30,)))
    report = monitor.compute()
    assert any("topk 10 is at least num_classes=4" in note for note in report.notes)


# ----------------------------------------------------------------------------- rows and reprs
@given(num_rows=st.integers(1, 500), wanted=st.integers(1, 200))
def test_sampled_rows_reach_the_end_of_the_batch(num_rows: int, wanted: int) -> None:
    rows = range(num_rows)[spread_rows(num_rows, wanted)]
    assert 1 <= len(rows) <= min(num_rows, wanted)
    assert rows[-1] + rows.step > num_rows - 1  # no gap of a whole step left at the end


def test_pk_batch_of_80_with_64_sampled_rows_sees_every_class() -> None:
    labels = torch.arange(10).repeat_interleave(8)  # P = 10 classes x K = 8
    assert set(labels[spread_rows(80, 64)].tolist()) == set(range(10))


def test_monitors_have_a_repr() -> None:
    monitor = EmbeddingHealthMonitor(sample_size=256)
    monitor.update(torch.randn(5, 4))
    assert repr(monitor) == (
        "EmbeddingHealthMonitor(sample_size=256, covariance_rows=64, sync_on_compute=True, seen=5)"
    )
    assert repr(ClassCollapseMonitor(4, topk=(1, 2))).startswith(
        "ClassCollapseMonitor(num_classes=4, topk=(1, 2)"
    )
    assert repr(LossMonitor(window=5)).startswith("LossMonitor(window=5,")


# ----------------------------------------------------------------------------- doctor
def _exact_effective_rank(z: np.ndarray) -> float:
    centred = z - z.mean(axis=0)
    singular = np.sqrt(np.clip(np.linalg.eigvalsh(centred.T @ centred / len(z)), 0, None))
    p = singular / singular.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("rank", [None, 20])
def test_doctor_reads_the_covariance_of_every_row(tmp_path: Path, rank: int | None) -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3000, 128 if rank is None else rank))
    if rank is not None:  # a rank-20 subspace of 128 dimensions
        z = z @ np.linalg.qr(rng.standard_normal((128, rank)))[0].T
    np.save(tmp_path / "z.npy", z.astype(np.float32))
    (health,) = collect_reports(argparse.Namespace(**{**DEFAULTS, "embeddings": tmp_path / "z.npy"}))
    assert health.counts["covariance_samples"] == 3000
    assert health["effective_rank"] == pytest.approx(_exact_effective_rank(z), rel=0.05)
    assert (health.diagnosis("dimensional_collapse") is not None) == (rank is not None)


# ----------------------------------------------------------------------------- loss signals
@pytest.mark.parametrize(
    ("loss_fn", "value"),
    [
        (TripletMarginLoss(0.2, mining="batch_hard", soft_margin=True), math.log1p(math.exp(0.2))),
        (TripletMarginLoss(0.2), 0.2),
        (ContrastiveLoss(), 1.0),
    ],
)
def test_a_loss_flat_at_its_collapsed_value_is_loss_at_margin(loss_fn: object, value: float) -> None:
    labels = torch.arange(8).repeat_interleave(4)
    monitor = LossMonitor(window=10)
    for step in range(12):
        z = torch.ones(32, 16) + 1e-7 * torch.randn(32, 16)  # a dead network: one point
        loss_fn(z, labels)  # type: ignore[operator]
        monitor.update(step, loss_fn)  # type: ignore[arg-type]
    diagnosis = monitor.compute().diagnosis("loss_at_margin")
    assert diagnosis is not None and diagnosis.evidence["margin"] == pytest.approx(value)


def test_a_learning_contrastive_loss_is_not_at_margin() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat_interleave(4)
    centres = torch.randn(8, 16, generator=gen)
    loss_fn, monitor = ContrastiveLoss(), LossMonitor(window=10)
    for step in range(12):
        z = centres[labels] + 0.3 * torch.randn(32, 16, generator=gen)
        loss_fn(z, labels)
        monitor.update(step, loss_fn)
    assert "loss_at_margin" not in monitor.compute().codes


def test_arcface_on_a_dead_backbone_is_loss_falling_at_chance_from_the_documented_call() -> None:
    # A constant embedding: only the class centres train, the loss falls, accuracy stays 1/10.
    torch.manual_seed(0)  # the class centres' initialisation
    gen = torch.Generator().manual_seed(0)
    arcface = ArcFaceLoss(10, 16)
    optimizer = torch.optim.Adam(arcface.parameters(), lr=0.05)
    monitor = LossMonitor(window=20)
    z = torch.randn(1, 16, generator=gen).expand(64, 16)
    for step in range(20):
        loss = arcface(z, torch.randint(0, 10, (64,), generator=gen))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.update(step, arcface)
    report = monitor.compute()
    assert report["loss_window_change"] < -0.01
    assert report.diagnosis("loss_falling_at_chance") is not None, report.codes


# ----------------------------------------------------------------------------- sampler order
@pytest.mark.parametrize("covariance_rows", [None, 64])
@pytest.mark.parametrize(("width", "fires"), [(100, True), (300, False)])
def test_dimensional_collapse_does_not_depend_on_the_sampler_order(
    width: int, fires: bool, covariance_rows: int | None
) -> None:
    # 518 separated classes in a width-dimensional subspace of 512: threshold 0.4 x 512 = 204.8
    # (rank about 98 for width 100, 277 for width 300, with every row in the covariance).
    z, labels = bottleneck(0, 518, width=width, dim=512, per_class=8)
    batches = list(PKSampler(labels.numpy(), p=128, k=8, seed=0))
    pk_order = torch.tensor([i for batch in batches for i in batch])
    shuffled = pk_order[torch.randperm(pk_order.numel(), generator=torch.Generator().manual_seed(1))]
    # The last 1,024 rows of the P x K order hold only 128 classes: counting the classes
    # there (the pair sample), as earlier versions did, put the threshold at 50.8 and missed
    # width 100.
    assert labels[pk_order[-1024:]].unique().numel() == 128
    reports = []
    for order in (pk_order, shuffled):
        monitor = EmbeddingHealthMonitor(covariance_rows=covariance_rows)
        feed(monitor, z[order], labels[order], batch=128 * 8)
        reports.append(monitor.compute())
    for report in reports:
        assert report.counts["label_classes"] == 518
        assert (report.diagnosis("dimensional_collapse") is not None) == fires, report["effective_rank"]
        assert errors(report) == []
    assert reports[0].codes == reports[1].codes


def test_label_classes_count_every_finite_row_with_large_and_negative_ids() -> None:
    # Large, negative and repeated ids: each counted once, whatever the batch it came in.
    ids = torch.tensor([-5, 11, 7, 2**40, 2**40 + 1, 65_535, 65_536 + 3, -5, 7])
    monitor = EmbeddingHealthMonitor(sample_size=2)
    z = torch.randn(ids.shape[0], 4)
    z[1] = float("nan")  # a non-finite row's label is not counted
    feed(monitor, z, ids, batch=2)
    assert monitor.compute().counts["label_classes"] == 6


# ----------------------------------------------------------------------------- exploding norms
@FAST
@given(seed=st.integers(0, 2**16), decades=st.floats(1.0, 5.0))
@example(seed=0, decades=2.7)  # 500-fold: silent
@example(seed=0, decades=3.3)  # 2,000-fold: fires
def test_exploding_norms_fires_from_a_thousandfold_growth(seed: int, decades: float) -> None:
    # A healthy embedding whose later rows are scaled up: the ranking (AUC) is unchanged.
    z, labels, gen = identities(seed, classes=20, per_class=12, dim=32, spread=0.5)
    order = torch.randperm(z.shape[0], generator=gen)
    z, labels = z[order], labels[order]
    z[64:] *= 10**decades
    monitor = EmbeddingHealthMonitor(sample_size=64)
    feed(monitor, z, labels, batch=16)
    report = monitor.compute()
    norms = z.norm(dim=1)
    measured = float(norms[-64:].mean() / norms[:64].mean())
    assert report["recent_mean_norm"] / report["early_mean_norm"] == pytest.approx(measured, rel=1e-5)
    diagnosis = report.diagnosis("exploding_norms")
    assert (diagnosis is not None) == (measured >= 1e3), measured
    assert report["auc"] > 0.95 and errors(report) == []
    if diagnosis is not None:
        assert diagnosis.severity == "warning"
        assert diagnosis.evidence["norm_growth"] == pytest.approx(measured, rel=1e-5)


@pytest.mark.parametrize(("scale", "fires"), [(0.5, False), (2.0, True)])
def test_exploding_norms_fires_near_float32_overflow_without_growth(scale: float, fires: bool) -> None:
    z, labels, _ = identities(0, classes=20, per_class=12, dim=32, spread=0.5)
    z = torch.nn.functional.normalize(z, dim=1) * scale * health.NORM_LIMIT
    monitor = EmbeddingHealthMonitor(sample_size=64)
    feed(monitor, z, labels)
    report = monitor.compute()
    assert report["recent_mean_norm"] / report["early_mean_norm"] == pytest.approx(1.0)
    assert (report.diagnosis("exploding_norms") is not None) == fires
    assert errors(report) == []


def _train_unnormalised_soft_triplet(lr: float) -> object:
    """A soft-margin triplet loss on unnormalised embeddings: scaling them up lowers the loss."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(32).repeat_interleave(8)
    inputs = 2 * torch.randn(32, 16, generator=gen)[labels] + torch.randn(labels.shape[0], 16, generator=gen)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    loss_fn = TripletMarginLoss(0.2, mining="batch_hard", soft_margin=True, normalize=False)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    sampler = PKSampler(labels.numpy(), p=8, k=4, seed=0)
    monitor = EmbeddingHealthMonitor(sample_size=256)
    for epoch in range(6):
        sampler.set_epoch(epoch)
        for batch in sampler:
            embeddings = net(inputs[batch])
            loss = loss_fn(embeddings, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.update(embeddings.detach(), labels[batch])
    return monitor.compute()


@pytest.mark.parametrize(("lr", "fires"), [(0.05, False), (0.5, True)])
def test_a_diverging_unnormalised_loss_is_exploding_norms(lr: float, fires: bool) -> None:
    report = _train_unnormalised_soft_triplet(lr)
    assert (report.diagnosis("exploding_norms") is not None) == fires, (  # type: ignore[attr-defined]
        report["early_mean_norm"],  # type: ignore[index]
        report["recent_mean_norm"],  # type: ignore[index]
    )
    assert errors(report) == []
