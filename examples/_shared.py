"""What the bundled reproductions share: their flags, device choice, progress bars and outputs.

Every reproduction takes the same flags (``--data-dir``, ``--quick``, ``--device``,
``--out``, ``--seed``), shows tqdm progress bars when tqdm is installed, and writes
``report.json``, ``report.md`` and PNG figures into ``--out`` — the figures only when
matplotlib is installed (``pip install embedkit[examples]``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import embedkit as ek
from embedkit.evaluation.report import to_plain


def parser(description: str, *, data_dir_help: str | None = None) -> argparse.ArgumentParser:
    """An argument parser with the flags every reproduction takes.

    ``data_dir_help`` replaces the ``--data-dir`` help, e.g. for an example that cannot read
    a real folder and says so.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=data_dir_help
        or "a real image folder laid out as root/<identity>/<image> (default: built-in synthetic data)",
    )
    p.add_argument("--quick", action="store_true", help="a small configuration that runs in minutes on a CPU")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", type=Path, default=None, help="output folder (default: out/<example>[-quick])")
    p.add_argument("--seed", type=int, default=0)
    return p


def resolve_device(choice: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; asking for CUDA without it is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda was asked for, but torch.cuda.is_available() is False on this machine"
        )
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def command_line() -> str:
    """The command that started this process, to write beside every number it made."""
    return shlex.join(["python", *sys.argv])


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass


@contextmanager
def progress(total: int, description: str, enabled: bool = True) -> Iterator[Any]:
    """A tqdm bar (``update``, ``set_postfix_str``), or a silent stand-in without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        yield _Silent()
        return
    with tqdm(total=total, desc=description, leave=False, dynamic_ncols=True) as bar:
        yield bar


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (it reads as plain text on a terminal too)."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any], markdown: str) -> None:
    """``report.json`` and ``report.md`` in ``out``.

    report.json is strict JSON (:func:`~embedkit.evaluation.report.to_plain`): NaN is written
    as null, infinities as the strings "Infinity" and "-Infinity".
    """
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_plain(report), indent=2, allow_nan=False)
    (out / "report.json").write_text(text + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown, encoding="utf-8")


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figures (pip install embedkit[examples])", file=sys.stderr)
        return None
    return plt


def save(fig: Any, path: Path) -> str:
    """Save a figure, close it and return its file name (for report.md links)."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


@dataclass
class Monitors:
    """The monitors of one training, read every ``window`` optimizer steps.

    ``EmbeddingHealthMonitor`` and ``LossMonitor`` always; ``ClassCollapseMonitor`` too when
    ``num_classes`` is given (a classifier head). Steps count the optimizer steps done: a
    diagnosis "first fired at step 60" was raised when the monitors were read after the 60th
    step, from the window of steps 41–60.
    """

    window: int
    num_classes: int | None = None
    history: ek.TrainingHistory = field(default_factory=ek.TrainingHistory)
    first_fired: dict[str, dict[str, Any]] = field(default_factory=dict)
    windows_fired: dict[str, int] = field(default_factory=dict)
    fired_at: list[tuple[int, list[str]]] = field(default_factory=list)
    windows: int = 0
    last_read: int = 0

    def __post_init__(self) -> None:
        self.health = ek.EmbeddingHealthMonitor()
        self.collapse = None if self.num_classes is None else ek.ClassCollapseMonitor(self.num_classes)
        self.losses = ek.LossMonitor(window=self.window)

    def update(
        self,
        step: int,
        loss_fn: ek.Loss,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        *,
        paired: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
    ) -> None:
        """Feed the batch of optimizer step ``step`` (1-based); read the monitors every ``window`` steps.

        ``embeddings`` (b, d), ``labels`` (b,), ``paired`` (b, d) the paired view of each row,
        ``logits`` (b, num_classes) of the head the loss used.
        """
        self.health.update(embeddings, labels, paired_embeddings=paired)
        metrics = None
        if self.collapse is not None and logits is not None:
            self.collapse.update(logits, labels)
            hits = int((logits.argmax(dim=1) == labels).sum())  # for loss_falling_at_chance
            metrics = {"batch_top1": ek.Rate(hits, len(labels), 1 / self.collapse.num_classes)}
        self.losses.update(step, loss_fn, metrics)
        if step % self.window == 0:
            self.read(step)

    def finish(self, step: int) -> None:
        """Read the last, partial window when it holds at least half a window of steps."""
        if step - self.last_read >= max(1, self.window // 2):
            self.read(step)

    def read(self, step: int) -> None:
        """Compute every monitor, record its statistics and new diagnoses, reset the windowed ones."""
        self.windows += 1
        reports = [("health", self.health.compute()), ("loss", self.losses.compute())]
        if self.collapse is not None:
            reports.append(("collapse", self.collapse.compute()))
            self.collapse.reset()
        self.health.reset()
        fired: list[str] = []
        for monitor, report in reports:
            self.history.record(step, report, prefix=f"{monitor}/")
            for diagnosis in report.diagnoses:
                if diagnosis.code not in fired:
                    fired.append(diagnosis.code)
                self.first_fired.setdefault(
                    diagnosis.code,
                    {
                        "monitor": monitor,
                        "severity": diagnosis.severity,
                        "step": step,
                        "window": [self.last_read + 1, step],
                        "message": diagnosis.message,
                        "evidence": dict(diagnosis.evidence),
                        "suggestion": diagnosis.suggestion,
                    },
                )
        for code in fired:
            self.windows_fired[code] = self.windows_fired.get(code, 0) + 1
        self.fired_at.append((step, fired))
        self.last_read = step

    def fired_between(self, first: int, last: int) -> list[str]:
        """Codes raised by the readings after steps ``first``..``last``, in order, each once."""
        codes: list[str] = []
        for step, fired in self.fired_at:
            if first <= step <= last:
                codes += [c for c in fired if c not in codes]
        return codes

    def diagnoses(self) -> list[dict[str, Any]]:
        """Each code that fired: where it first fired, and in how many of the windows."""
        return [
            {"code": code, **info, "windows_fired": self.windows_fired[code], "windows": self.windows}
            for code, info in sorted(self.first_fired.items(), key=lambda item: item[1]["step"])
        ]
