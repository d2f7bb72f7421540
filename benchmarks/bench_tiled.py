"""Peak memory and time of SupConLoss, dense against tiled, beside pytorch-metric-learning's.

Each case runs forward + backward once in a fresh subprocess (N/4 classes of 4, float32)
and reports the growth of peak memory — the process's resident memory (``VmHWM``, reset
just before the loss) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA — and the wall
time. The tiled path never holds the N×N similarity matrix (:mod:`embedkit.tiled`); the
dense path and PML do. ``floor`` is the least any SupCon can do: one N×N GEMM and a
row logsumexp of the normalised embeddings, forward and backward. Values are checked
equal between the two embedkit paths. A case whose N×N matrices would not fit in the
memory available (three float32 N×N matrices) is listed as not run instead of started.

    python benchmarks/bench_tiled.py [--quick] [--sizes 4096 16384 65536] [--dim 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.bench_tiled
    from _table import print_table
except ImportError:
    from benchmarks._table import print_table

MODES = ("floor", "dense", "tiled", "pml")


def _status(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024  # MiB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _available_mib(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free / 2**20
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def _one(n: int, mode: str, dim: int, device_name: str) -> dict[str, object]:
    import torch

    import embedkit as ek

    device = torch.device(device_name)
    torch.manual_seed(0)
    z = torch.randn(n, dim, device=device, requires_grad=True)
    labels = torch.arange(n, device=device) // 4
    if mode == "pml":
        from pytorch_metric_learning.losses import SupConLoss

        loss_fn = SupConLoss(temperature=0.1)
    elif mode == "floor":

        def loss_fn(x: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
            x = torch.nn.functional.normalize(x, dim=1)
            return torch.logsumexp(x @ x.T / 0.1, dim=1).mean()
    else:
        loss_fn = ek.SupConLoss(0.1, tiled=mode == "tiled")

    def run() -> torch.Tensor:
        loss = loss_fn(z, labels)
        loss.backward()
        return loss

    if device.type == "cuda":
        run()  # warm-up: kernels, allocator, cuBLAS workspace
        z.grad = None
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")  # reset VmHWM to the current resident size
        base = _status("VmRSS")
    start = time.perf_counter()
    loss = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _status("VmHWM")
    return {"n": n, "mode": mode, "peak_growth_mib": peak - base, "seconds": seconds, "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="N = 4096 only")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_one(int(args.child[0]), args.child[1], args.dim, args.device)))
        return
    sizes = args.sizes or ([4096] if args.quick else [4096, 16384])
    rows = []
    for n in sizes:
        losses = {}
        for mode in args.modes:
            # The dense paths hold a few N×N float32 matrices; do not start what cannot fit.
            needed = 3 * n * n * 4 / 2**20
            if mode != "tiled" and needed > 0.9 * _available_mib(args.device):
                rows.append((n, mode, f"not run (needs about {needed:,.0f} MiB)", "", ""))
                continue
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(n),
                    mode,
                    "--dim",
                    str(args.dim),
                    "--device",
                    args.device,
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                reason = (out.stderr.strip().splitlines() or ["killed"])[-1][:80]
                rows.append((n, mode, f"failed: {reason}", "", ""))
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            losses[mode] = row["loss"]
            rows.append(
                (n, mode, f"{row['peak_growth_mib']:,.0f} MiB", f"{row['seconds']:.3g} s", row["loss"])
            )
        if "dense" in losses and "tiled" in losses:
            if abs(losses["dense"] - losses["tiled"]) > 1e-4 * abs(losses["dense"]):
                raise AssertionError(f"tiled and dense SupCon differ at N={n}: {losses}")
    print_table(
        ("N", "path", "peak memory growth", "time", "loss"),
        rows,
        title=f"SupCon fwd+bwd, d={args.dim}, {args.device}",
    )


if __name__ == "__main__":
    main()
