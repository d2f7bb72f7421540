"""Figures render to PNG with the expected artists; a missing matplotlib gets a clear error."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy.stats import norm  # noqa: E402

from embedkit.evaluation import Gallery  # noqa: E402
from embedkit.evaluation.report import Report  # noqa: E402
from embedkit.evaluation.verification import verification_metrics  # noqa: E402
from embedkit.plotting import (  # noqa: E402
    plot_cmc,
    plot_det,
    plot_dir_fpir,
    plot_roc,
    plot_score_distributions,
    plot_score_histograms,
)


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


def line(ax: object, label: str) -> object:
    """The one line of ``ax`` with this legend label."""
    found = [ln for ln in ax.lines if ln.get_label() == label]  # type: ignore[attr-defined]
    assert len(found) == 1, [ln.get_label() for ln in ax.lines]  # type: ignore[attr-defined]
    return found[0]


def drawn_at(ln: object, x: float, ax: object) -> float:
    """The y the line is drawn at for abscissa x, interpolating as matplotlib draws: straight
    chords in display (axis-scale) coordinates."""
    xs, ys = np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float)  # type: ignore[attr-defined]
    if ax.get_xscale() == "log":  # type: ignore[attr-defined]
        return float(np.interp(np.log10(x), np.log10(xs), ys))
    return float(np.interp(x, xs, ys))


def test_plot_roc(scored_pairs: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    scores, genuine = scored_pairs
    report = verification_metrics(scores, genuine, far_targets=(1e-2, 0.1))
    ax = plot_roc(report)
    save(ax, tmp_path / "roc.png")
    assert ax.get_xscale() == "log"
    far, tar = report.curves["far"], report.curves["tar"]
    roc = line(ax, f"ROC (AUC {report['auc']:.4f})")
    np.testing.assert_array_equal(roc.get_xdata(), far[far > 0])
    np.testing.assert_array_equal(roc.get_ydata(), tar[far > 0])
    markers = line(ax, "TAR @ FAR targets")
    np.testing.assert_array_equal(markers.get_xdata(), [1e-2, 0.1])
    np.testing.assert_array_equal(markers.get_ydata(), [report["tar@far=0.01"], report["tar@far=0.1"]])
    eer = line(ax, f"EER {report['eer']:.4f}")
    np.testing.assert_allclose(eer.get_xdata(), [report["eer"]])
    np.testing.assert_allclose(eer.get_ydata(), [1 - report["eer"]])

    _, given = plt.subplots()
    assert plot_roc(report, given, log_far=False) is given
    assert given.get_xscale() == "linear"
    assert len(given.lines[0].get_xdata()) == len(far)  # FAR = 0 kept on a linear axis
    chance = line(given, "chance (TAR = FAR)")
    np.testing.assert_array_equal(chance.get_xdata(), chance.get_ydata())
    assert drawn_at(chance, 0.3, given) == pytest.approx(0.3)


@pytest.mark.parametrize("n_impostor", [20_000, 300])
def test_roc_chance_line_is_tar_equal_far_on_the_log_axis(n_impostor: int) -> None:
    rng = np.random.default_rng(1)
    genuine = np.r_[np.ones(500, dtype=bool), np.zeros(n_impostor, dtype=bool)]
    scores = rng.normal(size=genuine.size) + 2.5 * genuine
    report = verification_metrics(scores, genuine, far_targets=(1e-4, 1e-3, 1e-2))
    ax = plot_roc(report)
    chance = line(ax, "chance (TAR = FAR)")
    x, y = np.asarray(chance.get_xdata()), np.asarray(chance.get_ydata())
    np.testing.assert_array_equal(x, y)  # every vertex on TAR = FAR
    assert x.min() <= 1e-4 and x.max() == 1.0  # reaches the finest FAR target asked for
    # As drawn (chords in log-x display space) it passes through the points the issue names,
    # and stays on TAR = FAR in between (a two-point chord gave 0.24 at FAR 1e-4).
    for far in (1e-4, 1e-2):
        assert drawn_at(chance, far, ax) == pytest.approx(far, rel=1e-12)
    between = np.logspace(-4, 0, 997)
    drawn = np.array([drawn_at(chance, f, ax) for f in between])
    np.testing.assert_allclose(drawn, between, rtol=2e-3)


def test_plot_det(scored_pairs: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    scores, genuine = scored_pairs
    report = verification_metrics(scores, genuine)
    ax = plot_det(report)
    save(ax, tmp_path / "det.png")
    far, frr = report.curves["far"], 1 - report.curves["tar"]
    shown = (far > 0) & (far < 1) & (frr > 0) & (frr < 1)
    det = line(ax, "DET")
    np.testing.assert_allclose(det.get_xdata(), norm.ppf(far[shown]))
    np.testing.assert_allclose(det.get_ydata(), norm.ppf(frr[shown]))
    eer = line(ax, f"EER {report['eer']:.4f}")
    np.testing.assert_allclose(eer.get_xdata(), [norm.ppf(report["eer"])])
    # Chance (a random score, TAR = FAR): FRR = 1 - FAR, checked on the probabilities drawn.
    chance = line(ax, "chance (FRR = 1 - FAR)")
    np.testing.assert_allclose(norm.cdf(chance.get_ydata()), 1 - norm.cdf(chance.get_xdata()), atol=1e-12)
    diagonal = line(ax, "FAR = FRR")
    np.testing.assert_array_equal(diagonal.get_xdata(), diagonal.get_ydata())
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert "1%" in labels and "0.1%" in labels
    np.testing.assert_allclose(ax.get_xticks(), norm.ppf([float(t[:-1]) / 100 for t in labels]))


@pytest.mark.parametrize("n_impostor", [300, 20_000, 200_000])
def test_det_tick_labels_never_overlap(n_impostor: int) -> None:
    rng = np.random.default_rng(2)
    genuine = np.r_[np.ones(2000, dtype=bool), np.zeros(n_impostor, dtype=bool)]
    scores = rng.normal(size=genuine.size) + 3.0 * genuine
    ax = plot_det(verification_metrics(scores, genuine))
    figure = ax.figure
    figure.set_size_inches(5, 4)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        boxes = sorted(
            (t.get_window_extent(renderer) for t in labels if t.get_text()), key=lambda b: b.x0 + b.y0
        )
        assert len(boxes) >= 3
        for a, b in itertools.pairwise(boxes):
            assert not a.overlaps(b), (a, b)


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


# ---------------------------------------------------------------------- plot_history
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from embedkit.evaluation.report import Rate  # noqa: E402
from embedkit.monitors.history import TrainingHistory  # noqa: E402
from embedkit.plotting import plot_history, plot_matches  # noqa: E402


@pytest.fixture
def history() -> TrainingHistory:
    history = TrainingHistory()
    for step in range(0, 100, 10):
        values: dict[str, object] = {"loss": 3.0 - step / 50}
        if step % 20 == 0:
            values["top1"] = Rate(step, 100, chance=0.01)
        history.record(step, values)
    return history


def test_plot_history_draws_lines_chance_and_events(history: TrainingHistory, tmp_path: Path) -> None:
    ax = plot_history(
        history,
        ["loss", "top1"],
        events=[(40, "class_collapse"), (60.0, "at_chance")],
        labels={"top1": "top-1 accuracy", "unused": "ignored"},
        chance=0.01,
        ylabel="value",
    )
    save(ax, tmp_path / "history.png")
    # loss, top1, the chance line, one vertical line per event.
    assert len(ax.lines) == 5
    loss, top1, chance, first, second = ax.lines
    np.testing.assert_array_equal(loss.get_xdata(), np.arange(0, 100, 10))
    np.testing.assert_allclose(loss.get_ydata(), 3.0 - np.arange(0, 100, 10) / 50)
    np.testing.assert_array_equal(top1.get_xdata(), [0, 20, 40, 60, 80])
    np.testing.assert_allclose(top1.get_ydata(), [0.0, 0.2, 0.4, 0.6, 0.8])  # Rates as their values
    assert loss.get_marker() == "o"  # few points: every point marked
    np.testing.assert_array_equal(chance.get_ydata(), [0.01, 0.01])
    assert chance.get_linestyle() == "--"
    for line, step in ((first, 40), (second, 60)):
        np.testing.assert_array_equal(line.get_xdata(), [step, step])
        assert line.get_linestyle() == ":" and to_rgba(line.get_color()) == to_rgba("red")
    texts = {t.get_text(): t for t in ax.texts}
    assert sorted(texts) == ["at_chance", "class_collapse"]
    assert texts["class_collapse"].get_position() == (40, 0.98)
    assert texts["at_chance"].get_position() == (60, 0.98)
    for text in texts.values():
        assert text.get_rotation() == 90
        # x in data coordinates, y in axes coordinates.
        assert text.get_transform() == ax.get_xaxis_transform()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["loss", "top-1 accuracy", "chance", "diagnosis first fired"]
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "value"
    assert ax.get_yscale() == "linear"


def test_plot_history_of_a_mapping_on_given_axes() -> None:
    steps = np.arange(100)
    _, given = plt.subplots()
    ax = plot_history(
        {"loss": (steps, torch.linspace(2.0, 0.5, 100)), "lr": ([0, 50], [0.1, 0.01])},
        "loss",
        given,
        logy=True,
        events=[(10, "loss_at_margin"), (10, "no_active_triplets")],
    )
    assert ax is given
    assert ax.get_yscale() == "log"
    assert len(ax.lines) == 2  # one key; events at the same step share one line
    assert ax.lines[0].get_marker() in (None, "None", "")  # many points: no markers
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.linspace(2.0, 0.5, 100), rtol=1e-6)
    assert [t.get_text() for t in ax.texts] == ["loss_at_margin, no_active_triplets"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss", "diagnosis first fired"]
    assert ax.get_ylabel() == ""


def test_plot_history_rejects_unknown_keys_and_bad_arguments(history: TrainingHistory) -> None:
    with pytest.raises(ValueError, match="'acc' is not in the history; it has 'loss', 'top1'"):
        plot_history(history, ["loss", "acc"])
    with pytest.raises(ValueError, match="'acc' is not in the history; it has 'loss'"):
        plot_history({"loss": ([0, 1], [1.0, 0.5])}, "acc")
    with pytest.raises(ValueError, match="nothing recorded yet"):
        plot_history(TrainingHistory(), "loss")
    with pytest.raises(TypeError, match="keys must be a str or a non-empty sequence"):
        plot_history(history, [])
    with pytest.raises(TypeError, match=r"keys\[1\] must be a str"):
        plot_history(history, ["loss", 3])
    with pytest.raises(TypeError, match="history must be a TrainingHistory or a mapping"):
        plot_history([1.0, 2.0], "loss")
    with pytest.raises(ValueError, match=r"history\['loss'\] has 2 steps but values of shape \(3,\)"):
        plot_history({"loss": ([0, 1], [1.0, 0.5, 0.2])}, "loss")
    with pytest.raises(TypeError, match=r"labels\['loss'\] must be a str"):
        plot_history(history, "loss", labels={"loss": 1})
    with pytest.raises(ValueError, match="chance must be finite"):
        plot_history(history, "loss", chance=float("nan"))


@pytest.mark.parametrize(
    ("events", "error", "message"),
    [
        ("class_collapse", TypeError, r"events must be a sequence of \(step, text\) pairs"),
        ([40], TypeError, r"events\[0\] must be a \(step, text\) pair"),
        ([(40, "a"), (50, "b", "c")], TypeError, r"events\[1\] must be a \(step, text\) pair"),
        ([("40", "class_collapse")], TypeError, r"events\[0\] step must be a real number; got str '40'"),
        ([(True, "class_collapse")], TypeError, r"events\[0\] step must be a real number"),
        ([(float("inf"), "class_collapse")], ValueError, r"events\[0\] step must be finite"),
        ([(40, 3)], TypeError, r"events\[0\] text must be a str"),
    ],
)
def test_plot_history_rejects_bad_events(
    history: TrainingHistory, events: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        plot_history(history, "loss", events=events)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- plot_matches
@pytest.fixture
def matches() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "probes": rng.random((5, 3, 8, 6)),
        "gallery": rng.random((10, 3, 8, 6)),
        "indices": np.array([[3, 1, 7], [0, 9, 2], [5, 5, 4], [8, 6, 1], [2, 3, 0]]),
        "is_correct": np.array(
            [[True, False, False], [False, True, False], [True, True, False], [False] * 3, [True] * 3]
        ),
        "scores": np.array(
            [[0.91, 0.5, 0.2], [0.8, 0.7, 0.1], [0.6, 0.6, 0.3], [0.4, 0.3, 0.2], [0.99, 0.98, 0.97]]
        ),
    }


def grid_images(fig: Figure) -> list[np.ndarray]:
    return [np.asarray(ax.images[0].get_array()) for ax in fig.axes]


def test_plot_matches_grid_frames_and_titles(matches: dict[str, np.ndarray], tmp_path: Path) -> None:
    probes, gallery, indices = matches["probes"], matches["gallery"], matches["indices"]
    correct, scores = matches["is_correct"], matches["scores"]
    fig = plot_matches(probes, gallery, indices, correct, scores=scores, max_probes=4)
    assert isinstance(fig, Figure)
    fig.savefig(tmp_path / "matches.png")
    assert (tmp_path / "matches.png").stat().st_size > 1000
    k = indices.shape[1]
    assert len(fig.axes) == 4 * (k + 1)  # max_probes rows of probe + k matches
    green, red = to_rgba("tab:green"), to_rgba("tab:red")
    for i in range(4):
        row = fig.axes[i * (k + 1) : (i + 1) * (k + 1)]
        assert row[0].get_title() == "probe"
        np.testing.assert_allclose(row[0].images[0].get_array(), probes[i].transpose(1, 2, 0))
        for j in range(k):
            ax = row[j + 1]
            assert ax.get_title() == f"#{j + 1} {scores[i, j]:.3g}"
            assert len(ax.get_xticks()) == 0 and len(ax.get_yticks()) == 0
            np.testing.assert_allclose(ax.images[0].get_array(), gallery[indices[i, j]].transpose(1, 2, 0))
            for spine in ax.spines.values():
                assert spine.get_edgecolor() == (green if correct[i, j] else red)
                assert spine.get_linewidth() == 3
    assert fig.axes[1].get_title() == "#1 0.91"
    # Without scores the titles are the ranks; max_probes above n_probes draws every probe.
    fig = plot_matches(probes, gallery, indices, correct.astype(int), max_probes=20)
    assert len(fig.axes) == 5 * (k + 1)
    assert [ax.get_title() for ax in fig.axes[:4]] == ["probe", "#1", "#2", "#3"]
    assert fig.axes[-1].spines["top"].get_edgecolor() == green


def test_plot_matches_channels_first_last_and_grayscale_agree(matches: dict[str, np.ndarray]) -> None:
    probes, gallery, indices, correct = (matches[k] for k in ("probes", "gallery", "indices", "is_correct"))
    gallery = gallery * 1.4 - 0.2  # out of [0, 1]: clipped
    first = plot_matches(
        torch.from_numpy(probes).float(), torch.from_numpy(gallery).float(), indices, correct
    )
    last = plot_matches(probes.transpose(0, 2, 3, 1), gallery.transpose(0, 2, 3, 1), indices, correct)
    images_first, images_last = grid_images(first), grid_images(last)
    assert len(images_first) == len(images_last) == 5 * 4
    assert images_first[0].shape == (8, 6, 3)
    for a, b in zip(images_first, images_last, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(images_last[1], np.clip(gallery[3].transpose(1, 2, 0), 0, 1))
    assert min(a.min() for a in images_last) == 0.0 and max(a.max() for a in images_last) == 1.0

    gray = plot_matches(probes[:, 0], gallery[:, :1], indices, correct, fig=plt.figure())
    images_gray = grid_images(gray)
    assert images_gray[0].shape == (8, 6)
    np.testing.assert_allclose(images_gray[0], probes[0, 0])
    np.testing.assert_allclose(images_gray[1], np.clip(gallery[3, 0], 0, 1))
    assert gray.axes[0].images[0].get_cmap().name == "gray"

    as_bytes = plot_matches((probes * 255).astype(np.uint8), gallery[:, :1], indices, correct)
    np.testing.assert_allclose(
        grid_images(as_bytes)[0], (probes[0] * 255).astype(np.uint8).transpose(1, 2, 0) / 255
    )


def test_plot_matches_draws_into_a_given_figure(matches: dict[str, np.ndarray]) -> None:
    fig = plt.figure()
    drawn = plot_matches(
        matches["probes"], matches["gallery"], matches["indices"][:2], matches["is_correct"][:2], fig=fig
    )
    assert drawn is fig and len(fig.axes) == 2 * 4
    with pytest.raises(TypeError, match="fig must be a matplotlib Figure"):
        plot_matches(
            matches["probes"], matches["gallery"], matches["indices"], matches["is_correct"], fig=plt.gca()
        )


def test_plot_matches_rejects_bad_shapes_and_indices(matches: dict[str, np.ndarray]) -> None:
    probes, gallery, indices, correct = (matches[k] for k in ("probes", "gallery", "indices", "is_correct"))
    with pytest.raises(ValueError, match=r"is_correct has shape \(5, 2\) but indices has shape \(5, 3\)"):
        plot_matches(probes, gallery, indices, correct[:, :2])
    with pytest.raises(ValueError, match=r"scores has shape \(4, 3\) but indices has shape \(5, 3\)"):
        plot_matches(probes, gallery, indices, correct, scores=matches["scores"][:4])
    with pytest.raises(ValueError, match=r"indices must be 2-D and non-empty.*got shape \(3,\)"):
        plot_matches(probes, gallery, indices[0], correct[0])
    with pytest.raises(TypeError, match="indices must hold integer gallery rows"):
        plot_matches(probes, gallery, indices.astype(float), correct)
    with pytest.raises(ValueError, match="is_correct must hold only booleans or 0/1"):
        plot_matches(probes, gallery, indices, correct * 2)
    with pytest.raises(ValueError, match=r"probe_images must have shape \(n, 3, H, W\)"):
        plot_matches(probes[:, :2], gallery, indices, correct)
    with pytest.raises(ValueError, match=r"gallery_images must have shape"):
        plot_matches(probes, gallery[0, 0], indices, correct)
    with pytest.raises(TypeError, match="probe_images must hold floats in"):
        plot_matches(probes > 0.5, gallery, indices, correct)
    with pytest.raises(ValueError, match="probe_images has 3 images but 5 probe rows are drawn"):
        plot_matches(probes[:3], gallery, indices, correct)
    plot_matches(probes[:3], gallery, indices, correct, max_probes=3)  # enough probes for 3 rows
    bad = gallery.copy()
    bad[7, 0, 0, 0] = np.nan
    with pytest.raises(
        ValueError, match=r"gallery_images holds NaN or inf in the image\(s\) at row\(s\) \[7\]"
    ):
        plot_matches(probes, bad, indices, correct)
    plot_matches(probes, bad, indices[1:], correct[1:])  # row 7 not drawn: not checked


@pytest.mark.parametrize(("bad", "found"), [(10, "found 10"), (-1, "found -1")])
def test_plot_matches_rejects_indices_outside_the_gallery(
    matches: dict[str, np.ndarray], bad: int, found: str
) -> None:
    indices = matches["indices"].copy()
    indices[2, 1] = bad
    with pytest.raises(ValueError, match=rf"indices must be gallery rows in \[0, 10\).*{found}"):
        plot_matches(matches["probes"], matches["gallery"], indices, matches["is_correct"])


def test_new_plots_say_how_to_install_matplotlib(
    matches: dict[str, np.ndarray], history: TrainingHistory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install embedkit\[plot\]"):
        plot_history(history, "loss")
    with pytest.raises(ImportError, match=r"pip install embedkit\[plot\]"):
        plot_matches(matches["probes"], matches["gallery"], matches["indices"], matches["is_correct"])


def open_set_report() -> Report:
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((60, 16))
    gallery_labels = np.repeat(np.arange(50), 2)
    probe_labels = rng.integers(0, 60, 600)
    gallery = centres[gallery_labels] + 0.5 * rng.standard_normal((100, 16))
    probes = centres[probe_labels] + 0.5 * rng.standard_normal((600, 16))
    return (
        Gallery().enrol(gallery, gallery_labels).dir_at_fpir(probes, probe_labels, fpir_targets=(0.01, 0.1))
    )


def test_plot_dir_fpir_draws_the_curve_chance_and_operating_points(tmp_path: Path) -> None:
    report = open_set_report()
    ax = plot_dir_fpir(report)
    save(ax, tmp_path / "dir_fpir.png")
    assert ax.get_xscale() == "log"
    fpir, dir_ = report.curves["fpir"], report.curves["dir"]
    curve = line(ax, "DIR")
    order = np.argsort(fpir, kind="stable")
    shown = fpir[order] > 0
    np.testing.assert_array_equal(curve.get_xdata(), fpir[order][shown])
    np.testing.assert_array_equal(curve.get_ydata(), dir_[order][shown])
    identities = report.counts["identities"]
    chance = line(ax, f"chance (FPIR / {identities})")
    x, y = np.asarray(chance.get_xdata()), np.asarray(chance.get_ydata())
    np.testing.assert_allclose(y, x / identities, rtol=1e-15)
    assert drawn_at(chance, 0.01, ax) == pytest.approx(0.01 / identities, rel=1e-12)
    between = np.logspace(np.log10(x.min()), 0, 301)
    np.testing.assert_allclose([drawn_at(chance, f, ax) for f in between], between / identities, rtol=2e-3)
    points = line(ax, "DIR @ FPIR targets (achieved FPIR)")
    np.testing.assert_array_equal(points.get_xdata(), [report["fpir@fpir=0.01"], report["fpir@fpir=0.1"]])
    np.testing.assert_array_equal(points.get_ydata(), [report["dir@fpir=0.01"], report["dir@fpir=0.1"]])
    with pytest.raises(ValueError, match="plot_dir_fpir needs the open-set report"):
        plot_dir_fpir(Report("x", {"a": 1.0}))


def test_plot_score_distributions_from_report_histograms(
    scored_pairs: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    scores, genuine = scored_pairs
    report = verification_metrics(scores, genuine)
    ax = plot_score_distributions(report)
    save(ax, tmp_path / "scores.png")
    edges = np.histogram_bin_edges(scores, 50)
    # The drawn densities are numpy's density histograms of each class on the shared bins.
    for patch, mask in zip(ax.patches, (genuine, ~genuine), strict=True):
        expected = np.histogram(scores[mask], bins=edges, density=True)[0]
        drawn_top = patch.get_path().vertices[:, 1].max()
        assert drawn_top == pytest.approx(expected.max())
    threshold = line(ax, f"threshold {report['best_threshold']:.4g}")
    np.testing.assert_array_equal(threshold.get_xdata(), [report["best_threshold"]] * 2)
    with pytest.raises(ValueError, match="score_bin_edges"):
        plot_score_distributions(Report("x", {"a": 1.0}))
