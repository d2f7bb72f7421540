"""Data-parallel SupCon under torchrun: PKSampler shards, a gathered loss, monitors, sharded evaluation.

Every process trains the same small CNN (wrapped in ``DistributedDataParallel``) on its own
P×K batches of built-in synthetic identities (:class:`~embedkit.samplers.PKSampler` gives each
process a disjoint shard of every epoch). The loss is
``GatheredLoss(SupConLoss(0.1))``: every process contrasts its rows with the embeddings of
*all* processes, so the value and the model's gradient are those of one process holding the
whole ``world_size × P × K`` batch. The embedding-health monitor combines the processes'
statistics when it is read; held-out identities are evaluated with
:func:`~embedkit.evaluation.sharded_retrieval_metrics`, each process embedding and holding its
own shard of the evaluation images. Rank 0 prints the report and writes ``report.json`` and
``report.md`` into ``--out`` (default ``out/ddp_supcon[-quick]``).

    torchrun --standalone --nproc_per_node=2 examples/ddp_supcon.py --quick     # CPU: gloo
    torchrun --standalone --nproc_per_node=8 examples/ddp_supcon.py             # GPUs: nccl

Run without torchrun it trains in one process (world size 1), which is the same computation
with the batch of one process.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _shared import command_line, markdown_table, parser, write_report
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import embedkit as ek
from embedkit.datasets import split_identities, synthetic_identities
from embedkit.distributed import GatheredLoss
from embedkit.evaluation import sharded_retrieval_metrics


@dataclass(frozen=True)
class Config:
    train_identities: int = 400
    eval_identities: int = 100
    images_per_identity: int = 12
    size: int = 32
    embedding_dim: int = 64
    width: int = 32
    p: int = 16  # classes per batch, per process
    k: int = 4
    epochs: int = 10
    lr: float = 2e-3
    temperature: float = 0.1
    window: int = 10  # steps between monitor readings


QUICK = Config(
    train_identities=48,
    eval_identities=24,
    images_per_identity=8,
    size=16,
    embedding_dim=32,
    width=16,
    p=8,
    k=4,
    epochs=5,
    lr=3e-3,
    window=4,
)


class Net(nn.Module):
    """Two convolution blocks (conv, batch norm, ReLU, 2× pooling) and a linear embedding.

    The embedding reads the flattened feature map, not a global average: a synthetic
    identity is a spatial pattern, which averaging would throw away.
    """

    def __init__(self, width: int, embedding_dim: int, size: int) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]

        self.features = nn.Sequential(*block(3, width), *block(width, 2 * width), nn.Flatten())
        self.head = nn.Linear(2 * width * (size // 4) ** 2, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def setup(device_choice: str) -> tuple[torch.device, str, int, int]:
    """Join the torchrun group (nccl on GPUs, gloo on CPUs); one process without torchrun."""
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    if not use_cuda:  # share the CPU cores between the processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return device, backend if world > 1 else "none", world, rank


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> ek.Report:
    """Held-out retrieval: each process embeds its shard; the report covers every shard."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    mine = torch.arange(rank, len(labels), world)
    model.eval()
    with torch.no_grad():
        embeddings = torch.cat([model(images[rows].to(device)) for rows in mine.split(256)])
    model.train()
    return sharded_retrieval_metrics(embeddings, labels[mine].to(device), ks=(1, 5), backend="torch")


