"""The monitors on a real (tiny) training run: sampler → model → loss → monitors.

Case studies 02 and 04 end to end: a network whose hidden ReLUs are all dead passes
nothing of its input through. Its embeddings are its last bias — one point per batch,
moved between batches by the ArcFace head's gradient — so the triplet loss sits at its
margin and the head predicts one class for everyone. The same run with a live network
must stay silent.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import embedkit as ek
from _factories import one_cpu_thread

_threads = pytest.fixture(autouse=True, scope="module")(one_cpu_thread)

CLASSES, PER_CLASS, DIM = 32, 8, 16


def _train(dead: bool) -> tuple[list[str], list[str], list[str]]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    inputs = 2 * torch.randn(CLASSES, DIM, generator=gen)[labels] + 0.5 * torch.randn(
        labels.shape[0], DIM, generator=gen
    )
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(DIM, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    if dead:  # every hidden unit is negative for every input: no signal, no gradient through
        torch.nn.init.constant_(net[0].bias, -50.0)
    head = ek.ArcFaceLoss(CLASSES, 16)
    loss_fn = ek.TripletMarginLoss(0.2, mining="all") + head
    optimizer = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.05)
    sampler = ek.PKSampler(labels.numpy(), p=8, k=4, seed=0)
    loader = DataLoader(TensorDataset(inputs, labels), batch_sampler=sampler)
    collapse, health, losses = ek.ClassCollapseMonitor(CLASSES), ek.EmbeddingHealthMonitor(), ek.LossMonitor()
    step = 0
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch, batch_labels in loader:
            embeddings = net(batch)
            loss = loss_fn(embeddings, batch_labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            collapse.update(head.logits(embeddings.detach()), batch_labels)
            health.update(embeddings.detach(), batch_labels)
            losses.update(step, loss_fn)
            step += 1
    return collapse.compute().codes, health.compute().codes, losses.compute().codes


def test_a_dead_network_is_named_by_every_monitor() -> None:
    collapse, health, losses = _train(dead=True)
    assert "class_collapse" in collapse
    assert "complete_collapse" in health
    assert "loss_at_margin" in losses


def test_a_learning_network_raises_nothing() -> None:
    assert _train(dead=False) == ([], [], [])
