"""Gallery-probe evaluation against slow, obviously-correct references."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from embedkit.evaluation.gallery import Gallery
from embedkit.similarity import pairwise_similarity


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
        # one convention with verification: a probe is accepted when its best score >= threshold
        # (the slow table is float64, the gallery's scores float32: 1e-6 covers the rounding)
        fp = int((non_mated_best >= threshold - 1e-6).sum())
        assert fp / len(non_mated_best) <= f
        # the loosest such threshold: the next lower observed score would let through more than f
        lower = best[best < threshold - 1e-6].max()
        assert int((non_mated_best >= lower).sum()) / len(non_mated_best) > f
        detected = 0
        for i in np.flatnonzero(mated):
            true = table[i, np.searchsorted(ids, probe_labels[i])]
            detected += bool(
                true >= table[i].max() and (table[i] >= true).sum() == 1 and true >= threshold - 1e-6
            )
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
    assert a.counts["near_duplicate_probes"] == 0  # checked for every metric


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


def slow_identity_table(gallery, gallery_labels, probes, metric, template):
    """Per probe and enrolled identity, in float64: best image score, or score of the mean template."""
    ids = np.unique(gallery_labels)
    g, p = torch.from_numpy(gallery).double(), torch.from_numpy(probes).double()
    if template == "mean":
        if metric == "cosine":
            g = torch.nn.functional.normalize(g, dim=1)
        means = torch.stack([g[torch.from_numpy(gallery_labels == i)].mean(dim=0) for i in ids])
        return ids, pairwise_similarity(p, means, metric=metric).numpy()
    scores = pairwise_similarity(p, g, metric=metric).numpy()
    return ids, np.stack([scores[:, gallery_labels == i].max(axis=1) for i in ids], axis=1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    n_ids=st.integers(1, 12),
    chunk=st.integers(1, 9),
    template=st.sampled_from(["none", "mean"]),
)
def test_ranks_with_unequal_identity_sizes_and_ties(seed: int, n_ids: int, chunk: int, template: str) -> None:
    # Small integer vectors under "dot": every score is an exact integer, so ties are frequent and
    # exact, and the pessimistic tie rule is checked exactly; identities hold 1 to 5 images each.
    rng = np.random.default_rng(seed)
    # mean templates of 1, 2 or 4 integer vectors are exact binary fractions: ties stay exact
    sizes = rng.choice([1, 2, 4], n_ids) if template == "mean" else rng.integers(1, 6, n_ids)
    labels = np.repeat(rng.permutation(100)[:n_ids] * 7, sizes)
    order = rng.permutation(labels.size)  # enrolment order is not grouped by identity
    gallery = rng.integers(-2, 3, (labels.size, 4)).astype(np.float32)[order]
    labels = labels[order]
    probes = rng.integers(-2, 3, (15, 4)).astype(np.float32)
    probe_labels = rng.choice(labels, 15)
    ids, table = slow_identity_table(gallery, labels, probes, "dot", template)
    true = table[np.arange(15), np.searchsorted(ids, probe_labels)]
    ranks = (table >= true[:, None] - 1e-9).sum(axis=1)
    gal = Gallery(metric="dot", chunk_size=chunk).enrol(gallery, labels, template=template)
    report = gal.identify(probes, probe_labels, ranks=(1, 2))
    np.testing.assert_allclose(report.curves["cmc"], [(ranks <= r).mean() for r in range(1, ids.size + 1)])
    assert report["mean_genuine_score"] == pytest.approx(true.mean(), abs=1e-4)
    if template == "none":
        np.testing.assert_array_equal(gal.labels, labels)  # enrolment order, whatever the storage


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean", "squared_euclidean"])
@pytest.mark.parametrize("template", ["none", "mean"])
def test_near_duplicate_probes_are_counted_for_every_metric_and_template(metric: str, template: str) -> None:
    rng = np.random.default_rng(11)
    gallery = rng.standard_normal((60, 16)).astype(np.float32)
    gallery[0] *= 50.0  # under "dot" this entry scores highest for most probes, yet is no duplicate
    labels = np.repeat(np.arange(20), 3)
    copies = [3, 7, 8, 40, 59]  # exact copies of enrolled images, and one copy with a little noise
    probes = np.concatenate([gallery[copies], rng.standard_normal((30, 16)).astype(np.float32)])
    probes[1] += 1e-5 * rng.standard_normal(16).astype(np.float32)
    probe_labels = np.concatenate([labels[copies], rng.integers(0, 20, 30)])
    report = Gallery(metric=metric).enrol(gallery, labels, template=template).identify(probes, probe_labels)
    # under template="mean" the copies can reach rank-1 through their template: the count is what shows it
    assert report.counts["near_duplicate_probes"] == len(copies)
    assert any("memorisation" in note for note in report.notes)
    clean = (
        Gallery(metric=metric)
        .enrol(gallery, labels, template=template)
        .identify(probes[5:], probe_labels[5:])
    )
    assert clean.counts["near_duplicate_probes"] == 0
    assert not any("memorisation" in note for note in clean.notes)


def test_image_ids_are_compared_by_value_and_type() -> None:
    gallery, gallery_labels, probes, probe_labels = make_data(seed=7, n_probes=20)
    n = len(gallery)
    gal = Gallery().enrol(gallery, gallery_labels, image_ids=list(range(1, n + 1)))
    # the strings "1", "2", ... are other images than the integers 1, 2, ...
    report = gal.identify(probes, probe_labels, image_ids=[str(i) for i in range(1, 21)])
    assert report.counts["probes"] == 20
    with pytest.raises(ValueError, match=r"1 image id\(s\).*: 5"):
        gal.identify(probes, probe_labels, image_ids=np.array([5, *range(1000, 1019)], dtype=np.int32))
    mixed = Gallery().enrol(gallery[:3], gallery_labels[:3], image_ids=["a.png", 2, b"c"])
    mixed.identify(probes[:3], gallery_labels[:3], image_ids=["2", b"a.png", "c"])  # none shared
    with pytest.raises(ValueError, match=r"b'c'"):
        mixed.identify(probes[:3], gallery_labels[:3], image_ids=["x", "y", b"c"])
    with pytest.raises(ValueError, match="unique"):
        Gallery().enrol(gallery[:3], gallery_labels[:3], image_ids=["a", 2, "a"])
    with pytest.raises(TypeError, match=r"image_ids\[1\]"):
        Gallery().enrol(gallery[:3], gallery_labels[:3], image_ids=["a", 2.5, "b"])


def test_threshold_at_fpir_means_accept_at_or_above() -> None:
    # Integer vectors under "dot": exact, heavily tied scores; the reported threshold applied with
    # ">=" must reproduce the reported FPIR and DIR exactly, and be the loosest such threshold.
    rng = np.random.default_rng(12)
    gallery = rng.integers(-2, 3, (40, 5)).astype(np.float32)
    labels = np.repeat(np.arange(20), 2)
    probes = rng.integers(-2, 3, (300, 5)).astype(np.float32)
    probe_labels = rng.integers(0, 40, 300)  # identities 20..39 are not enrolled
    _, table = slow_identity_table(gallery, labels, probes, "dot", "none")
    mated = probe_labels < 20
    best = table.max(axis=1)
    true = np.where(mated, table[np.arange(300), np.minimum(probe_labels, 19)], np.nan)
    rank1 = mated & ((table >= np.nan_to_num(true, nan=np.inf)[:, None]).sum(axis=1) == 1)
    targets = (0.01, 0.05, 0.2, 1)
    report = (
        Gallery(metric="dot").enrol(gallery, labels).dir_at_fpir(probes, probe_labels, fpir_targets=targets)
    )
    for f in targets:
        t = report[f"threshold@fpir={f}"]
        accepted = best[~mated] >= t
        assert report.rate(f"fpir@fpir={f}").hits == int(accepted.sum())
        assert accepted.mean() <= f
        assert report.rate(f"dir@fpir={f}").hits == int((rank1 & (true >= t)).sum())
        lower = best[best < t]
        assert lower.size == 0 or (best[~mated] >= lower.max()).mean() > f  # the loosest
    curve_t = report.curves["threshold"]
    np.testing.assert_allclose(report.curves["fpir"], [(best[~mated] >= t).mean() for t in curve_t])


def test_repr_and_numpy_integer_arguments() -> None:
    gallery, gallery_labels, probes, probe_labels = make_data(seed=8)
    assert repr(Gallery()) == "Gallery(metric='cosine', empty)"
    gal = Gallery(metric="euclidean", chunk_size=np.int64(7)).enrol(gallery, gallery_labels, image_ids=None)
    assert repr(gal) == (
        "Gallery(metric='euclidean', template='none', identities=30, entries=90, dim=10, dtype=float32, "
        "device=cpu, image_ids=no)"
    )
    assert isinstance(gal.chunk_size, int)
    a = gal.identify(probes, probe_labels, ranks=np.array([1, 5]))
    b = gal.identify(probes, probe_labels, ranks=(np.int32(1), np.uint8(5)))
    assert a["rank-5"] == b["rank-5"] and list(b.metrics)[:2] == ["rank-1", "rank-5"]
    with pytest.raises(ValueError, match="chunk_size"):
        Gallery(chunk_size=np.int64(0))
    with pytest.raises(TypeError, match="chunk_size"):
        Gallery(chunk_size=2.0)  # type: ignore[arg-type]


def pool_by_hand(
    probes: np.ndarray, probe_labels: np.ndarray, template_ids: np.ndarray, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Probe templates as a user would form them: mean of (L2-normalised, for cosine) rows per id."""
    ids = np.unique(template_ids)
    rows = probes.astype(np.float64)
    if metric == "cosine":
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    pooled = np.stack([rows[template_ids == t].mean(axis=0) for t in ids]).astype(np.float32)
    labels = np.array([probe_labels[template_ids == t][0] for t in ids])
    return pooled, labels


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("template", ["none", "mean"])
def test_probe_templates_equal_pooling_by_hand(metric: str, template: str) -> None:
    gallery, gallery_labels, probes, probe_labels = make_data(seed=13, n_probes=300, extra_ids=10)
    rng = np.random.default_rng(13)
    # media groups: 1 to 4 rows of one subject each, ids as strings in no particular order
    subject_order = np.argsort(probe_labels, kind="stable")
    probes, probe_labels = probes[subject_order], probe_labels[subject_order]
    group = np.zeros(len(probes), dtype=np.int64)
    for i in range(1, len(probes)):
        same = probe_labels[i] == probe_labels[i - 1] and rng.random() < 0.7
        group[i] = group[i - 1] + (0 if same else 1)
    template_ids = np.array([f"media-{g * 7919 % 1000:03d}" for g in group], dtype=object)
    gal = Gallery(metric=metric, chunk_size=17).enrol(gallery, gallery_labels, template=template)
    got = gal.evaluate(
        probes, probe_labels, template_ids=template_ids, ranks=(1, 3), fpir_targets=(0.1,), verification=True
    )
    pooled, pooled_labels = pool_by_hand(probes, probe_labels, template_ids, metric)
    want = gal.evaluate(pooled, pooled_labels, ranks=(1, 3), fpir_targets=(0.1,), verification=True)
    n_templates = len(np.unique(template_ids))
    assert 0 < n_templates < len(probes)
    for name in ("identification", "open_set", "verification"):
        a, b = got[name], want[name]
        assert set(a.metrics) == set(b.metrics)
        for key, value in a.metrics.items():
            if isinstance(value, float) and not np.isnan(value):
                assert value == pytest.approx(b[key], abs=1e-5), (name, key)
            else:
                assert a.metrics[key] == b.metrics[key], (name, key)
        assert a.counts["probe_rows"] == len(probes) and a.counts["probe_templates"] == n_templates
        assert a.counts["probes"] == b.counts["probes"] == n_templates
        assert any(
            f"{n_templates} probe templates formed from {len(probes)} probe rows" in n for n in a.notes
        )
    np.testing.assert_array_equal(got["identification"].curves["cmc"], want["identification"].curves["cmc"])


