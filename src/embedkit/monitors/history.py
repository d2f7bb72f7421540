"""A history of scalar statistics over steps or epochs, with CSV and TensorBoard export.

:class:`TrainingHistory` records one row of named values per step: loss values and
loss statistics, monitor reports, accuracies. Tensor values are kept as they are
(detached) and only read back to the host in a batch — when the history is read, or
once 1,024 values are pending — so recording every step costs no device-to-host sync
per step.
"""

from __future__ import annotations

import csv
import math
import numbers
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._checks import check_int, describe
from ..evaluation.report import Rate

__all__ = ["TrainingHistory"]

# Pending tensor values are read back to the host (one sync) once this many accumulate.
_FLUSH_EVERY = 1024

Value = float | Rate | Tensor


class TrainingHistory:
    """Named scalar values per step, in the order they were recorded.

    Examples
    --------
    >>> history = TrainingHistory()
    >>> history.record(0, {"loss": 2.3, "top1": Rate(3, 100, chance=0.01)})
    >>> history.record(1, {"loss": 2.1})
    >>> history.series("loss")
    (array([0, 1]), array([2.3, 2.1]))
    """

    def __init__(self) -> None:
        self._steps: list[int] = []
        self._rows: list[dict[str, Value]] = []
        self._keys: dict[str, None] = {}
        self._pending = 0

    # -------------------------------------------------------------------------- recording
    def record(self, step: int, values: Mapping[str, Any], *, prefix: str = "") -> None:
        """Add ``values`` to the row of ``step``.

        Parameters
        ----------
        step : int
            Training step or epoch; not smaller than the last recorded step. Values
            recorded twice for the same step are merged into one row.
        values : mapping of str to float, int, Rate or 0-d Tensor
            E.g. ``loss.last_stats``, a :class:`~embedkit.monitors.report.MonitorReport`
            (its statistics are recorded, Rates kept with their counts) or metrics.
        prefix : str
            Prepended to every key (e.g. ``"health/"``).
        """
        step = check_int(step, "step", low=0)
        if not isinstance(values, Mapping):
            raise TypeError(f"values must be a mapping of name to number; got {describe(values)}")
        if self._steps and step < self._steps[-1]:
            raise ValueError(
                f"step {step} is before the last recorded step {self._steps[-1]}; steps must not decrease"
            )
        if not self._steps or step != self._steps[-1]:
            self._steps.append(step)
            self._rows.append({})
        row = self._rows[-1]
        metrics = getattr(values, "metrics", values)  # a Report's Rates, not their float views
        for key, value in metrics.items():
            name = f"{prefix}{key}"
            row[name] = _as_value(value, name)
            self._keys.setdefault(name, None)
            if isinstance(row[name], Tensor):
                self._pending += 1
        if self._pending >= _FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        """Read every pending tensor value back to the host, in one transfer per device."""
        if not self._pending:
            return
        places = [(row, key) for row in self._rows for key, v in row.items() if isinstance(v, Tensor)]
        by_device: dict[torch.device, list[tuple[dict[str, Value], str]]] = {}
        for row, key in places:
            by_device.setdefault(row[key].device, []).append((row, key))  # type: ignore[union-attr]
        for entries in by_device.values():
            stacked = torch.stack([row[key].to(torch.float64) for row, key in entries])  # type: ignore[union-attr]
            for (row, key), value in zip(entries, stacked.cpu().tolist(), strict=True):
                row[key] = float(value)
        self._pending = 0

    def reset(self) -> None:
        """Forget everything recorded."""
        self._steps, self._rows, self._keys, self._pending = [], [], {}, 0

    # -------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        return len(self._steps)

    @property
    def steps(self) -> list[int]:
        """The recorded steps, in order."""
        return list(self._steps)

    @property
    def keys(self) -> list[str]:
        """Every recorded name, in order of first appearance."""
        return list(self._keys)

    def rows(self) -> Iterator[tuple[int, dict[str, float | Rate]]]:
        """``(step, {name: value})`` for every step; Rates stay Rates."""
        self._flush()
        for step, row in zip(self._steps, self._rows, strict=True):
            yield step, dict(row)  # type: ignore[arg-type]

    def series(self, key: str, *, last: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The steps at which ``key`` was recorded and its values there.

        Parameters
        ----------
        key : str
            A recorded name.
        last : int, optional
            Only the last ``last`` recordings of ``key``.

        Returns
        -------
        steps : ndarray of shape (n,) and dtype int64
        values : ndarray of shape (n,) and dtype float64
            Rates as their values (``hits / total``).
        """
        if key not in self._keys:
            known = ", ".join(repr(k) for k in self._keys) or "nothing yet"
            raise KeyError(f"{key!r} was never recorded; the history has {known}")
        self._flush()
        pairs = [(s, float(row[key])) for s, row in zip(self._steps, self._rows, strict=True) if key in row]
        if last is not None:
            pairs = pairs[-check_int(last, "last", low=1) :]
        steps = np.array([s for s, _ in pairs], dtype=np.int64)
        return steps, np.array([v for _, v in pairs], dtype=np.float64)

    def latest(self, key: str) -> float | Rate | None:
        """The most recent value of ``key`` (a Rate stays a Rate), or ``None``."""
        self._flush()
        for row in reversed(self._rows):
            if key in row:
                return row[key]  # type: ignore[return-value]
        return None

    # -------------------------------------------------------------------------- export
    def to_csv(self, path: str | Path) -> Path:
        """Write one row per step: ``step``, then every name (empty where not recorded).

        A Rate adds the columns ``<name>.hits`` and ``<name>.total`` next to its value.

        Parameters
        ----------
        path : str or Path
            The file to write (overwritten).

        Returns
        -------
        Path
            ``path``.
        """
        self._flush()
        rate_keys = {k for row in self._rows for k, v in row.items() if isinstance(v, Rate)}
        columns = ["step"]
        for key in self._keys:
            columns += [key, f"{key}.hits", f"{key}.total"] if key in rate_keys else [key]
        path = Path(path)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for step, row in zip(self._steps, self._rows, strict=True):
                line: list[Any] = [step]
                for key in self._keys:
                    value = row.get(key)
                    line.append("" if value is None else repr(float(value)))
                    if key in rate_keys:
                        line += [value.hits, value.total] if isinstance(value, Rate) else ["", ""]
                writer.writerow(line)
        return path

    def log_to_tensorboard(self, writer: Any, step: int | None = None, *, prefix: str = "") -> int:
        """Send the values of one step to a TensorBoard ``SummaryWriter``.

        Parameters
        ----------
        writer : object with ``add_scalar(tag, value, global_step)``
            ``torch.utils.tensorboard.SummaryWriter`` or anything with that method;
            TensorBoard itself is not needed by embedkit.
        step : int, optional
            The step to log (default: the last recorded one).
        prefix : str
            Prepended to every tag.

        Returns
        -------
        int
            The number of scalars written (NaN values are skipped).
        """
        if not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(
                f"writer must have an add_scalar(tag, value, global_step) method, like "
                f"torch.utils.tensorboard.SummaryWriter; got {describe(writer)}"
            )
        if not self._steps:
            raise ValueError("the history is empty; record() something before logging it")
        self._flush()
        if step is None:
            index = len(self._steps) - 1
        else:
            step = check_int(step, "step", low=0)
            if step not in self._steps:
                raise ValueError(f"step {step} was never recorded; recorded steps run {self._steps[0]}..")
            index = self._steps.index(step)
        written = 0
        for key, value in self._rows[index].items():
            number = float(value)
            if not math.isnan(number):
                writer.add_scalar(f"{prefix}{key}", number, self._steps[index])
                written += 1
        return written


def _as_value(value: Any, name: str) -> Value:
    if isinstance(value, Rate):
        return value
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar; got a tensor of shape {tuple(value.shape)}")
        return value.detach().reshape(())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be a number, a Rate or a 0-d tensor; got {describe(value)}")
