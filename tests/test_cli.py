"""The ``embedkit evaluate`` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embedkit.cli import load_embeddings, main
from embedkit.evaluation.report import load_reports
from embedkit.evaluation.verification import verification_metrics
from embedkit.similarity import pairwise_similarity


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
    for figure in ("cmc.png", "dir_fpir.png", "roc.png", "det.png", "scores.png"):
        assert (out / figure).stat().st_size > 1000, figure


def _refuse(token: str) -> None:
    raise ValueError(f"non-standard JSON token {token}")


def test_report_json_is_strict_has_curves_and_replots(
    files, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gallery, probe = files
    out = tmp_path / "out"
    # FPIR 1 puts threshold@fpir=1 at the lowest score and FAR 1e-6 is unmeasurable here:
    # the values that used to be written as -Infinity / NaN.
    argv = ["evaluate", "--gallery", str(gallery), "--probe", str(probe), "--out", str(out), "--no-progress"]
    assert main([*argv, "--fpir", "0.01", "1", "--far", "1e-6", "0.1", "1"]) == 0
    with open(out / "report.json", encoding="utf-8") as f:
        data = json.load(f, parse_constant=_refuse)  # strict: NaN / Infinity tokens raise
    verification = data["verification"]
    # +inf (the ROC's first threshold: accept nothing) is the string "Infinity".
    assert verification["curves"]["thresholds"][0] == "Infinity"
    assert {"far", "tar", "thresholds", "score_bin_edges", "impostor_histogram"} <= set(
        verification["curves"]
    )
    assert {"cmc", "cmc_chance"} <= set(data["identification"]["curves"])
    assert {"fpir", "dir"} <= set(data["open_set"]["curves"])
    assert "genuine_scores" not in verification["curves"]

    reports = load_reports(out / "report.json")
    assert set(reports) == {"identification", "open_set", "verification", "retrieval"}
    loaded = reports["verification"]
    assert loaded.curves["thresholds"][0] == np.inf
    assert loaded.rate("tar@far=0.1") is not None and loaded["auc"] == verification["metrics"]["auc"]
    np.testing.assert_array_equal(
        loaded.curves["impostor_histogram"], verification["curves"]["impostor_histogram"]
    )

    again = tmp_path / "again"
    capsys.readouterr()
    assert main(["plot", str(out / "report.json"), "--out", str(again)]) == 0
    for figure in ("cmc.png", "dir_fpir.png", "roc.png", "det.png", "scores.png"):
        assert (again / figure).stat().st_size > 1000, figure


def test_cli_verification_equals_the_in_memory_computation(files, tmp_path: Path) -> None:
    gallery, probe = files
    out = tmp_path / "out"
    argv = ["evaluate", "--gallery", str(gallery), "--probe", str(probe), "--out", str(out), "--no-progress"]
    assert main([*argv, "--no-retrieval", "--far", "0.001", "0.01", "0.1"]) == 0
    written = json.loads((out / "report.json").read_text())["verification"]["metrics"]
    g, p = load_embeddings(gallery), load_embeddings(probe)
    scores = pairwise_similarity(torch.from_numpy(p["embeddings"]), torch.from_numpy(g["embeddings"])).numpy()
    genuine = p["labels"][:, None] == g["labels"][None, :]
    expected = verification_metrics(scores.ravel(), genuine.ravel(), far_targets=(0.001, 0.01, 0.1))
    assert written["auc"] == pytest.approx(expected["auc"], abs=1e-12)
    assert written["eer"] == pytest.approx(expected["eer"], abs=1e-12)
    for key in ("tar@far=0.001", "tar@far=0.01", "tar@far=0.1", "far@far=0.01", "best_accuracy"):
        rate = expected.rate(key)
        assert rate is not None
        assert (written[key]["hits"], written[key]["total"]) == (rate.hits, rate.total), key


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


def test_a_closed_pipe_is_not_reported_as_bad_input(
    files, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # BrokenPipeError is an OSError; evaluate's bad-input handler (exit 2) must let it through
    # to main(), which ends quietly with 141 (tested end to end in test_packaging).
    import embedkit.cli as cli

    def closed_pipe(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_evaluate", closed_pipe)
    gallery, probe = files
    with pytest.raises(BrokenPipeError):
        cli._main(["evaluate", "--gallery", str(gallery), "--probe", str(probe)])
    assert "error" not in capsys.readouterr().err