def test_probe_templates_per_identity_and_of_single_rows() -> None:
    gallery, gallery_labels, probes, probe_labels = make_data(seed=14, n_probes=120)
    gal = Gallery().enrol(gallery, gallery_labels, template="mean")
    # one template per subject: the labels themselves are the template ids
    per_subject = gal.identify(probes, probe_labels, template_ids=probe_labels)
    pooled, pooled_labels = pool_by_hand(probes, probe_labels, probe_labels, "cosine")
    assert per_subject.rate("rank-1") == gal.identify(pooled, pooled_labels).rate("rank-1")
    # one row per template: the same as no templates (a mean of one unit vector is itself)
    single = gal.identify(probes, probe_labels, template_ids=np.arange(len(probes))[::-1])
    plain = gal.identify(probes, probe_labels)
    np.testing.assert_allclose(single.curves["cmc"], plain.curves["cmc"])
    assert single.counts["probe_templates"] == single.counts["probe_rows"] == len(probes)


def test_probe_templates_bad_inputs() -> None:
    gallery, gallery_labels, probes, probe_labels = make_data(seed=15, n_probes=20)
    gal = Gallery().enrol(gallery, gallery_labels)
    with pytest.raises(ValueError, match=r"template_ids has 3 entries but probes has 20 rows"):
        gal.identify(probes, probe_labels, template_ids=[1, 2, 3])
    with pytest.raises(TypeError, match="template_ids"):
        gal.identify(probes, probe_labels, template_ids=np.zeros(20))
    with pytest.raises(ValueError, match="template_ids must be 1-D"):
        gal.identify(probes, probe_labels, template_ids=np.zeros((20, 1), dtype=int))
    mixed = np.arange(20)
    mixed[:2] = 99  # rows 0 and 1 share a template
    labels = np.array([f"person-{v}" for v in probe_labels], dtype=object)
    labels[:2] = ["ann", "bob"]
    named = Gallery().enrol(gallery, np.array([f"person-{v}" for v in gallery_labels]))
    with pytest.raises(ValueError, match=r"template 99 holds rows of labels 'ann', 'bob'"):
        named.identify(probes, labels, template_ids=mixed)


