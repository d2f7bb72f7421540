"""Quickstart: train a small embedding network with a composed embedkit loss.

Runs on CPU in under a minute with no download. It builds synthetic "identities"
(each a random prototype seen through nuisance variation: a per-image pose-like
rotation, lighting-like gain and noise), trains a small MLP with

    ArcFaceLoss + 0.5 * SupConLoss

on P×K batches from ``PKSampler`` and prints, per epoch, the total loss, each
term's value and the statistics the losses record (batch accuracy, positive and
negative similarity), then identification accuracy on *held-out images* with its
counts and chance level.

    python examples/quickstart.py [--epochs 8] [--device auto|cpu|cuda] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import embedkit as ek


def make_identities(
    num_ids: int, per_id: int, input_dim: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of ``num_ids`` identities: prototype, random rotation-like mix, gain and noise."""
    prototypes = torch.randn(num_ids, input_dim, generator=generator)
    labels = torch.arange(num_ids).repeat_interleave(per_id)
    base = prototypes[labels]
    nuisance = torch.randn(input_dim, input_dim, generator=generator) / input_dim**0.5
    pose = torch.randn(len(labels), 1, generator=generator)
    gain = 1.0 + 0.3 * torch.randn(len(labels), 1, generator=generator)
    noise = 0.6 * torch.randn(len(labels), input_dim, generator=generator)
    images = gain * (base + pose * (base @ nuisance)) + noise
    return images, labels


def nearest_neighbour_accuracy(
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    probes: torch.Tensor,
    probe_labels: torch.Tensor,
) -> tuple[int, int]:
    """Rank-1 hits of probes against a gallery of *other* images (cosine)."""
    scores = ek.pairwise_similarity(probes, gallery)
    predicted = gallery_labels[scores.argmax(dim=1)]
    return int((predicted == probe_labels).sum()), len(probe_labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    num_ids, per_id, input_dim, embedding_dim = 100, 12, 64, 32
    images, labels = make_identities(num_ids, per_id, input_dim, generator)
    # Disjoint images: 8 per identity to train on, 2 as gallery, 2 as probes.
    slot = torch.arange(len(labels)) % per_id
    train, gallery, probe = slot < 8, (slot == 8) | (slot == 9), slot >= 10

    model = nn.Sequential(nn.Linear(input_dim, 128), nn.ReLU(), nn.Linear(128, embedding_dim)).to(device)
    loss_fn = (ek.ArcFaceLoss(num_ids, embedding_dim, margin=0.3, scale=16.0) + 0.5 * ek.SupConLoss(0.1)).to(
        device
    )
    optimizer = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=3e-3)

    def identification() -> str:
        with torch.no_grad():
            g = model(images[gallery].to(device))
            p = model(images[probe].to(device))
        hits, total = nearest_neighbour_accuracy(g, labels[gallery].to(device), p, labels[probe].to(device))
        return f"rank-1 {hits}/{total} = {hits / total:.1%} (chance {1 / num_ids:.1%})"

    print(f"device={device}  identities={num_ids}  train images={int(train.sum())}")
    print(f"untrained: {identification()}")
    x_train, y_train = images[train], labels[train]
    # P identities × K images per batch, so every batch has positive pairs.
    sampler = ek.PKSampler(y_train, p=16, k=4, seed=args.seed)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_sampler=sampler)
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        sampler.set_epoch(epoch)
        total = 0.0
        for x, y in loader:
            loss = loss_fn(model(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        stats = loss_fn.last_stats
        print(
            f"epoch {epoch:2d}  loss {total / len(loader):7.3f}  "
            f"arcface {stats['0.ArcFaceLoss.loss']:6.3f} (batch acc {stats['0.ArcFaceLoss.accuracy']:.2f})  "
            f"supcon {stats['1.SupConLoss.loss']:5.3f} "
            f"(pos sim {stats['1.SupConLoss.mean_positive_similarity']:+.2f}, "
            f"neg sim {stats['1.SupConLoss.mean_negative_similarity']:+.2f})  "
            f"{identification()}  [{time.perf_counter() - start:.1f}s]"
        )


if __name__ == "__main__":
    main()
