"""Partial FC under torch.distributed: centres sharded over two gloo processes vs the unsharded loss.

Without sampling, value and gradients (embeddings and centres) must equal ArcFaceLoss /
CosFaceLoss on the concatenated batch with the concatenated centres; with sampling, the
loss must equal the unsharded loss restricted to the kept classes, every class of the
batch kept. Predictions and the collapse-monitor stand-in must match the full logits.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from embedkit.losses import ArcFaceLoss, CosFaceLoss, ShardedArcFaceLoss, ShardedCosFaceLoss
from embedkit.monitors import ClassCollapseMonitor
from test_distributed_losses import WORLD, init_gloo, run_two_processes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="forks two gloo processes")

CLASSES, DIM = 11, 6  # shards of 6 and 5 classes
SPLITS = {"even": (7, 7), "uneven": (9, 4)}
KINDS = {"arcface": (ShardedArcFaceLoss, ArcFaceLoss), "cosface": (ShardedCosFaceLoss, CosFaceLoss)}


def _data(total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(total)
    weight = torch.randn(CLASSES, DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (total,), generator=gen)
    embeddings = weight[labels] + 0.7 * torch.randn(total, DIM, generator=gen, dtype=torch.float64)
    return embeddings, labels, weight


def _rows(split: tuple[int, ...], rank: int) -> slice:
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, world_size, init_file)
    try:
        out: dict[str, object] = {}
        for split_name, split in SPLITS.items():
            embeddings, labels, weight = _data(sum(split))
            rows = _rows(split, rank)
            for kind, (sharded, _) in KINDS.items():
                loss = sharded(CLASSES, DIM, scale=16.0).double()
                loss.load_full_weight(weight)
                x = embeddings[rows].clone().requires_grad_(True)
                value = loss(x, labels[rows])
                value.backward()
                out[f"{split_name}/{kind}"] = {
                    "value": value.detach(),
                    "x_grad": x.grad,
                    "w_grad": loss.weight.grad,
                    "shard": (loss.start, loss.stop),
                    "stats": loss.last_stats,
                    "predict": loss.predict(embeddings[rows], k=3),
                    "collapse": loss.collapse_logits(embeddings[rows], k=3),
                    "full_weight": loss.full_weight(),
                    "state": loss.state_dict(),
                }
            torch.manual_seed(10 + rank)
            sampled = ShardedArcFaceLoss(CLASSES, DIM, scale=16.0, sample_rate=0.8).double()
            sampled.load_full_weight(weight)
            x = embeddings[rows].clone().requires_grad_(True)
            value = sampled(x, labels[rows])
            value.backward()
            out[f"{split_name}/sampled"] = (value.detach(), sampled.last_classes, x.grad, sampled.weight.grad)
        # The monitor fed each process's rows of the stand-in, combined across processes.
        embeddings, labels, weight = _data(40)
        loss = ShardedArcFaceLoss(CLASSES, DIM, scale=16.0).double()
        loss.load_full_weight(weight)
        monitor = ClassCollapseMonitor(CLASSES, topk=(1, 3), softmax_rows=None)
        rows = _rows((25, 15), rank)
        monitor.update(loss.collapse_logits(embeddings[rows], k=3), labels[rows])
        out["monitor"] = monitor.compute().to_dict()
        torch.save(out, Path(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp_path = tmp_path_factory.mktemp("partial_fc")
    run_two_processes(_worker, tmp_path)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("split_name", list(SPLITS))
def test_sharded_loss_equals_the_unsharded_loss(results: list[dict], split_name: str, kind: str) -> None:
    split = SPLITS[split_name]
    embeddings, labels, weight = _data(sum(split))
    full = KINDS[kind][1](CLASSES, DIM, scale=16.0).double()
    full.weight.data.copy_(weight)
    x = embeddings.clone().requires_grad_(True)
    expected = full(x, labels)
    expected.backward()
    assert x.grad is not None and full.weight.grad is not None
    shards = []
    for rank in range(WORLD):
        got = results[rank][f"{split_name}/{kind}"]
        start, stop = got["shard"]
        shards.append((start, stop))
        torch.testing.assert_close(got["value"], expected.detach(), rtol=1e-12, atol=1e-12)
        # The model's gradient is WORLD times the single-process one (DDP averages it back) ...
        torch.testing.assert_close(got["x_grad"] / WORLD, x.grad[_rows(split, rank)], rtol=1e-9, atol=1e-12)
        # ... the centres' is exact: they are not averaged by DDP, each process owns its shard.
        torch.testing.assert_close(got["w_grad"], full.weight.grad[start:stop], rtol=1e-9, atol=1e-12)
        assert got["stats"] == pytest.approx(full.last_stats, rel=1e-9, abs=1e-12)
        torch.testing.assert_close(got["full_weight"], weight)
        assert got["state"]["weight"].shape == (stop - start, DIM)
    assert shards == [(0, 6), (6, 11)]


@pytest.mark.parametrize("split_name", list(SPLITS))
def test_predictions_and_collapse_stand_in_match_the_full_logits(
    results: list[dict], split_name: str
) -> None:
    split = SPLITS[split_name]
    embeddings, _, weight = _data(sum(split))
    full = ArcFaceLoss(CLASSES, DIM, scale=16.0).double()
    full.weight.data.copy_(weight)
    logits = full.logits(embeddings).detach()
    top_scores, top_classes = logits.sort(dim=1, descending=True, stable=True)
    for rank in range(WORLD):
        rows = _rows(split, rank)
        scores, classes = results[rank][f"{split_name}/arcface"]["predict"]
        assert classes.tolist() == top_classes[rows, :3].tolist()
        torch.testing.assert_close(scores, top_scores[rows, :3])
        stand_in = results[rank][f"{split_name}/arcface"]["collapse"]
        assert stand_in.shape == (split[rank], CLASSES)
        assert stand_in.argmax(dim=1).tolist() == logits[rows].argmax(dim=1).tolist()
        # The softmax normaliser, hence the max-softmax confidence, is the true one.
        torch.testing.assert_close(stand_in.logsumexp(dim=1), logits[rows].logsumexp(dim=1))


def test_collapse_monitor_reads_the_stand_in_as_the_full_logits(results: list[dict]) -> None:
    embeddings, labels, weight = _data(40)
    full = ArcFaceLoss(CLASSES, DIM, scale=16.0).double()
    full.weight.data.copy_(weight)
    monitor = ClassCollapseMonitor(CLASSES, topk=(1, 3), softmax_rows=None)
    monitor.update(full.logits(embeddings).detach(), labels)
    expected = monitor.compute().to_dict()
    for rank in range(WORLD):
        got = results[rank]["monitor"]
        assert got["counts"] == expected["counts"]
        for key in ("top1_accuracy", "top3_accuracy", "num_predicted_classes", "dominant_class_share"):
            assert got["metrics"][key] == expected["metrics"][key], key
        assert got["metrics"]["mean_max_softmax"] == pytest.approx(expected["metrics"]["mean_max_softmax"])


@pytest.mark.parametrize("split_name", list(SPLITS))
def test_sampling_keeps_every_batch_class_and_is_the_loss_over_the_kept_classes(
    results: list[dict], split_name: str
) -> None:
    split = SPLITS[split_name]
    embeddings, labels, weight = _data(sum(split))
    kept = torch.cat([results[rank][f"{split_name}/sampled"][1] for rank in range(WORLD)])
    assert set(labels.tolist()) <= set(kept.tolist())
    assert set(kept.tolist()) - set(labels.tolist()), (
        "no negative class was sampled: the test would not test it"
    )
    assert kept.numel() < CLASSES
    # Each shard keeps ceil(0.8 × its classes) or all its batch classes if more.
    for rank, (start, stop) in enumerate([(0, 6), (6, 11)]):
        mine = results[rank][f"{split_name}/sampled"][1]
        in_batch = labels[(labels >= start) & (labels < stop)].unique().numel()
        assert mine.numel() == max(math.ceil(0.8 * (stop - start)), in_batch)
    restricted = ArcFaceLoss(kept.numel(), DIM, scale=16.0).double()
    restricted.weight.data.copy_(weight[kept])
    x = embeddings.clone().requires_grad_(True)
    expected = restricted(x, torch.searchsorted(kept, labels))
    expected.backward()
    assert x.grad is not None and restricted.weight.grad is not None
    offset = 0
    for rank in range(WORLD):
        value, mine, x_grad, w_grad = results[rank][f"{split_name}/sampled"]
        torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x_grad / WORLD, x.grad[_rows(split, rank)], rtol=1e-9, atol=1e-12)
        start = (0, 6)[rank]
        torch.testing.assert_close(
            w_grad[mine - start], restricted.weight.grad[offset : offset + mine.numel()]
        )
        unkept = torch.ones(w_grad.shape[0], dtype=torch.bool)
        unkept[mine - start] = False
        assert bool((w_grad[unkept] == 0).all())
        offset += mine.numel()


def test_a_shard_loads_only_into_the_same_shard(results: list[dict]) -> None:
    state = results[1]["even/arcface"]["state"]
    single = ShardedArcFaceLoss(CLASSES, DIM, scale=16.0).double()  # one process: holds [0, 11)
    with pytest.raises(ValueError, match=r"classes \[6, 11\) of 11 into process 0, which holds \[0, 11\)"):
        single.load_state_dict(state)
    single.load_full_weight(results[0]["even/arcface"]["full_weight"])
    torch.testing.assert_close(single.full_weight(), _data(14)[2])
    with pytest.raises(ValueError, match="margin"):
        ShardedArcFaceLoss(CLASSES, DIM, margin=2.0)
    with pytest.raises(ValueError, match="sample_rate"):
        ShardedCosFaceLoss(CLASSES, DIM, sample_rate=0.0)
