"""The ``embedkit`` command line: ``evaluate``, ``plot`` and ``doctor``.

``embedkit evaluate --gallery G.npz --probe P.npz [--out DIR]`` enrols the gallery, then
reports closed-set identification (rank-k, CMC), open-set identification (DIR@FPIR, when
some probes belong to identities that are not enrolled), probe-vs-gallery verification
(ROC, TAR@FAR, EER) and retrieval metrics (precision@1, R-precision, MAP@R, mAP). It prints
the tables, and with ``--out`` writes ``report.json``, ``report.md`` and figures (``cmc.png``,
``dir_fpir.png``, ``roc.png``, ``det.png``, ``scores.png``). Verification covers every probe ×
gallery pair exactly, in bounded memory (two passes over the scores, see
:func:`embedkit.evaluation.verification.all_pairs_verification`).

``report.json`` is strict JSON (no ``NaN``/``Infinity`` tokens: NaN is ``null``, ``±inf`` the
strings ``"Infinity"``/``"-Infinity"``) and holds each report's curves (ROC, CMC, DIR–FPIR,
score histograms), so ``embedkit plot report.json --out DIR`` redraws the figures from it.

Inputs are ``.npz`` files holding ``embeddings`` (n, d) and ``labels`` (n,) arrays, and
optionally ``image_ids`` (n,) — or ``.npy`` files of embeddings with the labels in a
second ``.npy`` (``--gallery-labels``, ``--probe-labels``).

``embedkit doctor EMBEDDINGS.npz [--logits LOGITS.npy]`` runs the monitors on saved
embeddings (and classifier logits) and prints every diagnosis; see
:mod:`embedkit.monitors.cli`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .evaluation._inputs import read_npy, read_npz
from .evaluation.gallery import Gallery
from .evaluation.report import Report, load_reports
from .evaluation.retrieval import retrieval_metrics
from .monitors.cli import add_doctor_parser, run_doctor
from .similarity import METRICS

__all__ = ["load_embeddings", "main"]


def load_embeddings(path: str | Path, labels_path: str | Path | None = None) -> dict[str, np.ndarray]:
    """Read embeddings, labels and optional image ids from ``.npz`` or ``.npy`` files.

    Parameters
    ----------
    path : str or Path
        A ``.npz`` with arrays ``embeddings`` and ``labels`` (and optionally ``image_ids``),
        or a ``.npy`` of embeddings.
    labels_path : str or Path, optional
        A ``.npy`` of labels; required with a ``.npy`` of embeddings, and overrides the
        ``labels`` of a ``.npz``.

    Returns
    -------
    dict of str to ndarray
        ``"embeddings"`` (n, d), ``"labels"`` (n,) and, when present, ``"image_ids"`` (n,).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    if path.suffix == ".npz":
        arrays = read_npz(path)
        if "embeddings" not in arrays:
            raise ValueError(f"{path} has arrays {sorted(arrays)}; expected one named 'embeddings'")
    elif path.suffix == ".npy":
        arrays = {"embeddings": read_npy(path, "embeddings")}
    else:
        raise ValueError(f"{path} should be a .npz or .npy file; got suffix {path.suffix!r}")
    if labels_path is not None:
        arrays["labels"] = read_npy(labels_path, "labels")
    if "labels" not in arrays:
        raise ValueError(
            f"no labels for {path}: store an array named 'labels' in the .npz, or pass a labels .npy"
        )
    return {key: arrays[key] for key in ("embeddings", "labels", "image_ids") if key in arrays}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedkit", description="embedkit command-line tools")
    parser.add_argument("--version", action="version", version=f"embedkit {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate = commands.add_parser(
        "evaluate",
        help="gallery-probe evaluation of embeddings",
        description="Identify and verify probe embeddings against an enrolled gallery.",
    )
    evaluate.add_argument("--gallery", required=True, help=".npz (embeddings, labels[, image_ids]) or .npy")
    evaluate.add_argument("--probe", required=True, help=".npz (embeddings, labels[, image_ids]) or .npy")
    evaluate.add_argument("--gallery-labels", help=".npy of gallery labels (for a .npy gallery)")
    evaluate.add_argument("--probe-labels", help=".npy of probe labels (for a .npy probe set)")
    evaluate.add_argument("--out", help="folder for report.json, report.md and figures")
    evaluate.add_argument("--metric", default="cosine", choices=METRICS)
    evaluate.add_argument("--template", default="none", choices=("none", "mean"))
    evaluate.add_argument("--ranks", type=int, nargs="+", default=[1, 5, 10], metavar="K")
    evaluate.add_argument("--fpir", type=float, nargs="+", default=[0.001, 0.01, 0.1], metavar="F")
    evaluate.add_argument("--far", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2], metavar="F")
    evaluate.add_argument("--no-verification", action="store_true", help="skip probe-vs-gallery verification")
    evaluate.add_argument("--no-retrieval", action="store_true", help="skip retrieval metrics")
    evaluate.add_argument(
        "--map", action="store_true", help="also compute full-ranking mAP (an extra pass over all pairs)"
    )
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.add_argument("--no-figures", action="store_true", help="write no figures")
    plot = commands.add_parser(
        "plot",
        help="redraw the figures of a report.json",
        description="Redraw the figures of an `embedkit evaluate` report.json from the curves it holds.",
    )
    plot.add_argument("report", help="report.json written by `embedkit evaluate --out`")
    plot.add_argument("--out", required=True, help="folder for the figures")
    add_doctor_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (141 when stdout's reader went away).

    ``embedkit doctor --format json ... | head`` closes the pipe early: that ends the
    command quietly, without a ``BrokenPipeError`` traceback.
    """
    try:
        status = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the flush at interpreter exit
        return status
    except BrokenPipeError:
        # Point stdout at devnull so the flush at exit cannot raise again (Python docs' recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("embedkit")
    except PackageNotFoundError:  # a source tree without an install
        return "0+unknown"


def _main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    0 on success, 2 on bad input; ``doctor`` returns 1 when an error-level diagnosis
    fires.
    """
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        return run_doctor(args)  # handles its own errors: 0 ok, 1 error diagnosis, 2 bad input
    try:
        return _plot(args) if args.command == "plot" else _evaluate(args)
    except BrokenPipeError:
        raise  # an OSError, but not bad input: main() ends quietly with 141
    except (ValueError, TypeError, OSError) as error:
        print(f"embedkit {args.command}: error: {error}", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace) -> int:
    gallery_data = load_embeddings(args.gallery, args.gallery_labels)
    probe_data = load_embeddings(args.probe, args.probe_labels)
    progress = not args.no_progress
    start = time.perf_counter()
    gallery = Gallery(metric=args.metric).enrol(
        gallery_data["embeddings"],
        gallery_data["labels"],
        template=args.template,
        image_ids=gallery_data.get("image_ids"),
    )
    reports = gallery.evaluate(
        probe_data["embeddings"],
        probe_data["labels"],
        ranks=args.ranks,
        fpir_targets=args.fpir,
        far_targets=args.far,
        image_ids=probe_data.get("image_ids"),
        verification=not args.no_verification,
        progress=progress,
    )
    if not args.no_retrieval:
        reports["retrieval"] = retrieval_metrics(
            probe_data["embeddings"],
            probe_data["labels"],
            gallery_data["embeddings"],
            gallery_data["labels"],
            ks=args.ranks,
            metric=args.metric,
            compute_map=args.map,
            progress=progress,
        )
    elapsed = time.perf_counter() - start
    for report in reports.values():
        print(report)
        print()
    print(
        f"evaluated {len(probe_data['labels'])} probes against {gallery.num_entries} gallery entries "
        f"in {elapsed:.1f} s"
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = {name: report.to_dict(curves=_json_curves(report)) for name, report in reports.items()}
        summary["run"] = {
            "gallery": str(args.gallery),
            "probe": str(args.probe),
            "metric": args.metric,
            "template": args.template,
            "seconds": elapsed,
        }
        # Strict JSON: to_plain already wrote NaN as null and inf as "Infinity"; allow_nan=False
        # makes any value that slipped through an error here rather than in a user's parser.
        text = json.dumps(summary, indent=2, allow_nan=False)
        (out / "report.json").write_text(text + "\n", encoding="utf-8")
        (out / "report.md").write_text("\n".join(r.to_markdown() for r in reports.values()), encoding="utf-8")
        written = [] if args.no_figures else _figures(reports, out)
        print(f"wrote {out / 'report.json'}, {out / 'report.md'}" + "".join(f", {p}" for p in written))
    return 0


def _json_curves(report: Report) -> list[str]:
    """The curves written to report.json: all but the raw per-pair scores (the histograms stay)."""
    return [name for name in report.curves if name != "genuine_scores"]


def _plot(args: argparse.Namespace) -> int:
    reports = load_reports(args.report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = _figures(reports, out)
    print(
        "wrote " + ", ".join(str(p) for p in written)
        if written
        else "no figure could be drawn from the report"
    )
    return 0


def _figures(reports: dict[str, Report], out: Path) -> list[Path]:
    """Save CMC, DIR–FPIR, ROC, DET and score-histogram figures; skip them without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from . import plotting
    except ImportError:
        print("figures skipped: matplotlib is not installed (pip install 'embedkit[plot]')", file=sys.stderr)
        return []

    drawers: list[tuple[str, str, Callable[[Report, Any], Any]]] = [
        ("cmc.png", "identification", plotting.plot_cmc),
        ("dir_fpir.png", "open_set", plotting.plot_dir_fpir),
        ("roc.png", "verification", plotting.plot_roc),
        ("det.png", "verification", plotting.plot_det),
        ("scores.png", "verification", plotting.plot_score_distributions),
    ]
    written = []
    for file_name, report_name, draw in drawers:
        if report_name not in reports:
            continue
        figure, ax = plt.subplots(figsize=(5, 4))
        try:
            draw(reports[report_name], ax)
            figure.tight_layout()
            figure.savefig(out / file_name, dpi=120)
        except (ValueError, KeyError) as error:  # a figure the data cannot support never costs the report
            print(f"figure {file_name} skipped: {error}", file=sys.stderr)
            continue
        finally:
            plt.close(figure)
        written.append(out / file_name)
    return written
