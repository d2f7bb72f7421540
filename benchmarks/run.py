"""Every benchmark in one command, with the machine it ran on, as JSON and markdown.

Runs the loss, tiled-SupCon, evaluation (retrieval, verification), sampler, triplet and
monitor benchmarks one after another, each in its own process (so one benchmark's memory
does not inflate the next one's peak), side by side with the reference each of them
measures against (pytorch-metric-learning, faiss, scikit-learn). Each benchmark's output
is shown as it runs and saved; its markdown tables are parsed into the JSON.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--only losses monitors] [--out DIR]

Writes ``DIR/benchmarks.json`` and ``DIR/benchmarks.md`` (default ``out/benchmarks``).
With ``--device cuda`` the benchmarks that can run on a GPU do so (losses' tiled SupCon with
the floor of one N×N GEMM + logsumexp and peak GPU memory, monitors); without a CUDA device
the GPU rows are reported as not measured, never estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.run
    from _table import markdown_table, parse_tables
except ImportError:
    from benchmarks._table import markdown_table, parse_tables

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    takes_device: bool = False

    def command(self, quick: bool, device: str) -> list[str]:
        args = list(self.quick if quick else self.full)
        if self.takes_device:
            args += ["--device", device]
        return [sys.executable, str(HERE / self.script), *args]


BENCHMARKS = (
    Benchmark("losses", "bench_losses.py", ("--sizes", "256", "1024", "4096", "--memory"), ("--quick",)),
    Benchmark(
        "tiled", "bench_tiled.py", ("--sizes", "4096", "16384", "65536"), ("--quick",), takes_device=True
    ),
    Benchmark("evaluation", "bench_evaluation.py", (), ("--quick",)),
    Benchmark("samplers", "bench_samplers.py", (), ("--quick",)),
    Benchmark("triplets", "bench_triplets.py", (), ("--quick",)),
    Benchmark("monitors", "bench_monitors.py", (), ("--quick",), takes_device=True),
)


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def describe_machine(device: str) -> dict[str, Any]:
    """What the numbers depend on: hardware, threads, library versions, commit."""
    import torch

    meminfo = Path("/proc/meminfo")
    memory = None
    if meminfo.exists():
        total_kib = int(meminfo.read_text(encoding="ascii").split("MemTotal:")[1].split()[0])
        memory = f"{total_kib / 2**20:.1f} GiB"
    machine = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory": memory,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **{
            name: _package_version(name)
            for name in ("torch", "numpy", "scipy", "faiss-cpu", "pytorch-metric-learning", "scikit-learn")
        },
        "embedkit": _package_version("embedkit"),
    }
    return machine


def run_one(benchmark: Benchmark, quick: bool, device: str) -> dict[str, Any]:
    """Run one benchmark script, echoing its output, and return its record."""
    command = benchmark.command(quick, device)
    shown = " ".join(["python", *(os.path.relpath(c) if c.startswith(str(HERE)) else c for c in command[1:])])
    print(f"\n## {benchmark.name}: {shown}")
    start = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    returncode = process.wait()
    output = "".join(lines)
    return {
        "name": benchmark.name,
        "command": " ".join(
            [
                "python",
                *[
                    str(Path(c).relative_to(HERE.parent)) if c.startswith(str(HERE)) else c
                    for c in command[1:]
                ],
            ]
        ),
        "returncode": returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "tables": parse_tables(output),
        "output": output,
    }


def to_markdown(machine: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    """The whole run as one markdown page: the machine, then each benchmark's output."""
    parts = ["# embedkit benchmarks", ""]
    parts.append(markdown_table(("", ""), [(key, value) for key, value in machine.items()], title="Machine"))
    for record in records:
        status = "" if record["returncode"] == 0 else f" — FAILED (exit {record['returncode']})"
        parts += [
            "",
            f"## {record['name']}{status}",
            "",
            f"`{record['command']}` ({record['seconds']} s)",
            "",
        ]
        parts.append(record["output"].rstrip())
    if machine["gpu"] is None:
        parts += ["", "## GPU", "", "Not measured: no CUDA device on this machine."]
    return "\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="each benchmark's quick mode (a few minutes)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] for the benchmarks that take one")
    names = [b.name for b in BENCHMARKS]
    parser.add_argument(
        "--only", nargs="+", choices=names, default=names, metavar="NAME", help=", ".join(names)
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/benchmarks"), help="folder for the JSON and markdown"
    )
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: no CUDA device is available here")
    machine = describe_machine(args.device)
    print(markdown_table(("", ""), list(machine.items()), title="Machine"))
    records = [run_one(b, args.quick, args.device) for b in BENCHMARKS if b.name in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "quick": args.quick, "benchmarks": records}
    (args.out / "benchmarks.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / "benchmarks.md").write_text(to_markdown(machine, records), encoding="utf-8")
    failed = [r["name"] for r in records if r["returncode"] != 0]
    print(f"\nwrote {args.out / 'benchmarks.json'} and {args.out / 'benchmarks.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
