"""Loss forward+backward time (and optionally peak memory) against pytorch-metric-learning.

Both libraries run in the same process on the same PK batches (P classes × 4
samples, d=128, float32, CPU) with equal hyper-parameters, their repetitions
interleaved (embedkit, PML, embedkit, ...) so that a busy machine slows both alike;
the table reports the median of each and the ratio PML / embedkit (above 1 =
embedkit faster). ``--memory`` re-runs each case in a fresh subprocess and reports its peak
resident memory growth, which shows the N×N×N and pairs×N tensors PML builds.

How memory is measured (Linux, glibc): in the fresh subprocess each library first makes
one warm-up forward+backward on the same batch, as every step of a training loop after
the first does. The first call of a process pays one-time costs of torch itself, the
same for both libraries whatever the loss: the first matmul (MKL's buffers, about
4.7 MiB), the first backward (the autograd engine, about 2.4 MiB) and each kernel's code
paged in — about 12 MiB in all, more than the loss's own tensors at N=256. After the
warm-up, freed memory is handed back to the system (``malloc_trim``) and the peak is
reset to the current resident size (``/proc/self/clear_refs``), so the measured call
faults in every page it uses: the figure is its own peak above what was resident before
it. The subprocess pins glibc's mmap threshold at its default 128 KiB
(``MALLOC_MMAP_THRESHOLD_``): otherwise glibc raises it after the first large free,
later tensors come from the heap, and the reading depends on fragmentation (PML's
ArcFace at N=4,096 read 115-166 MiB in identical runs); pinned, every tensor of 128 KiB
or more is its own mapping, returned when freed, and the figure is the peak of live
tensors (repeat runs agree within 0.2 MiB). ``--cold`` measures the first call instead,
one-time costs included.

    python benchmarks/bench_losses.py [--quick] [--memory [--cold]] [--sizes 256 1024] [--losses Triplet]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import embedkit as ek

NUM_CLASSES = 1000
DIM = 128
SLOW_SECONDS = 5.0
# Above this many float32 entries in one PML intermediate (about 4 GiB) the case is not run.
PML_ENTRY_LIMIT = 2**30


def _ntxent_entries(size: int) -> int:
    """Entries of PML's NT-Xent positive-pairs × negative-pairs matrix for a PK batch, K=4."""
    positives = size * 3
    negatives = size * (size - 4)
    return positives * negatives


def _cases() -> dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], object] | None]]:
    """name -> (embedkit factory, PML factory returning a callable(emb, labels))."""
    from pytorch_metric_learning import losses as L
    from pytorch_metric_learning import miners as M
    from pytorch_metric_learning.reducers import MeanReducer

    def pml_with_miner(loss: object, miner: object) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return lambda x, y: loss(x, y, miner(x, y))  # type: ignore[operator]

    def classifier_pair(ours: type, theirs: type, **kw: float) -> tuple[Callable, Callable]:
        def make_ours() -> torch.nn.Module:
            return ours(NUM_CLASSES, DIM)

        def make_theirs() -> object:
            return theirs(num_classes=NUM_CLASSES, embedding_size=DIM, **kw)

        return make_ours, make_theirs

    return {
        "ContrastiveLoss": (ek.ContrastiveLoss, L.ContrastiveLoss),
        "TripletMarginLoss batch_all": (
            lambda: ek.TripletMarginLoss(0.2),
            lambda: L.TripletMarginLoss(0.2),
        ),
        "TripletMarginLoss all": (
            lambda: ek.TripletMarginLoss(0.2, mining="all"),
            lambda: L.TripletMarginLoss(0.2, reducer=MeanReducer()),
        ),
        "TripletMarginLoss all soft": (
            lambda: ek.TripletMarginLoss(0.2, mining="all", soft_margin=True),
            lambda: L.TripletMarginLoss(0.2, smooth_loss=True, reducer=MeanReducer()),
        ),
        "TripletMarginLoss batch_all soft": (
            lambda: ek.TripletMarginLoss(0.2, soft_margin=True),
            lambda: L.TripletMarginLoss(0.2, smooth_loss=True),
        ),
        "TripletMarginLoss batch_hard": (
            lambda: ek.TripletMarginLoss(0.2, mining="batch_hard"),
            lambda: pml_with_miner(L.TripletMarginLoss(0.2, reducer=MeanReducer()), M.BatchHardMiner()),
        ),
        "TripletMarginLoss semi_hard": (
            lambda: ek.TripletMarginLoss(0.2, mining="semi_hard"),
            None,  # PML's TripletMarginMiner("semihard") keeps every semi-hard triplet: not the same rule
        ),
        "SupConLoss": (ek.SupConLoss, L.SupConLoss),
        "NTXentLoss": (ek.NTXentLoss, L.NTXentLoss),
        "MultiSimilarityLoss (mined)": (
            ek.MultiSimilarityLoss,
            lambda: pml_with_miner(L.MultiSimilarityLoss(), M.MultiSimilarityMiner(0.1)),
        ),
        "CircleLoss": (ek.CircleLoss, L.CircleLoss),
        # PML's temperature divides unit cosines (W and embeddings both L2-normalised per
        # call), so its temperature=0.05 is our default scale=20 with temperature=1. The
        # weight inits differ (PML normal std 1 on W (d, C), ours std 0.01 on (C, d)) but
        # only the directions of the centres enter either loss.
        "NormalizedSoftmaxLoss": classifier_pair(
            ek.NormalizedSoftmaxLoss, L.NormalizedSoftmaxLoss, temperature=0.05
        ),
        "ArcFaceLoss": classifier_pair(ek.ArcFaceLoss, L.ArcFaceLoss, margin=math.degrees(0.5)),
        "CosFaceLoss": classifier_pair(ek.CosFaceLoss, L.CosFaceLoss),
        "SubCenterArcFaceLoss": classifier_pair(
            ek.SubCenterArcFaceLoss, L.SubCenterArcFaceLoss, margin=math.degrees(0.5)
        ),
        "ProxyAnchorLoss": classifier_pair(ek.ProxyAnchorLoss, L.ProxyAnchorLoss),
    }


