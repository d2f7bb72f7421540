"""Retrieval evaluation speed against pytorch-metric-learning and the bare FAISS search.

Each size runs three things in one process on the same data (d=128, 1,000 classes,
float32, every embedding a query against all the others, itself excluded):

* ``faiss``: the floor — ``faiss.IndexFlatIP`` on L2-normalised embeddings, ``add`` and
  ``search`` at the depth the metrics need (max class size), nothing else;
* ``embedkit``: :func:`embedkit.evaluation.retrieval.retrieval_metrics` with its defaults
  (precision@1, R-precision, MAP@R, recall@k and precision@k for ``ks=(1, 5, 10)``, no mAP),
  from the raw embeddings. It searches four results deeper than the bare search (to see a tie
  across the cut-off), re-scores exactly the results within rounding of each other and scans
  the whole set for the few queries whose tie reaches past the depth: all included;
* ``PML``: ``AccuracyCalculator(include=("precision_at_1", "r_precision",
  "mean_average_precision_at_r"), k="max_bin_count")`` with its default FAISS k-NN.

The metrics of both libraries are checked to agree before any time is reported. The three
run in turn, round after round (3 rounds below 1e5 embeddings, 1 above), and each keeps its
best round, so that they share whatever else the machine is doing. The table gives process
CPU seconds (all threads) and, in brackets, wall seconds; the ratios ``PML / embedkit``
(above 1 = embedkit faster) and ``embedkit / faiss`` (the overhead over the bare search) are
taken from CPU time, which a machine shared with other work disturbs far less than wall time
(on an idle machine the two tell the same story).
The cost of the exact full-ranking mAP (an extra pass) is timed separately, at 1e4, and so is
the tie rule where ties abound (10% of the embeddings exact copies of others, under other
labels), against the bare search.

``--large`` evaluates 1e4 queries against a 1e6 × 128 reference set in a fresh subprocess
and reports its time and peak resident memory during the evaluation (``VmHWM``, reset after
the data are generated; FAISS and torch allocate outside Python's allocator, so tracemalloc
would miss them, and ``ru_maxrss`` would include the parent's memory).

When ``benchmarks/bench_verification.py`` is present it runs afterwards (TAR@FAR on 1e7
impostor scores against scikit-learn), so one command runs the whole evaluation benchmark.

``--collapsed N`` only times ``retrieval_metrics`` with its defaults on N identical 16-d rows
with N / 100 labels (an embedding collapsed to one point: every query ties with every
reference), and reports the process's peak resident memory.

    python benchmarks/bench_evaluation.py [--quick] [--large] [--sizes 10000 100000] [--rounds 3]
                                          [--no-verification] [--large-only] [--collapsed N]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import runpy
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

NUM_CLASSES = 1000
DIM = 128


def make_data(
    n: int, seed: int = 0, n_classes: int = NUM_CLASSES, dim: int = DIM
) -> tuple[np.ndarray, np.ndarray]:
    """Clustered embeddings: class centres plus noise (precision@1 well away from 0 and 1)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim), dtype=np.float32)
    labels = rng.integers(0, n_classes, n)
    x = centres[labels]
    x += 1.3 * rng.standard_normal((n, dim), dtype=np.float32)
    return x, labels


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall time, process CPU time (all threads) and the result of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, tuple[float, float, Any]]:
    """Best wall and CPU time of each function over ``rounds`` rounds, run in turn.

    Running the contenders in turn, round after round, lets them share whatever else the
    machine is doing; the best of the rounds is the least disturbed.
    """
    best: dict[str, tuple[float, float, Any]] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            wall, cpu, result = timed(fn)
            old = best.get(name)
            best[name] = (min(wall, old[0]), min(cpu, old[1]), result) if old else (wall, cpu, result)
    return best


