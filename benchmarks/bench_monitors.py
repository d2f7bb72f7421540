"""Monitor update time as a fraction of one loss forward+backward.

At batch 1,024 and d=512 (float32), each monitor's ``update`` is timed against one
forward+backward of ``ArcFaceLoss(1000, 512)`` and of ``SupConLoss(0.1)`` on P×K
batches (256 classes × 4). The measurements are interleaved (loss, monitors, loss,
...) so that a busy machine slows both alike and every update finds its inputs as
a training step leaves them (out of cache). The monitors count their batches a few
at a time (``FOLD_EVERY``, 8 for both at 1,000 classes), so some updates cost more
than others: each figure is the mean over a block of that many consecutive calls,
and the table shows the median
of those block means and the ratio update / loss (below 0.10 is the target on CPU).
``ClassCollapseMonitor`` reads ``ArcFaceLoss.last_logits``, the logits the loss's forward
pass computed anyway; computing them again with ``ArcFaceLoss.logits`` (one more matmul of
the head, the way monitors were fed before) is listed separately. The last row is the
whole monitored step — ArcFace forward+backward, then both monitors fed from it — whose
ratio to the bare step is the monitoring overhead (target: at most 1.10).

    python benchmarks/bench_monitors.py [--quick] [--batch-size 1024] [--dim 512] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

import embedkit as ek
from embedkit.monitors import ClassCollapseMonitor, EmbeddingHealthMonitor, LossMonitor
from embedkit.monitors import collapse as collapse_module
from embedkit.monitors import health as health_module

NUM_CLASSES = 1000
# A block holds whole fold periods of both monitors (the collapse monitor folds fewer
# batches at a time only above 131,072 classes).
BLOCK = math.lcm(collapse_module.FOLD_EVERY, health_module.FOLD_EVERY)


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 blocks of calls instead of 11")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    blocks = 3 if args.quick else 11
    torch.manual_seed(0)
    b, d = args.batch_size, args.dim

    base = torch.randn(b, d, device=device)
    class_labels = torch.randint(0, NUM_CLASSES, (b,), device=device)
    pk_labels = torch.arange(b // 4, device=device).repeat_interleave(4)[torch.randperm(b, device=device)]
    paired = base + 0.1 * torch.randn(b, d, device=device)
    arcface = ek.ArcFaceLoss(NUM_CLASSES, d).to(device)
    supcon = ek.SupConLoss(0.1)
    arcface(base, class_labels)
    logits = arcface.last_logits
    assert logits is not None

    def loss_step(loss: torch.nn.Module, labels: torch.Tensor) -> Callable[[], object]:
        def step() -> None:
            z = base.clone().requires_grad_(True)
            loss(z, labels).backward()

        return step

    collapse = ClassCollapseMonitor(NUM_CLASSES)
    health = EmbeddingHealthMonitor()
    health_paired = EmbeddingHealthMonitor()
    health_exact = EmbeddingHealthMonitor(covariance_rows=None)
    collapse_exact = ClassCollapseMonitor(NUM_CLASSES, softmax_rows=None)
    both = (ClassCollapseMonitor(NUM_CLASSES), EmbeddingHealthMonitor())
    loss_monitor = LossMonitor()
    counter = iter(range(10**9))

    def both_updates() -> None:
        both[0].update(logits, class_labels)
        both[1].update(base, pk_labels)

    monitored = (ClassCollapseMonitor(NUM_CLASSES), EmbeddingHealthMonitor())

    def monitored_step() -> None:
        z = base.clone().requires_grad_(True)
        arcface(z, class_labels).backward()
        monitored[0].update(arcface.last_logits, class_labels)
        monitored[1].update(z.detach(), pk_labels)

    cases: dict[str, Callable[[], object]] = {
        "ArcFaceLoss(1000, d) fwd+bwd": loss_step(arcface, class_labels),
        "SupConLoss(0.1) fwd+bwd": loss_step(supcon, pk_labels),
        "ArcFaceLoss.logits (no grad)": lambda: arcface.logits(base.detach()),
        "ClassCollapseMonitor.update": lambda: collapse.update(logits, class_labels),
        "  ... softmax_rows=None (exact)": lambda: collapse_exact.update(logits, class_labels),
        "EmbeddingHealthMonitor.update": lambda: health.update(base, pk_labels),
        "  ... with paired_embeddings": lambda: health_paired.update(base, pk_labels, paired),
        "  ... covariance_rows=None (exact)": lambda: health_exact.update(base, pk_labels),
        "LossMonitor.update (LossSum stats)": lambda: loss_monitor.update(next(counter), arcface),
        "collapse + health in one step": both_updates,
        "ArcFace step + both monitors": monitored_step,
    }
    timer = _timer(device)
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(blocks * BLOCK):
        for name, fn in cases.items():
            times[name].append(timer(fn))
    median = {
        name: statistics.median(statistics.fmean(values[i : i + BLOCK]) for i in range(0, len(values), BLOCK))
        for name, values in times.items()
    }
    arc, sup = median["ArcFaceLoss(1000, d) fwd+bwd"], median["SupConLoss(0.1) fwd+bwd"]

    print(f"batch {b}, d={d}, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {blocks} means of {BLOCK} calls")  # fmt: skip
    print(f"{'':38} {'ms':>8} {'/ ArcFace':>10} {'/ SupCon':>10}")
    for name, seconds in median.items():
        print(f"{name:38} {1e3 * seconds:8.2f} {seconds / arc:10.3f} {seconds / sup:10.3f}")
    overhead = median["ArcFace step + both monitors"] / arc
    print(f"monitored ArcFace step / bare step: {overhead:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
