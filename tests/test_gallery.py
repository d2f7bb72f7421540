"""Gallery-probe evaluation against slow, obviously-correct references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from embedkit.evaluation.gallery import Gallery


def make_data(seed: int = 0, n_ids: int = 30, per_id: int = 3, n_probes: int = 200, extra_ids: int = 8):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids + extra_ids, 10))
    gallery_labels = np.repeat(np.arange(n_ids), per_id) * 1000 + 7  # not 0..C-1
    gallery = centres[np.repeat(np.arange(n_ids), per_id)] + 0.8 * rng.standard_normal((n_ids * per_id, 10))
    probe_ids = rng.integers(0, n_ids + extra_ids, n_probes)
    probes = centres[probe_ids] + 0.8 * rng.standard_normal((n_probes, 10))
    return gallery.astype(np.float32), gallery_labels, probes.astype(np.float32), probe_ids * 1000 + 7


def slow_identity_scores(gallery, gallery_labels, probes, template):
    """Per probe and enrolled identity: best image cosine, or cosine to the mean template."""
    ids = np.unique(gallery_labels)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    p = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    table = np.empty((len(probes), len(ids)))
    for j, identity in enumerate(ids):
        members = g[gallery_labels == identity]
        if template == "mean":
            t = members.mean(axis=0)
            table[:, j] = p @ (t / np.linalg.norm(t))
        else:
            table[:, j] = (p @ members.T).max(axis=1)
    return ids, table


@pytest.mark.parametrize("template", ["none", "mean"])
def test_identification_matches_slow_reference(template: str) -> None:
    gallery, gallery_labels, probes, probe_labels = make_data()
    ids, table = slow_identity_scores(gallery, gallery_labels, probes, template)
    mated = np.isin(probe_labels, ids)
    ranks = []
    for i in np.flatnonzero(mated):
        true = table[i, np.searchsorted(ids, probe_labels[i])]
        ranks.append(int((table[i] >= true).sum()))  # ties pessimistic
    ranks = np.array(ranks)

    report = (
        Gallery(chunk_size=13)
        .enrol(gallery, gallery_labels, template=template)
        .identify(probes, probe_labels, ranks=(1, 5))
    )
    for k in (1, 5):
        rate = report.rate(f"rank-{k}")
        assert rate is not None
        assert (rate.hits, rate.total) == (int((ranks <= k).sum()), int(mated.sum()))
        assert rate.chance == pytest.approx(k / len(ids))
    np.testing.assert_allclose(report.curves["cmc"], [(ranks <= r).mean() for r in range(1, len(ids) + 1)])
    assert report.counts["non_mated_probes"] == int((~mated).sum()) > 0
    assert any("not enrolled" in note for note in report.notes)
    true_scores = [table[i, np.searchsorted(ids, probe_labels[i])] for i in np.flatnonzero(mated)]
    assert report["mean_genuine_score"] == pytest.approx(np.mean(true_scores), abs=1e-5)


def test_dir_at_fpir_matches_slow_reference() -> None:
    gallery, gallery_labels, probes, probe_labels = make_data(seed=1, n_probes=400, extra_ids=20)
    ids, table = slow_identity_scores(gallery, gallery_labels, probes, "none")
    mated = np.isin(probe_labels, ids)
    best = table.max(axis=1)
    report = (
        Gallery().enrol(gallery, gallery_labels).dir_at_fpir(probes, probe_labels, fpir_targets=(0.05, 0.2))
    )
    non_mated_best = best[~mated]
    for f in (0.05, 0.2):
        threshold = report[f"threshold@fpir={f}"]
        fp = int((non_mated_best > threshold).sum())
        assert fp / len(non_mated_best) <= f
        # the loosest such threshold: lowering it to the next non-mated score would exceed f
        assert int((non_mated_best >= threshold).sum()) / len(non_mated_best) > f
        detected = 0
        for i in np.flatnonzero(mated):
            true = table[i, np.searchsorted(ids, probe_labels[i])]
            detected += bool(true >= table[i].max() and (table[i] >= true).sum() == 1 and true > threshold)
        rate = report.rate(f"dir@fpir={f}")
        assert rate is not None and (rate.hits, rate.total) == (detected, int(mated.sum()))
        assert report.rate(f"fpir@fpir={f}").hits == fp
    assert report.curves["dir"].shape == report.curves["fpir"].shape == (int((~mated).sum()),)


def test_fpir_finer_than_the_non_mated_probes_is_noted() -> None:
    gallery, gallery_labels, probes, probe_labels = make_data(seed=2)
    report = Gallery().enrol(gallery, gallery_labels).dir_at_fpir(probes, probe_labels, fpir_targets=(1e-4,))
    assert report.rate("fpir@fpir=0.0001").hits == 0
    assert any("finer than" in note for note in report.notes)


def test_verification_pairs_and_auc_match_sklearn() -> None:
    gallery, gallery_labels, probes, probe_labels = make_data(seed=3, n_probes=80)
    report = Gallery().enrol(gallery, gallery_labels).verify(probes, probe_labels, far_targets=(0.01,))
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    p = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    scores = (p @ g.T).ravel()
    genuine = (probe_labels[:, None] == gallery_labels[None, :]).ravel()
    assert report.counts["genuine_pairs"] == int(genuine.sum())
    assert report.counts["impostor_pairs"] == int((~genuine).sum())
    assert report["auc"] == pytest.approx(roc_auc_score(genuine, scores), abs=1e-6)
    assert report.curves["genuine_scores"].size == int(genuine.sum())


def test_case_study_03_paired_images_are_caught() -> None:
    # Probes that are (almost) their own gallery image: the paired shortcut of case study 03.
    rng = np.random.default_rng(4)
    gallery = rng.standard_normal((40, 16)).astype(np.float32)
    labels = np.repeat(np.arange(20), 2)
    probes = gallery + 1e-4 * rng.standard_normal(gallery.shape).astype(np.float32)
    names = np.array([f"subject{lab:03d}_{i}.png" for i, lab in enumerate(labels)])
    gal = Gallery().enrol(gallery, labels, image_ids=names)
    with pytest.raises(ValueError, match=r"subject000_0\.png"):
        gal.identify(probes, labels, image_ids=names)
    # without image ids, the near duplicates are counted and named in a note
    report = gal.identify(probes, labels)
    assert report.counts["near_duplicate_probes"] == 40
    assert any("memorisation" in note for note in report.notes)
    # the honest protocol: the other image of the same person is a random vector here -> chance level
    other = Gallery().enrol(gallery[0::2], labels[0::2], image_ids=names[0::2])
    honest = other.identify(gallery[1::2], labels[1::2], image_ids=names[1::2])
    assert honest.rate("rank-1").hits <= 5 and honest.counts["near_duplicate_probes"] == 0


def test_torch_inputs_and_euclidean_metric() -> None:
    gallery, gallery_labels, probes, probe_labels = make_data(seed=5)
    a = Gallery(metric="euclidean").enrol(gallery, gallery_labels).identify(probes, probe_labels)
    b = (
        Gallery(metric="euclidean")
        .enrol(torch.from_numpy(gallery), torch.from_numpy(gallery_labels))
        .identify(torch.from_numpy(probes).double(), torch.from_numpy(probe_labels))
    )
    assert a["rank-1"] == b["rank-1"] and a["rank-5"] == b["rank-5"]
    assert "near_duplicate_probes" not in a.counts  # a cosine-only check


def test_mean_template_is_mean_of_normalised_embeddings() -> None:
    gallery = np.array([[3.0, 0.0], [0.0, 1.0], [1.0, 0.35]], dtype=np.float32)
    gal = Gallery().enrol(gallery, [5, 5, 9], template="mean")
    assert gal.num_entries == 2 and gal.num_identities == 2
    np.testing.assert_array_equal(gal.labels, [5, 9])
    # identity 5's template points along (1, 1) (mean of unit vectors), not along the raw mean (3, 1):
    # this probe is closer to identity 9 than to (1, 1), but closer to (3, 1) than to identity 9
    probe = np.array([[1.0, 0.3]], dtype=np.float32)
    assert gal.identify(probe, [9])["rank-1"] == 1.0
    # ties count pessimistically: a probe equally close to both identities is not rank 1
    tied = Gallery().enrol(np.array([[1.0, 0.0], [2.0, 0.0]], dtype=np.float32), [1, 2])
    report = tied.identify(np.array([[1.0, 0.0]], dtype=np.float32), [1], ranks=(1, 2))
    assert report["rank-1"] == 0.0 and report["rank-2"] == 1.0


def test_bad_inputs() -> None:
    gallery, gallery_labels, probes, probe_labels = make_data(seed=6)
    with pytest.raises(ValueError, match="empty"):
        Gallery().identify(probes, probe_labels)
    gal = Gallery().enrol(gallery, gallery_labels)
    with pytest.raises(ValueError, match="embedding_dim"):
        gal.identify(probes[:, :4], probe_labels)
    with pytest.raises(ValueError, match="labels has 3 entries"):
        gal.identify(probes, probe_labels[:3])
    with pytest.raises(ValueError, match="template"):
        Gallery().enrol(gallery, gallery_labels, template="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unique"):
        Gallery().enrol(gallery, gallery_labels, image_ids=np.zeros(len(gallery), dtype=int))
    with pytest.raises(ValueError, match="none of the"):
        gal.identify(probes, probe_labels + 1)
    with pytest.raises(ValueError, match="mated and non-mated"):
        gal.dir_at_fpir(
            probes[np.isin(probe_labels, gallery_labels)], probe_labels[np.isin(probe_labels, gallery_labels)]
        )
    with pytest.raises(ValueError, match="fpir_targets"):
        gal.dir_at_fpir(probes, probe_labels, fpir_targets=(0.0,))
    with pytest.raises(TypeError, match="labels"):
        gal.identify(probes, probe_labels.astype(float))
    with pytest.raises(ValueError, match="image_ids must have shape"):
        gal.identify(probes, probe_labels, image_ids=[1, 2])
