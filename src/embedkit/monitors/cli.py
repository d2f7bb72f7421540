"""``embedkit doctor``: run the monitors on saved embeddings and logits, print the diagnoses.

Usage::

    embedkit doctor EMBEDDINGS.npz [--labels LABELS.npy] [--paired PAIRED.npy]
                    [--logits LOGITS.npy] [--num-classes C] [--topk 1 5]
                    [--format text|markdown|json] [--sample-size N] [--seed S]

``EMBEDDINGS.npz`` holds the array ``embeddings`` (n, d) and optionally ``labels``
(n,), ``paired_embeddings`` (n, d) and ``logits`` (n, C); a plain ``.npy`` file is
the embeddings alone. The options override or add arrays from ``.npy`` files.

Every statistic is exact over every row (norms, spread, the covariance and its effective
rank, the prediction counts) except the pair statistics (AUC, d′, alignment, uniformity,
same/different-identity similarity), which come from ``--sample-size`` rows (default
2,048) drawn at random with ``--seed``: they cost O(rows² · d).

Exit status: 0 when no diagnosis of severity ``"error"`` fired, 1 when one did, 2 on
bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..labels import encode_labels
from .collapse import ClassCollapseMonitor
from .health import EmbeddingHealthMonitor
from .report import MonitorReport

__all__ = ["add_doctor_parser", "collect_reports", "doctor_main", "run_doctor"]

_DESCRIPTION = "Run embedkit's monitors on saved embeddings (and logits) and print what is wrong."
# Rows per update(): bounds the working memory of the monitors on large files.
_CHUNK = 8192
#: The arrays the doctor reads from an .npz; any other key draws a warning.
NPZ_KEYS = {
    "embeddings": "(n, d) float, required",
    "labels": "(n,) identities of any type (integers, strings)",
    "paired_embeddings": "(n, d) float, the paired view of each row (e.g. its HR image)",
    "logits": "(n, C) float classifier logits (needs integer labels in [0, C))",
}
_EPILOG = "Arrays read from an .npz: " + "; ".join(f"'{k}' {v}" for k, v in NPZ_KEYS.items()) + "."


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "embeddings",
        type=Path,
        help="an .npz with 'embeddings' [+ 'labels', 'paired_embeddings', 'logits'] or an .npy",
    )
    parser.add_argument("--labels", type=Path, help="an .npy of labels (n,), integers or strings")
    parser.add_argument(
        "--paired", type=Path, help="an .npy of paired embeddings (n, d), e.g. the HR image of each probe"
    )
    parser.add_argument("--logits", type=Path, help="an .npy of classifier logits (n, C)")
    parser.add_argument("--num-classes", type=int, help="number of classes (default: the logits' columns)")
    parser.add_argument(
        "--topk", type=int, nargs="+", default=[1, 5], help="k of the top-k accuracies (default 1 5)"
    )
    parser.add_argument(
        "--format", choices=("text", "markdown", "json"), default="text", help="output format"
    )
    parser.add_argument(
        "--sample-size", type=int, default=2048, help="rows kept for pair statistics (default 2048)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the row order that picks the sample (default 0)"
    )
    return parser


def add_doctor_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``doctor`` on the ``embedkit`` command's sub-parsers.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        From ``parser.add_subparsers()``.

    Returns
    -------
    argparse.ArgumentParser
        The ``doctor`` parser; its default ``func`` is :func:`run_doctor`.
    """
    parser = subparsers.add_parser("doctor", help=_DESCRIPTION, description=_DESCRIPTION, epilog=_EPILOG)
    _configure(parser)
    parser.set_defaults(func=run_doctor)
    return parser


