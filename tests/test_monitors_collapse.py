"""ClassCollapseMonitor: each pathology of case studies 01 and 02 built on purpose.

* the ArcFace head of case study 02 that predicts class 223 for all 518 classes;
* chance-level top-1 / top-5 (case study 01: "45/25729" is chance, not "0%");
* predictions worse than chance (a label-mapping bug);
* healthy, well-separated logits, where nothing may fire;
* exact statistics against a plain recomputation, any batching.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedkit.evaluation.report import Rate
from embedkit.monitors import ClassCollapseMonitor, chance_verdict, describe_rate, wilson_interval
from embedkit.monitors.collapse import FOLD_EVERY

FAST = settings(max_examples=8, deadline=None)


def _feed(monitor: ClassCollapseMonitor, logits: torch.Tensor, labels: torch.Tensor, batch: int) -> None:
    for start in range(0, logits.shape[0], batch):
        monitor.update(logits[start : start + batch], labels[start : start + batch])


def _collapsed_logits(n: int, num_classes: int, dominant: int, gen: torch.Generator) -> torch.Tensor:
    """Random logits with one column lifted far above the rest: argmax is ``dominant`` everywhere."""
    logits = torch.randn(n, num_classes, generator=gen)
    logits[:, dominant] += 10.0
    return logits


def _healthy_logits(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """A classifier that learned: the true class scores 6 above unit-noise competitors."""
    logits = torch.randn(labels.shape[0], num_classes, generator=gen)
    logits[torch.arange(labels.shape[0]), labels] += 6.0
    return logits


# ----------------------------------------------------------------------------- class collapse
@FAST
@given(seed=st.integers(0, 2**16), n=st.integers(60, 400), batch=st.sampled_from([7, 64, 1024]))
def test_class_223_for_everyone_is_class_collapse(seed: int, n: int, batch: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 518, (n,), generator=gen)
    monitor = ClassCollapseMonitor(518)
    _feed(monitor, _collapsed_logits(n, 518, 223, gen), labels, batch)
    report = monitor.compute()
    collapse = report.diagnosis("class_collapse")
    assert collapse is not None and collapse.severity == "error"
    assert report["dominant_class"] == 223
    assert report["dominant_class_share"] == 1.0
    assert report["num_predicted_classes"] == 1
    assert report["prediction_entropy"] == 0.0
    assert "class 223" in collapse.message
    assert collapse.evidence["dominant_class"] == 223
    assert collapse.docs.endswith("#class-collapse")


def test_two_classes_splitting_all_predictions_is_class_collapse() -> None:
    # Case study 02, epoch 2: "still heavy bias" — predictions shared by two classes.
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 518, (2000,), generator=gen)
    logits = torch.randn(2000, 518, generator=gen)
    logits[:1000, 309] += 10
    logits[1000:, 223] += 10
    report = ClassCollapseMonitor(518)
    report.update(logits, labels)
    result = report.compute()
    assert "class_collapse" in result.codes
    assert result["num_predicted_classes"] == 2
    assert result["accuracy_ceiling"] == pytest.approx(
        float(((labels == 309) | (labels == 223)).float().mean())
    )


def test_majority_class_collapse_on_imbalanced_labels() -> None:
    # 90% of the labels are class 0 and the head predicts 0 for everyone: top-1 is 90%,
    # yet every sample of the other classes is absorbed — still collapse.
    labels = torch.cat([torch.zeros(900, dtype=torch.long), torch.randint(1, 10, (100,))])
    logits = torch.zeros(1000, 10)
    logits[:, 0] = 5.0
    monitor = ClassCollapseMonitor(10)
    monitor.update(logits, labels)
    report = monitor.compute()
    assert report["top1_accuracy"] == pytest.approx(0.9)
    assert report["dominant_class_absorption"] == 1.0
    assert "class_collapse" in report.codes


def test_constant_logits_are_collapse_and_never_a_hit() -> None:
    labels = torch.arange(100) % 10
    monitor = ClassCollapseMonitor(10, topk=(1, 5))
    monitor.update(torch.zeros(100, 10), labels)
    report = monitor.compute()
    # Ties count against the true class: a constant head gets no hit at any k < C.
    assert report.rate("top1_accuracy") == Rate(0, 100, 0.1)
    assert report.rate("top5_accuracy") == Rate(0, 100, 0.5)
    assert "class_collapse" in report.codes


# ----------------------------------------------------------------------------- chance level
def test_case_study_01_counts_are_consistent_with_chance() -> None:
    rate = Rate(45, 25729, chance=1 / 518)
    assert chance_verdict(rate) == "at_chance"
    text = describe_rate(rate)
    assert "45/25729" in text and "chance 0.19%" in text
    low, high = wilson_interval(45, 25729)
    assert low < 1 / 518 < high
    # ... and its top-5 of 1286/25729 = 5% is far above the 0.97% chance of top-5.
    assert chance_verdict(Rate(1286, 25729, chance=5 / 518)) == "above_chance"
    # 0/25729 top-5 (case study 02) is significantly *below* chance.
    assert chance_verdict(Rate(0, 25729, chance=5 / 518)) == "below_chance"


def test_too_few_trials_are_undetermined_not_at_chance() -> None:
    assert chance_verdict(Rate(3, 3, chance=0.5)) == "undetermined"
    assert chance_verdict(Rate(0, 0, chance=0.5)) == "undetermined"


@FAST
@given(seed=st.integers(0, 2**16), rounds=st.integers(2, 12), batch=st.sampled_from([100, 1024]))
def test_chance_level_predictions_are_at_chance(seed: int, rounds: int, batch: int) -> None:
    # Exactly one hit in 518: the prediction is the label shifted by 0, 1, ..., 517.
    gen = torch.Generator().manual_seed(seed)
    n = 518 * rounds
    labels = torch.randint(0, 518, (n,), generator=gen)
    shift = torch.arange(n)[torch.randperm(n, generator=gen)] % 518
    logits = 0.01 * torch.randn(n, 518, generator=gen)  # a soft, unsaturated head
    logits[torch.arange(n), (labels + shift) % 518] += 0.5
    monitor = ClassCollapseMonitor(518, topk=(1,))
    _feed(monitor, logits, labels, batch)
    report = monitor.compute()
    at_chance = report.diagnosis("at_chance")
    assert at_chance is not None and at_chance.severity == "warning"
    assert report.codes == ["at_chance"]
    assert report.rate("top1_accuracy") == Rate(rounds, n, 1 / 518)
    assert f"{rounds}/{n}" in at_chance.message and "chance 0.19%" in at_chance.message


def test_random_logits_are_at_chance_at_top1_and_top5() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 518, (25729,), generator=gen)
    monitor = ClassCollapseMonitor(518)
    _feed(monitor, torch.randn(25729, 518, generator=gen) * 0.1, labels, 4096)
    report = monitor.compute()
    at_chance = report.diagnosis("at_chance")
    assert at_chance is not None and at_chance.severity == "warning"
    assert "top-1" in at_chance.message and "top-5" in at_chance.message and "/25729" in at_chance.message
    assert "class_collapse" not in report.codes


def test_top1_at_chance_while_top5_learns_is_only_info() -> None:
    # Case study 01: top-1 indistinguishable from chance, top-5 clearly above it.
    gen = torch.Generator().manual_seed(3)
    n, c = 6000, 518
    labels = torch.randint(0, c, (n,), generator=gen)
    logits = torch.randn(n, c, generator=gen)
    rows = torch.arange(n)
    # The true class lands in ranks 2-5 for a third of the samples, never at rank 1.
    lift = torch.rand(n, generator=gen) < 1 / 3
    top = logits.max(dim=1).values
    logits[rows[lift], labels[lift]] = top[lift] - 1e-3
    monitor = ClassCollapseMonitor(c)
    monitor.update(logits, labels)
    report = monitor.compute()
    diagnosis = report.diagnosis("at_chance")
    assert diagnosis is not None and diagnosis.severity == "info"
    assert chance_verdict(report.rate("top5_accuracy")) == "above_chance"  # type: ignore[arg-type]
    assert report.ok


def test_shifted_labels_are_below_chance() -> None:
    # A label-mapping bug: the head is confident and right, but label i is column i+1.
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (500,), generator=gen)
    monitor = ClassCollapseMonitor(10, topk=(1,))
    monitor.update(_healthy_logits((labels + 1) % 10, 10, gen), labels)
    report = monitor.compute()
    below = report.diagnosis("below_chance")
    assert below is not None and below.severity == "error"
    assert "0/500" in below.message


def test_a_collapsed_class_that_drifts_between_batches_is_still_class_collapse() -> None:
    """Each batch all one class, but a different class each step (the head's weights move):
    the epoch histogram spreads over many classes, the batches are still collapsed."""
    gen = torch.Generator().manual_seed(3)
    monitor = ClassCollapseMonitor(50)
    for step in range(20):
        labels = torch.randint(0, 50, (100,), generator=gen)
        logits = torch.randn(100, 50, generator=gen) * 0.1
        logits[:, (7 * step) % 50] += 5.0  # every sample of this batch -> one class
        monitor.update(logits, labels)
    report = monitor.compute()
    assert report["num_predicted_classes"] == 20 and report["dominant_class_absorption"] < 0.1
    assert report["batch_dominant_absorption"] > 0.95
    collapse = report.diagnosis("class_collapse")
    assert collapse is not None and "changes between batches" in collapse.message


def test_pk_batches_of_two_classes_are_not_collapse() -> None:
    """P=2 classes per batch: each predicted class fills half the batch, correctly."""
    gen = torch.Generator().manual_seed(4)
    monitor = ClassCollapseMonitor(50)
    for _ in range(20):
        classes = torch.randperm(50, generator=gen)[:2]
        labels = classes.repeat_interleave(32)
        monitor.update(_healthy_logits(labels, 50, gen), labels)
    assert "class_collapse" not in monitor.compute().codes


def test_top_k_with_k_at_least_the_classes_is_never_below_chance() -> None:
    """Top-5 of 2 classes is 100% whatever the model does: no verdict either way."""
    labels = torch.arange(2).repeat(14)
    monitor = ClassCollapseMonitor(2, topk=(1, 5))
    monitor.update(_healthy_logits(labels, 2, torch.Generator().manual_seed(0)), labels)
    report = monitor.compute()
    assert report.rate("top5_accuracy") == Rate(28, 28, 1.0)
    assert "below_chance" not in report.codes and "at_chance" not in report.codes


def test_saturated_wrong_softmax_is_overconfident() -> None:
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 100, (400,), generator=gen)
    logits = torch.randn(400, 100, generator=gen) * 30  # scale 30 on random cosines
    monitor = ClassCollapseMonitor(100)
    monitor.update(logits, labels)
    report = monitor.compute()
    assert "overconfident" in report.codes
    assert report["mean_max_softmax"] > 0.9


# ----------------------------------------------------------------------------- healthy
@FAST
@given(
    seed=st.integers(0, 2**16),
    num_classes=st.integers(2, 60),
    per_class=st.integers(3, 20),
    batch=st.sampled_from([5, 32, 4096]),
)
def test_nothing_fires_on_a_healthy_classifier(
    seed: int, num_classes: int, per_class: int, batch: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat(per_class)[
        torch.randperm(num_classes * per_class, generator=gen)
    ]
    monitor = ClassCollapseMonitor(num_classes, topk=(1, 5))
    _feed(monitor, _healthy_logits(labels, num_classes, gen), labels, batch)
    report = monitor.compute()
    assert report.diagnoses == (), report.codes
    assert report["num_predicted_classes"] == num_classes


# ----------------------------------------------------------------------------- exactness
@FAST
@given(seed=st.integers(0, 2**16), n=st.integers(1, 300), c=st.integers(2, 40), batch=st.integers(1, 300))
def test_statistics_match_a_plain_recomputation(seed: int, n: int, c: int, batch: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, c, (n,), generator=gen)
    monitor = ClassCollapseMonitor(c, topk=(1, 3, 50), softmax_rows=None)
    _feed(monitor, logits, labels, batch)
    report = monitor.compute()
    assert report.counts["softmax_samples"] == n
    for k in (1, 3, 50):
        expected = int((logits.topk(min(k, c), dim=1).indices == labels[:, None]).any(dim=1).sum())
        assert report.rate(f"top{k}_accuracy") == Rate(expected, n, min(k, c) / c)
    histogram = torch.bincount(logits.argmax(dim=1), minlength=c)
    assert report["num_predicted_classes"] == int((histogram > 0).sum())
    assert report["dominant_class_share"] == pytest.approx(int(histogram.max()) / n)
    assert report["mean_max_softmax"] == pytest.approx(float(torch.softmax(logits, 1).amax(1).mean()))
    assert report["logit_mean"] == pytest.approx(float(logits.mean()), abs=1e-9)
    assert report["logit_std"] == pytest.approx(float(logits.std(unbiased=False)))
    p = histogram[histogram > 0].double() / n
    assert report["prediction_entropy"] == pytest.approx(
        float(-(p * p.log()).sum()) / torch.log(torch.tensor(c))
    )


@FAST
@given(seed=st.integers(0, 2**16), n=st.integers(1, 300), rows=st.integers(1, 64), batch=st.integers(1, 100))
def test_confidence_and_logit_moments_come_from_softmax_rows_spread_over_each_batch(
    seed: int, n: int, rows: int, batch: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 7, generator=gen, dtype=torch.float64) * 3
    monitor = ClassCollapseMonitor(7, softmax_rows=rows)
    _feed(monitor, logits, torch.randint(0, 7, (n,), generator=gen), batch)
    sampled = []
    for start in range(0, n, batch):  # rows spread over the whole batch: every ceil(b / rows)-th
        chunk = logits[start : start + batch]
        step = -(-chunk.shape[0] // rows)
        sampled.append(chunk[::step])
    sampled = torch.cat(sampled)
    report = monitor.compute()
    assert report.counts["softmax_samples"] == sampled.shape[0]
    assert report.counts["samples"] == n
    assert report["mean_max_softmax"] == pytest.approx(float(torch.softmax(sampled, 1).amax(1).mean()))
    assert report["logit_mean"] == pytest.approx(float(sampled.mean()), abs=1e-9)
    assert report["logit_std"] == pytest.approx(float(sampled.std(unbiased=False)))


def test_without_a_usable_sampled_row_the_confidence_is_unknown_not_zero() -> None:
    # The sampled rows (every 15th of 30: rows 0 and 15) are non-finite, the others fine.
    logits = torch.randn(30, 10, generator=torch.Generator().manual_seed(0))
    logits[[0, 15], 0] = float("nan")
    monitor = ClassCollapseMonitor(10, softmax_rows=2)
    monitor.update(logits, torch.arange(30) % 10)
    report = monitor.compute()
    assert report.counts["softmax_samples"] == 0 and report.counts["samples"] == 28
    for key in ("mean_max_softmax", "logit_mean", "logit_std"):
        assert math.isnan(report[key]), key
    assert "overconfident" not in report.codes


def test_predictions_follow_argmax_on_ties_and_saturated_logits() -> None:
    # Ties go to the first column (torch.argmax's rule), so constant logits all predict class 0;
    # logits 1,000 apart (exp underflows, the cheap path clamps) keep exact confidence 1.
    gen = torch.Generator().manual_seed(3)
    tied = torch.randint(0, 3, (200, 50), generator=gen).float()  # many ties at the maximum
    wide = torch.randn(200, 50, generator=gen) * 1000
    labels = torch.randint(0, 50, (200,), generator=gen)
    for logits in (tied, wide, torch.zeros(200, 50)):
        monitor = ClassCollapseMonitor(50, topk=(1,), softmax_rows=None)
        monitor.update(logits, labels)
        report = monitor.compute()
        histogram = torch.bincount(logits.argmax(dim=1), minlength=50)
        assert report["dominant_class"] == int(histogram.argmax())
        assert report["dominant_class_share"] == int(histogram.max()) / 200
        assert report["num_predicted_classes"] == int((histogram > 0).sum())
        expected = float(torch.softmax(logits.double(), 1).amax(1).mean())
        assert report["mean_max_softmax"] == pytest.approx(expected, rel=1e-6)
    assert report["dominant_class"] == 0 and report["dominant_class_share"] == 1.0


def test_compute_at_any_time_and_many_classes_give_the_same_counts() -> None:
    # Batches are counted FOLD_EVERY at a time (fewer when C is large); compute() counts the
    # pending ones, so reading a report mid-stream must change nothing.
    gen = torch.Generator().manual_seed(5)
    for num_classes in (30, 300_000):
        logits = torch.randn(60, num_classes, generator=gen)
        labels = torch.randint(0, num_classes, (60,), generator=gen)
        logits[:30, 7] += 10  # class 7 takes the first half
        streamed, once = ClassCollapseMonitor(num_classes), ClassCollapseMonitor(num_classes)
        for start in range(0, 60, 5):
            streamed.update(logits[start : start + 5], labels[start : start + 5])
            if start in (10, 35):
                streamed.compute()
        once.update(logits, labels)
        a, b = streamed.compute(), once.compute()
        for key in ("top1_accuracy", "top5_accuracy", "num_predicted_classes", "dominant_class"):
            assert a[key] == b[key], key
        assert a["dominant_class_share"] == b["dominant_class_share"] == pytest.approx(0.5, abs=0.05)
        assert a.counts == b.counts
        histogram = torch.bincount(logits.argmax(dim=1), minlength=num_classes)
        assert a["num_predicted_classes"] == int((histogram > 0).sum())
        absorbed = others = 0
        for start in range(0, 60, 5):  # per batch: the class taking most other-class predictions
            predicted, truth = logits[start : start + 5].argmax(dim=1), labels[start : start + 5]
            taken = torch.bincount(predicted[predicted != truth], minlength=num_classes)
            worst = int(taken.argmax())
            if int((truth != worst).sum()) >= 20:  # only batches with 20 samples of other classes
                absorbed += int(taken[worst])
                others += int((truth != worst).sum())
        expected = absorbed / others if others else math.nan
        assert a["batch_dominant_absorption"] == pytest.approx(expected, nan_ok=True)
        assert b["batch_dominant_absorption"] == pytest.approx(0.5, abs=0.2)  # one batch of 60


def test_half_precision_logits_are_accepted() -> None:
    labels = torch.arange(40) % 4
    logits = torch.nn.functional.one_hot(labels, 4).to(torch.float16) * 8
    monitor = ClassCollapseMonitor(4, topk=(1,))
    monitor.update(logits, labels)
    assert monitor.compute().rate("top1_accuracy") == Rate(40, 40, 0.25)


def test_non_finite_rows_are_counted_and_left_out() -> None:
    labels = torch.arange(20) % 5
    logits = torch.nn.functional.one_hot(labels, 5).float() * 9
    logits[3, 2] = float("nan")
    logits[7, 0] = float("inf")
    monitor = ClassCollapseMonitor(5, topk=(1,))
    monitor.update(logits, labels)
    report = monitor.compute()
    assert report.rate("top1_accuracy") == Rate(18, 18, 0.2)
    bad = report.diagnosis("non_finite")
    assert bad is not None and bad.evidence["non_finite"] == 2


def test_reset_forgets_everything() -> None:
    monitor = ClassCollapseMonitor(3, topk=(1,))
    monitor.update(torch.eye(3) * 5, torch.tensor([0, 1, 2]))
    monitor.reset()
    with pytest.raises(ValueError, match="before any update"):
        monitor.compute()
    monitor.update(torch.eye(3) * 5, torch.tensor([1, 2, 0]))
    assert monitor.compute().rate("top1_accuracy") == Rate(0, 3, 1 / 3)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        ClassCollapseMonitor(1)
    with pytest.raises(TypeError, match="topk"):
        ClassCollapseMonitor(5, topk="5")  # type: ignore[arg-type]
    assert ClassCollapseMonitor(5, topk=3).topk == (3,)
    assert ClassCollapseMonitor(5, topk=[5, 1, 5]).topk == (1, 5)
    with pytest.raises(ValueError, match="topk"):
        ClassCollapseMonitor(5, topk=(0,))
    with pytest.raises(ValueError, match="softmax_rows"):
        ClassCollapseMonitor(5, softmax_rows=0)
    monitor = ClassCollapseMonitor(5)
    with pytest.raises(ValueError, match=r"logits has 4 columns.*num_classes=5"):
        monitor.update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="logits must be 2-D"):
        monitor.update(torch.zeros(5), torch.tensor([0]))
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        monitor.update(torch.zeros(2, 5), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels has 3 entries but logits has 2 rows"):
        monitor.update(torch.zeros(2, 5), torch.tensor([0, 1, 2]))
    monitor.update(torch.zeros(2, 5), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"1 of the 2 labels .* outside \[0, num_classes\) = \[0, 5\)"):
        monitor.compute()


# ----------------------------------------------------------------------------- no host sync
@contextlib.contextmanager
def _no_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make every tensor-to-Python read raise: update() must not wait for the device."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("update() read a tensor back to the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
            patch.setattr(torch.Tensor, name, refuse)
        yield


def test_update_reads_nothing_back_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monitor = ClassCollapseMonitor(50)
    logits, labels = torch.randn(64, 50), torch.randint(0, 50, (64,))
    monitor.update(logits, labels)  # the first call creates the state
    with _no_host_reads(monkeypatch):
        for _ in range(FOLD_EVERY + 1):  # through a fold of the pending batches
            monitor.update(logits, labels)
    assert monitor.compute().rate("top1_accuracy").total == 64 * (FOLD_EVERY + 2)  # type: ignore[union-attr]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_does_not_synchronise_cuda() -> None:
    monitor = ClassCollapseMonitor(1000)
    logits = torch.randn(1024, 1000, device="cuda")
    labels = torch.randint(0, 1000, (1024,), device="cuda")
    monitor.update(logits, labels)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(FOLD_EVERY + 1):  # through a fold of the pending batches
            monitor.update(logits, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert monitor.compute().counts["samples"] == 1024 * (FOLD_EVERY + 2)
