"""Peak memory and time of SupConLoss, dense against tiled, beside pytorch-metric-learning's.

Each case runs forward + backward once in a fresh subprocess (d=128, N/4 classes of 4,
float32, CPU) and reports the growth of the process's peak resident memory (``VmHWM``,
reset just before the loss) and the wall time. The tiled path never holds the N×N
similarity matrix (:mod:`embedkit.tiled`); the dense path and PML do. Values are checked
equal between the two embedkit paths.

    python benchmarks/bench_tiled.py [--quick] [--sizes 4096 16384]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _status(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024  # MiB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _one(n: int, mode: str) -> dict[str, float]:
    import torch

    import embedkit as ek

    torch.manual_seed(0)
    z = torch.randn(n, 128, requires_grad=True)
    labels = torch.arange(n) // 4
    if mode == "pml":
        from pytorch_metric_learning.losses import SupConLoss

        loss_fn = SupConLoss(temperature=0.1)
    else:
        loss_fn = ek.SupConLoss(0.1, tiled=mode == "tiled")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
        refs.write("5")  # reset VmHWM to the current resident size
    base = _status("VmRSS")
    start = time.perf_counter()
    loss = loss_fn(z, labels)
    loss.backward()
    seconds = time.perf_counter() - start
    return {
        "n": n,
        "mode": mode,
        "peak_growth_mib": _status("VmHWM") - base,
        "seconds": seconds,
        "loss": float(loss.detach()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="N = 4096 only")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_one(int(args.child[0]), args.child[1])))
        return
    sizes = args.sizes or ([4096] if args.quick else [4096, 16384])
    print("| N | path | peak memory growth | time | loss |")
    print("|---|---|---|---|---|")
    for n in sizes:
        losses = {}
        for mode in ("dense", "tiled", "pml"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(n), mode],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            losses[mode] = row["loss"]
            print(
                f"| {n:,} | {mode} | {row['peak_growth_mib']:,.0f} MiB | {row['seconds']:.2f} s "
                f"| {row['loss']:.6f} |"
            )
        if abs(losses["dense"] - losses["tiled"]) > 1e-4 * abs(losses["dense"]):
            raise AssertionError(f"tiled and dense SupCon differ at N={n}: {losses}")


if __name__ == "__main__":
    main()
