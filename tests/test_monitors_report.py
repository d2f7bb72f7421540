"""Diagnosis, MonitorReport, the guide's anchors, ``embedkit doctor`` and the Lightning callback."""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from embedkit.evaluation.report import Rate
from embedkit.losses import TripletMarginLoss
from embedkit.monitors import (
    ClassCollapseMonitor,
    Diagnosis,
    EmbeddingHealthMonitor,
    LossMonitor,
    MonitorReport,
    TrainingHistory,
)
from embedkit.monitors.cli import add_doctor_parser, doctor_main
from embedkit.monitors.diagnosis import CODES, docs_link
from embedkit.monitors.lightning import DiagnosisWarning, MonitorCallbackBase

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "reading-the-diagnoses.rst"


# ----------------------------------------------------------------------------- diagnosis and report
def test_every_code_has_a_section_in_the_guide() -> None:
    labels = set(re.findall(r"^\.\. _([a-z-]+):$", GUIDE.read_text(encoding="utf-8"), flags=re.M))
    for code in CODES:
        anchor = docs_link(code).rsplit("#", 1)[1]
        assert anchor in labels, f"{code}: no '.. _{anchor}:' section in {GUIDE.name}"


def test_diagnosis_renders_and_validates() -> None:
    d = Diagnosis(
        "class_collapse",
        "error",
        "every prediction is class 223",
        {"dominant_class": 223, "share": 1.0},
        "soften",
    )
    assert d.docs.endswith("reading-the-diagnoses.html#class-collapse")
    assert json.loads(d.to_json())["evidence"] == {"dominant_class": 223, "share": 1.0}
    assert "**ERROR `class_collapse`**" in d.to_markdown()
    assert str(d).startswith("[error] class_collapse: every prediction is class 223")
    with pytest.raises(ValueError, match="severity must be one of"):
        Diagnosis("x", "fatal", "m")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="code must be a non-empty string"):
        Diagnosis("", "info", "m")
    with pytest.raises(TypeError, match="evidence must be a mapping"):
        Diagnosis("x", "info", "m", evidence=[1, 2])  # type: ignore[arg-type]


def test_report_orders_diagnoses_and_renders_everywhere() -> None:
    info = Diagnosis("at_chance", "info", "top-1 at chance")
    error = Diagnosis("class_collapse", "error", "one class")
    report = MonitorReport(
        "class collapse",
        {"top1_accuracy": Rate(45, 25729, chance=1 / 518), "prediction_entropy": float("nan")},
        counts={"samples": 25729},
        diagnoses=(info, error),
    )
    assert report.codes == ["class_collapse", "at_chance"]
    assert not report.ok
    assert report["top1_accuracy"] == pytest.approx(45 / 25729)
    assert report.diagnosis("at_chance") is info and report.diagnosis("paired_shortcut") is None
    data = json.loads(report.to_json())
    assert data["metrics"]["top1_accuracy"]["hits"] == 45
    assert data["metrics"]["prediction_entropy"] is None
    assert [d["code"] for d in data["diagnoses"]] == ["class_collapse", "at_chance"]
    assert "45/25729" in str(report) and "[error] class_collapse" in str(report)
    assert "#### Diagnoses" in report.to_markdown() and "`class_collapse`" in report.to_markdown()
    assert MonitorReport("empty", {}).ok
    assert "No problem found." in MonitorReport("empty", {}).to_markdown()


def test_history_records_reports_with_their_rates() -> None:
    monitor = ClassCollapseMonitor(4, topk=(1,))
    monitor.update(torch.eye(4) * 5, torch.arange(4))
    history = TrainingHistory()
    history.record(3, monitor.compute(), prefix="collapse/")
    assert history.latest("collapse/top1_accuracy") == Rate(4, 4, chance=0.25)


# ----------------------------------------------------------------------------- embedkit doctor
def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _healthy(rng: np.random.Generator, n: int = 400, classes: int = 20, dim: int = 32) -> tuple:
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim))
    embeddings = (centres[labels] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    return embeddings, labels, (embeddings @ centres.T).astype(np.float32)


def test_doctor_is_quiet_on_healthy_embeddings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    z, labels, logits = _healthy(np.random.default_rng(0))
    path = _save(tmp_path / "ok.npz", embeddings=z, labels=labels, logits=logits)
    assert doctor_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "class collapse" in out and "embedding health" in out and "diagnoses: none" in out


def test_doctor_names_collapse_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    z = np.ones((300, 16), dtype=np.float32)
    labels = rng.integers(0, 518, 300)
    logits = rng.normal(size=(300, 518)).astype(np.float32)
    logits[:, 223] += 10
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "labels.npy", labels)
    path = _save(tmp_path / "bad.npz", embeddings=z)
    argv = [str(path), "--logits", str(tmp_path / "logits.npy"), "--labels", str(tmp_path / "labels.npy")]
    assert doctor_main([*argv, "--format", "json"]) == 1
    reports = json.loads(capsys.readouterr().out)
    codes = {d["code"] for report in reports for d in report["diagnoses"]}
    assert {"class_collapse", "complete_collapse"} <= codes
    assert doctor_main([*argv, "--format", "markdown"]) == 1
    assert "`class_collapse`" in capsys.readouterr().out