def _shown(report: ek.Report, key: str) -> str:
    """A rate with its counts and chance level; a plain value with three decimals."""
    rate = report.rate(key)
    if rate is None:
        return f"{report[key]:.3f}"
    return str(rate)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__ or "", data_dir_help="not supported: this example trains on built-in synthetic data")
    p.add_argument("--epochs", type=int, default=None, help="override the configuration's epochs")
    args = p.parse_args(argv)
    if args.data_dir is not None:
        raise SystemExit("--data-dir is not supported by this example (built-in synthetic data only)")
    config = QUICK if args.quick else Config()
    if args.epochs is not None:
        config = dataclasses.replace(config, epochs=args.epochs)
    device, backend, world, rank = setup(args.device)
    started = time.perf_counter()
    torch.manual_seed(args.seed)  # the same initial model on every process (DDP checks it too)

    data = synthetic_identities(
        config.train_identities + config.eval_identities,
        config.images_per_identity,
        size=config.size,
        seed=args.seed,
    )
    train_rows, eval_rows = split_identities(data.labels, [config.train_identities, None], seed=args.seed)
    train_images, eval_images = data.images[train_rows], data.images[eval_rows]
    _, train_labels = torch.unique(data.labels[train_rows], return_inverse=True)
    eval_labels = data.labels[eval_rows]

    model = Net(config.width, config.embedding_dim, config.size).to(device)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loss_fn = GatheredLoss(ek.SupConLoss(config.temperature))
    optimizer = torch.optim.Adam(ddp.parameters(), lr=config.lr)
    sampler = ek.PKSampler(train_labels, p=config.p, k=config.k, seed=args.seed)  # this process's shard
    loader = DataLoader(TensorDataset(train_images, train_labels), batch_sampler=sampler)
    health = ek.EmbeddingHealthMonitor()  # combines every process's rows when read
    losses = ek.LossMonitor(window=config.window)

    baseline = evaluate(model, eval_images, eval_labels, device)
    step, history, diagnoses = 0, [], {}
    for epoch in range(config.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            embeddings = ddp(x)
            loss = loss_fn(embeddings, y)  # the same value on every process
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            health.update(embeddings.detach(), y)
            losses.update(step, loss_fn)
            if step % config.window == 0:
                for report in (health.compute(), losses.compute()):  # collectives: every process reads
                    for d in report.diagnoses:
                        diagnoses.setdefault(
                            d.code, {"step": step, "severity": d.severity, "message": d.message}
                        )
                health.reset()
        history.append({"epoch": epoch + 1, "steps": step, "loss": loss_fn.last_value})
    trained = evaluate(model, eval_images, eval_labels, device)
    seconds = time.perf_counter() - started

    stats = loss_fn.last_stats
    report: dict[str, Any] = {
        "command": command_line(),
        "world_size": world,
        "backend": backend,
        "device": str(device),
        "config": dataclasses.asdict(config),
        "steps": step,
        "batch_per_process": config.p * config.k,
        "gathered_batch": world * config.p * config.k,
        "last_step_stats": stats,
        "seconds": round(seconds, 1),
        "loss": {"first_epoch": history[0]["loss"], "last_epoch": history[-1]["loss"]},
        "history": history,
        "retrieval_untrained": baseline.to_dict(),
        "retrieval_trained": trained.to_dict(),
        "diagnoses": diagnoses,
    }
    if rank == 0:
        rows = [
            [key, _shown(baseline, key), _shown(trained, key)] for key in ("precision@1", "recall@5", "map@r")
        ]
        text = "\n".join(
            [
                f"# ddp_supcon: {world} process(es), backend {backend}, {device}",
                "",
                f"{step} steps, {config.p}×{config.k} per process, "
                f"gathered batch {world * config.p * config.k}, {seconds:.1f} s after start-up",
                f"SupCon loss {history[0]['loss']:.3f} (epoch 1) -> "
                f"{history[-1]['loss']:.3f} (epoch {config.epochs})",
                "",
                f"held-out retrieval ({trained.counts['queries']} images of {config.eval_identities} "
                f"unseen identities, sharded over {world} process(es)):",
                "",
                markdown_table(["metric", "untrained", "trained"], rows),
                "",
                "diagnoses: "
                + (", ".join(f"{c} (step {d['step']})" for c, d in diagnoses.items()) or "none"),
            ]
        )
        print(text)
        out = args.out or Path("out") / ("ddp_supcon-quick" if args.quick else "ddp_supcon")
        write_report(Path(out), report, text + "\n")
        print(f"wrote {out}/report.json and report.md")
    if dist.is_initialized():
        dist.destroy_process_group()
    return report


if __name__ == "__main__":
    main()