def test_string_labels_equal_integer_codes() -> None:
    gallery, gallery_labels, probes, probe_labels = make_data(seed=16, n_probes=150, extra_ids=6)
    codes = {v: i for i, v in enumerate(np.unique(np.concatenate([gallery_labels, probe_labels])))}
    as_code = np.vectorize(codes.get)
    as_name = np.vectorize(lambda v: f"subject/{codes[v]:04d}")
    name_objects = np.array([f"subject/{codes[v]:04d}" for v in probe_labels], dtype=object)
    by_code = Gallery(chunk_size=11).enrol(gallery, as_code(gallery_labels).astype(np.int16))
    by_name = Gallery(chunk_size=11).enrol(gallery, list(as_name(gallery_labels)))
    want = by_code.evaluate(
        probes, as_code(probe_labels).astype(np.uint32), ranks=(1, 5), fpir_targets=(0.05,), verification=True
    )
    for probe_names in (as_name(probe_labels), name_objects, list(name_objects)):
        got = by_name.evaluate(probes, probe_names, ranks=(1, 5), fpir_targets=(0.05,), verification=True)
        for name in want:
            assert got[name].metrics == want[name].metrics, name
            assert got[name].counts == want[name].counts, name
    assert list(by_name.labels[:3]) == list(as_name(gallery_labels)[:3])
    np.testing.assert_array_equal(by_name.identities, np.unique(as_name(gallery_labels)))
    # the integer 7 and the string "7" are different identities: nothing is mated
    with pytest.raises(ValueError, match="none of the"):
        Gallery().enrol(gallery, gallery_labels).identify(probes, [str(v) for v in probe_labels])


