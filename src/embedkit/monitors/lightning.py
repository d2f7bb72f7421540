"""A PyTorch Lightning callback that runs the monitors during training.

PyTorch Lightning is optional: importing this module never imports it. The callback
class :data:`MonitorCallback` is built on first access from ``lightning.pytorch`` (or
the older ``pytorch_lightning``) and raises an ``ImportError`` that says what to
install when neither is present. All of its logic lives in the framework-free
:class:`MonitorCallbackBase`, which can be driven by any loop that calls its hooks.

Usage::

    from embedkit.monitors.lightning import MonitorCallback

    class Model(L.LightningModule):
        def training_step(self, batch, batch_idx):
            images, labels = batch
            embeddings = self.backbone(images)
            loss = self.loss_fn(embeddings, labels)
            return {"loss": loss, "embeddings": embeddings, "labels": labels,
                    "logits": self.loss_fn.last_logits}  # kept by the forward: no second matmul

    trainer = L.Trainer(callbacks=[MonitorCallback(
        collapse=ClassCollapseMonitor(518), health=EmbeddingHealthMonitor(),
        losses=LossMonitor(), loss_fn=model.loss_fn)])
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from .._checks import check_int, describe
from ..losses.base import Loss
from .collapse import ClassCollapseMonitor
from .health import EmbeddingHealthMonitor
from .history import TrainingHistory
from .report import MonitorReport
from .signals import LossMonitor

__all__ = ["DiagnosisWarning", "MonitorCallbackBase"]


class DiagnosisWarning(UserWarning):
    """Issued by the callback for every diagnosis of severity ``"warning"`` or ``"error"``."""


class MonitorCallbackBase:
    """Feed the monitors from training-step outputs, report per epoch or every n steps.

    ``training_step`` returns a dict holding ``"loss"`` and any of ``"embeddings"``
    (with ``"labels"`` and optionally ``"paired_embeddings"``) for the health monitor
    and ``"logits"`` (with ``"labels"``) for the collapse monitor.

    Parameters
    ----------
    collapse : ClassCollapseMonitor, optional
    health : EmbeddingHealthMonitor, optional
    losses : LossMonitor, optional
        Fed with ``loss_fn`` when given (all its statistics), else with ``outputs["loss"]``.
    loss_fn : embedkit.losses.base.Loss, optional
        The embedkit loss whose ``last_value``/``last_stats`` to record.
    every_n_steps : int, optional
        Also report (and restart the collapse and health monitors) every n training
        batches; by default only at the end of each training epoch.
    history : TrainingHistory, optional
        Where the reported statistics are recorded (a new one by default), under
        ``"collapse/"``, ``"health/"`` and ``"loss/"``.
    log : bool
        Send the statistics to the LightningModule's loggers with ``log_dict``.
    warn : bool
        Issue a :class:`DiagnosisWarning` for every warning or error diagnosis (under
        DDP on the global-zero process only; the collapse and health reports already
        combine every process, see their ``sync_on_compute``).

    Attributes
    ----------
    reports : dict of str to MonitorReport
        The latest report of each monitor.
    """

    def __init__(
        self,
        *,
        collapse: ClassCollapseMonitor | None = None,
        health: EmbeddingHealthMonitor | None = None,
        losses: LossMonitor | None = None,
        loss_fn: Loss | None = None,
        every_n_steps: int | None = None,
        history: TrainingHistory | None = None,
        log: bool = True,
        warn: bool = True,
    ) -> None:
        for value, name, kind in (
            (collapse, "collapse", ClassCollapseMonitor),
            (health, "health", EmbeddingHealthMonitor),
            (losses, "losses", LossMonitor),
            (loss_fn, "loss_fn", Loss),
            (history, "history", TrainingHistory),
        ):
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__}; got {describe(value)}")
        if collapse is None and health is None and losses is None:
            raise ValueError("give at least one of collapse=, health=, losses= to monitor")
        self.collapse, self.health, self.losses, self.loss_fn = collapse, health, losses, loss_fn
        self.every_n_steps = (
            None if every_n_steps is None else check_int(every_n_steps, "every_n_steps", low=1)
        )
        self.history = history if history is not None else TrainingHistory()
        self.log, self.warn = bool(log), bool(warn)
        self.reports: dict[str, MonitorReport] = {}
        self._updated: set[str] = set()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Update the monitors from one training step's outputs."""
        step = int(trainer.global_step)
        out = outputs if isinstance(outputs, Mapping) else {"loss": outputs}
        labels = out.get("labels")
        if self.health is not None and out.get("embeddings") is not None:
            self.health.update(out["embeddings"], labels, out.get("paired_embeddings"))
            self._updated.add("health")
        if self.collapse is not None and out.get("logits") is not None:
            if labels is None:
                raise ValueError("outputs has 'logits' but no 'labels'; the collapse monitor needs both")
            self.collapse.update(out["logits"], labels)
            self._updated.add("collapse")
        if self.losses is not None:
            source = self.loss_fn if self.loss_fn is not None else out.get("loss")
            if source is not None:
                self.losses.update(step, source)
                self._updated.add("loss")
        if self.every_n_steps is not None and (batch_idx + 1) % self.every_n_steps == 0:
            self.report(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Report at the end of every training epoch."""
        self.report(trainer, pl_module)

    def report(self, trainer: Any, pl_module: Any) -> dict[str, MonitorReport]:
        """Compute every monitor that has data, record, log and warn; restart collapse and health.

        Returns
        -------
        dict of str to MonitorReport
            The reports computed now, keyed ``"collapse"``, ``"health"``, ``"loss"``.
        """
        step = int(trainer.global_step)
        monitors = {"collapse": self.collapse, "health": self.health, "loss": self.losses}
        reports = {name: monitors[name].compute() for name in monitors if name in self._updated}  # type: ignore[union-attr]
        for name, report in reports.items():
            self.history.record(step, report, prefix=f"{name}/")
            if self.log:
                values = {f"{name}/{key}": float(report[key]) for key in report}
                finite = {k: v for k, v in values.items() if v == v}  # NaN cannot be logged
                pl_module.log_dict(finite, sync_dist=_same_on_every_process(monitors[name]))
            if self.warn and getattr(trainer, "is_global_zero", True):
                for diagnosis in report.diagnoses:
                    if diagnosis.severity != "info":
                        warnings.warn(str(diagnosis), DiagnosisWarning, stacklevel=2)
        for monitor in (self.collapse, self.health):
            if monitor is not None:
                monitor.reset()
        self.reports.update(reports)
        self._updated = {"loss"} & self._updated  # the loss history carries over, the others restart
        return reports


def _same_on_every_process(monitor: object) -> bool:
    """Whether a report is identical on every DDP process, so Lightning may average it.

    Only then: Lightning reduces each logged key with its own collective, so processes
    whose reports differ (per-process loss statistics, a monitor with
    ``sync_on_compute=False`` or a subgroup) would log different keys and hang.
    """
    return (
        bool(getattr(monitor, "sync_on_compute", False)) and getattr(monitor, "process_group", None) is None
    )


def _lightning_callback() -> type:
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as error:
            raise ImportError(
                "embedkit.monitors.lightning.MonitorCallback needs PyTorch Lightning; install it with "
                "`pip install lightning` (or `pip install pytorch-lightning`), or call the hooks of "
                "MonitorCallbackBase from your own loop"
            ) from error
    return Callback


def __getattr__(name: str) -> Any:
    if name == "MonitorCallback":
        callback = type(
            "MonitorCallback",
            (MonitorCallbackBase, _lightning_callback()),
            {
                "__module__": __name__,
                "__doc__": "A Lightning ``Callback`` with the logic of MonitorCallbackBase.",
            },
        )
        globals()["MonitorCallback"] = callback
        return callback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
