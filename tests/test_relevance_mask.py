"""The relevance-mask reproduction (case study 05) end to end, in a tiny configuration.

It checks what a user reads: every promised field of report.json, finite values, region
counts consistent with the data, Wilson intervals that contain their estimates, the
figures and the printed table; that --data-dir is refused with a clear message; and that
a seed gives the same numbers twice on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from _factories import load_example
from embedkit.monitors import wilson_interval

rm = load_example("relevance_mask")

TINY = dataclasses.replace(
    rm.QUICK,
    train_sequences=12,
    val_sequences=4,
    test_sequences=10,
    frames=4,
    size=32,
    width=4,
    embedding_dim=8,
    pretrain_epochs=2,
    pretrain_batch=6,
    finetune_epochs=2,
    batch_size=12,
    window=2,
    figure_frames=2,
)

MODELS = ["motion only", "untrained", *rm.VARIANTS]
RATES = ("relevant_regions", "irrelevant_regions", "all_regions")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("relevance")
    rm.run(TINY, data_dir=None, device=torch.device("cpu"), out=out, seed=0, show=False)
    return out


def _strict_json(path: Path):
    def reject(constant):
        raise AssertionError(f"report.json holds {constant}, which is not strict JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_report_has_every_promised_field(tiny_run) -> None:
    report = _strict_json(tiny_run / "report.json")
    assert report["command"].startswith("python") and report["device"] == "cpu" and report["seed"] == 0
    splits = report["data"]["splits"]
    for name, sequences in (("train", 12), ("val", 4), ("test", 10)):
        assert splits[name]["sequences"] == sequences
        assert splits[name]["frames"] == sequences * (TINY.frames - 1)  # motion needs the previous frame
        assert 0 <= splits[name]["motion_pixels_on_relevant_objects"] <= 1
    regions = report["regions"]
    causes = regions["distractor"] + regions["lighting"] + regions["noise"]
    assert regions["regions"] == regions["relevant"] + causes
    assert regions["relevant"] == regions["object"]
    assert regions["regions"] > 0
    assert list(report["models"]) == MODELS
    for name, r in report["models"].items():
        assert r["description"]
        for key in ("iou_vs_truth", "iou_vs_motion", "precision_vs_truth", "recall_vs_truth"):
            assert r[key] is None or 0 <= r[key] <= 1, (name, key)
        for key in ("mean_region_score", "mean_pixel_score", "predicted_pixel_fraction"):
            assert _finite(r[key]) and 0 <= r[key] <= 1, (name, key)
        assert 0 <= r["mean_region_decisiveness"] <= 0.5
        assert r["region_auc"] is None or 0 <= r["region_auc"] <= 1
        assert r["relevant_regions"]["total"] == regions["relevant"]
        assert r["irrelevant_regions"]["total"] == regions["regions"] - regions["relevant"]
        assert r["all_regions"]["total"] == regions["regions"]
        assert r["all_regions"]["hits"] == r["relevant_regions"]["hits"] + r["irrelevant_regions"]["hits"]
        for key in RATES:
            rate = r[key]
            assert 0 <= rate["hits"] <= rate["total"] and rate["chance"] == 0.5 and rate["confidence"] == 0.95
            if rate["total"] == 0:
                continue
            assert rate["value"] == pytest.approx(rate["hits"] / rate["total"])
            assert rate["ci_low"] <= rate["value"] <= rate["ci_high"], (name, key)
            wilson = wilson_interval(rate["hits"], rate["total"])
            assert (rate["ci_low"], rate["ci_high"]) == pytest.approx(wilson)
            assert rate["verdict"] in ("above_chance", "at_chance", "below_chance", "undetermined")
            if rate["ci_low"] > 0.5:
                assert rate["verdict"] == "above_chance"
            if rate["ci_high"] < 0.5:
                assert rate["verdict"] == "below_chance"
        rejected = r["irrelevant_rejected_by_cause"]
        assert sum(rejected[c]["total"] for c in ("distractor", "lighting", "noise")) == (
            regions["regions"] - regions["relevant"]
        )
        assert sum(rejected[c]["hits"] for c in rejected) == r["irrelevant_regions"]["hits"]
        if name in rm.VARIANTS:
            assert len(r["epochs"]) == TINY.finetune_epochs
            for epoch in r["epochs"]:
                assert _finite(epoch["train_loss"]) and _finite(epoch["val_loss"])
            assert r["training_seconds"] >= 0
        else:
            assert r["training_seconds"] is None
    # Stage 1 alone calls every motion region relevant and reproduces the motion mask.
    motion = report["models"]["motion only"]
    assert motion["iou_vs_motion"] == 1.0
    assert motion["relevant_regions"]["hits"] == regions["relevant"]
    assert motion["irrelevant_regions"]["hits"] == 0
    assert set(report["confidence_drift"]) == set(MODELS)
    pre = report["pretraining"]
    steps = TINY.pretrain_epochs * (TINY.train_sequences // TINY.pretrain_batch)
    assert pre["steps"] == steps and len(pre["loss"]) == steps and all(_finite(x) for x in pre["loss"])
    for key in ("sequence_precision@1_untrained", "sequence_precision@1_pretrained"):
        assert 0 <= pre[key] <= 1
    for d in pre["diagnoses"]:
        assert d["code"] and d["severity"] in ("info", "warning", "error") and d["message"]
        assert 1 <= d["step"] <= steps and 1 <= d["windows_fired"] <= d["windows"]


def test_figures_table_and_history_are_written(tiny_run) -> None:
    pytest.importorskip("matplotlib")
    report = _strict_json(tiny_run / "report.json")
    assert set(report["figures"]) == {"comparison.png", "training.png", "regions.png"}
    for name in report["figures"]:
        assert (tiny_run / name).stat().st_size > 1000
    markdown = (tiny_run / "report.md").read_text(encoding="utf-8")
    for name in MODELS:
        assert f"| {name} " in markdown
    assert "IoU vs truth" in markdown and "mean distance from 0.5" in markdown
    history = (tiny_run / "monitors_pretraining.csv").read_text(encoding="utf-8").splitlines()
    assert "health/" in history[0]


def test_same_seed_same_numbers(tiny_run, tmp_path) -> None:
    config = dataclasses.replace(TINY, figure_frames=1)
    again = rm.run(config, data_dir=None, device=torch.device("cpu"), out=tmp_path, seed=0, show=False)
    first = _strict_json(tiny_run / "report.json")
    assert again["pretraining"]["loss"] == first["pretraining"]["loss"]
    for name in MODELS:
        for key in ("iou_vs_truth", "mean_region_score"):
            a, b = again["models"][name][key], first["models"][name][key]
            assert (a is None and b is None) or a == pytest.approx(b, abs=0, rel=0), (name, key)
        for key in RATES:
            assert again["models"][name][key]["hits"] == first["models"][name][key]["hits"], (name, key)


def test_data_dir_is_refused_clearly(tmp_path) -> None:
    with pytest.raises(SystemExit, match="no real-data mode"):
        rm.load_data(TINY, tmp_path, seed=0)


def test_help_says_there_is_no_real_data_mode(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        rm.main(["--help"])
    assert exit_info.value.code == 0
    assert "no real-data mode" in capsys.readouterr().out


def test_segmenter_heads_give_full_resolution_logits() -> None:
    encoder = rm.Encoder(4)
    images = torch.rand(2, 3, 32, 32)
    for head in ("coarse", "full"):
        assert rm.Segmenter(encoder, head)(images).shape == (2, 32, 32)
    with pytest.raises(ValueError, match="head must be"):
        rm.Segmenter(encoder, "medium")
