"""PKSampler against pytorch-metric-learning's MPerClassSampler, in one run.

For 1e5 and 1e6 labels spread over 1e4 classes (uniformly at random), with p=32
classes × k=4 samples per batch, it times

* construct — the sampler's constructor;
* build     — from ``iter()`` to the first batch: making one epoch's indices
  (MPerClassSampler fills its whole index list up front, PKSampler its whole plan);
* epoch     — from ``iter()`` to the last batch, each a list of ``p * k`` ints, the
  way ``DataLoader`` consumes them (MPerClassSampler through ``torch``'s
  ``BatchSampler``).

Fair length: MPerClassSampler's epoch is fixed by ``length_before_new_iter``
(100,000 indices by default, whatever the dataset). It is set here to the number of
indices in PKSampler's epoch (``len(sampler) * p * k``), so both hand out the same
number of samples per epoch, and ``batch_size=p*k`` so its batches also hold ``p``
distinct classes of ``k``.

Each row is the run with the smallest construct + epoch time out of ``--repeats``
runs (at least 5 for PKSampler; the slow MPerClassSampler run at 1e6 labels runs
once). Run ``python benchmarks/bench_samplers.py`` (under a minute on 2 cores) or
``--quick`` (1e5 labels only, a few seconds).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch.utils.data import BatchSampler

from embedkit.samplers import PKSampler

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.bench_samplers
    from _table import print_table
except ImportError:
    from benchmarks._table import print_table

try:
    from pytorch_metric_learning.samplers import MPerClassSampler
except ImportError:  # pragma: no cover - the reference is a dev dependency
    MPerClassSampler = None


def best_of(repeats: int, run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The run with the smallest construct + epoch time (its numbers stay consistent)."""
    results = [run() for _ in range(repeats)]
    return min(results, key=lambda r: r["construct"] + r["epoch"])


def time_batches(batches: Iterable[list[int]]) -> tuple[float, float, int]:
    """Seconds to the first batch, seconds to the last, and the batch count."""
    start = time.perf_counter()
    iterator = iter(batches)
    next(iterator)
    first = time.perf_counter() - start
    count = 1 + sum(1 for _ in iterator)
    return first, time.perf_counter() - start, count


def time_embedkit(labels: np.ndarray, p: int, k: int, epoch: int) -> dict[str, float]:
    start = time.perf_counter()
    sampler = PKSampler(labels, p, k, seed=0)
    construct = time.perf_counter() - start
    sampler.set_epoch(epoch)
    build, epoch_time, count = time_batches(sampler)
    assert count == len(sampler)
    return {"construct": construct, "build": build, "epoch": epoch_time, "samples": count * p * k}


def time_pml(labels: np.ndarray, p: int, k: int, length: int) -> dict[str, float]:
    np.random.seed(0)  # noqa: NPY002 - MPerClassSampler draws from the global numpy RNG
    start = time.perf_counter()
    sampler = MPerClassSampler(labels, m=k, batch_size=p * k, length_before_new_iter=length)
    construct = time.perf_counter() - start
    build, epoch_time, count = time_batches(BatchSampler(sampler, batch_size=p * k, drop_last=False))
    return {"construct": construct, "build": build, "epoch": epoch_time, "samples": count * p * k}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1e5 labels only, one repeat")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (default 3)")
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("-p", type=int, default=32)
    parser.add_argument("-k", type=int, default=4)
    args = parser.parse_args()
    sizes = [100_000] if args.quick else [100_000, 1_000_000]
    repeats = 1 if args.quick else args.repeats

    title = (
        f"PKSampler vs MPerClassSampler: p={args.p}, k={args.k}, {args.classes} classes; "
        f"numpy {np.__version__}, torch {torch.__version__}, torch threads {torch.get_num_threads()}"
    )
    table = []
    for n in sizes:
        labels = np.random.default_rng(n).integers(0, args.classes, size=n)
        # embedkit's runs are cheap: take the best of a few more to steady the numbers.
        ours = best_of(max(repeats, 5), lambda labels=labels: time_embedkit(labels, args.p, args.k, epoch=1))
        rows = [("embedkit PK", ours)]
        if MPerClassSampler is not None:
            pml_repeats = 1 if n >= 1_000_000 else repeats
            length = int(ours["samples"])
            pml = best_of(
                pml_repeats, lambda labels=labels, length=length: time_pml(labels, args.p, args.k, length)
            )
            rows.append(("PML MPerClass", pml))
        for name, r in rows:
            total = r["construct"] + r["epoch"]
            table.append((n, name, int(r["samples"]), r["construct"], r["build"], r["epoch"], total))
        if len(rows) == 2:
            pml = rows[1][1]
            ratio = {key: pml[key] / ours[key] for key in ("construct", "build", "epoch")}
            total_ratio = (pml["construct"] + pml["epoch"]) / (ours["construct"] + ours["epoch"])
            table.append(
                (n, "ratio PML/ours", "", ratio["construct"], ratio["build"], ratio["epoch"], total_ratio)
            )
    columns = ("labels", "sampler", "samples/epoch", "construct s", "build s", "epoch s", "total s")
    print_table(columns, table, title=title)
    if MPerClassSampler is None:
        print("pytorch-metric-learning is not installed: no reference timings")


if __name__ == "__main__":
    main()
