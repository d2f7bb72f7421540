"""Verification metrics on large pair sets against scikit-learn, side by side in one run.

Scores are float32 (what :func:`embedkit.evaluation.verification.pair_scores` returns),
1e7 impostor and 1e5 genuine pairs by default. Each case checks that both sides give
the same numbers, then reports the best wall time and the best CPU time of this process
over ``--repeats`` runs, and the speed-up (scikit-learn time / embedkit time; above 1 =
embedkit faster). Both sides run single-threaded numpy code; on a busy machine the CPU
time is the steadier of the two.

* ``roc_curve``: :func:`roc_curve` against ``sklearn.metrics.roc_curve(...,
  drop_intermediate=False)`` (the same exact curve).
* ``tar@far``: :func:`tar_at_far` at FAR 1e-4, 1e-3, 1e-2 against the same lookup
  (largest TPR with FPR <= target) on scikit-learn's ROC.
* ``verification_metrics``: AUC, EER, three TAR@FAR and best accuracy from one ROC,
  against the same computed from scikit-learn's ``roc_curve`` plus ``roc_auc_score``.

    python benchmarks/bench_verification.py [--quick] [--repeats 1]

``--all-pairs``: every probe × gallery pair (:func:`all_pairs_verification`, behind
``Gallery.verify`` and ``embedkit evaluate``) against the in-memory route (the full score
matrix, then :func:`verification_metrics`), each in a fresh subprocess whose peak resident
memory (``ru_maxrss``) is read. Both must give the same AUC, EER, TAR@FAR and best accuracy
where both fit; the in-memory side is skipped above ``--in-memory-limit`` pairs.

    python benchmarks/bench_verification.py --all-pairs [--gallery 100000 --probes 10000]

Measured on the project's 2-core CPU machine (shared with other jobs, so wall times are
inflated; float32, d = 128, 10 images per identity, 91% of probes enrolled; peak RSS of the
whole process, data included):

=================  ==========  ============================  ==========  =========
gallery × probes   pairs       route                         peak RSS    wall time
=================  ==========  ============================  ==========  =========
100000 × 300       3e7         in memory (every score)       1817 MiB    10.1 s
100000 × 300       3e7         all_pairs_verification        545 MiB     3.1 s
100000 × 10000     1e9         in memory                     ~36 GB      (no fit)
100000 × 10000     1e9         all_pairs_verification        538 MiB     99 s
=================  ==========  ============================  ==========  =========

At 3e7 pairs both routes gave AUC 0.947654, EER 0.122909, TAR@FAR 1e-4 / 1e-3 / 1e-2 =
0.0756364 / 0.212727 / 0.481818 and best accuracy 0.999908, equal to the last bit
(asserted). The whole ``embedkit evaluate`` (identification, open set, verification,
retrieval, figures) on 100000 × 10000 peaked at 732 MiB (130 s).

``--identify``: :meth:`Gallery.identify <embedkit.evaluation.gallery.Gallery.identify>`
(closed-set rank-1/5/10 and the whole CMC) against the bare exact search it cannot beat,
``faiss.IndexFlatIP`` on the same L2-normalised data (top 10), with the same threads. The
gallery is enrolled and the FAISS index built before the clock starts; each timed call
normalises its probes. The two run in turn, ``--rounds`` times, and each keeps its best
wall and process CPU time; the ratio is Gallery / FAISS.

    python benchmarks/bench_verification.py --identify [--gallery 100000 --probes 10000 --rounds 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from embedkit.evaluation.verification import roc_curve, tar_at_far, verification_metrics

ALL_PAIRS_KEYS = ("auc", "eer", "tar@far=0.0001", "tar@far=0.001", "tar@far=0.01", "best_accuracy")

FAR_TARGETS = (1e-4, 1e-3, 1e-2)


def _data(n_genuine: int, n_impostor: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    genuine = np.zeros(n_genuine + n_impostor, dtype=bool)
    genuine[rng.choice(genuine.shape[0], n_genuine, replace=False)] = True
    scores = (rng.normal(size=genuine.shape[0]) * 0.15 + np.where(genuine, 0.6, 0.1)).astype(np.float32)
    return scores, genuine


def _best_time(fn: Callable[[], Any], repeats: int) -> tuple[tuple[float, float], Any]:
    """Best wall time and best CPU time (this process) of ``repeats`` runs, and the result."""
    wall, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return (wall, cpu), result


def _sklearn_tar_at_far(fpr: np.ndarray, tpr: np.ndarray, n_impostor: int) -> list[float]:
    return [float(tpr[fpr <= t].max()) if t >= 1 / n_impostor else float("nan") for t in FAR_TARGETS]


def _sklearn_all(scores: np.ndarray, genuine: np.ndarray) -> dict[str, Any]:
    """What a user would write with scikit-learn for the same report."""
    from sklearn.metrics import roc_auc_score
    from sklearn.metrics import roc_curve as sk_roc_curve

    fpr, tpr, _ = sk_roc_curve(genuine, scores, drop_intermediate=False)
    auc = roc_auc_score(genuine, scores)
    gap = fpr - (1 - tpr)
    j = int(np.searchsorted(gap, 0.0))
    eer = (
        fpr[j] if gap[j] == 0 else fpr[j - 1] + (-gap[j - 1] / (gap[j] - gap[j - 1])) * (fpr[j] - fpr[j - 1])
    )
    n_genuine = int(genuine.sum())
    n_impostor = genuine.shape[0] - n_genuine
    correct = tpr * n_genuine + (1 - fpr) * n_impostor
    return {
        "auc": auc,
        "eer": eer,
        "tar": _sklearn_tar_at_far(fpr, tpr, n_impostor),
        "best_accuracy": float(correct.max() / genuine.shape[0]),
    }


def run(quick: bool = False, repeats: int | None = None) -> list[dict[str, Any]]:
    """Time embedkit against scikit-learn; one dict per case.

    Parameters
    ----------
    quick : bool
        1e5 impostor and 1e3 genuine pairs instead of 1e7 and 1e5.
    repeats : int, optional
        Runs per side (best time kept); 3 when quick, 1 otherwise.

    Returns
    -------
    list of dict
        Keys ``benchmark``, ``case``, ``n_genuine``, ``n_impostor``, ``embedkit_s``,
        ``reference``, ``reference_s``, ``speedup`` (reference / embedkit), and the same
        in CPU time of this process (``embedkit_cpu_s``, ``reference_cpu_s``,
        ``cpu_speedup``), which a busy machine disturbs less than wall time.
    """
    import sklearn
    from sklearn.metrics import roc_curve as sk_roc_curve

    n_genuine, n_impostor = (1_000, 100_000) if quick else (100_000, 10_000_000)
    repeats = repeats or (3 if quick else 1)
    scores, genuine = _data(n_genuine, n_impostor)
    reference = f"scikit-learn {sklearn.__version__}"
    rows: list[dict[str, Any]] = []

    def add(case: str, ours: tuple[float, float], theirs: tuple[float, float]) -> None:
        rows.append(
            {
                "benchmark": "verification",
                "case": case,
                "n_genuine": n_genuine,
                "n_impostor": n_impostor,
                "embedkit_s": ours[0],
                "reference": reference,
                "reference_s": theirs[0],
                "speedup": theirs[0] / ours[0],
                "embedkit_cpu_s": ours[1],
                "reference_cpu_s": theirs[1],
                "cpu_speedup": theirs[1] / ours[1],
            }
        )

    ours_s, (far, tar, _) = _best_time(lambda: roc_curve(scores, genuine), repeats)
    theirs_s, (fpr, tpr, _) = _best_time(
        lambda: sk_roc_curve(genuine, scores, drop_intermediate=False), repeats
    )
    np.testing.assert_allclose(far, fpr, atol=1e-12)
    np.testing.assert_allclose(tar, tpr, atol=1e-12)
    add("roc_curve", ours_s, theirs_s)

    ours_s, report = _best_time(lambda: tar_at_far(scores, genuine, far_targets=FAR_TARGETS), repeats)

    def sklearn_tar() -> list[float]:
        fpr, tpr, _ = sk_roc_curve(genuine, scores, drop_intermediate=False)
        return _sklearn_tar_at_far(fpr, tpr, n_impostor)

    theirs_s, expected = _best_time(sklearn_tar, repeats)
    got = [report[f"tar@far={np.format_float_positional(t, trim='-')}"] for t in FAR_TARGETS]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    add("tar@far", ours_s, theirs_s)

    ours_s, report = _best_time(
        lambda: verification_metrics(scores, genuine, far_targets=FAR_TARGETS), repeats
    )
    theirs_s, expected_all = _best_time(lambda: _sklearn_all(scores, genuine), repeats)
    np.testing.assert_allclose(report["auc"], expected_all["auc"], atol=1e-9)
    np.testing.assert_allclose(report["eer"], expected_all["eer"], atol=1e-9)
    np.testing.assert_allclose(report["best_accuracy"], expected_all["best_accuracy"], atol=1e-9)
    add("verification_metrics", ours_s, theirs_s)
    return rows


def _gallery_data(n_gallery: int, n_probes: int, dim: int = 128, seed: int = 0) -> tuple[np.ndarray, ...]:
    """A gallery of 10 images per identity and probes, 10% of them of identities not enrolled.

    The noise makes genuine and impostor scores overlap (AUC about 0.99), so that TAR@FAR and
    the EER are not trivially 1 and 0.
    """
    rng = np.random.default_rng(seed)
    n_ids = max(1, n_gallery // 10)
    centres = rng.standard_normal((n_ids + n_ids // 10 + 1, dim), dtype=np.float32)
    gallery_labels = np.arange(n_gallery) % n_ids
    probe_labels = rng.integers(0, centres.shape[0], n_probes)
    noise = 2.0
    gallery = centres[gallery_labels] + noise * rng.standard_normal((n_gallery, dim), dtype=np.float32)
    probes = centres[probe_labels] + noise * rng.standard_normal((n_probes, dim), dtype=np.float32)
    return gallery, gallery_labels, probes, probe_labels


def _all_pairs_child(route: str, n_gallery: int, n_probes: int) -> None:
    """Run one route in this (fresh) process; print its metrics and peak RSS as JSON."""
    import json
    import resource

    import torch

    from embedkit.evaluation.verification import all_pairs_verification
    from embedkit.similarity import similarity_blocks

    gallery, gallery_labels, probes, probe_labels = _gallery_data(n_gallery, n_probes)
    start = time.perf_counter()
    if route == "streaming":
        report = all_pairs_verification(
            probes, probe_labels, gallery, gallery_labels, far_targets=FAR_TARGETS
        )
    else:  # every score held, from the same blocks, then the in-memory metrics
        blocks = similarity_blocks(
            torch.from_numpy(probes),
            torch.from_numpy(gallery),
            metric="cosine",
            chunk_size=max(1, (1 << 23) // n_gallery),
        )
        scores = torch.cat([b for _, b in blocks]).numpy().ravel()
        genuine = (probe_labels[:, None] == gallery_labels[None, :]).ravel()
        report = verification_metrics(scores, genuine, far_targets=FAR_TARGETS)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(json.dumps({"seconds": seconds, "peak_mib": peak_mib, **{k: report[k] for k in ALL_PAIRS_KEYS}}))


def run_all_pairs(n_gallery: int, n_probes: int, in_memory_limit: float) -> list[dict[str, Any]]:
    """Both routes in fresh subprocesses; the in-memory one only up to ``in_memory_limit`` pairs.

    Returns one dict per route with ``route``, ``pairs``, ``peak_mib``, ``seconds`` and the
    metrics; raises AssertionError if the two routes disagree.
    """
    import json
    import subprocess
    import sys

    rows = []
    routes = ["streaming"] + (["in-memory"] if n_gallery * n_probes <= in_memory_limit else [])
    for route in routes:
        command = [
            sys.executable,
            __file__,
            "--child",
            route,
            "--gallery",
            str(n_gallery),
            "--probes",
            str(n_probes),
        ]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(
            {"route": route, "pairs": n_gallery * n_probes, **json.loads(out.strip().splitlines()[-1])}
        )
    if len(rows) == 2:
        for key in ALL_PAIRS_KEYS:
            assert rows[0][key] == rows[1][key], (key, rows[0][key], rows[1][key])
    return rows


def run_identification(n_gallery: int, n_probes: int, rounds: int = 5, k: int = 10) -> dict[str, Any]:
    """``Gallery.identify`` against a bare ``faiss.IndexFlatIP`` search, interleaved.

    Returns ``gallery_s``, ``faiss_s`` (best wall seconds), ``gallery_cpu_s``, ``faiss_cpu_s``
    (best process CPU seconds), their ratios ``ratio`` and ``cpu_ratio`` (Gallery / FAISS),
    ``threads``, and ``rank1`` (Gallery) beside ``faiss_rank1`` (the top-1 label of the
    search, which agrees but for ties).
    """
    import faiss
    import torch

    from embedkit.evaluation.gallery import Gallery

    gallery, gallery_labels, probes, probe_labels = _gallery_data(n_gallery, n_probes)
    enrolled = Gallery().enrol(gallery, gallery_labels)
    unit = gallery.copy()
    faiss.normalize_L2(unit)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)

    def bare() -> np.ndarray:
        q = probes.copy()
        faiss.normalize_L2(q)
        return index.search(q, k)[1]

    def ours() -> Any:
        return enrolled.identify(probes, probe_labels, ranks=(1, 5, k))

    best: dict[str, list[float]] = {"faiss": [np.inf, np.inf], "gallery": [np.inf, np.inf]}
    results: dict[str, Any] = {}
    for _ in range(rounds):
        for name, fn in (("faiss", bare), ("gallery", ours)):
            (wall, cpu), results[name] = _best_time(fn, 1)
            best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
    mated = np.isin(probe_labels, gallery_labels)
    top1 = gallery_labels[results["faiss"][:, 0]] == probe_labels
    return {
        "n_gallery": n_gallery,
        "n_probes": n_probes,
        "identities": int(np.unique(gallery_labels).size),
        "threads": f"torch {torch.get_num_threads()}, faiss {faiss.omp_get_max_threads()}",
        "gallery_s": best["gallery"][0],
        "faiss_s": best["faiss"][0],
        "gallery_cpu_s": best["gallery"][1],
        "faiss_cpu_s": best["faiss"][1],
        "ratio": best["gallery"][0] / best["faiss"][0],
        "cpu_ratio": best["gallery"][1] / best["faiss"][1],
        "rank1": results["gallery"]["rank-1"],
        "faiss_rank1": float(top1[mated].mean()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1e5 impostor pairs instead of 1e7")
    parser.add_argument("--repeats", type=int, default=None, help="runs per side, best kept")
    parser.add_argument("--all-pairs", action="store_true", help="probe x gallery verification memory")
    parser.add_argument("--gallery", type=int, default=100_000, help="gallery images (--all-pairs)")
    parser.add_argument("--probes", type=int, default=10_000, help="probes (--all-pairs)")
    parser.add_argument(
        "--in-memory-limit", type=float, default=1e8, help="largest pair count run in memory (--all-pairs)"
    )
    parser.add_argument("--identify", action="store_true", help="Gallery.identify against bare FAISS")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (--identify)")
    parser.add_argument("--child", choices=("streaming", "in-memory"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.identify:
        r = run_identification(args.gallery, args.probes, args.rounds)
        print(
            f"Gallery.identify, {r['n_probes']} probes vs {r['n_gallery']} x 128 gallery "
            f"({r['identities']} identities), {r['threads']} threads, "
            f"best of {args.rounds} interleaved rounds"
        )
        print(
            f"  faiss.IndexFlatIP top-10  {r['faiss_s']:7.2f} s wall  {r['faiss_cpu_s']:7.2f} s CPU"
            f"  (top-1 accuracy {r['faiss_rank1']:.4f})"
        )
        print(
            f"  Gallery.identify          {r['gallery_s']:7.2f} s wall  {r['gallery_cpu_s']:7.2f} s CPU"
            f"  (rank-1 {r['rank1']:.4f})"
        )
        print(f"  Gallery / FAISS: {r['ratio']:.2f}x wall, {r['cpu_ratio']:.2f}x CPU")
        return
    if args.child:
        _all_pairs_child(args.child, args.gallery, args.probes)
        return
    if args.all_pairs:
        rows_ap = run_all_pairs(args.gallery, args.probes, args.in_memory_limit)
        print(f"{args.gallery} gallery x {args.probes} probes = {rows_ap[0]['pairs']:.3g} pairs")
        for row in rows_ap:
            metrics = ", ".join(f"{k} {row[k]:.6g}" for k in ALL_PAIRS_KEYS)
            peak, seconds = row["peak_mib"], row["seconds"]
            print(f"  {row['route']:<10} peak RSS {peak:8.0f} MiB  {seconds:7.1f} s  {metrics}")
        if len(rows_ap) == 2:
            print("  both routes give the same metrics")
        return
    rows = run(quick=args.quick, repeats=args.repeats)
    first = rows[0]
    print(
        f"{first['n_impostor']} impostor + {first['n_genuine']} genuine float32 scores; {first['reference']}"
    )
    print(
        "wall time (CPU time of this process in brackets), best of each; speed-up = scikit-learn / embedkit"
    )
    print(f"| {'case':<22} | {'embedkit (s)':>16} | {'scikit-learn (s)':>16} | {'speed-up':>15} |")
    print(f"| {'-' * 22} | {'-' * 16}:| {'-' * 16}:| {'-' * 15}:|")
    for row in rows:
        print(
            f"| {row['case']:<22} | {row['embedkit_s']:>7.3f} ({row['embedkit_cpu_s']:>6.3f}) "
            f"| {row['reference_s']:>7.3f} ({row['reference_cpu_s']:>6.3f}) "
            f"| {row['speedup']:>5.1f}x ({row['cpu_speedup']:>5.1f}x) |"
        )


if __name__ == "__main__":
    main()
