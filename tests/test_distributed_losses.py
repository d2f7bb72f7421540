"""GatheredLoss under torch.distributed: two real gloo processes against one process.

Each process holds a slice of one batch (even and uneven slices). The gathered loss must
have the value of the loss of the whole batch on one process, and each process's rows
must receive ``world_size`` times their single-process gradient (DDP then averages over
the processes); a model wrapped in DDP must end up with the single-process gradient.

``run_two_processes`` is shared by the other ``test_distributed_*`` files.
"""

from __future__ import annotations

import importlib
import multiprocessing
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from embedkit.distributed import GatheredLoss, all_gather_with_grad, class_shard, merge_topk
from embedkit.losses import (
    ArcFaceLoss,
    CircleLoss,
    ContrastiveLoss,
    Loss,
    MultiSimilarityLoss,
    NTXentLoss,
    SupConLoss,
    TripletMarginLoss,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="forks two gloo processes")

WORLD = 2
DIM = 8
# Rows of each process: even, uneven, and one process without rows.
SPLITS = {"even": (6, 6), "uneven": (8, 3), "empty": (9, 0)}


def run_two_processes(
    worker: Callable[..., None], tmp_path: Path, *args: object, timeout: float = 90.0
) -> None:
    """Run ``worker(rank, 2, init_file, out_dir, *args)`` in two processes.

    A process that raises makes ``join`` raise at once (the other is terminated); a
    process stuck in a collective makes the test fail after ``timeout`` seconds instead
    of hanging. The processes come from a fork server that imported torch and embedkit
    once: forking the test process itself, whose earlier tests left threads and locks
    behind, hung now and then in a full run.
    """
    multiprocessing.set_forkserver_preload(["torch", "embedkit"])  # read when the server starts
    context = torch.multiprocessing.start_processes(
        worker,
        args=(WORLD, str(tmp_path / "init"), str(tmp_path), *args),
        nprocs=WORLD,
        join=False,
        start_method="forkserver",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=0.5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two processes did not finish within {timeout:.0f} s (a collective mismatch?)")


def init_gloo(rank: int, world_size: int, init_file: str) -> None:
    """Join the test's gloo group (one CPU thread: a forked child must not share the parent's pool)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )


def _losses() -> dict[str, Loss]:
    return {
        "supcon": SupConLoss(temperature=0.2),
        "supcon_tiled": SupConLoss(temperature=0.2, tiled=True),
        "ntxent": NTXentLoss(temperature=0.3),
        "contrastive": ContrastiveLoss(pos_margin=0.1, neg_margin=0.9),
        "triplet_batch_all": TripletMarginLoss(margin=0.3),
        "triplet_batch_hard": TripletMarginLoss(margin=0.3, mining="batch_hard"),
        "triplet_semi_hard": TripletMarginLoss(margin=0.3, mining="semi_hard"),
        "multi_similarity": MultiSimilarityLoss(),
        "multi_similarity_unmined": MultiSimilarityLoss(mining=False),
        "circle": CircleLoss(m=0.25, gamma=32.0),
        "sum": SupConLoss(0.2) + 0.5 * TripletMarginLoss(0.3),  # one gather for both terms
    }


def _batch(total: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (total,), generator=gen)
    centres = torch.randn(4, DIM, generator=gen, dtype=torch.float64)
    embeddings = centres[labels] + 1.5 * torch.randn(total, DIM, generator=gen, dtype=torch.float64)
    return embeddings, labels


def _rows(split: tuple[int, ...], rank: int) -> slice:
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def _loss_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, world_size, init_file)
    try:
        out: dict[str, object] = {}
        for split_name, split in SPLITS.items():
            embeddings, labels = _batch(sum(split))
            rows = _rows(split, rank)
            for name, loss in _losses().items():
                x = embeddings[rows].clone().requires_grad_(True)
                gathered = GatheredLoss(loss)
                value = gathered(x, labels[rows])
                value.backward()
                out[f"{split_name}/{name}"] = (
                    value.detach(),
                    x.grad,
                    gathered.local_rows,
                    gathered.last_stats,
                )
            # References gathered too: every process's queries against every process's references.
            refs, ref_labels = _batch(2 * sum(split), seed=1)
            ref_rows = _rows(tuple(2 * n for n in split), rank)
            x = embeddings[rows].clone().requires_grad_(True)
            r = refs[ref_rows].clone().requires_grad_(True)
            value = GatheredLoss(SupConLoss(0.2))(
                x, labels[rows], ref_embeddings=r, ref_labels=ref_labels[ref_rows]
            )
            value.backward()
            out[f"{split_name}/supcon_ref"] = (value.detach(), x.grad, r.grad)
        # A classifier loss with replicated centres and per-row values: the whole gathered batch's rows.
        embeddings, labels = _batch(sum(SPLITS["uneven"]))
        rows = _rows(SPLITS["uneven"], rank)
        torch.manual_seed(1)
        arcface = ArcFaceLoss(4, DIM, scale=16.0, reduction="none").double()
        x = embeddings[rows].clone().requires_grad_(True)
        gathered = GatheredLoss(arcface)
        per_row = gathered(x, labels[rows])
        per_row.mean().backward()
        out["arcface_none"] = (per_row.detach(), x.grad, arcface.weight.grad, gathered.reduction)
        # DDP: a linear model, uneven batches, parameter gradients after DDP's averaging.
        torch.manual_seed(0)
        model = nn.Linear(5, DIM).double()
        ddp = nn.parallel.DistributedDataParallel(model)
        gen = torch.Generator().manual_seed(3)
        inputs = torch.randn(11, 5, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 3, (11,), generator=gen)
        rows = _rows(SPLITS["uneven"], rank)
        loss = GatheredLoss(SupConLoss(0.2)) + 0.5 * GatheredLoss(TripletMarginLoss(0.3))
        value = loss(ddp(inputs[rows]), labels[rows])
        value.backward()
        out["ddp"] = (value.detach(), [p.grad.clone() for p in model.parameters()])
        # Processes called differently: the same error on both, no hang.
        try:
            GatheredLoss(SupConLoss())(torch.randn(4, DIM + rank), torch.tensor([0, 0, 1, 1]))
        except ValueError as error:
            out["mismatch"] = str(error)
        # The plain gather, through a sum that differs between processes.
        y = torch.full((rank + 1, 2), float(rank + 1), requires_grad=True)
        gathered_rows = all_gather_with_grad(y)
        (gathered_rows.sum() * (rank + 1)).backward()
        out["gather"] = (gathered_rows.detach(), y.grad)
        torch.save(out, Path(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp_path = tmp_path_factory.mktemp("gathered")
    # DistributedDataParallel imports torch._dynamo on first use (seconds): once here, not in
    # both forked children at once.
    importlib.import_module("torch._dynamo")
    run_two_processes(_loss_worker, tmp_path)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.mark.parametrize("split_name", list(SPLITS))
@pytest.mark.parametrize("name", list(_losses()))
def test_gathered_loss_equals_one_process_with_the_whole_batch(
    results: list[dict], split_name: str, name: str
) -> None:
    split = SPLITS[split_name]
    embeddings, labels = _batch(sum(split))
    x = embeddings.clone().requires_grad_(True)
    loss = _losses()[name]
    expected = loss(x, labels)
    expected.backward()
    assert x.grad is not None
    for rank in range(WORLD):
        value, grad, local_rows, stats = results[rank][f"{split_name}/{name}"]
        torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-12)
        # DDP divides by the number of processes: each row gets WORLD times its gradient.
        torch.testing.assert_close(grad / WORLD, x.grad[_rows(split, rank)], rtol=1e-10, atol=1e-12)
        assert local_rows == _rows(split, rank)
        assert stats == pytest.approx(loss.last_stats, rel=1e-9, abs=1e-12)
    assert float(expected.detach()) != 0.0  # the batch has pairs: the comparison is not 0 == 0


@pytest.mark.parametrize("split_name", list(SPLITS))
def test_references_are_gathered_too(results: list[dict], split_name: str) -> None:
    split = SPLITS[split_name]
    embeddings, labels = _batch(sum(split))
    refs, ref_labels = _batch(2 * sum(split), seed=1)
    x, r = embeddings.clone().requires_grad_(True), refs.clone().requires_grad_(True)
    expected = SupConLoss(0.2)(x, labels, ref_embeddings=r, ref_labels=ref_labels)
    expected.backward()
    assert x.grad is not None and r.grad is not None
    for rank in range(WORLD):
        value, x_grad, r_grad = results[rank][f"{split_name}/supcon_ref"]
        torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x_grad / WORLD, x.grad[_rows(split, rank)], rtol=1e-10, atol=1e-12)
        ref_rows = _rows(tuple(2 * n for n in split), rank)
        torch.testing.assert_close(r_grad / WORLD, r.grad[ref_rows], rtol=1e-10, atol=1e-12)


def test_per_row_values_of_a_replicated_classifier(results: list[dict]) -> None:
    embeddings, labels = _batch(sum(SPLITS["uneven"]))
    torch.manual_seed(1)
    arcface = ArcFaceLoss(4, DIM, scale=16.0, reduction="none").double()
    x = embeddings.clone().requires_grad_(True)
    per_row = arcface(x, labels)
    per_row.mean().backward()
    assert x.grad is not None and arcface.weight.grad is not None
    for rank in range(WORLD):
        got, x_grad, w_grad, reduction = results[rank]["arcface_none"]
        assert reduction == "none"
        torch.testing.assert_close(got, per_row.detach(), rtol=1e-12, atol=1e-12)  # every row, rank order
        torch.testing.assert_close(
            x_grad / WORLD, x.grad[_rows(SPLITS["uneven"], rank)], rtol=1e-10, atol=1e-12
        )
        # Replicated centres: the same single-process gradient on every process (DDP's mean keeps it).
        torch.testing.assert_close(w_grad, arcface.weight.grad, rtol=1e-10, atol=1e-12)


def test_ddp_parameter_gradients_equal_one_process(results: list[dict]) -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, DIM).double()
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (11,), generator=gen)
    value = (SupConLoss(0.2) + 0.5 * TripletMarginLoss(0.3))(model(inputs), labels)
    value.backward()
    for rank in range(WORLD):
        got_value, grads = results[rank]["ddp"]
        torch.testing.assert_close(got_value, value.detach(), rtol=1e-12, atol=1e-12)
        for got, parameter in zip(grads, model.parameters(), strict=True):
            torch.testing.assert_close(got, parameter.grad, rtol=1e-10, atol=1e-12)


def test_processes_called_differently_raise_the_same_error(results: list[dict]) -> None:
    messages = [results[rank]["mismatch"] for rank in range(WORLD)]
    assert messages[0] == messages[1]
    assert "called differently" in messages[0] and "(rows, 8)" in messages[0] and "(rows, 9)" in messages[0]


def test_all_gather_with_grad_sums_the_gradients_of_every_process(results: list[dict]) -> None:
    for rank in range(WORLD):
        gathered, grad = results[rank]["gather"]
        torch.testing.assert_close(gathered, torch.tensor([[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]))
        # process 0's loss weighs each row by 1, process 1's by 2: every row gets 1 + 2.
        torch.testing.assert_close(grad, torch.full((rank + 1, 2), 3.0))


def _dying_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, world_size, init_file)
    if rank == 1:
        raise SystemExit(3)  # dies before the collective its partner waits in
    GatheredLoss(SupConLoss())(torch.randn(4, DIM), torch.tensor([0, 0, 1, 1]))


def _stuck_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, world_size, init_file)
    if rank == 0:  # waits in a collective that process 1 never joins
        GatheredLoss(SupConLoss())(torch.randn(4, DIM), torch.tensor([0, 0, 1, 1]))
    else:
        time.sleep(30)


def test_a_dead_process_fails_the_test_instead_of_hanging(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(Exception, match=r"exit|terminated|3"):
        run_two_processes(_dying_worker, tmp_path, timeout=30.0)
    (tmp_path / "init").unlink(missing_ok=True)
    with pytest.raises(pytest.fail.Exception, match="did not finish"):
        run_two_processes(_stuck_worker, tmp_path, timeout=2.0)
    assert time.monotonic() - start < 25.0


def test_without_torch_distributed_the_wrapper_is_the_loss() -> None:
    embeddings, labels = _batch(10)
    loss = SupConLoss(0.2)
    gathered = GatheredLoss(loss)
    torch.testing.assert_close(gathered(embeddings, labels), loss(embeddings, labels))
    assert gathered.local_rows == slice(0, 10)
    assert gathered.last_stats == loss.last_stats
    assert gathered.reduction == "mean"
    with pytest.raises(TypeError, match="already a GatheredLoss"):
        GatheredLoss(gathered)
    with pytest.raises(TypeError, match="embedkit Loss"):
        GatheredLoss(nn.MSELoss())  # type: ignore[arg-type]


def test_class_shard_and_merge_topk() -> None:
    assert [class_shard(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [class_shard(2, 3, r) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]
    scores = torch.tensor([[0.5, 0.75, 0.5, float("-inf")], [1.0, 1.0, 1.0, 0.0]])
    indices = torch.tensor([[7, 3, 2, 0], [9, 4, 6, 1]])
    top_scores, top_indices = merge_topk(scores, indices, 3)
    assert top_indices.tolist() == [[3, 2, 7], [4, 6, 9]]
    assert top_scores.tolist() == [[0.75, 0.5, 0.5], [1.0, 1.0, 1.0]]