def _batch(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randperm(NUM_CLASSES, generator=generator)[: size // 4].repeat_interleave(4)
    return torch.randn(len(labels), DIM, generator=generator), labels


def _step(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> float:
    emb = x.clone().requires_grad_()
    start = time.perf_counter()
    loss(emb, y).backward()
    return time.perf_counter() - start


def _times(
    losses: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], size: int, repeats: int
) -> list[float]:
    """Median forward+backward time of each loss, their repetitions interleaved."""
    x, y = _batch(size)
    warm = [_step(loss, x, y) for loss in losses]  # the first call warms up
    # One call is measurement enough for a very slow case (PML's NT-Xent at 1024 takes minutes).
    live = [i for i, t in enumerate(warm) if t <= SLOW_SECONDS]
    samples: list[list[float]] = [[t] for t in warm]
    for i in live:
        samples[i] = []
    for _ in range(repeats if live else 0):
        for i in live:
            samples[i].append(_step(losses[i], x, y))
    return [statistics.median(s) for s in samples]


def _peak_growth_mib(name: str, library: str, size: int, *, cold: bool = False) -> float:
    """Peak resident memory growth of one forward+backward, in a fresh interpreter.

    After one warm-up call unless ``cold`` (see the module docstring). Read from ``VmHWM``
    (the high-water mark of this process's own memory map), not ``ru_maxrss``, which a
    child inherits from its parent's peak across ``exec``.
    """
    code = (
        "import benchmarks.bench_losses as b\n"
        f"ours, theirs = b._cases()[{name!r}]\n"
        f"loss = (ours if {library!r} == 'embedkit' else theirs)()\n"
        f"x, y = b._batch({size})\n"
        f"if not {cold!r}:\n"
        "    loss(x.clone().requires_grad_(), y).backward()\n"
        "    b._release_and_reset_peak()\n"
        "before = b._high_water_kib()\n"
        "loss(x.requires_grad_(), y).backward()\n"
        "print((b._high_water_kib() - before) / 1024)\n"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def _release_and_reset_peak() -> None:
    """Give freed heap memory back to the system and reset ``VmHWM`` to the current RSS (Linux).

    Without the first, the measured call would reuse pages the warm-up left in the
    allocator and read low; without the second, it would read 0 below the warm-up's peak.
    """
    gc.collect()
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _high_water_kib() -> int:
    """This process's peak resident memory so far, in KiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="batch 256 only, 3 repetitions")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (slow)")
    parser.add_argument(
        "--cold", action="store_true", help="with --memory: measure the first call (one-time costs included)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument(
        "--losses", nargs="+", default=None, help="only the cases whose name contains one of these"
    )
    parser.add_argument(
        "--exclude", nargs="+", default=(), help="skip the cases whose name contains one of these"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per case")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([256] if args.quick else [256, 1024])
    repeats = args.repeats or (3 if args.quick else 7)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d={DIM}, PK batches with K=4")
    header = f"{'loss':30s} {'batch':>5s} {'embedkit ms':>12s} {'PML ms':>10s} {'PML/ek':>7s}"
    if args.memory:
        header += f" {'ek MiB':>8s} {'PML MiB':>8s}"
    print(header)
    for name, (ours, theirs) in _cases().items():
        if args.losses and not any(part in name for part in args.losses):
            continue
        if any(part in name for part in args.exclude):
            continue
        for size in sizes:
            skip = None
            if theirs is None:
                skip = "no PML equivalent"
            elif name == "NTXentLoss" and _ntxent_entries(size) > PML_ENTRY_LIMIT:
                # PML's NT-Xent builds a (positive pairs × negative pairs) tensor.
                skip = f"PML skipped: it would allocate {4 * _ntxent_entries(size) / 2**30:.0f} GiB"
            if skip is not None:
                (ek_time,) = _times([ours()], size, repeats)
                row = f"{name:30s} {size:5d} {1e3 * ek_time:12.2f}   {skip}"
                if args.memory:
                    row += f" {_peak_growth_mib(name, 'embedkit', size, cold=args.cold):8.1f}"
                print(row, flush=True)
                continue
            ek_time, pml_time = _times([ours(), theirs()], size, repeats)  # type: ignore[list-item]
            row = (
                f"{name:30s} {size:5d} {1e3 * ek_time:12.2f} {1e3 * pml_time:10.2f} {pml_time / ek_time:7.2f}"
            )
            if args.memory:
                row += f" {_peak_growth_mib(name, 'embedkit', size, cold=args.cold):8.1f}"
                row += f" {_peak_growth_mib(name, 'pml', size, cold=args.cold):8.1f}"
            print(row, flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