def bare_faiss(x: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    xn = x.copy()
    faiss.normalize_L2(xn)
    index = faiss.IndexFlatIP(DIM)
    index.add(xn)
    return index.search(xn, depth)


def embedkit_metrics(x: np.ndarray, labels: np.ndarray, compute_map: bool = False) -> dict[str, float]:
    from embedkit.evaluation.retrieval import retrieval_metrics

    report = retrieval_metrics(x, labels, compute_map=compute_map)
    return dict(report)


def pml_metrics(x: np.ndarray, labels: np.ndarray, include: tuple[str, ...], k: Any) -> dict[str, float]:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calculator = AccuracyCalculator(include=include, k=k, device=torch.device("cpu"))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)  # PML's default k-NN is L2: normalise for cosine
    return calculator.get_accuracy(torch.from_numpy(xn), torch.from_numpy(labels))


PML_NAMES = {
    "precision@1": "precision_at_1",
    "r_precision": "r_precision",
    "map@r": "mean_average_precision_at_r",
}


def warm_up() -> None:
    """Import and first-call costs (FAISS, torch, scipy) are paid here, outside every timing."""
    x, labels = make_data(3_000, seed=9, n_classes=50)
    bare_faiss(x, 5)
    embedkit_metrics(x, labels, compute_map=True)
    pml_metrics(x, labels, tuple(PML_NAMES.values()), "max_bin_count")


def run_size(n: int, rounds: int) -> dict[str, Any]:
    x, labels = make_data(n)
    depth = int(np.bincount(labels).max())  # max R + 1 (self) = max class size
    times = interleaved(
        {
            "faiss": lambda: bare_faiss(x, depth),
            "embedkit": lambda: embedkit_metrics(x, labels),
            "pml": lambda: pml_metrics(x, labels, tuple(PML_NAMES.values()), "max_bin_count"),
        },
        rounds,
    )
    ours, theirs = times["embedkit"][2], times["pml"][2]
    for key, pml_key in PML_NAMES.items():
        if abs(ours[key] - theirs[pml_key]) > 1e-4:
            raise AssertionError(f"n={n}: {key} differs: embedkit {ours[key]} vs PML {theirs[pml_key]}")
    return {"n": n, "depth": depth, **{name: t[:2] for name, t in times.items()}, "map@r": ours["map@r"]}


