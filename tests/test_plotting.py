"""Figures render to PNG with the expected artists; a missing matplotlib gets a clear error."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy.stats import norm  # noqa: E402

from embedkit.evaluation.report import Report  # noqa: E402
from embedkit.evaluation.verification import verification_metrics  # noqa: E402
from embedkit.plotting import plot_cmc, plot_det, plot_roc, plot_score_histograms  # noqa: E402


@pytest.fixture
def scored_pairs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    genuine = rng.random(3000) < 0.2
    return rng.normal(size=3000) + 2.0 * genuine, genuine


@pytest.fixture(autouse=True)
def close_figures() -> object:
    yield
    plt.close("all")


def save(ax: object, path: Path) -> None:
    ax.figure.savefig(path)  # type: ignore[attr-defined]
    assert path.exists() and path.stat().st_size > 1000


def test_plot_roc(scored_pairs: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    scores, genuine = scored_pairs
    # 1e-4 cannot be measured with ~2400 impostor pairs: it gets no marker.
    report = verification_metrics(scores, genuine, far_targets=(1e-4, 1e-2, 0.1))
    ax = plot_roc(report)
    save(ax, tmp_path / "roc.png")
    # ROC, chance diagonal, two target lines, one line of target markers, the EER marker.
    assert len(ax.lines) == 6
    assert ax.get_xscale() == "log"
    roc = ax.lines[0]
    far = report.curves["far"]
    np.testing.assert_array_equal(roc.get_xdata(), far[far > 0])
    markers = ax.lines[4]
    np.testing.assert_array_equal(markers.get_xdata(), [1e-2, 0.1])
    np.testing.assert_array_equal(markers.get_ydata(), [report["tar@far=0.01"], report["tar@far=0.1"]])
    np.testing.assert_allclose(ax.lines[5].get_ydata(), [1 - report["eer"]])

    _, given = plt.subplots()
    assert plot_roc(report, given, log_far=False) is given
    assert given.get_xscale() == "linear"
    assert len(given.lines[0].get_xdata()) == len(far)  # FAR = 0 kept on a linear axis


def test_plot_det(scored_pairs: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    scores, genuine = scored_pairs
    report = verification_metrics(scores, genuine)
    ax = plot_det(report)
    save(ax, tmp_path / "det.png")
    assert len(ax.lines) == 3  # DET, FAR = FRR diagonal, EER point
    far, frr = report.curves["far"], 1 - report.curves["tar"]
    shown = (far > 0) & (far < 1) & (frr > 0) & (frr < 1)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), norm.ppf(far[shown]))
    np.testing.assert_allclose(ax.lines[0].get_ydata(), norm.ppf(frr[shown]))
    np.testing.assert_allclose(ax.lines[2].get_xdata(), [norm.ppf(report["eer"])])
    assert "1%" in [t.get_text() for t in ax.get_xticklabels()]


def test_plot_det_of_perfect_separation_is_empty_not_broken(tmp_path: Path) -> None:
    report = verification_metrics([3.0, 2.0, 1.0, 0.0], [1, 1, 0, 0], far_targets=(0.5,))
    ax = plot_det(report)
    save(ax, tmp_path / "det.png")
    assert len(ax.lines[0].get_xdata()) == 0 and "no errors" in ax.get_title()


def test_plot_score_histograms(scored_pairs: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    scores, genuine = scored_pairs
    ax = plot_score_histograms(scores, genuine, threshold=1.0)
    save(ax, tmp_path / "hist.png")
    assert len(ax.patches) == 2  # one filled step patch per class
    assert len(ax.lines) == 1
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [1.0, 1.0])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"genuine (n={genuine.sum()})" in labels and f"impostor (n={(~genuine).sum()})" in labels
    assert len(plot_score_histograms(scores, genuine, plt.subplots()[1]).lines) == 0
    with pytest.raises(ValueError, match="is_genuine has 2 entries"):
        plot_score_histograms(scores, [True, False])


def test_plot_cmc(tmp_path: Path) -> None:
    cmc = np.array([0.5, 0.7, 0.8, 0.85, 0.9])
    ax = plot_cmc(cmc, chance=0.1)
    save(ax, tmp_path / "cmc.png")
    assert len(ax.lines) == 2
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [1, 2, 3, 4, 5])
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.1, 0.2, 0.3, 0.4, 0.5])
    report = Report("identification", {"cmc@1": 0.5}, curves={"cmc": cmc, "cmc_chance": np.full(5, 0.25)})
    ax = plot_cmc(report)
    assert len(ax.lines) == 2
    np.testing.assert_allclose(ax.lines[1].get_ydata(), np.full(5, 0.25))
    assert len(plot_cmc(cmc).lines) == 1  # no chance level known: no chance line
    with pytest.raises(ValueError, match=r"rates in \[0, 1\]"):
        plot_cmc([0.5, 1.5])
    with pytest.raises(ValueError, match="without curves\\['cmc'\\]"):
        plot_cmc(Report("x", {"a": 1.0}))
    with pytest.raises(ValueError, match="chance has 2 values but there are 5 ranks"):
        plot_cmc(cmc, chance=[0.1, 0.2])


def test_plot_roc_needs_a_verification_report() -> None:
    with pytest.raises(ValueError, match="verification_metrics"):
        plot_roc(Report("retrieval", {"map@r": 0.3}))


def test_missing_matplotlib_says_how_to_install(
    scored_pairs: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    scores, genuine = scored_pairs
    report = verification_metrics(scores, genuine)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    for call in (
        lambda: plot_roc(report),
        lambda: plot_det(report),
        lambda: plot_score_histograms(scores, genuine),
        lambda: plot_cmc([0.5, 0.6]),
    ):
        with pytest.raises(ImportError, match=r"pip install embedkit\[plot\]"):
            call()
