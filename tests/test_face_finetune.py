"""The face fine-tuning reproduction end to end, in a tiny configuration.

It checks what a user reads: every promised field of report.json, finite values, counts
consistent with the data, the figures, the printed table; the folder mode on PNGs written
here; and that a seed gives the same numbers twice on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from _factories import load_example
from embedkit.datasets import synthetic_identities

ff = load_example("face_finetune")

TINY = dataclasses.replace(
    ff.QUICK,
    pretrain_identities=24,
    finetune_identities=10,
    images_per_identity=9,
    hr_size=16,
    vlr_size=4,
    width=8,
    embedding_dim=16,
    dsr_epochs=1,
    pretrain_epochs=2,
    finetune_epochs=2,
    batch_size=16,
    p=4,
    k=2,
    window=3,
    test_gallery=1,
    test_probe=2,
)

RECIPES = ["pretrained", "arcface-s32-m0.3", "arcface-s8-m0.1-t4", "paired", "supcon"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("face")
    ff.run(TINY, data_dir=None, device=torch.device("cpu"), out=out, seed=0, show=False)
    return out


def _strict_json(path: Path):
    def reject(constant):
        raise AssertionError(f"report.json holds {constant}, which is not strict JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def test_report_has_every_promised_field(tiny_run) -> None:
    report = _strict_json(tiny_run / "report.json")
    assert list(report["recipes"]) == RECIPES
    counts = report["data"]["counts"]
    identities = TINY.finetune_identities
    assert counts["finetune_identities"] == identities
    assert counts["test_probe_images"] == identities * TINY.test_probe
    assert counts["test_gallery_images"] == identities * TINY.test_gallery
    held_out = TINY.held_out
    assert counts["train_images"] == identities * (TINY.images_per_identity - held_out)
    assert counts["pretrain_identities"] == TINY.pretrain_identities
    for name, r in report["recipes"].items():
        for key in ("paired_similarity", "same_identity_similarity", "different_identity_similarity"):
            assert -1 <= r[key] <= 1, (name, key)
        for key in ("eer", "auc"):
            assert 0 <= r[key] <= 1, (name, key)
        impostors = r["verification"]["counts"]["impostor_pairs"]
        # FAR = 1e-3 is measurable from 1,000 impostor pairs on; below that it is null, with a note.
        assert (r["tar@far=0.001"] is None) == (impostors < 1000), name
        for k in (1, 5):
            rate = r[f"rank-{k}"]
            assert rate["total"] == counts["test_probe_images"]
            assert 0 <= rate["hits"] <= rate["total"]
            assert rate["chance"] == pytest.approx(k / identities)
            assert rate["value"] == pytest.approx(rate["hits"] / rate["total"])
        assert r["rank-1"]["hits"] <= r["rank-5"]["hits"]
        assert math.isfinite(r["training_seconds"]) and r["training_seconds"] >= 0
        assert r["diverged"] is None  # lr 3e-4 trains; divergence has its own test
        assert r["identification"]["counts"]["probes"] == counts["test_probe_images"]
        assert r["verification"]["counts"]["genuine_pairs"] == counts["test_probe_images"] * TINY.test_gallery
        if name == "pretrained":
            assert r["diagnoses"] is None and r["validation"] == []
            continue
        assert len(r["validation"]) == TINY.finetune_epochs
        # Every recipe trains the same number of steps of batch_size images per epoch.
        steps_per_epoch = counts["train_images"] // TINY.batch_size
        assert [v["step"] for v in r["validation"]] == [
            steps_per_epoch * (e + 1) for e in range(TINY.finetune_epochs)
        ]
        assert 1 <= r["selected_epoch"] <= TINY.finetune_epochs
        selected = r["validation"][r["selected_epoch"] - 1][r["validated_on"]]
        assert selected == max(v[r["validated_on"]] for v in r["validation"])
        for d in r["diagnoses"]:
            assert d["code"] and d["severity"] in ("info", "warning", "error") and d["message"]
            assert 1 <= d["step"] <= TINY.finetune_epochs * steps_per_epoch
            assert 1 <= d["windows_fired"] <= d["windows"]
            low, high = d["window"]
            assert high == d["step"] and 1 <= low <= high and high - low < TINY.window
    assert report["dsr"]["psnr_dsr_db"] > 0 and report["pretrained_hr_probes"]["rank-1"]["total"] > 0
    assert report["command"].startswith("python")


def test_figures_table_and_histories_are_written(tiny_run) -> None:
    pytest.importorskip("matplotlib")
    report = _strict_json(tiny_run / "report.json")
    expected = {"cmc.png", "scores.png", "validation.png"}
    expected |= {f"matches_{name}.png" for name in RECIPES}
    expected |= {f"monitors_{name}.png" for name in RECIPES[1:]}
    assert set(report["figures"]) == expected
    for name in expected:
        assert (tiny_run / name).stat().st_size > 1000
    markdown = (tiny_run / "report.md").read_text(encoding="utf-8")
    for name in RECIPES:
        assert f"| {name} " in markdown
    assert "rank-1" in markdown and "TAR@FAR=1e-3" in markdown
    history = (tiny_run / "monitors_supcon.csv").read_text(encoding="utf-8").splitlines()
    assert "health/paired_similarity" in history[0]


def test_same_seed_same_numbers(tiny_run, tmp_path) -> None:
    again = ff.run(TINY, data_dir=None, device=torch.device("cpu"), out=tmp_path, seed=0, show=False)
    first = _strict_json(tiny_run / "report.json")
    for name in RECIPES:
        for key in ("paired_similarity", "same_identity_similarity", "eer"):
            assert again["recipes"][name][key] == first["recipes"][name][key], (name, key)
        assert again["recipes"][name]["rank-1"].hits == first["recipes"][name]["rank-1"]["hits"]


def test_folder_of_pngs(tmp_path) -> None:
    image = pytest.importorskip("PIL.Image")
    faces = synthetic_identities(16, 8, size=20, seed=1)
    root = tmp_path / "faces"
    for x, label, image_id in zip(faces.images, faces.labels, faces.image_ids, strict=True):
        folder = root / f"person_{int(label):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (x.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        image.fromarray(pixels).save(folder / f"{image_id.split('/')[1]}.png")
    config = dataclasses.replace(TINY, finetune_identities=6)
    out = tmp_path / "out"
    report = ff.run(config, data_dir=root, device=torch.device("cpu"), out=out, seed=0, show=False)
    assert report["data"]["counts"]["finetune_identities"] == 6
    assert report["data"]["counts"]["pretrain_identities"] == 10
    assert "folder" in report["data"]["source"]
    assert (out / "report.json").exists()


def test_splits_do_not_leak() -> None:
    data = ff.load_data(TINY, None, seed=0)
    parts = [data.train, data.val_gallery, data.val_probe, data.test_gallery, data.test_probe]
    ids = [i for part in parts for i in part.image_ids.tolist()]
    assert len(ids) == len(set(ids)) == TINY.finetune_identities * TINY.images_per_identity
    assert not set(data.pretrain.identity_names) & set(data.train.identity_names)
    for part in parts[1:]:  # every held-out part covers every fine-tuning identity
        assert set(part.identity_names) == set(data.train.identity_names)


def test_folder_with_too_few_images(tmp_path) -> None:
    image = pytest.importorskip("PIL.Image")
    for person in ("a", "b", "c"):
        (tmp_path / person).mkdir()
        for i in range(2):
            image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / person / f"{i}.png")
    with pytest.raises(SystemExit, match="at least 2 identities"):
        ff.load_data(TINY, tmp_path, seed=0)


def test_a_diverging_recipe_is_reported_not_fatal(tmp_path, monkeypatch) -> None:
    # An infinite learning rate makes the weights non-finite after the first step, so every
    # fine-tuned recipe diverges at step 2; the run must still finish and say so.
    monkeypatch.setattr(
        ff, "RECIPES", [r for r in ff.RECIPES if r.name in ("pretrained", "arcface-s32-m0.3")]
    )
    config = dataclasses.replace(TINY, lr=math.inf, finetune_epochs=1)
    ff.run(config, data_dir=None, device=torch.device("cpu"), out=tmp_path, seed=0, show=False)
    report = _strict_json(tmp_path / "report.json")
    assert report["recipes"]["pretrained"]["diverged"] is None
    arcface = report["recipes"]["arcface-s32-m0.3"]
    assert arcface["diverged"] == {"step": 2, "epoch": 1, "reason": "non-finite embeddings"}
    assert arcface["selected_epoch"] == 0  # nothing validated: the pretrained weights are evaluated
    assert arcface["rank-1"]["value"] == report["recipes"]["pretrained"]["rank-1"]["value"]
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "diverged (2)" in markdown and "**Diverged** at step 2" in markdown