def doctor_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``embedkit doctor`` (``argv`` without the program and command names).

    Returns
    -------
    int
        The exit status: 0 without error diagnoses, 1 with one, 2 on bad input.
    """
    parser = _configure(
        argparse.ArgumentParser(prog="embedkit doctor", description=_DESCRIPTION, epilog=_EPILOG)
    )
    return run_doctor(parser.parse_args(argv))


def _load(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ValueError(f"{what}: no such file {str(path)!r}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises several kinds for unreadable files
        raise ValueError(f"{what}: cannot read {str(path)!r} as .npy/.npz ({error})") from error
    if isinstance(loaded, np.ndarray):
        return {"": loaded}
    with loaded:
        return {key: loaded[key] for key in loaded.files}


def _array(path: Path | None, what: str) -> np.ndarray | None:
    if path is None:
        return None
    arrays = _load(path, what)
    if len(arrays) != 1:
        raise ValueError(f"{what}: expected one array in {str(path)!r}; found {sorted(arrays)}")
    return next(iter(arrays.values()))


def _float_matrix(array: np.ndarray, what: str, rows: int | None) -> torch.Tensor:
    if array.ndim != 2 or array.dtype.kind not in "fiu":
        raise ValueError(
            f"{what} must be a 2-D numeric array; got shape {array.shape} and dtype {array.dtype}"
        )
    if rows is not None and array.shape[0] != rows:
        raise ValueError(
            f"{what} has {array.shape[0]} rows but the embeddings have {rows}; expected one per row"
        )
    return torch.from_numpy(
        np.ascontiguousarray(array, dtype=np.float64 if array.dtype == np.float64 else np.float32)
    )


def collect_reports(args: argparse.Namespace) -> list[MonitorReport]:
    """Load the arrays named by ``args`` and compute the collapse and health reports."""
    arrays = _load(args.embeddings, "EMBEDDINGS")
    embeddings = arrays.get("embeddings", arrays.get(""))
    if embeddings is None:
        raise ValueError(
            f"EMBEDDINGS: {str(args.embeddings)!r} has no array 'embeddings'; found {sorted(arrays)}"
        )
    unread = sorted(set(arrays) - set(NPZ_KEYS) - {""})
    if unread:
        # A silently ignored key hides a check the user meant to run (e.g. 'paired').
        print(
            f"embedkit doctor: warning: {str(args.embeddings)!r} holds arrays the doctor does not read: "
            f"{', '.join(repr(k) for k in unread)}; it reads {', '.join(repr(k) for k in NPZ_KEYS)} "
            "(rename an array to use it)",
            file=sys.stderr,
        )
    z = _float_matrix(embeddings, "embeddings", None)
    n = z.shape[0]
    labels = _array(args.labels, "--labels")
    labels = arrays.get("labels") if labels is None else labels
    paired = _array(args.paired, "--paired")
    paired = arrays.get("paired_embeddings") if paired is None else paired
    logits = _array(args.logits, "--logits")
    logits = arrays.get("logits") if logits is None else logits
    names = None
    if labels is not None:
        codes, names = encode_labels(labels, "labels")
        if codes.shape[0] != n:
            raise ValueError(f"labels has {codes.shape[0]} entries but the embeddings have {n} rows")
    y = None if labels is None else torch.from_numpy(codes)
    p = None if paired is None else _float_matrix(paired, "paired embeddings", n)

    # Exact statistics do not depend on the row order; the pair statistics use the last
    # rows fed, so a seeded permutation makes them a uniform random sample.
    order = torch.from_numpy(np.random.default_rng(args.seed).permutation(n))
    # Offline, every row enters the covariance (covariance_rows=None): the per-step
    # monitor's default of 64 rows per update would read 64 of every _CHUNK rows here and
    # report 5,000 isotropic 256-d rows as effective rank 61 instead of 254. Only the pair
    # statistics are sampled (the last --sample-size rows of a seeded permutation).
    health = EmbeddingHealthMonitor(sample_size=args.sample_size, covariance_rows=None)
    for start in range(0, n, _CHUNK):
        rows = order[start : start + _CHUNK]
        health.update(z[rows], None if y is None else y[rows], None if p is None else p[rows])
    reports = []
    if logits is not None:
        if y is None:
            raise ValueError("--logits needs labels (in the .npz or with --labels)")
        if names is None or names.dtype.kind not in "iu":
            raise ValueError(
                "--logits needs integer labels (the logits' column of each row's class); got labels of "
                f"dtype {np.asarray(labels).dtype}"
            )
        y = torch.from_numpy(names[codes])  # the integer classes themselves, not their codes
        scores = _float_matrix(logits, "logits", n)
        num_classes = args.num_classes if args.num_classes is not None else scores.shape[1]
        collapse = ClassCollapseMonitor(num_classes, topk=args.topk)
        for start in range(0, n, _CHUNK):
            collapse.update(scores[start : start + _CHUNK], y[start : start + _CHUNK])
        reports.append(collapse.compute())
    reports.append(health.compute())
    return reports


def run_doctor(args: argparse.Namespace) -> int:
    """Run ``embedkit doctor`` on parsed arguments and print the reports.

    Returns
    -------
    int
        The exit status: 0 without error diagnoses, 1 with one, 2 on bad input.
    """
    try:
        reports = collect_reports(args)
    except (ValueError, TypeError) as error:
        print(f"embedkit doctor: error: {error}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps([report.to_dict() for report in reports], indent=2))
    elif args.format == "markdown":
        print("\n".join(report.to_markdown() for report in reports))
    else:
        print("\n\n".join(str(report) for report in reports))
    return 1 if any(d.severity == "error" for report in reports for d in report.diagnoses) else 0
