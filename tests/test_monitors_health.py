"""EmbeddingHealthMonitor: the pathologies of case studies 03 and 04 built on purpose.

* every embedding equal (zero variance must read as complete collapse);
* embeddings confined to a 2-D subspace of 128 dimensions;
* paired embeddings identical while other images of the same identity differ;
* same-label pairs no closer than different-label pairs;
* healthy, well-separated clusters, where nothing may fire;
* every statistic against a plain recomputation from all pairs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedkit.monitors import EmbeddingHealthMonitor
from embedkit.monitors import health as health_module
from embedkit.monitors.health import FOLD_EVERY
from test_monitors_collapse import _no_host_reads

FAST = settings(max_examples=8, deadline=None)


def _feed(
    monitor: EmbeddingHealthMonitor,
    z: torch.Tensor,
    labels: torch.Tensor | None = None,
    paired: torch.Tensor | None = None,
    batch: int = 256,
) -> None:
    for i in range(0, z.shape[0], batch):
        rows = slice(i, i + batch)
        monitor.update(
            z[rows], None if labels is None else labels[rows], None if paired is None else paired[rows]
        )


def _clusters(gen: torch.Generator, classes: int, per_class: int, dim: int, noise: float = 0.5) -> tuple:
    """Well-separated identities: centres ~ N(0, I), members at noise std ``noise`` per dimension."""
    labels = torch.arange(classes).repeat_interleave(per_class)
    labels = labels[torch.randperm(labels.shape[0], generator=gen)]
    centres = torch.randn(classes, dim, generator=gen)
    return centres[labels] + noise * torch.randn(labels.shape[0], dim, generator=gen), labels


# ----------------------------------------------------------------------------- complete collapse
@FAST
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 600),
    dim=st.sampled_from([1, 8, 128]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
)
def test_all_embeddings_equal_is_complete_collapse(seed: int, n: int, dim: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    point = torch.randn(1, dim, generator=gen) * 3
    monitor = EmbeddingHealthMonitor()
    _feed(monitor, point.expand(n, dim).to(dtype), torch.arange(n) % 4, batch=97)
    report = monitor.compute()
    collapse = report.diagnosis("complete_collapse")
    assert collapse is not None and collapse.severity == "error"
    # Zero variance reads as collapse, never as "full rank".
    assert report["effective_rank"] == 0.0
    assert report["relative_variance"] <= 1e-10
    assert "dimensional_collapse" not in report.codes
    assert collapse.docs.endswith("#complete-collapse")


def test_every_batch_one_point_moving_between_batches_is_complete_collapse() -> None:
    # A dead network whose last bias still learns: each batch is one point, the point drifts.
    gen = torch.Generator().manual_seed(6)
    monitor = EmbeddingHealthMonitor()
    for _ in range(12):
        point = torch.randn(32, generator=gen)
        monitor.update(point.expand(64, 32), torch.arange(64) % 16)
    report = monitor.compute()
    assert report["relative_variance"] > 0.1 and report["mean_pairwise_cosine"] < 0.5  # no global sign
    assert report["within_batch_relative_variance"] <= 1e-10
    collapse = report.diagnosis("complete_collapse")
    assert collapse is not None and "within every batch" in collapse.message


def test_single_row_batches_say_nothing_about_the_spread_inside_a_batch() -> None:
    monitor = EmbeddingHealthMonitor()
    for row in torch.randn(40, 8, generator=torch.Generator().manual_seed(7)):
        monitor.update(row[None, :])
    report = monitor.compute()
    assert math.isnan(report["within_batch_relative_variance"])
    assert "complete_collapse" not in report.codes


def test_all_zero_embeddings_are_complete_collapse() -> None:
    monitor = EmbeddingHealthMonitor()
    monitor.update(torch.zeros(64, 16))
    report = monitor.compute()
    assert "complete_collapse" in report.codes
    assert report["effective_rank"] == 0.0
    assert report["mean_norm"] == 0.0


def test_embeddings_squeezed_onto_one_direction_are_complete_collapse() -> None:
    # Case study 04: the triplet loss sat at its 0.2 margin because all distances were ~0.
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(1, 64, generator=gen)
    z = direction + 0.01 * torch.randn(500, 64, generator=gen)
    monitor = EmbeddingHealthMonitor()
    monitor.update(z, torch.arange(500) % 10)
    report = monitor.compute()
    assert report["mean_pairwise_cosine"] > 0.98
    assert report["effective_rank"] > 1  # the residual noise still has many directions ...
    assert "complete_collapse" in report.codes  # ... but the embedding carries no identity


# ----------------------------------------------------------------------------- dimensional collapse
@FAST
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(300, 900),
    with_labels=st.booleans(),
    exact=st.booleans(),
)
def test_a_2d_subspace_of_128_is_dimensional_collapse(
    seed: int, n: int, with_labels: bool, exact: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(128, 2, generator=gen)).Q.T  # (2, 128), orthonormal rows
    z = torch.randn(n, 2, generator=gen) @ basis
    labels = torch.arange(n) % 20 if with_labels else None
    monitor = EmbeddingHealthMonitor(sample_size=256, covariance_rows=None if exact else 256)
    _feed(monitor, z, labels)
    report = monitor.compute()
    diagnosis = report.diagnosis("dimensional_collapse")
    assert diagnosis is not None and diagnosis.severity == "warning"
    assert report["effective_rank"] <= 2.0 + 1e-3
    assert "complete_collapse" not in report.codes
    assert diagnosis.evidence["rank_threshold"] > report["effective_rank"]


# ----------------------------------------------------------------------------- paired shortcut
@FAST
@given(seed=st.integers(0, 2**16), identities=st.integers(5, 40), per_identity=st.integers(2, 6))
def test_identical_pairs_with_unrelated_same_identity_images_are_a_paired_shortcut(
    seed: int, identities: int, per_identity: int
) -> None:
    # Case study 03: each probe matches its own HR image (0.999), not the person's others (0.18).
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(identities).repeat_interleave(per_identity)
    probes = torch.randn(labels.shape[0], 64, generator=gen)
    paired = probes.clone()
    monitor = EmbeddingHealthMonitor()
    _feed(monitor, probes, labels, paired, batch=64)
    report = monitor.compute()
    shortcut = report.diagnosis("paired_shortcut")
    assert shortcut is not None and shortcut.severity == "error"
    assert report["paired_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert report["same_identity_similarity"] < 0.5
    assert shortcut.evidence["gap"] >= 0.2


def test_pairs_that_match_like_the_rest_of_the_identity_are_no_shortcut() -> None:
    gen = torch.Generator().manual_seed(1)
    z, labels = _clusters(gen, classes=30, per_class=4, dim=64, noise=0.3)
    centres_again = z - 0.3 * torch.randn(z.shape, generator=gen)  # another image of each identity
    paired = centres_again + 0.3 * torch.randn(z.shape, generator=gen)
    monitor = EmbeddingHealthMonitor()
    monitor.update(z, labels, paired)
    report = monitor.compute()
    assert report.diagnoses == (), report.codes
    assert report["paired_similarity"] - report["same_identity_similarity"] < 0.2


def test_without_repeated_identities_the_shortcut_cannot_be_checked() -> None:
    z = torch.randn(50, 16)
    monitor = EmbeddingHealthMonitor()
    monitor.update(z, torch.arange(50), z.clone())
    report = monitor.compute()
    assert "paired_shortcut" not in report.codes
    assert any("share a label" in note for note in report.notes)


# ----------------------------------------------------------------------------- separation
@FAST
@given(seed=st.integers(0, 2**16), n=st.integers(100, 800))
def test_random_embeddings_with_labels_have_no_separation(seed: int, n: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    monitor = EmbeddingHealthMonitor()
    _feed(monitor, torch.randn(n, 32, generator=gen), torch.arange(n) % 10)
    report = monitor.compute()
    diagnosis = report.diagnosis("no_separation")
    assert diagnosis is not None
    assert abs(report["auc"] - 0.5) < 0.1
    assert "complete_collapse" not in report.codes and "dimensional_collapse" not in report.codes


# ----------------------------------------------------------------------------- healthy
@FAST
@given(
    seed=st.integers(0, 2**16),
    classes=st.integers(2, 30),
    per_class=st.integers(2, 30),
    dim=st.sampled_from([8, 64, 128]),
    batch=st.sampled_from([16, 256, 4096]),
)
def test_nothing_fires_on_well_separated_clusters(
    seed: int, classes: int, per_class: int, dim: int, batch: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    z, labels = _clusters(gen, classes, per_class, dim)
    monitor = EmbeddingHealthMonitor()
    _feed(monitor, z, labels, batch=batch)
    report = monitor.compute()
    assert report.diagnoses == (), [str(d) for d in report.diagnoses]
    # The clusters really are separated. Re-examined on 400 random draws of this test's
    # parameters (exact AUC by scikit-learn): the worst was 0.935 in 8 dimensions, where a few
    # of 30 random centres lie close together, and above 0.9999 in 64 and 128 dimensions.
    assert report["auc"] > (0.9 if dim == 8 else 0.999)


# ----------------------------------------------------------------------------- exactness
def _cosines(z: torch.Tensor) -> torch.Tensor:
    unit = torch.nn.functional.normalize(z.double(), dim=1)
    return unit @ unit.T


@FAST
@given(seed=st.integers(0, 2**16), n=st.integers(3, 120), dim=st.integers(1, 40), batch=st.integers(1, 120))
def test_statistics_match_a_plain_recomputation(seed: int, n: int, dim: int, batch: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=gen, dtype=torch.float64) + torch.randn(
        dim, generator=gen, dtype=torch.float64
    )
    labels = torch.randint(0, 5, (n,), generator=gen)
    paired = z + torch.randn(n, dim, generator=gen, dtype=torch.float64)
    monitor = EmbeddingHealthMonitor(sample_size=n, covariance_rows=None)
    _feed(monitor, z, labels, paired, batch=batch)
    report = monitor.compute()

    norms = z.norm(dim=1)
    assert report["mean_norm"] == pytest.approx(float(norms.mean()))
    assert report["norm_std"] == pytest.approx(float(norms.std(unbiased=False)), abs=1e-9)
    assert report["min_norm"] == pytest.approx(float(norms.min()))
    assert report["max_norm"] == pytest.approx(float(norms.max()))
    # sample_size = n: the first sample_size rows and the sample are every row.
    assert report["early_mean_norm"] == pytest.approx(float(norms.mean()))
    assert report["recent_mean_norm"] == pytest.approx(float(norms.mean()))
    assert report.counts["label_classes"] == labels.unique().numel()
    cos = _cosines(z)
    off = ~torch.eye(n, dtype=torch.bool)
    assert report["mean_pairwise_cosine"] == pytest.approx(float(cos[off].mean()), abs=1e-9)

    centred = z - z.mean(dim=0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / n).clamp_min(0)
    sigma = eigenvalues.sqrt()
    p = sigma / sigma.sum() + 1e-7
    assert report["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)
    assert report["first_pc_variance_share"] == pytest.approx(float(eigenvalues.max() / eigenvalues.sum()))
    spread, rows = 0.0, 0  # inside each batch of at least two rows
    for start in range(0, n, batch):
        chunk = z[start : start + batch]
        if chunk.shape[0] >= 2:
            spread, rows = spread + float(((chunk - chunk.mean(dim=0)) ** 2).sum()), rows + chunk.shape[0]
    if rows:
        expected = spread / rows / float((z**2).sum(dim=1).mean())
        assert report["within_batch_relative_variance"] == pytest.approx(min(expected, 1.0), rel=1e-6)
    else:
        assert math.isnan(report["within_batch_relative_variance"])

    same = labels[:, None] == labels[None, :]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    pos, neg = cos[upper & same], cos[upper & ~same]
    if pos.numel() and neg.numel():
        wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
        assert report["auc"] == pytest.approx(float(wins.mean()), abs=1e-6)
        pooled = math.sqrt((pos.var(unbiased=False) + neg.var(unbiased=False)) / 2)
        if pooled > 0:
            assert report["d_prime"] == pytest.approx(float(pos.mean() - neg.mean()) / pooled, rel=1e-5)
    if pos.numel():
        assert report["alignment"] == pytest.approx(float((2 - 2 * pos).mean()), abs=1e-6)
    expected_uniformity = float(torch.log(torch.exp(-2 * (2 - 2 * cos[upper])).mean()))
    assert report["uniformity"] == pytest.approx(expected_uniformity, abs=1e-6)

    unit = torch.nn.functional.normalize(z, dim=1)
    unit_p = torch.nn.functional.normalize(paired, dim=1)
    assert report["paired_similarity"] == pytest.approx(float((unit * unit_p).sum(1).mean()))
    cross = unit @ unit_p.T
    if (same & off).any():
        assert report["same_identity_similarity"] == pytest.approx(float(cross[same & off].mean()), abs=1e-6)
    if (~same).any():
        assert report["different_identity_similarity"] == pytest.approx(float(cross[~same].mean()), abs=1e-6)
    assert report["normalized_std"] == pytest.approx(float(unit.std(dim=0, unbiased=False).mean()), abs=1e-6)


def test_compute_at_any_time_changes_nothing_and_reset_forgets_pending_batches() -> None:
    # Batches are folded into the float64 sums FOLD_EVERY at a time; compute() folds the
    # pending ones, so reading a report mid-stream must not change the final one.
    gen = torch.Generator().manual_seed(1)
    z, labels = _clusters(gen, 12, 10, 24)
    streamed = EmbeddingHealthMonitor(covariance_rows=None)
    once = EmbeddingHealthMonitor(covariance_rows=None)
    for start in range(0, 120, 10):
        streamed.update(z[start : start + 10], labels[start : start + 10], z[start : start + 10])
        if start in (20, 90):
            streamed.compute()
    once.update(z, labels, z)
    a, b = streamed.compute(), once.compute()
    assert a.counts == b.counts
    for key, value in b.items():
        if key != "within_batch_relative_variance":  # depends on the batching, by definition
            assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # A pending batch, then forgotten:
    streamed.update(torch.full((5, 24), 3.0), torch.zeros(5, dtype=torch.long), z[:5])
    streamed.reset()
    streamed.update(z, labels, z)
    assert streamed.compute().counts == b.counts


@pytest.mark.parametrize("drift", [0.0, 1.0])
def test_tiny_spread_far_from_the_origin_is_not_lost_to_cancellation(drift: float) -> None:
    # Nearly collapsed float32 embeddings: a common point at distance 8,000, a spread of
    # 0.1 in 8 of 64 directions, the point drifting between batches. Raw float32 second
    # moments would cancel to noise (6e7 against 1e-2); the pooled deviations must not.
    gen = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(64, 8, generator=gen, dtype=torch.float64))[0]
    batches = []
    for step in range(40):  # five folds
        centre = 1000.0 * torch.ones(64, dtype=torch.float64) + drift * step
        batches.append(centre + 0.1 * torch.randn(50, 8, generator=gen, dtype=torch.float64) @ basis.T)
    monitor = EmbeddingHealthMonitor(covariance_rows=None)
    for batch in batches:
        monitor.update(batch.float())
    rows = torch.cat([batch.float().double() for batch in batches])
    centred = rows - rows.mean(dim=0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / rows.shape[0]).clamp_min(0)
    report = monitor.compute()
    expected_share = float(eigenvalues.max() / eigenvalues.sum())
    assert report["first_pc_variance_share"] == pytest.approx(expected_share, rel=0.05)
    if drift == 0.0:  # the spread lies in 8 directions: the rank reads about 8, not 64
        assert 6.0 < report["effective_rank"] < 8.5


def test_the_sample_keeps_the_most_recent_rows() -> None:
    monitor = EmbeddingHealthMonitor(sample_size=10)
    monitor.update(torch.randn(7, 4), torch.zeros(7, dtype=torch.long))
    monitor.update(torch.randn(25, 4), torch.arange(25) % 5)
    report = monitor.compute()
    assert report.counts["sample_rows"] == 10
    assert report.counts["samples"] == 32
    # The last 10 rows carry labels 0..4 twice: 5 positive pairs among 45.
    assert report.counts["positive_pairs"] == 5


def test_covariance_rows_limit_the_rows_per_batch() -> None:
    monitor = EmbeddingHealthMonitor(covariance_rows=100)
    for _ in range(3):
        monitor.update(torch.randn(300, 8))
    report = monitor.compute()
    assert report.counts["covariance_samples"] == 300
    assert report.counts["samples"] == 900
    assert not any("biased low" in note for note in report.notes)  # 300 rows >= 10 x d = 80
    small = EmbeddingHealthMonitor()
    small.update(torch.randn(50, 64))
    assert any("biased low" in note for note in small.compute().notes)


def test_non_finite_rows_are_counted_and_left_out() -> None:
    gen = torch.Generator().manual_seed(0)
    z, labels = _clusters(gen, 5, 10, 16)
    clean = EmbeddingHealthMonitor(covariance_rows=None)
    clean.update(z, labels)
    dirty_z = torch.cat([z, torch.full((2, 16), float("nan")), torch.full((1, 16), float("inf"))])
    dirty = EmbeddingHealthMonitor(covariance_rows=None)
    dirty.update(dirty_z, torch.cat([labels, torch.tensor([0, 1, 2])]))
    a, b = clean.compute(), dirty.compute()
    for key in ("mean_norm", "max_norm", "min_norm", "effective_rank", "mean_pairwise_cosine", "auc"):
        assert b[key] == pytest.approx(a[key]), key
    bad = b.diagnosis("non_finite")
    assert bad is not None and bad.evidence["non_finite"] == 3
    paired = z.clone()
    paired[4] = float("nan")
    with_pairs = EmbeddingHealthMonitor()
    with_pairs.update(z, labels, paired)
    report = with_pairs.compute()
    assert report.counts["paired_non_finite_rows"] == 1
    assert report["paired_similarity"] == pytest.approx(1.0)  # the NaN pair is left out, not averaged in
    assert report.diagnosis("non_finite") is not None


def test_later_batches_take_the_first_batch_working_dtype() -> None:
    gen = torch.Generator().manual_seed(3)
    z, labels = _clusters(gen, 6, 20, 12)
    mixed, plain = EmbeddingHealthMonitor(), EmbeddingHealthMonitor()
    for i, dtype in enumerate((torch.float32, torch.float64, torch.float16, torch.bfloat16)):
        rows = slice(30 * i, 30 * (i + 1))
        mixed.update(z[rows].to(dtype), labels[rows])
        plain.update(z[rows].to(dtype).float(), labels[rows])
    a, b = mixed.compute(), plain.compute()
    for key, value in b.items():
        assert a[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_norm_spread_of_near_unit_norms_is_kept() -> None:
    # Norms 1 ± 1e-4: the variance is the 1e-8 term of a squared norm, lost if squared in float32.
    gen = torch.Generator().manual_seed(4)
    unit = torch.nn.functional.normalize(torch.randn(4096, 64, generator=gen, dtype=torch.float64), dim=1)
    z = unit * (1 + 1e-4 * torch.randn(4096, 1, generator=gen, dtype=torch.float64))
    monitor = EmbeddingHealthMonitor()
    _feed(monitor, z.float(), batch=256)
    expected = float(z.float().double().norm(dim=1).std(unbiased=False))
    assert monitor.compute()["norm_std"] == pytest.approx(expected, rel=1e-3)


def test_a_batch_larger_than_the_sample_is_not_kept_whole() -> None:
    monitor = EmbeddingHealthMonitor(sample_size=16)
    monitor.update(torch.randn(4096, 32))
    kept = monitor._state.recent[-1].embeddings  # type: ignore[union-attr]
    assert kept.shape == (16, 32) and kept.untyped_storage().nbytes() == 16 * 32 * 4


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="sample_size"):
        EmbeddingHealthMonitor(sample_size=1)
    monitor = EmbeddingHealthMonitor()
    with pytest.raises(ValueError, match="before any update"):
        monitor.compute()
    with pytest.raises(TypeError, match=r"embeddings must be a torch\.Tensor"):
        monitor.update(np.zeros((3, 4)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="paired_embeddings has 2 rows but embeddings has 3"):
        monitor.update(torch.zeros(3, 4), paired_embeddings=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="embeddings has embedding_dim 4 but paired_embeddings has 5"):
        monitor.update(torch.zeros(3, 4), paired_embeddings=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="paired_embeddings is on meta but embeddings is on cpu"):
        monitor.update(torch.zeros(3, 4), paired_embeddings=torch.zeros(3, 4, device="meta"))
    monitor.update(torch.randn(3, 4), [0, 1, 1])
    with pytest.raises(ValueError, match="labels was not given in this update but given in earlier ones"):
        monitor.update(torch.randn(3, 4))
    with pytest.raises(ValueError, match="embedding_dim 6 but earlier batches had 4"):
        monitor.update(torch.randn(3, 6), [0, 1, 1])


def test_update_reads_nothing_back_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on an accelerator: the CPU-only shortcut for all-finite batches reads a flag.
    monkeypatch.setattr(health_module, "_FREE_FLAG_DEVICES", frozenset())
    monitor = EmbeddingHealthMonitor(sample_size=64)
    z, labels = torch.randn(100, 32), torch.arange(100) % 7
    monitor.update(z, labels, z.flip(0))
    with _no_host_reads(monkeypatch):
        for _ in range(FOLD_EVERY + 1):  # through a fold of the pending batches
            monitor.update(z, labels, z.flip(0))
    assert monitor.compute().counts["samples"] == 100 * (FOLD_EVERY + 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_shortcut_for_finite_batches_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    # On CPU an all-finite batch is not copied; the report must equal the copying path's,
    # and later in-place changes to the caller's tensor must not reach the kept sample.
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(48, 24, generator=gen).to(dtype) for _ in range(FOLD_EVERY + 3)]
    batches[2][5] = float("nan")
    labels = torch.arange(48) % 6

    def report(devices: frozenset[str]) -> dict[str, float]:
        monkeypatch.setattr(health_module, "_FREE_FLAG_DEVICES", devices)
        monitor = EmbeddingHealthMonitor(sample_size=64)
        for z in batches:
            monitor.update(z.clone(), labels)
            z_mutable = z.clone()
            monitor.update(z_mutable, labels)
            z_mutable.fill_(7.0)  # the caller reuses its buffer
        return dict(monitor.compute())

    shortcut, copying = report(frozenset({"cpu"})), report(frozenset())
    assert shortcut.keys() == copying.keys()
    for key, value in copying.items():
        assert shortcut[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_does_not_synchronise_cuda() -> None:
    monitor = EmbeddingHealthMonitor()
    z = torch.randn(1024, 512, device="cuda")
    labels = torch.arange(1024, device="cuda") % 256
    monitor.update(z, labels, z)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(FOLD_EVERY + 1):  # through a fold of the pending batches
            monitor.update(z, labels, z)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert monitor.compute().counts["samples"] == 1024 * (FOLD_EVERY + 2)
