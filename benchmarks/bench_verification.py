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
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from embedkit.evaluation.verification import roc_curve, tar_at_far, verification_metrics

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1e5 impostor pairs instead of 1e7")
    parser.add_argument("--repeats", type=int, default=None, help="runs per side, best kept")
    args = parser.parse_args(argv)
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
