"""Combining monitor state across processes under ``torch.distributed`` (DDP).

Each process of a data-parallel run sees only its own share of the batches, so a
monitor's ``compute()`` combines the states of every process before interpreting them.
These helpers are collectives: every process of the group must call them, in the same
order. They copy; the local state is never changed, so updates continue to count only
local batches and a later ``compute()`` combines again without counting anything twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "check_same_setup",
    "fair_shares",
    "gather_rows",
    "gather_same_shape",
    "max_across",
    "process_count",
    "process_index",
    "reduce_min_max",
    "sum_across",
]


def process_count(group: Any = None) -> int:
    """Processes in ``group`` when ``torch.distributed`` is initialised, else 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


def process_index(group: Any = None) -> int:
    """This process's rank in ``group`` (0 outside ``torch.distributed``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return int(dist.get_rank(group))


def fair_shares(available: Sequence[int], total: int) -> list[int]:
    """Split ``total`` rows between processes holding ``available`` rows each, evenly.

    A process with fewer rows than its even share gives them all, and the rest is split
    evenly between the others (the same result on every process: no randomness).

    >>> fair_shares([3, 100], 64)
    [3, 61]
    >>> fair_shares([50, 50, 50], 64)
    [22, 21, 21]
    """
    shares = [0] * len(available)
    remaining = total
    by_rows = sorted(range(len(available)), key=lambda i: (available[i], i))
    for position, index in enumerate(by_rows):
        left = len(available) - position
        shares[index] = min(available[index], -(-remaining // left))  # ceil: the first ones round up
        remaining -= shares[index]
    return shares


def sum_across(tensors: Sequence[Tensor], group: Any = None) -> list[Tensor]:
    """Element-wise sums over the processes, one ``all_reduce`` per dtype."""
    out: list[Tensor] = [t.clone() for t in tensors]
    # In order of first appearance: every process must issue the same collectives in the
    # same order, and a set's order follows hashes that differ between processes.
    for dtype in dict.fromkeys(t.dtype for t in out):
        same = [t for t in out if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for t, part in zip(same, flat.split([t.numel() for t in same]), strict=True):
            t.copy_(part.view_as(t))
    return out


def reduce_min_max(low: Tensor, high: Tensor, group: Any = None) -> tuple[Tensor, Tensor]:
    """The minimum of ``low`` and the maximum of ``high`` over the processes (one collective)."""
    both = torch.stack([-low, high])  # max(-low) = -min(low)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return -both[0], both[1]


def max_across(tensor: Tensor, group: Any = None) -> Tensor:
    """The element-wise maximum of ``tensor`` over the processes (a copy; one collective)."""
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


def gather_same_shape(tensor: Tensor, group: Any = None) -> Tensor:
    """Every process's ``tensor`` stacked along a new first dimension (same shape everywhere)."""
    parts = [torch.empty_like(tensor) for _ in range(process_count(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def gather_rows(tensor: Tensor, group: Any = None) -> Tensor:
    """Every process's rows, concatenated; the number of rows may differ between processes."""
    rows = gather_same_shape(torch.tensor([tensor.shape[0]], device=tensor.device), group)[:, 0].tolist()
    # Collectives need equal shapes (and some backends no bool): pad, send as uint8.
    as_bytes = tensor.dtype == torch.bool
    sent = tensor.to(torch.uint8) if as_bytes else tensor
    padded = sent.new_zeros((max(rows), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = sent
    gathered = gather_same_shape(padded, group)
    out = torch.cat([part[:n] for part, n in zip(gathered, rows, strict=True)])
    return out.bool() if as_bytes else out


def check_same_setup(setup: dict[str, int], monitor: str, device: torch.device, group: Any = None) -> None:
    """Raise the same ``ValueError`` on every process when the processes' setups differ.

    ``setup`` holds what decides the shapes of the collectives that follow (the same keys
    on every process). Without this check, a process fed differently (no labels, another
    dimension) would make the next collective mismatch, and training would hang.
    """
    everyone = gather_same_shape(torch.tensor(list(setup.values()), dtype=torch.int64, device=device), group)
    if bool((everyone != everyone[0]).any()):
        per_process = "; ".join(
            f"process {rank}: " + ", ".join(f"{key}={value}" for key, value in zip(setup, row, strict=True))
            for rank, row in enumerate(everyone.tolist())
        )
        raise ValueError(
            f"{monitor}.compute(): the processes were fed differently ({per_process}); feed every process "
            "the same way, or build the monitor with sync_on_compute=False"
        )
