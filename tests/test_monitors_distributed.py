"""Monitors under torch.distributed: two real gloo processes, each fed half the batches.

With ``sync_on_compute`` (the default) every process must report what one process fed
every batch reports; with ``sync_on_compute=False`` each reports on its own half.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from embedkit.monitors import ClassCollapseMonitor, EmbeddingHealthMonitor, _distributed
from test_distributed_losses import run_two_processes

ROWS, BATCH, CLASSES, DIM = 600, 30, 50, 16


def _data() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(4)
    labels = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    logits = torch.randn(ROWS, CLASSES, generator=gen)
    logits[torch.arange(ROWS), labels] += 2.0  # better than chance, not perfect
    logits[:100, 3] += 8.0  # and one class absorbing a stretch of batches
    centres = torch.randn(CLASSES, DIM, generator=gen)
    embeddings = centres[labels] + 0.5 * torch.randn(ROWS, DIM, generator=gen)
    embeddings[7] = float("nan")
    paired = embeddings + 0.1 * torch.randn(ROWS, DIM, generator=gen)
    return logits, labels, embeddings, paired


def _monitors(sync: bool = True) -> tuple[ClassCollapseMonitor, EmbeddingHealthMonitor]:
    # sample_size = ROWS: each process keeps all of its rows, so the pair statistics
    # rest on the same rows as in one process.
    return (
        ClassCollapseMonitor(CLASSES, softmax_rows=None, sync_on_compute=sync),
        EmbeddingHealthMonitor(sample_size=ROWS, covariance_rows=None, sync_on_compute=sync),
    )


def _feed(monitors: tuple[ClassCollapseMonitor, EmbeddingHealthMonitor], batches: range) -> None:
    logits, labels, embeddings, paired = _data()
    collapse, health = monitors
    for i in batches:
        rows = slice(i * BATCH, (i + 1) * BATCH)
        collapse.update(logits[rows], labels[rows])
        health.update(embeddings[rows], labels[rows], paired[rows])


def _reports(monitors: tuple[ClassCollapseMonitor, EmbeddingHealthMonitor]) -> list[dict]:
    return [monitor.compute().to_dict() for monitor in monitors]


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    # A forked child must not enter the parent's OpenMP thread pool (it can hang there).
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        combined, local = _monitors(), _monitors(sync=False)
        shard = range(rank, ROWS // BATCH, world_size)  # 10 batches each: through a fold
        _feed(combined, shard)
        _feed(local, shard)
        first = _reports(combined)
        _feed(combined, range(0))  # nothing new: combining again must not count twice
        out = {"combined": first, "again": _reports(combined), "local": _reports(local)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out, default=str))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="forks two gloo processes")
def test_two_processes_report_what_one_process_reports(tmp_path: Path) -> None:
    run_two_processes(_worker, tmp_path, timeout=120.0)
    single = _monitors()
    _feed(single, range(ROWS // BATCH))
    expected = _reports(single)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for reports in (got["combined"], got["again"]):
            for report, want in zip(reports, expected, strict=True):
                assert report["counts"] == want["counts"]
                assert [d["code"] for d in report["diagnoses"]] == [d["code"] for d in want["diagnoses"]]
                assert report["metrics"].keys() == want["metrics"].keys()
                for key, value in want["metrics"].items():
                    if isinstance(value, dict):  # a Rate: hits and totals are exact
                        assert report["metrics"][key] == value, key
                    else:
                        assert report["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
        local_collapse, local_health = got["local"]
        assert local_collapse["counts"]["samples"] == ROWS // 2
        assert local_health["counts"]["samples"] == ROWS // 2 - (rank == 0)  # row 7 is NaN, on rank 0
    assert expected[0]["counts"]["samples"] == ROWS
    assert "class_collapse" not in [d["code"] for d in expected[0]["diagnoses"]]


def _mismatched_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        health = EmbeddingHealthMonitor()
        z = torch.randn(20, DIM)
        health.update(z, torch.arange(20) % 4, z if rank == 0 else None)  # paired data on rank 0 only
        try:
            health.compute()
            message = "no error"
        except ValueError as error:
            message = str(error)
        Path(out_dir, f"error{rank}.txt").write_text(message)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="forks two gloo processes")
def test_processes_fed_differently_get_an_error_not_a_hang(tmp_path: Path) -> None:
    run_two_processes(_mismatched_worker, tmp_path, timeout=120.0)
    for rank in range(2):
        message = (tmp_path / f"error{rank}.txt").read_text()
        assert "the processes were fed differently" in message
        assert "process 0: embedding_dim=16, labels=1, paired_embeddings=1" in message
        assert "process 1: embedding_dim=16, labels=1, paired_embeddings=0" in message


def _uneven_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        health = EmbeddingHealthMonitor(sample_size=64)
        rows = 3 if rank == 0 else 100
        health.update(torch.randn(rows, DIM), torch.arange(rows) % 5)
        Path(out_dir, f"sample{rank}.txt").write_text(str(health.compute().counts["sample_rows"]))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="forks two gloo processes")
def test_a_process_with_few_rows_leaves_its_share_of_the_pair_sample_to_the_others(tmp_path: Path) -> None:
    run_two_processes(_uneven_worker, tmp_path, timeout=120.0)
    assert [(tmp_path / f"sample{rank}.txt").read_text() for rank in range(2)] == ["64", "64"]  # 3 + 61


def _disjoint_classes_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        # Each process sees its own 25 classes (as a sharded P x K sampler may): the
        # dimensional_collapse reference counts the 50 classes of both.
        labels = torch.arange(25).repeat_interleave(4) + 25 * rank
        combined, local = EmbeddingHealthMonitor(), EmbeddingHealthMonitor(sync_on_compute=False)
        for monitor in (combined, local):
            monitor.update(torch.randn(100, DIM), labels)
        counts = [monitor.compute().counts["label_classes"] for monitor in (combined, local)]
        Path(out_dir, f"classes{rank}.json").write_text(json.dumps(counts))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="forks two gloo processes")
def test_classes_seen_by_either_process_are_counted_once(tmp_path: Path) -> None:
    run_two_processes(_disjoint_classes_worker, tmp_path, timeout=120.0)
    for rank in range(2):
        assert json.loads((tmp_path / f"classes{rank}.json").read_text()) == [50, 25]


def test_shares_of_the_pair_sample() -> None:
    assert _distributed.fair_shares([3, 100], 64) == [3, 61]
    assert _distributed.fair_shares([50, 50, 50], 64) == [22, 21, 21]
    assert _distributed.fair_shares([100, 2, 7], 64) == [55, 2, 7]
    assert _distributed.fair_shares([0, 0], 64) == [0, 0]


def test_collectives_are_issued_in_an_order_every_process_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every process must issue the same collectives in the same order. Ordering by a set of
    # dtypes broke that (hashes differ between processes): one process summed its int64
    # counts while the other summed float64, and gloo aborted (found under Lightning DDP).
    issued: list[torch.dtype] = []
    monkeypatch.setattr(_distributed.dist, "all_reduce", lambda t, **kwargs: issued.append(t.dtype))
    parts = [torch.zeros(2, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), torch.zeros(1)]
    _distributed.sum_across(parts)
    assert issued == [torch.float64, torch.int64, torch.float32]
    issued.clear()
    _distributed.sum_across(parts[::-1])
    assert issued == [torch.float32, torch.int64, torch.float64]
