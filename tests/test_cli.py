"""The ``embedkit evaluate`` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedkit.cli import load_embeddings, main


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((25, 12))
    gallery_labels = np.repeat(np.arange(20), 2)
    probe_labels = rng.integers(0, 25, 120)
    gallery = centres[gallery_labels] + 0.4 * rng.standard_normal((40, 12))
    probes = centres[probe_labels] + 0.4 * rng.standard_normal((120, 12))
    np.savez(
        tmp_path / "gallery.npz",
        embeddings=gallery.astype(np.float32),
        labels=gallery_labels,
        image_ids=np.array([f"hr/{i}.png" for i in range(40)]),
    )
    np.savez(
        tmp_path / "probe.npz",
        embeddings=probes.astype(np.float32),
        labels=probe_labels,
        image_ids=np.array([f"lr/{i}.png" for i in range(120)]),
    )
    return tmp_path / "gallery.npz", tmp_path / "probe.npz"


def test_evaluate_writes_report(files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gallery, probe = files
    out = tmp_path / "out"
    status = main(
        ["evaluate", "--gallery", str(gallery), "--probe", str(probe), "--out", str(out), "--no-progress"]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "closed-set identification" in printed and "rank-1" in printed and "chance" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"identification", "open_set", "verification", "retrieval", "run"}
    rank1 = report["identification"]["metrics"]["rank-1"]
    assert rank1["total"] == report["identification"]["counts"]["mated_probes"]
    assert rank1["chance"] == pytest.approx(1 / 20)
    assert report["verification"]["metrics"]["auc"] > 0.9
    assert "map@r" in report["retrieval"]["metrics"]
    assert (out / "report.md").read_text().count("| metric |") == 4
    for figure in ("cmc.png", "roc.png", "det.png", "scores.png"):
        assert (out / figure).stat().st_size > 1000, figure


def test_npy_inputs_with_label_files(tmp_path: Path, files) -> None:
    gallery, probe = files
    for name, path in (("g", gallery), ("p", probe)):
        data = np.load(path)
        np.save(tmp_path / f"{name}.npy", data["embeddings"])
        np.save(tmp_path / f"{name}_labels.npy", data["labels"])
    args = ["evaluate", "--gallery", str(tmp_path / "g.npy"), "--probe", str(tmp_path / "p.npy")]
    args += [
        "--gallery-labels",
        str(tmp_path / "g_labels.npy"),
        "--probe-labels",
        str(tmp_path / "p_labels.npy"),
    ]
    assert main([*args, "--no-progress", "--no-verification", "--no-retrieval", "--template", "mean"]) == 0


def test_bad_input_is_reported_not_raised(tmp_path: Path, files, capsys: pytest.CaptureFixture[str]) -> None:
    gallery, _ = files
    np.savez(tmp_path / "bad.npz", vectors=np.zeros((3, 2), dtype=np.float32))
    assert main(["evaluate", "--gallery", str(gallery), "--probe", str(tmp_path / "bad.npz")]) == 2
    assert "expected one named 'embeddings'" in capsys.readouterr().err
    np.save(tmp_path / "e.npy", np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="no labels"):
        load_embeddings(tmp_path / "e.npy")
    # the same image enrolled and probed is refused, by name
    assert main(["evaluate", "--gallery", str(gallery), "--probe", str(gallery), "--no-progress"]) == 2
    assert "hr/0.png" in capsys.readouterr().err


def test_python_dash_m(files) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "embedkit", "evaluate", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "--gallery" in result.stdout


def test_doctor_is_a_subcommand_and_names_collapse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``embedkit doctor`` runs the monitors: identical embeddings are complete collapse (exit 1)."""
    path = tmp_path / "collapsed.npz"
    np.savez(path, embeddings=np.ones((64, 16), dtype=np.float32), labels=np.arange(64) % 8)
    assert main(["doctor", str(path)]) == 1
    assert "complete_collapse" in capsys.readouterr().out


def test_doctor_is_quiet_on_healthy_clusters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, 16))
    labels = np.arange(400) % 8
    embeddings = centres[labels] + 0.05 * rng.standard_normal((400, 16))
    path = tmp_path / "healthy.npz"
    np.savez(path, embeddings=embeddings.astype(np.float32), labels=labels)
    assert main(["doctor", str(path)]) == 0
    assert "error" not in capsys.readouterr().out.lower()