def with_duplicates(
    x: np.ndarray, labels: np.ndarray, share: float, seed: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """``share`` of the rows replaced by exact copies of other rows, under random labels (ties)."""
    rng = np.random.default_rng(seed)
    x, labels = x.copy(), labels.copy()
    rows = rng.choice(len(x), int(share * len(x)), replace=False)
    x[rows] = x[rng.integers(0, len(x), rows.size)]
    labels[rows] = rng.integers(0, NUM_CLASSES, rows.size)
    return x, labels


def run_ties(n: int, rounds: int, share: float = 0.1) -> dict[str, Any]:
    """The cost of the tie rule where ties abound: ``share`` of the embeddings are exact copies."""
    x, labels = with_duplicates(*make_data(n), share)
    depth = int(np.bincount(labels).max())
    times = interleaved(
        {"faiss": lambda: bare_faiss(x, depth), "embedkit": lambda: embedkit_metrics(x, labels)}, rounds
    )
    return {"n": n, "share": share, "depth": depth, **{name: t[:2] for name, t in times.items()}}


def run_map(n: int) -> dict[str, Any]:
    """The exact full-ranking mAP: embedkit's extra pass against PML ranking every reference (k=None)."""
    x, labels = make_data(n, seed=1)
    times = interleaved(
        {
            "without": lambda: embedkit_metrics(x, labels, compute_map=False),
            "with": lambda: embedkit_metrics(x, labels, compute_map=True),
            "pml": lambda: pml_metrics(x, labels, ("mean_average_precision",), None),
        },
        1,
    )
    ours, theirs = times["with"][2], times["pml"][2]
    if abs(ours["map"] - theirs["mean_average_precision"]) > 1e-4:
        raise AssertionError(f"mAP differs: embedkit {ours['map']} vs PML {theirs['mean_average_precision']}")
    return {"n": n, **{name: t[1] for name, t in times.items()}, "map": ours["map"]}  # CPU seconds


def run_approximate(n: int, dim: int, n_queries: int, k: int = 10) -> list[dict[str, Any]]:
    """Recall@k against the exact search, and time, of the approximate indexes' settings.

    The reference set is :func:`make_data` (``n × dim``, 1,000 classes) and the queries
    are ``n_queries`` more embeddings of the same classes, all L2-normalised (cosine). Every
    setting is timed as build (train + add) and search of all queries, by FAISS directly,
    so that one build serves a sweep of ``nprobe`` / ``efSearch``; the first row is the
    exact flat search. Recall@k = the share of the exact top ``k`` that the index returns.
    """
    import faiss

    x, _ = make_data(n + n_queries, seed=3, dim=dim)
    faiss.normalize_L2(x)
    reference, queries = x[:n], x[n:]
    rows: list[dict[str, Any]] = []

    def measure(kind: str, params: str, build_s: float, index: Any, exact: np.ndarray | None) -> np.ndarray:
        start = time.perf_counter()
        _, found = index.search(queries, k)
        search_s = time.perf_counter() - start
        recall = (
            1.0
            if exact is None
            else float(np.mean([np.intersect1d(a, b).size for a, b in zip(found, exact, strict=True)]) / k)
        )
        rows.append(
            {
                "n": n,
                "dim": dim,
                "index": kind,
                "params": params,
                "build_s": build_s,
                "search_s": search_s,
                f"recall@{k}": recall,
            }
        )
        return found

    start = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(reference)
    exact = measure("flat (exact)", "", time.perf_counter() - start, flat, None)
    del flat
    root = int(np.sqrt(n))
    for nlist in sorted({root, 4 * root}):
        start = time.perf_counter()
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(reference)
        ivf.add(reference)
        build = time.perf_counter() - start
        for nprobe in (1, 2, 4, 8, 16, 32, 64, 128):
            if nprobe <= nlist:
                ivf.nprobe = nprobe
                measure("ivf", f"nlist={nlist} nprobe={nprobe}", build, ivf, exact)
        del ivf
    for m, ef_construction in ((16, 40), (32, 40), (32, 128)):
        start = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = ef_construction
        hnsw.add(reference)
        build = time.perf_counter() - start
        for ef_search in (16, 32, 64, 128, 256, 512):
            hnsw.hnsw.efSearch = ef_search
            measure("hnsw", f"M={m} efC={ef_construction} efS={ef_search}", build, hnsw, exact)
        del hnsw
    return rows


def run_approximate_defaults(n: int, dim: int, n_queries: int, k: int = 10) -> list[dict[str, Any]]:
    """Recall@k and wall time of ``knn`` itself on the approximate back-ends, at its defaults.

    The data are :func:`run_approximate`'s; each row times one whole ``knn`` call (build,
    the calibration of ``nprobe`` / ``efSearch`` on a sample of the queries, and the search),
    the first row the exact search (``backend="faiss"``), against whose top ``k`` the recall
    is counted.
    """
    import faiss

    from embedkit.evaluation import knn

    x, _ = make_data(n + n_queries, seed=3, dim=dim)
    faiss.normalize_L2(x)
    reference, queries = x[:n], x[n:]
    rows: list[dict[str, Any]] = []
    exact: np.ndarray | None = None
    for backend in ("faiss", "faiss-ivf", "faiss-hnsw"):
        start = time.perf_counter()
        _, found = knn(queries, reference, k, backend=backend)  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
        found = np.asarray(found)
        if exact is None:
            exact = found
        recall = float(np.mean([np.intersect1d(a, b).size for a, b in zip(found, exact, strict=True)]) / k)
        rows.append({"n": n, "dim": dim, "backend": backend, "seconds": seconds, f"recall@{k}": recall})
        print(f"| {backend} | {seconds:.1f} | {recall:.4f} |", flush=True)
    return rows


def _proc_status_gib(field: str) -> float | None:
    """A memory field (``VmHWM``, ``VmRSS``) of ``/proc/self/status`` in GiB; None off Linux."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20  # kB
    return None


def peak_rss_gib() -> float:
    """Peak resident memory of this process in GiB.

    ``VmHWM`` from ``/proc/self/status`` where it exists (Linux): unlike ``ru_maxrss``, it
    belongs to this process's own address space, so neither the parent's memory (which
    ``ru_maxrss`` keeps across ``exec``) nor data generation before :func:`reset_peak_rss`
    counts.
    """
    peak = _proc_status_gib("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**30 if sys.platform == "darwin" else maxrss / 2**20  # bytes on macOS, kB on Linux


def current_rss_gib() -> float:
    """Current resident memory in GiB (NaN off Linux)."""
    rss = _proc_status_gib("VmRSS")
    return float("nan") if rss is None else rss


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current resident size (Linux ``clear_refs``); a no-op elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def large_child(n_reference: int, n_queries: int) -> None:
    """Runs in a fresh process: prints one JSON line with time and peak memory."""
    from embedkit.evaluation.retrieval import retrieval_metrics

    x, labels = make_data(n_reference + n_queries, seed=2)
    queries, query_labels = x[:n_queries].copy(), labels[:n_queries].copy()
    reference, reference_labels = x[n_queries:], labels[n_queries:]
    reset_peak_rss()
    data_rss = current_rss_gib()
    start, cpu = time.perf_counter(), time.process_time()
    report = retrieval_metrics(
        queries, query_labels, reference, reference_labels, ks=(1, 5, 10), compute_map=False
    )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    peak = peak_rss_gib()
    result = {
        "n_reference": n_reference,
        "n_queries": n_queries,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss_gib": peak,
        "rss_before_evaluation_gib": data_rss,
        "nxn_matrix_gib": n_reference * n_queries * 4 / 2**30,
        "precision@1": report["precision@1"],
        "map@r": report["map@r"],
        "search_depth": report.counts["search_depth"],
    }
    print(json.dumps(result))


def run_large(n_reference: int, n_queries: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--large-child", str(n_reference), str(n_queries)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_collapsed(n: int) -> None:
    """Time retrieval_metrics (defaults) on ``n`` identical 16-d rows with ``n / 100`` labels."""
    import warnings

    from embedkit.evaluation.retrieval import retrieval_metrics

    x = np.ones((n, 16), dtype=np.float32)
    y = np.random.default_rng(0).integers(0, max(1, n // 100), n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the collapsed-embedding warning, expected here
        wall, cpu, report = timed(lambda: retrieval_metrics(x, y))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(
        f"collapsed: {n:,} identical rows x 16, {max(1, n // 100)} labels: retrieval_metrics {wall:.2f} s "
        f"({cpu:.2f} CPU s), peak RSS {peak:.2f} GiB, search depth {report.counts['search_depth']}, "
        f"precision@1 {float(report['precision@1']):.4f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="sizes 2e3 and 1e4 only")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument(
        "--rounds", type=int, default=None, help="timing rounds (default 3 below 1e5, else 1)"
    )
    parser.add_argument("--large", action="store_true", help="also the 1e6-reference, 1e4-query run")
    parser.add_argument("--large-only", action="store_true", help="only the large run")
    parser.add_argument("--no-verification", action="store_true", help="skip bench_verification.py")
    parser.add_argument("--large-child", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--collapsed", type=int, metavar="N", help="only time retrieval_metrics on N identical rows"
    )
    parser.add_argument(
        "--approximate",
        type=int,
        metavar="N",
        help="only the approximate back-ends: knn at its defaults on N references and N/10 queries",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="with --approximate: also the nprobe / efSearch sweep (slow)"
    )
    args = parser.parse_args()
    if args.approximate:
        n = args.approximate
        print(f"knn at its defaults, {n:,} references, {n // 10:,} queries, d={DIM}, cosine: wall seconds")
        print("| backend | seconds (build + calibration + search) | recall@10 |\n| --- | --- | --- |")
        run_approximate_defaults(n, DIM, n // 10)
        if args.sweep:
            for row in run_approximate(n, DIM, n // 10):
                print(json.dumps(row), flush=True)
        return
    if args.collapsed:
        run_collapsed(args.collapsed)
        return
    if args.large_child:
        large_child(*args.large_child)
        return
    logging.getLogger("PML").setLevel(logging.ERROR)
    if not args.large_only:
        sizes = args.sizes or ([2_000, 10_000] if args.quick else [10_000, 100_000, 200_000])
        print(f"retrieval: precision@1 + R-precision + MAP@R, d={DIM}, {NUM_CLASSES} classes, query == ref")
        warm_up()
        print("CPU seconds, all threads (wall seconds); ratios from CPU time")
        columns = ["n", "depth", "faiss bare", "embedkit", "PML", "PML / embedkit", "embedkit / faiss"]
        print("| " + " | ".join([*columns, "MAP@R"]) + " |")
        print("| --- " * (len(columns) + 1) + "|")
        for n in sizes:
            r = run_size(n, args.rounds or (3 if n < 100_000 else 1))
            cells = [f"{r[name][1]:.2f} ({r[name][0]:.1f})" for name in ("faiss", "embedkit", "pml")]
            ratios = [r["pml"][1] / r["embedkit"][1], r["embedkit"][1] / r["faiss"][1]]
            print(
                f"| {n:,} | {r['depth']} | " + " | ".join(cells) + " | "
                f"{ratios[0]:.2f}x | {ratios[1]:.2f}x | {r['map@r']:.4f} |",
                flush=True,
            )
        t = run_ties(2_000 if args.quick else 10_000, args.rounds or 3)
        print(
            f"\nwith {100 * t['share']:.0f}% exact duplicates under other labels at n={t['n']:,}: bare FAISS "
            f"{t['faiss'][1]:.2f} CPU s, embedkit {t['embedkit'][1]:.2f} CPU s "
            f"({t['embedkit'][1] / t['faiss'][1]:.2f}x the bare search, ties settled)",
            flush=True,
        )
        m = run_map(2_000 if args.quick else 10_000)
        print(
            f"\nexact full-ranking mAP at n={m['n']:,} (CPU seconds): embedkit {m['with']:.2f} s with mAP "
            f"({m['without']:.2f} s without); PML ranking every reference (k=None) "
            f"{m['pml']:.2f} s; mAP {m['map']:.4f} (equal)",
            flush=True,
        )
    if args.large or args.large_only:
        r = run_large(1_000_000, 10_000)
        print(
            f"\nlarge: {r['n_queries']:,} queries vs {r['n_reference']:,} x {DIM} references: "
            f"{r['seconds']:.1f} s ({r['cpu_seconds']:.1f} CPU s), peak RSS {r['peak_rss_gib']:.2f} GiB "
            f"({r['rss_before_evaluation_gib']:.2f} GiB holding the data "
            f"before evaluation; an N x N float32 score matrix would be {r['nxn_matrix_gib']:.1f} GiB); "
            f"search depth {r['search_depth']}, precision@1 {r['precision@1']:.4f}",
            flush=True,
        )
    verification = Path(__file__).with_name("bench_verification.py")
    if not args.no_verification and not args.large_only and verification.exists():
        print(f"\n--- {verification.name} ---", flush=True)
        sys.argv = [str(verification), *(["--quick"] if args.quick else [])]
        runpy.run_path(str(verification), run_name="__main__")


if __name__ == "__main__":
    main()
