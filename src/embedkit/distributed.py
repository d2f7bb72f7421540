"""Scaling out with ``torch.distributed``: gather with gradient, sharded classes, top-k merge.

Under data parallelism (DDP, ``torchrun``) each process holds ``1 / P`` of the batch. A
pair or contrastive loss computed on that share sees only ``B / P`` of the positives and
negatives; :class:`GatheredLoss` gives it every process's embeddings instead, with the
gradient flowing back to the process that produced each row, so that value and gradient
equal those of one process holding the whole batch.

The pieces, all collectives (every process of the group calls them, in the same order):

* :func:`all_gather_with_grad` — every process's rows, concatenated in rank order (the
  number of rows may differ between processes); backward sums the gradients of every
  process and returns this process's rows;
* :class:`GatheredLoss` — wraps any embedkit loss; the wrapped loss runs on the gathered
  batch;
* :func:`class_shard` — the classes ``[start, stop)`` a process holds in a sharded
  classifier (:mod:`embedkit.losses.partial_fc`);
* :func:`merge_topk` — the top ``k`` of candidate lists by (score descending, index
  ascending), the tie rule of :func:`embedkit.evaluation.knn`; sharded k-NN
  (:mod:`embedkit.evaluation.sharded`) and sharded class predictions merge with it.

Outside ``torch.distributed`` (or with one process) every piece reduces to its
single-process meaning: nothing is communicated.

How the gradient is scaled
--------------------------
DDP *averages* parameter gradients over the ``P`` processes. Every process computes the
loss of the whole gathered batch (the same value everywhere), and the backward of the
gather *sums* the gradients of the ``P`` copies, so each process's rows receive ``P``
times the single-process gradient; DDP's average then gives exactly the single-process
gradient of the model's parameters. The bytes each step communicates are listed in the
scaling-out guide (``docs/guides/scaling-out.rst``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._checks import check_embeddings, check_int, check_labels
from .losses.base import Loss, Reduction, _reject_unexpected
from .monitors._distributed import gather_same_shape, process_count, process_index

__all__ = [
    "GatheredLoss",
    "all_gather_with_grad",
    "class_shard",
    "gather_batch",
    "merge_topk",
    "process_count",
    "process_index",
]


def class_shard(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """The classes ``[start, stop)`` held by process ``rank`` of ``world_size``.

    Contiguous and as even as possible: the first ``num_classes % world_size`` processes
    hold one class more.

    >>> [class_shard(10, 3, r) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    """
    num_classes = check_int(num_classes, "num_classes", low=1)
    world_size = check_int(world_size, "world_size", low=1)
    rank = check_int(rank, "rank", low=0, high=world_size - 1)
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class _GatherRows(torch.autograd.Function):
    """All-gather of rows (padded to the largest count) whose backward sums and slices."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, rows: list[int], rank: int, group: Any) -> Tensor:
        ctx.group = group
        ctx.start = sum(rows[:rank])
        ctx.stop = ctx.start + rows[rank]
        return _padded_gather(tensor, rows, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        # Every process's loss may depend on every row: the gradient of a row is the sum of
        # its gradients on every process (P times one copy's when all compute the same loss).
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[ctx.start : ctx.stop], None, None, None


def _padded_gather(tensor: Tensor, rows: list[int], group: Any) -> Tensor:
    """Every process's rows, concatenated; each pads to ``max(rows)`` for the collective."""
    as_bytes = tensor.dtype == torch.bool  # some backends cannot send bool
    sent = tensor.to(torch.uint8) if as_bytes else tensor
    padded = sent.new_zeros((max(rows), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = sent.detach()
    gathered = gather_same_shape(padded, group)
    out = torch.cat([part[:n] for part, n in zip(gathered, rows, strict=True)])
    return out.bool() if as_bytes else out


def _row_counts(tensor: Tensor, group: Any, *extra: int) -> Tensor:
    """``[rows, *extra]`` of every process, shape (P, 1 + len(extra)): one small collective."""
    mine = torch.tensor([tensor.shape[0], *extra], dtype=torch.int64, device=tensor.device)
    return gather_same_shape(mine, group)


def all_gather_with_grad(tensor: Tensor, process_group: Any = None) -> Tensor:
    """Every process's rows of ``tensor``, concatenated in rank order, differentiably.

    Parameters
    ----------
    tensor : Tensor of shape (n_rows, ...)
        This process's rows; ``n_rows`` may differ between processes, the other
        dimensions may not.
    process_group : optional
        The ``torch.distributed`` group (default: all processes).

    Returns
    -------
    Tensor of shape (total_rows, ...)
        Rows of process 0, then process 1, ... Outside ``torch.distributed``, ``tensor``
        itself.

    Notes
    -----
    The backward pass all-reduces (sums) the incoming gradient over the processes and
    returns this process's rows: if every process computes the same function of the
    gathered rows, each row receives ``P`` times its single-process gradient, which DDP's
    average over ``P`` processes turns back into the single-process gradient.
    """
    gathered, _ = _gather_with_rows(tensor, process_group)
    return gathered


def _gather_with_rows(tensor: Tensor, group: Any, *setup: int) -> tuple[Tensor, Tensor]:
    """The gathered rows and, per process, ``[rows, *trailing shape, *setup]`` (shape (P, ·)).

    ``setup`` holds what decides the collectives that follow (e.g. whether references
    come next); it and the trailing shape must agree between processes, else every
    process raises the same ``ValueError`` instead of hanging in a mismatched collective.
    """
    if process_count(group) == 1:
        return tensor, torch.tensor([[tensor.shape[0], *tensor.shape[1:], *setup]])
    counts = _row_counts(tensor, group, *tensor.shape[1:], *setup)
    if bool((counts[:, 1:] != counts[0, 1:]).any()):
        trailing = tensor.dim() - 1

        def describe(row: list[int]) -> str:
            shape = ", ".join(["rows", *map(str, row[1 : 1 + trailing])])
            extra = f", setup {tuple(row[1 + trailing :])}" if setup else ""
            return f"({shape}){extra}"

        per_process = "; ".join(f"process {r}: {describe(row)}" for r, row in enumerate(counts.tolist()))
        raise ValueError(
            f"the processes were called differently ({per_process}); every process must use the "
            "same model and call alike (the same embedding dimension, with or without references)"
        )
    rows = counts[:, 0].tolist()
    out = _GatherRows.apply(tensor, rows, process_index(group), group)
    return out, counts


def gather_batch(
    embeddings: Tensor, labels: Any, process_group: Any = None, *, _setup: Sequence[int] = ()
) -> tuple[Tensor, Tensor, slice]:
    """Every process's embeddings (with gradient) and labels, and where this process's rows are.

    Parameters
    ----------
    embeddings : Tensor of shape (batch_size, embedding_dim)
        This process's embeddings; ``batch_size`` may differ between processes (even 0).
    labels : Tensor of shape (batch_size,)
        Integer labels.
    process_group : optional
        The ``torch.distributed`` group (default: all processes).

    Returns
    -------
    embeddings : Tensor of shape (total_batch_size, embedding_dim)
        See :func:`all_gather_with_grad`.
    labels : Tensor of shape (total_batch_size,) and dtype int64
    rows : slice
        This process's rows of the gathered batch.
    """
    _check_rows(embeddings)
    local_labels = check_labels(labels, embeddings.shape[0], "labels", device=embeddings.device)
    if process_count(process_group) == 1:
        return embeddings, local_labels, slice(0, embeddings.shape[0])
    gathered, counts = _gather_with_rows(embeddings, process_group, *_setup)
    rows = counts[:, 0].tolist()
    gathered_labels = _padded_gather(local_labels, rows, process_group)
    start = sum(rows[: process_index(process_group)])
    return gathered, gathered_labels, slice(start, start + embeddings.shape[0])


def _check_rows(embeddings: Tensor, name: str = "embeddings") -> None:
    """A 2-D floating tensor; unlike a loss's own check, a process may hold no rows."""
    if isinstance(embeddings, Tensor) and embeddings.ndim == 2 and embeddings.shape[0] == 0:
        if not embeddings.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype; got {embeddings.dtype}")
        return
    check_embeddings(embeddings, name, check_finite=False)


def merge_topk(
    scores: Tensor, indices: Tensor, k: int, *, tie_later: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The best ``k`` of each row's candidates: score descending, then index ascending.

    The order of :func:`embedkit.evaluation.knn` (tied references come by index), so the
    per-shard top-k lists of a sharded search merge into the single-process result: an
    item of the global top ``k`` is in its own shard's top ``k`` under the same order.

    Parameters
    ----------
    scores : Tensor of shape (n, m)
        Candidate similarities (higher is better).
    indices : Tensor of shape (n, m) and dtype int64
        Their global indices; padding candidates carry score ``-inf``.
    k : int
        ``1 <= k <= m``.
    tie_later : Tensor of shape (n, m) and dtype bool, optional
        Among equal scores, candidates marked ``True`` come after the others (then by
        index): the ``tie_order`` of :func:`embedkit.evaluation.search.settle_ties`.

    Returns
    -------
    scores, indices : Tensor of shape (n, k)
    """
    k = check_int(k, "k", low=1, high=scores.shape[1])
    # Stable sorts from the least to the most significant key: index, tie rule, score.
    order = indices.argsort(dim=1, stable=True)
    if tie_later is not None:
        order = order.gather(1, tie_later.gather(1, order).to(torch.uint8).argsort(dim=1, stable=True))
    order = order.gather(1, scores.gather(1, order).argsort(dim=1, descending=True, stable=True))[:, :k]
    return scores.gather(1, order), indices.gather(1, order)


class GatheredLoss(Loss):
    """A loss computed on the embeddings of every process, as if one process held them all.

    Each call all-gathers the embeddings (with gradient) and labels of every process, runs
    the wrapped loss on the whole gathered batch — every process computes the same value —
    and sends each row's gradient back to the process it came from, ``P`` times the
    single-process gradient so that DDP's average over ``P`` processes gives exactly the
    single-process gradient (see :func:`all_gather_with_grad`). Processes may hold
    different numbers of rows (the row counts are gathered first; rows are padded for the
    collective and the padding dropped). Outside ``torch.distributed`` it is the wrapped
    loss.

    Why a wrapper, not a flag inside each loss: the losses stay single-process, short and
    testable against their published definitions, and the communication lives in one
    place that works for every loss (pair, tuple, proxy, classifier) without each of them
    re-deriving its normaliser. The price is compute: every process evaluates the whole
    ``N × N`` similarity matrix of the gathered batch (``N = Σ batch sizes``) instead of
    its ``B × N`` share. The communication (``N × d`` values gathered, the same all-reduced
    in backward) is that of any gather-based scheme.

    Parameters
    ----------
    loss : embedkit.losses.base.Loss
        The loss to gather for: any embedkit loss (typically :class:`SupConLoss`,
        :class:`NTXentLoss`, :class:`ContrastiveLoss`, :class:`TripletMarginLoss`,
        :class:`MultiSimilarityLoss`, :class:`CircleLoss`). A loss with parameters
        (proxies, class centres) keeps them replicated and gets, on every process, the
        single-process gradient; for class centres too many to replicate, use
        :mod:`embedkit.losses.partial_fc` instead.
    process_group : optional
        The ``torch.distributed`` group to gather over (default: all processes).

    Notes
    -----
    * ``ref_embeddings``/``ref_labels`` (for losses that take them) are gathered likewise:
      every process's queries against every process's references.
    * ``reduction`` is the wrapped loss's. With ``"none"`` the per-sample values of the
      *whole gathered batch* are returned, shape ``(total_batch_size,)`` in rank order
      (the same on every process); :attr:`local_rows` says which are this process's.
      Reduce them the same way on every process (e.g. ``.mean()``) to keep the gradient
      scaling exact.
    * ``last_value`` and ``last_stats`` are the wrapped loss's on the gathered batch (the
      same on every process; pair counts are those of the whole batch).
    * Every process must call it at every step, with the same embedding dimension and
      with or without references alike; a dimension mismatch raises the same
      ``ValueError`` on every process.

    Examples
    --------
    >>> loss = GatheredLoss(SupConLoss(temperature=0.1))          # doctest: +SKIP
    >>> value = loss(model(images), labels)  # under torchrun, DDP   # doctest: +SKIP
    """

    def __init__(self, loss: Loss, process_group: Any = None) -> None:
        if not isinstance(loss, Loss):
            raise TypeError(f"loss must be an embedkit Loss; got {type(loss).__name__}")
        if isinstance(loss, GatheredLoss):
            raise TypeError("loss is already a GatheredLoss; gathering twice would count every row P times")
        super().__init__(reduction=loss.reduction)
        self.loss = loss
        self.process_group = process_group
        self.accepts_reference = loss.accepts_reference
        self._local_rows = slice(0, 0)

    # The wrapped loss's reduction is the one that applies; reading or setting it here goes there.
    @property
    def reduction(self) -> Reduction:
        inner = self._modules.get("loss")
        return inner.reduction if isinstance(inner, Loss) else "mean"

    @reduction.setter
    def reduction(self, value: Reduction) -> None:
        inner = self._modules.get("loss")
        if isinstance(inner, Loss):
            inner.reduction = value

    @property
    def local_rows(self) -> slice:
        """This process's rows in the gathered batch of the last call."""
        return self._local_rows

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        *,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
        **unexpected: Any,
    ) -> Tensor:
        """The wrapped loss on every process's embeddings (and references).

        Parameters
        ----------
        embeddings : Tensor of shape (batch_size, embedding_dim)
            This process's embeddings; ``batch_size`` may differ between processes.
        labels : Tensor of shape (batch_size,)
        ref_embeddings : Tensor of shape (ref_size, embedding_dim), optional
            This process's references, for losses that accept them.
        ref_labels : Tensor of shape (ref_size,), optional

        Returns
        -------
        Tensor
            The wrapped loss of the gathered batch: a scalar (the same on every
            process), or per-sample values of shape ``(total_batch_size,)`` for
            ``reduction="none"``.
        """
        _reject_unexpected(self, unexpected)
        has_ref = ref_embeddings is not None or ref_labels is not None
        if has_ref and not self.loss.accepts_reference:
            raise TypeError(f"{type(self.loss).__name__} does not accept ref_embeddings/ref_labels")
        if has_ref and (ref_embeddings is None or ref_labels is None):
            raise ValueError(
                "ref_embeddings and ref_labels must be given together; got only "
                + ("ref_embeddings" if ref_labels is None else "ref_labels")
            )
        group = self.process_group
        all_embeddings, all_labels, self._local_rows = gather_batch(
            embeddings, labels, group, _setup=(int(has_ref),)
        )
        if ref_embeddings is not None:
            all_refs, all_ref_labels, _ = gather_batch(ref_embeddings, ref_labels, group)
            value = self.loss(all_embeddings, all_labels, ref_embeddings=all_refs, ref_labels=all_ref_labels)
        else:
            value = self.loss(all_embeddings, all_labels)
        return self._record(value, self.loss._last_stats)

    def extra_repr(self) -> str:
        return f"processes={process_count(self.process_group)}"
