"""The triplet reproduction (case study 04) end to end, in a tiny configuration.

It checks what a user reads: every promised field of report.json, finite values where
promised, triplet counts that match the data (and a hand count), the figures and the printed
table; that the monitors plumbing names a collapsed network; the folder mode; and that a seed
gives the same numbers twice on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import embedkit as ek
from _factories import load_example

tr = load_example("triplet_resnext")

TINY = dataclasses.replace(
    tr.QUICK,
    train_identities=24,
    val_identities=6,
    test_identities=10,
    image_size=16,
    width=8,
    blocks=(1, 1),
    cardinality=2,
    embedding_dim=8,
    epochs=2,
    batch_triplets=8,
    window=3,
    max_impostors=3000,
)

EPOCH_FIELDS = {
    "epoch",
    "first_step",
    "step",
    "triplets",
    "semi_hard_negatives",
    "loss",
    "active_triplet_fraction",
    "threshold",
    "val",
    "far",
    "val@far=0.001",
    "auc",
    "eer",
    "mean_genuine_distance",
    "mean_impostor_distance",
    "val_threshold_accuracy",
    "diagnoses",
}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("triplet")
    torch.use_deterministic_algorithms(True, warn_only=True)
    report = tr.run(TINY, data_dir=None, device=torch.device("cpu"), out=out, seed=0, show=False)
    return report, out


def test_report_has_every_promised_field(result):
    report, out = result
    on_disk = json.loads((out / "report.json").read_text())
    assert set(on_disk) >= {
        "command",
        "device",
        "seed",
        "config",
        "data",
        "triplet_counts",
        "margin",
        "test_pairs",
        "runs",
        "figures",
        "seconds",
    }
    assert on_disk["margin"] == 0.2
    assert list(on_disk["runs"]) == [run.name for run in tr.RUNS]
    for name, r in on_disk["runs"].items():
        assert len(r["epochs"]) == TINY.epochs, name
        assert r["steps"] == TINY.epochs * r["steps_per_epoch"]
        assert r["diverged"] is None
        for epoch in r["epochs"]:
            assert set(epoch) == EPOCH_FIELDS, name
            for key in ("loss", "active_triplet_fraction", "auc", "eer", "mean_genuine_distance"):
                assert math.isfinite(epoch[key]), (name, key)
            assert 0.0 <= epoch["active_triplet_fraction"] <= 1.0
            # VAL and FAR with their counts: accepted pairs out of same / different pairs.
            assert epoch["val"]["total"] == on_disk["test_pairs"]["genuine"]
            assert epoch["far"]["total"] == on_disk["test_pairs"]["impostor"]
            for key in ("val", "far"):
                assert 0 <= epoch[key]["hits"] <= epoch[key]["total"]
                assert epoch[key]["value"] == pytest.approx(epoch[key]["hits"] / epoch[key]["total"])
            # 3,000 impostor pairs allow FAR = 1e-3 (three false accepts): measurable.
            assert 0.0 <= epoch["val@far=0.001"]["value"] <= 1.0
            assert (epoch["semi_hard_negatives"] is None) == (r["negatives"] == "random")
            assert all(isinstance(code, str) for code in epoch["diagnoses"])
        for d in r["diagnoses"]:
            assert {"code", "monitor", "severity", "step", "window", "message", "evidence"} <= set(d)
            assert 1 <= d["step"] <= r["steps"]
    for name in report["figures"]:
        assert (out / name).stat().st_size > 0
    assert set(report["figures"]) == {"triplet_history.png", "triplet_val_far.png", "triplet_health.png"}
    text = (out / "report.md").read_text()
    assert "| run " in text and "VAL@FAR=1e-3" in text  # the table printed at the end
    assert all(run.name in text for run in tr.RUNS)
    for run in tr.RUNS:
        assert (out / f"monitors_{run.name}.csv").exists()


def test_triplet_counts_match_the_data(result):
    report, _ = result
    by_size = {int(n): c for n, c in report["data"]["counts"]["train_identities_by_image_count"].items()}
    assert set(by_size) == {2, 3, 4}  # the case study's shape: 2, 3 or 4 images per identity
    assert sum(by_size.values()) == TINY.train_identities
    old = sum(c * (n // 2) for n, c in by_size.items())
    fixed = sum(c * (n - 1) for n, c in by_size.items())
    assert report["triplet_counts"] == {"both_removed": old, "one_removed": fixed}
    assert fixed > old
    for r in report["runs"].values():
        per_epoch = report["triplet_counts"][r["rule"]]
        assert all(e["triplets"] == per_epoch for e in r["epochs"])
        assert r["steps_per_epoch"] == math.ceil(per_epoch / TINY.batch_triplets)


def test_triplet_counts_by_hand():
    # Identities of 2, 3, 4 and 1 images: old rule 1 + 1 + 2 + 0, fixed rule 1 + 2 + 3 + 0.
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 3])
    assert tr.triplet_counts(labels) == {"both_removed": 4, "one_removed": 6}


def test_case_study_shape_keeps_two_three_or_four_images():
    labels = torch.arange(9).repeat_interleave(5)
    rows = tr.case_study_shape(labels, seed=3)
    kept = np.bincount(labels[rows].numpy())
    assert sorted(kept) == [2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert np.array_equal(rows, tr.case_study_shape(labels, seed=3))
    with pytest.raises(ValueError, match="needs 4 or more"):
        tr.case_study_shape(torch.tensor([0, 0, 0, 1, 1, 1, 1]), seed=0)


def test_a_collapsed_network_is_named_at_the_margin():
    # Every embedding the same point: d(a, p) = d(a, n) = 0, each triplet costs the margin.
    monitors = tr.Monitors(window=4)
    loss_fn = ek.TripletMarginLoss(tr.MARGIN)
    labels = torch.arange(8).repeat(2)
    for step in range(1, 13):
        z = torch.ones(16, 8, requires_grad=True)
        loss = loss_fn(z[:8], labels[:8], ref_embeddings=z[8:], ref_labels=labels[8:])
        assert loss.item() == pytest.approx(tr.MARGIN)
        monitors.update(step, loss_fn, z.detach(), labels)
    codes = {d["code"]: d["step"] for d in monitors.diagnoses()}
    assert codes["loss_at_margin"] == 4
    assert codes["complete_collapse"] == 4
    steps, values = monitors.losses.history.series("loss")
    assert tr.loss_at_margin_from(steps, values, window=4) == 1
    assert monitors.fired_between(5, 8) == ["complete_collapse", "no_separation", "loss_at_margin"]


def test_the_same_seed_gives_the_same_numbers(result, tmp_path):
    first, _ = result
    # Runs are independent (each seeds its own weights, triplets and batch order): two of them alone
    # give the numbers they gave among all six.
    runs = (tr.RUNS[2], tr.RUNS[5])
    again = tr.run(
        TINY, data_dir=None, device=torch.device("cpu"), out=tmp_path, seed=0, show=False, runs=runs
    )
    for run in runs:
        assert _numbers(again["runs"][run.name]) == _numbers(first["runs"][run.name])


def _numbers(r):
    """A run's report without its timings, as plain JSON values."""
    plain = json.loads(json.dumps(ek.evaluation.report.to_plain(r)))
    plain.pop("training_seconds")
    return plain


def test_folder_mode_splits_by_identity(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(8):
        for j in range(3):
            (tmp_path / f"person{i}").mkdir(exist_ok=True)
            pixels = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / f"person{i}" / f"{j}.png")
    data = tr.load_data(TINY, tmp_path, seed=0)
    parts = [set(p.identity_names) for p in (data.train, data.val, data.test)]
    assert sum(len(p) for p in parts) == 8 and not (
        parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]
    )
    assert data.train.images.shape[-1] == TINY.image_size
    for i in range(3, 8):  # 3 identities left: too few for three disjoint parts
        for file in (tmp_path / f"person{i}").iterdir():
            file.unlink()
        (tmp_path / f"person{i}").rmdir()
    with pytest.raises(SystemExit, match="at least 6 identities"):
        tr.load_data(TINY, tmp_path, seed=0)
