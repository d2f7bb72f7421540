"""All-pairs verification in bounded memory: equal to the in-memory computation, exactly."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from embedkit.evaluation import Gallery
from embedkit.evaluation.report import Report
from embedkit.evaluation.verification import (
    _roc,
    _roc_corners,
    all_pairs_verification,
    verification_metrics,
)
from embedkit.similarity import Metric, similarity_blocks

TARGETS = (1e-4, 1e-3, 1e-2, 0.1, 0.5)


def in_memory(
    probes: np.ndarray,
    p_labels: np.ndarray,
    refs: np.ndarray,
    r_labels: np.ndarray,
    metric: Metric,
    chunk: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Every score, from the same blocks the streaming pass computes (bit-identical), and the flags."""
    blocks = similarity_blocks(
        torch.from_numpy(probes), torch.from_numpy(refs), metric=metric, chunk_size=chunk
    )
    scores = torch.cat([b for _, b in blocks]).numpy()
    return scores.ravel(), (p_labels[:, None] == r_labels[None, :]).ravel()


def case(
    seed: int, n_probes: int, n_refs: int, dim: int, tied: bool, dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_ids = max(2, n_refs // 3)
    centres = rng.standard_normal((n_ids + 3, dim))
    r_labels = rng.integers(0, n_ids, n_refs)
    p_labels = rng.integers(0, n_ids + 3, n_probes)  # some probes have no reference: impostors only
    refs = centres[r_labels] + rng.standard_normal((n_refs, dim))
    probes = centres[p_labels] + rng.standard_normal((n_probes, dim))
    if tied:  # few distinct scores: most thresholds are ties of genuine and impostor pairs
        refs, probes = np.round(refs), np.round(probes)
    return probes.astype(dtype), p_labels, refs.astype(dtype), r_labels


def assert_same_report(streamed: Report, reference: Report) -> None:
    for key in reference:
        if key == "mean_impostor_score":  # summed block by block: equal up to summation rounding
            assert streamed[key] == pytest.approx(reference[key], rel=1e-12, abs=1e-12)
            continue
        assert streamed[key] == reference[key], (key, streamed[key], reference[key])
        assert streamed.rate(key) == reference.rate(key), key
    assert list(streamed) == list(reference)
    assert streamed.notes == reference.notes
    assert {k: streamed.counts[k] for k in reference.counts} == dict(reference.counts)
    for key in ("score_bin_edges", "genuine_histogram", "impostor_histogram", "far_targets"):
        np.testing.assert_array_equal(streamed.curves[key], reference.curves[key], err_msg=key)
    # The streamed ROC is the in-memory ROC with collinear points dropped: the same corners.
    corners = _roc_corners(
        _roc(np.asarray(reference.curves["_scores"]), np.asarray(reference.curves["_genuine"]))
    )
    np.testing.assert_array_equal(streamed.curves["far"], corners.far)
    np.testing.assert_array_equal(streamed.curves["tar"], corners.tar)


def reference_report(scores: np.ndarray, genuine: np.ndarray) -> Report:
    report = verification_metrics(scores, genuine, far_targets=TARGETS)
    report.curves["_scores"], report.curves["_genuine"] = scores, genuine  # type: ignore[index]
    return report


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean", "squared_euclidean"])
@pytest.mark.parametrize("tied", [False, True])
def test_equals_in_memory_and_sklearn(metric: Metric, tied: bool) -> None:
    probes, p_labels, refs, r_labels = case(0, 70, 150, 6, tied)
    for chunk in (1, 9, 70):
        streamed = all_pairs_verification(
            probes, p_labels, refs, r_labels, metric=metric, far_targets=TARGETS, chunk_size=chunk
        )
        scores, genuine = in_memory(probes, p_labels, refs, r_labels, metric, chunk)
        assert_same_report(streamed, reference_report(scores, genuine))
        assert streamed["auc"] == pytest.approx(roc_auc_score(genuine, scores), abs=1e-14)
        # Every corner of the streamed ROC is a point of scikit-learn's full ROC.
        fpr, tpr, _ = sklearn_roc_curve(genuine, scores, drop_intermediate=False)
        sk_points = set(zip(fpr.tolist(), tpr.tolist(), strict=True))
        assert (
            set(zip(streamed.curves["far"].tolist(), streamed.curves["tar"].tolist(), strict=True))
            <= sk_points
        )
        np.testing.assert_array_equal(np.sort(streamed.curves["genuine_scores"]), np.sort(scores[genuine]))


def test_heavily_tied_scores_have_few_thresholds() -> None:
    probes, p_labels, refs, r_labels = case(3, 60, 90, 3, tied=True)
    scores, genuine = in_memory(probes, p_labels, refs, r_labels, "dot", 60)
    assert np.unique(scores).size < 50  # 5400 pairs on few values: the ties the > / >= counts are for
    streamed = all_pairs_verification(probes, p_labels, refs, r_labels, metric="dot", far_targets=TARGETS)
    assert_same_report(streamed, reference_report(scores, genuine))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_probes=st.integers(1, 25),
    n_refs=st.integers(2, 30),
    chunk=st.integers(1, 30),
    tied=st.booleans(),
)
def test_any_chunking_gives_the_in_memory_report(
    seed: int, n_probes: int, n_refs: int, chunk: int, tied: bool
) -> None:
    probes, p_labels, refs, r_labels = case(seed, n_probes, n_refs, 4, tied)
    scores, genuine = in_memory(probes, p_labels, refs, r_labels, "cosine", chunk)
    if genuine.all() or not genuine.any():
        with pytest.raises(ValueError, match=r"no (genuine|impostor) pairs"):
            all_pairs_verification(probes, p_labels, refs, r_labels, chunk_size=chunk)
        return
    streamed = all_pairs_verification(probes, p_labels, refs, r_labels, far_targets=TARGETS, chunk_size=chunk)
    assert_same_report(streamed, reference_report(scores, genuine))


def test_float64_embeddings_keep_float64_scores() -> None:
    probes, p_labels, refs, r_labels = case(1, 20, 40, 5, False, dtype=np.float64)
    report = Gallery().enrol(refs, r_labels).verify(probes, p_labels, far_targets=(0.1,))
    assert report.curves["genuine_scores"].dtype == np.float64
    scores, genuine = in_memory(probes, p_labels, refs, r_labels, "cosine", 20)
    assert scores.dtype == np.float64
    np.testing.assert_array_equal(np.sort(report.curves["genuine_scores"]), np.sort(scores[genuine]))


def test_gallery_verify_equals_in_memory_with_templates() -> None:
    probes, p_labels, refs, r_labels = case(2, 50, 120, 6, False)
    gallery = Gallery().enrol(refs, r_labels, template="mean")
    report = gallery.verify(probes, p_labels, far_targets=TARGETS)
    # One genuine pair per mated probe: its identity's template.
    mated = np.isin(p_labels, r_labels)
    assert report.counts["genuine_pairs"] == int(mated.sum())
    assert report.counts["impostor_pairs"] == 50 * gallery.num_entries - int(mated.sum())
    assert report["auc"] == pytest.approx(
        all_pairs_verification(probes, p_labels, refs, r_labels, far_targets=TARGETS)["auc"], abs=0.2
    )


def test_memory_does_not_grow_with_impostor_pairs() -> None:
    """Peak traced (numpy) memory with 16x the impostor pairs stays that of one block."""
    peaks = []
    for n_probes in (200, 3200):
        probes, p_labels, refs, r_labels = case(4, n_probes, 2000, 8, False)
        # Probes of unseen identities only add impostor pairs; keep the genuine count fixed.
        p_labels = np.where(np.arange(n_probes) < 200, p_labels, 10**9)
        tracemalloc.start()
        all_pairs_verification(probes, p_labels, refs, r_labels, chunk_size=100)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    block_bytes = 100 * 2000 * 4
    assert peaks[1] < 1.5 * peaks[0] + block_bytes, peaks
    assert peaks[1] < 0.5 * 3200 * 2000 * 4  # far below the score matrix it never holds


def test_bad_inputs_are_named() -> None:
    probes, p_labels, refs, r_labels = case(0, 10, 20, 4, False)
    with pytest.raises(ValueError, match="probe_labels has 9 labels but probes has 10 rows"):
        all_pairs_verification(probes, p_labels[:9], refs, r_labels)
    with pytest.raises(ValueError, match="probes have dimension 3 but references have 4"):
        all_pairs_verification(probes[:, :3], p_labels, refs, r_labels)
    with pytest.raises(ValueError, match="no genuine pairs"):
        all_pairs_verification(probes, p_labels + 1000, refs, r_labels)
    with pytest.raises(ValueError, match="chunk_size"):
        all_pairs_verification(probes, p_labels, refs, r_labels, chunk_size=0)
    with pytest.raises(ValueError, match="metric"):
        all_pairs_verification(probes, p_labels, refs, r_labels, metric="manhattan")  # type: ignore[arg-type]