def test_doctor_finds_the_paired_shortcut(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(size=(200, 32)).astype(np.float32)
    path = _save(tmp_path / "pairs.npz", embeddings=z, labels=np.arange(200) // 4, paired_embeddings=z)
    assert doctor_main([str(path)]) == 1
    assert "paired_shortcut" in capsys.readouterr().out


def test_doctor_rejects_bad_input_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor_main([str(tmp_path / "missing.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    path = _save(tmp_path / "floats.npz", embeddings=np.zeros((4, 3), np.float32), labels=np.zeros(4))
    assert doctor_main([str(path)]) == 2
    assert "labels must hold integers; got dtype float64" in capsys.readouterr().err
    path = _save(tmp_path / "nolabels.npz", embeddings=np.zeros((4, 3), np.float32), logits=np.zeros((4, 2)))
    assert doctor_main([str(path)]) == 2
    assert "--logits needs labels" in capsys.readouterr().err
    path = _save(tmp_path / "other.npz", features=np.zeros((4, 3), np.float32))
    assert doctor_main([str(path)]) == 2
    assert "has no array 'embeddings'" in capsys.readouterr().err


def test_doctor_parser_hooks_into_a_main_parser(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="embedkit")
    add_doctor_parser(parser.add_subparsers(dest="command"))
    z, labels, _ = _healthy(np.random.default_rng(3))
    path = _save(tmp_path / "ok.npz", embeddings=z, labels=labels)
    args = parser.parse_args(["doctor", str(path), "--format", "json"])
    assert args.command == "doctor" and args.func(args) == 0


# ----------------------------------------------------------------------------- Lightning callback
class _Module:
    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []

        self.synced: dict[str, bool] = {}

    def log_dict(self, values: dict[str, float], *, sync_dist: bool = False) -> None:
        self.logged.append(values)
        self.synced.update(dict.fromkeys(values, sync_dist))


def test_callback_logic_feeds_reports_logs_and_warns() -> None:
    loss_fn = TripletMarginLoss(0.2)
    callback = MonitorCallbackBase(
        collapse=ClassCollapseMonitor(518),
        health=EmbeddingHealthMonitor(),
        losses=LossMonitor(window=4),
        loss_fn=loss_fn,
    )
    trainer, module = SimpleNamespace(global_step=0), _Module()
    labels = torch.arange(64) % 16
    gen = torch.Generator().manual_seed(0)
    for batch_idx in range(4):
        trainer.global_step = batch_idx
        embeddings = torch.ones(64, 8) + 1e-5 * torch.randn(64, 8, generator=gen)  # collapsed
        loss = loss_fn(embeddings, labels)
        logits = torch.randn(64, 518, generator=gen)
        logits[:, 223] += 10
        outputs = {"loss": loss, "embeddings": embeddings, "labels": labels, "logits": logits}
        callback.on_train_batch_end(trainer, module, outputs, None, batch_idx)
    with pytest.warns(DiagnosisWarning) as warned:
        callback.on_train_epoch_end(trainer, module)
    messages = " ".join(str(w.message) for w in warned)
    for code in ("class_collapse", "complete_collapse", "loss_at_margin"):
        assert code in messages
    assert set(callback.reports) == {"collapse", "health", "loss"}
    logged = {key for values in module.logged for key in values}
    assert {"collapse/top1_accuracy", "health/effective_rank", "loss/loss"} <= logged
    # Combined across DDP processes already: logged as synced; loss statistics per process.
    assert module.synced["collapse/top1_accuracy"] and module.synced["health/effective_rank"]
    assert not module.synced["loss/loss"]
    # A monitor reporting on its own process only must not be averaged: its keys may differ
    # between processes, and Lightning's per-key collectives would hang.
    local = MonitorCallbackBase(health=EmbeddingHealthMonitor(sync_on_compute=False), warn=False)
    local_module = _Module()
    local.on_train_batch_end(trainer, local_module, {"embeddings": torch.randn(8, 4)}, None, 0)
    local.on_train_epoch_end(trainer, local_module)
    assert local_module.synced and not any(local_module.synced.values())
    assert callback.history.latest("health/mean_pairwise_cosine") == pytest.approx(1.0, abs=1e-6)
    # The collapse and health monitors restart each epoch; with no new batch nothing is recomputed for them.
    with pytest.warns(DiagnosisWarning, match="loss_at_margin"):
        assert set(callback.report(trainer, module)) == {"loss"}
    # Under DDP only the global-zero process warns (the reports are the same on every process).
    other_process = SimpleNamespace(global_step=5, is_global_zero=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagnosisWarning)
        assert set(callback.report(other_process, module)) == {"loss"}


def test_callback_every_n_steps_and_input_checks() -> None:
    callback = MonitorCallbackBase(health=EmbeddingHealthMonitor(), every_n_steps=2, log=False, warn=False)
    trainer, module = SimpleNamespace(global_step=0), _Module()
    for batch_idx in range(4):
        callback.on_train_batch_end(trainer, module, {"embeddings": torch.randn(16, 4)}, None, batch_idx)
    assert len(callback.history) == 1 and module.logged == []
    with pytest.raises(ValueError, match="at least one of"):
        MonitorCallbackBase()
    with pytest.raises(TypeError, match="health must be a EmbeddingHealthMonitor"):
        MonitorCallbackBase(health=ClassCollapseMonitor(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'logits' but no 'labels'"):
        MonitorCallbackBase(collapse=ClassCollapseMonitor(3)).on_train_batch_end(
            trainer, module, {"logits": torch.zeros(2, 3)}, None, 0
        )


@pytest.mark.skipif(
    importlib.util.find_spec("lightning") is not None
    or importlib.util.find_spec("pytorch_lightning") is not None,
    reason="Lightning is installed",
)
def test_monitor_callback_without_lightning_says_what_to_install() -> None:
    import embedkit.monitors.lightning as module

    with pytest.raises(ImportError, match="pip install lightning"):
        module.MonitorCallback  # noqa: B018


def test_monitor_callback_is_built_on_lightnings_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    import embedkit.monitors.lightning as module

    class Callback:  # stands in for lightning.pytorch.Callback
        pass

    fake = types.ModuleType("lightning.pytorch")
    fake.Callback = Callback  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lightning", types.ModuleType("lightning"))
    monkeypatch.setitem(sys.modules, "lightning.pytorch", fake)
    module.__dict__.pop("MonitorCallback", None)
    try:
        callback_class = module.MonitorCallback
    finally:
        module.__dict__.pop("MonitorCallback", None)  # do not leak the class built on the fake
    assert issubclass(callback_class, Callback) and issubclass(callback_class, MonitorCallbackBase)
    callback = callback_class(health=EmbeddingHealthMonitor(), log=False, warn=False)
    trainer = SimpleNamespace(global_step=0)
    callback.on_train_batch_end(trainer, _Module(), {"embeddings": torch.randn(8, 4)}, None, 0)
    callback.on_train_epoch_end(trainer, _Module())
    assert "health" in callback.reports


def test_counts_and_class_ids_print_as_integers_and_stay_ints_in_json() -> None:
    import json
    import re

    import torch

    import embedkit as ek

    monitor = ek.ClassCollapseMonitor(10)
    monitor.update(torch.randn(64, 10, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 10)
    report = monitor.compute()
    for text in (str(report), report.to_markdown()):
        assert re.search(r"num_predicted_classes\W+\d+\s", text), text
        assert re.search(r"dominant_class\W+\d+\s", text), text
        assert "num_predicted_classes      10.0000" not in text
    plain = json.loads(report.to_json())
    assert isinstance(plain["metrics"]["num_predicted_classes"], int)
    assert report["num_predicted_classes"] == 10.0  # the mapping still gives floats
    health = ek.EmbeddingHealthMonitor()
    health.update(torch.randn(32, 8), torch.arange(32) % 4)
    assert re.search(r"num_samples\s+32\n", str(health.compute()))


def test_doctor_warns_about_keys_it_does_not_read_and_takes_string_labels(tmp_path, capsys) -> None:
    import numpy as np

    from embedkit.monitors.cli import doctor_main

    gen = np.random.default_rng(0)
    centres = gen.normal(size=(10, 16))
    labels = np.arange(200) % 10
    z = (centres[labels] + 0.1 * gen.normal(size=(200, 16))).astype(np.float32)
    names = np.array([f"person_{c}" for c in labels])
    np.savez(tmp_path / "e.npz", embeddings=z, labels=names, paired=z)
    status = doctor_main([str(tmp_path / "e.npz"), "--format", "json"])
    captured = capsys.readouterr()
    assert "does not read: 'paired'" in captured.err and "'paired_embeddings'" in captured.err
    assert status == 0
    np.savez(tmp_path / "ints.npz", embeddings=z, labels=labels)
    doctor_main([str(tmp_path / "ints.npz"), "--format", "json"])
    # Names and their integer codes give the same report, and no warning without extra keys.
    by_ints = capsys.readouterr()
    assert by_ints.err == "" and by_ints.out == captured.out
    np.save(tmp_path / "logits.npy", gen.normal(size=(200, 10)).astype(np.float32))
    status = doctor_main([str(tmp_path / "e.npz"), "--logits", str(tmp_path / "logits.npy")])
    assert status == 2 and "--logits needs integer labels" in capsys.readouterr().err