def elementwise_identity_table(
    gallery: np.ndarray, gallery_labels: np.ndarray, probes: np.ndarray, metric: str, template: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per probe and identity, pair by pair in float64 (no matrix product), rounded to float32.

    Identical gallery rows get identical scores wherever they sit, as in the gallery's tie rule.
    """
    ids = np.unique(gallery_labels)
    g, p = gallery.astype(np.float64), probes.astype(np.float64)
    if template == "mean":
        if metric == "cosine":
            g = g / np.linalg.norm(g, axis=1, keepdims=True)
        g = np.stack([g[gallery_labels == i].mean(axis=0) for i in ids])
        member = np.arange(ids.size)
    else:
        member = np.searchsorted(ids, gallery_labels)
    if metric == "euclidean":
        scores = -np.sqrt(((p[:, None, :] - g[None, :, :]) ** 2).sum(axis=2))
    else:
        scores = (p[:, None, :] * g[None, :, :]).sum(axis=2)
        if metric == "cosine":
            scores /= np.linalg.norm(p, axis=1)[:, None] * np.linalg.norm(g, axis=1)[None, :]
    scores = scores.astype(np.float32).astype(np.float64)
    table = np.full((len(p), ids.size), -np.inf)
    np.maximum.at(table.T, member, scores.T)
    return ids, table


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("template", ["none", "mean"])
def test_exact_duplicates_under_other_identities_rank_pessimistically(metric: str, template: str) -> None:
    # A probe's true image enrolled again, bit for bit, under other identities: those tie with
    # the true identity exactly and rank before it, wherever the copies sit in the gallery
    # (a matrix product can round identical columns differently at different positions).
    rng = np.random.default_rng(17)
    n_ids, dim = 257, 48
    gallery = rng.standard_normal((n_ids, dim)).astype(np.float32)
    labels = np.arange(n_ids) * 3
    probes = gallery[:40] + 0.05 * rng.standard_normal((40, dim)).astype(np.float32)
    probe_labels = labels[:40]
    copies = {0: 3, 1: 1, 5: 6, 39: 2}  # probe i's true image copied under this many other identities
    extra = [(i, 1000 + 10 * i + j) for i, c in copies.items() for j in range(c)]
    gallery = np.concatenate([gallery, gallery[[i for i, _ in extra]]])
    labels = np.concatenate([labels, [lab for _, lab in extra]])
    expected = {i: c + 1 for i, c in copies.items()}  # the copies, then the true identity
    for seed in range(3):  # any enrolment order gives the same ranks
        order = np.random.default_rng(seed).permutation(len(labels))
        gal = Gallery(metric=metric, chunk_size=7 + seed).enrol(
            gallery[order], labels[order], template=template
        )
        report = gal.identify(probes, probe_labels, ranks=(1,))
        ids, table = elementwise_identity_table(gallery, labels, probes, metric, template)
        true = table[np.arange(40), np.searchsorted(ids, probe_labels)]
        ranks = (table >= true[:, None]).sum(axis=1)
        for i, r in expected.items():
            assert ranks[i] == r
        np.testing.assert_allclose(
            report.curves["cmc"], [(ranks <= r).mean() for r in range(1, ids.size + 1)]
        )
        rank1 = report.rate("rank-1")
        assert rank1 is not None and rank1.hits == 40 - len(copies)


def test_duplicate_probes_of_a_tied_pair_rank_the_same_in_any_block() -> None:
    # The same probe, repeated so that its copies fall in different blocks and rows, against a
    # gallery holding one image twice under two identities: the rank is 2 for every copy.
    rng = np.random.default_rng(18)
    gallery = rng.standard_normal((300, 64)).astype(np.float32)
    labels = np.arange(300)
    gallery[250] = gallery[17]  # identity 250 holds an exact copy of identity 17's image
    probes = np.repeat(gallery[17:18] + 0.01, 50, axis=0).astype(np.float32)
    gal = Gallery(chunk_size=9).enrol(gallery, labels)
    report = gal.identify(probes, np.full(50, 17), ranks=(1, 2))
    assert report["rank-1"] == 0.0 and report["rank-2"] == 1.0
    # A matrix product may round the copy's column differently from the original's (blocking,
    # GPU split-K): one unit in the last place either way must not change the rank.
    copy = int(gal._enrol_position[250])
    blocks = gal._score_blocks
    for direction in (-np.inf, np.inf):

        def nudged(probes_: torch.Tensor, chunk_size: int, direction: float = direction) -> Iterator:
            for start, block in blocks(probes_, chunk_size):
                column = block[:, copy].numpy()
                block[:, copy] = torch.from_numpy(np.nextafter(column, np.float32(direction)))
                yield start, block

        gal._score_blocks = nudged  # type: ignore[method-assign, assignment]
        nudged_report = gal.identify(probes, np.full(50, 17), ranks=(1, 2))
        assert nudged_report["rank-1"] == 0.0 and nudged_report["rank-2"] == 1.0, direction
    del gal._score_blocks
    open_set = (
        Gallery()
        .enrol(gallery, labels)
        .dir_at_fpir(
            np.concatenate([probes, rng.standard_normal((20, 64)).astype(np.float32)]),
            np.concatenate([np.full(50, 17), np.arange(1000, 1020)]),
            fpir_targets=(1.0,),
        )
    )
    dir_rate = open_set.rate("dir@fpir=1")
    assert dir_rate is not None and dir_rate.hits == 0  # never rank 1: its tie ranks first
