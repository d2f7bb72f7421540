"""Offline semi-hard triplet construction against a plain torch masking, in one run.

``build_triplets(negatives="semi_hard")`` mines one negative per (anchor, positive)
pair from the full (anchors × samples) distance matrix, in row blocks. The reference
is the same rule written as a plain torch masking over each block (label comparison,
band and fallback masks over every entry; the implementation before issue 17). Both
use the same random keys, so they return the same triplets, which is checked.

For ``n`` samples of 64-d Gaussian embeddings with ``n // 4`` classes (about
``0.75 n`` pairs), each row is the best of ``--repeats`` runs. Run
``python benchmarks/bench_triplets.py`` (about a minute on 2 cores) or ``--quick``
(n = 5,000 only).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import embedkit.samplers.triplets as triplets_module
from embedkit.samplers import build_triplets

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.bench_triplets
    from _table import print_table
except ImportError:
    from benchmarks._table import print_table
from embedkit.similarity import pairwise_distance


def masked_reference(
    embeddings: torch.Tensor,
    class_index: np.ndarray,
    anchors: np.ndarray,
    positives: np.ndarray,
    margin: float,
    metric: str,
    seed: int,
) -> tuple[np.ndarray, int]:
    """The semi-hard rule as a plain torch masking over blocks of the distance matrix."""
    n = embeddings.shape[0]
    labels = torch.from_numpy(class_index)
    generator = torch.Generator().manual_seed(seed)
    block = max(1, triplets_module._BLOCK_ELEMENTS // n)
    chosen = np.empty(anchors.size, dtype=np.int64)
    num_semi_hard = 0
    for begin in range(0, anchors.size, block):
        a = torch.from_numpy(anchors[begin : begin + block])
        pos = torch.from_numpy(positives[begin : begin + block])
        distance = pairwise_distance(embeddings[a], embeddings, metric=metric)  # type: ignore[arg-type]
        d_ap = distance.gather(1, pos[:, None])
        negative = labels[None, :] != labels[a][:, None]
        farther = negative & (distance > d_ap)
        band = farther & (distance < d_ap + margin)
        keys = torch.rand(distance.shape, generator=generator, dtype=distance.dtype)
        in_band = band.any(dim=1)
        pick = torch.where(band, keys, torch.full_like(keys, -1.0)).argmax(dim=1)
        inf = torch.full_like(distance, float("inf"))
        nearest_farther = torch.where(farther, distance, inf).argmin(dim=1)
        farthest = torch.where(negative, distance, -inf).argmax(dim=1)
        fallback = torch.where(farther.any(dim=1), nearest_farther, farthest)
        chosen[begin : begin + a.shape[0]] = torch.where(in_band, pick, fallback).numpy()
        num_semi_hard += int(in_band.sum())
    return chosen, num_semi_hard


def best_of(repeats: int, run: object) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 5,000 only")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = (5_000,) if args.quick else (5_000, 20_000)
    rows = []
    for n in sizes:
        rng = np.random.default_rng(0)
        labels = rng.integers(0, n // 4, n)
        embeddings = torch.from_numpy(rng.standard_normal((n, 64)).astype(np.float32))

        def fast(labels: np.ndarray = labels, embeddings: torch.Tensor = embeddings) -> object:
            return build_triplets(labels, negatives="semi_hard", embeddings=embeddings, seed=0)

        fast_time, result = best_of(args.repeats, fast)
        original = triplets_module._semi_hard
        triplets_module._semi_hard = masked_reference
        try:
            slow_time, reference = best_of(max(1, args.repeats - 2), fast)
        finally:
            triplets_module._semi_hard = original
        same = np.array_equal(result.indices, reference.indices)  # type: ignore[attr-defined]
        count = result.num_triplets  # type: ignore[attr-defined]
        rows.append((n, count, fast_time, slow_time, slow_time / fast_time, same))
    print_table(
        ("n", "triplets", "embedkit s", "masking s", "speed-up", "same triplets"),
        rows,
        title=f"semi-hard build_triplets, d=64, torch {torch.__version__}, {torch.get_num_threads()} threads",
    )


if __name__ == "__main__":
    main()
