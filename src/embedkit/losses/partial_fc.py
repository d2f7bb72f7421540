r"""Partial FC: ArcFace and CosFace with the class centres sharded across processes.

With a million identities the ``(num_classes, embedding_dim)`` centre matrix and the
``(batch, num_classes)`` logits no longer fit — or no longer fit ``P`` times — on each
device. Partial FC (An et al., "Partial FC: Training 10 Million Identities on a Single
Machine", 2021) splits the classes: process ``r`` of ``P`` holds the centres of classes
``[start, stop)`` (:func:`embedkit.distributed.class_shard`). Each step:

1. the embeddings and labels of every process are all-gathered (``N = Σ`` batch sizes
   rows), the embeddings with gradient back to the process they came from;
2. each process computes the margin-free logits of all ``N`` rows against its own
   centres: an ``(N, stop - start)`` block;
3. the owner of each row's class reads the target logit, which is shared (one
   ``all_reduce``), and every process applies the margin to it with the very functions of
   :class:`~embedkit.losses.ArcFaceLoss` / :class:`~embedkit.losses.CosFaceLoss`;
4. the softmax's row maximum (``all_reduce`` max) and normaliser (``all_reduce`` sum)
   are combined across processes, so every process has the exact cross-entropy of every
   row;
5. backward: each process turns its block of the softmax into the gradient of its
   centres (exact: the single-process gradient of those rows) and of the gathered
   embeddings, which the gather's backward sums over the processes.

With ``sample_rate=1`` (default) the value and the gradients equal those of the
unsharded loss on the concatenated batch, up to rounding. With ``sample_rate < 1`` each
process keeps, per step, every class of its shard that occurs in the gathered batch and a
uniform random sample of its other classes, ``ceil(sample_rate × shard size)`` in all (or
the positives alone when there are more); the softmax then runs over the kept classes
only (the paper's approximation: fewer negatives, the same positives).

Use with DDP: wrap the *model* in ``DistributedDataParallel``, not this loss. Its
centres differ between processes (each holds its own shard): DDP would average them.
Give the centres to the optimizer like any parameter; each process updates its own.
The embeddings' gradient is scaled by ``P`` so that DDP's average over the processes
yields exactly the single-process gradient of the model (as for
:class:`~embedkit.distributed.GatheredLoss`).

Checkpoints. ``state_dict()`` holds this process's shard (``weight``, shape
``(stop - start, embedding_dim)``) and, as extra state, ``num_classes`` and the shard's
``[start, stop)`` with the hyper-parameters; loading it into a loss with another shard
(another world size or rank) raises a ``ValueError`` naming both. Two ways to save:

* per process: ``torch.save(loss.state_dict(), f"partial_fc.rank{rank}.pt")`` and, to
  resume with the same world size, ``loss.load_state_dict(torch.load(...))``;
* whole: ``full = loss.full_weight()`` (a collective: every process gets the
  ``(num_classes, embedding_dim)`` matrix) and ``torch.save(full, ...)`` on rank 0;
  ``loss.load_full_weight(full)`` on every process copies its rows back, whatever the
  world size — and ``ArcFaceLoss(...).weight.data.copy_(full)`` turns it into an
  unsharded loss for evaluation.

Monitoring. :attr:`last_logits` are this process's block (``(N, kept classes)``), which
:class:`~embedkit.monitors.ClassCollapseMonitor` cannot read alone (it needs every
class). :meth:`predict` returns every row's global top-``k`` classes (one merge across
processes), and :meth:`collapse_logits` a stand-in logit matrix for the monitor built
from them, see there.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

# The module, not its names: embedkit.distributed imports embedkit.losses (GatheredLoss is a
# Loss), so either may be imported first.
from .. import distributed
from .._checks import check_class_labels, check_embeddings, check_int, check_real
from ..monitors._distributed import gather_same_shape, process_count, process_index
from ..similarity import l2_normalize, pairwise_similarity, working_dtype
from .base import HyperChecks, Loss, Reduction, _reject_unexpected
from .margin_softmax import ArcFaceLoss, CosFaceLoss, exp_floor

__all__ = ["ShardedArcFaceLoss", "ShardedCosFaceLoss", "ShardedMarginSoftmaxLoss"]


def _all_reduce(tensor: Tensor, op: Any, group: Any) -> Tensor:
    if process_count(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _ShardedMarginCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy whose classes are spread over the processes.

    ``forward(logits, columns, owned, target_logits, target_slope, group) -> (loss, hits)``
    with ``logits`` (N, C_local) this process's margin-free block, ``columns`` (N,) the
    target's column in it where ``owned`` (N,) is true, ``target_logits`` (N,) the target
    logits with the margin (the same on every process) and ``target_slope`` their
    derivative with respect to the margin-free target logit. ``loss`` (N,) and ``hits``
    (N,) are the same on every process; backward gives this process's block of the
    gradient (the target entries through the margin's slope).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        logits: Tensor,
        columns: Tensor,
        owned: Tensor,
        target_logits: Tensor,
        plain_target: Tensor,
        target_slope: Tensor,
        group: Any,
    ) -> tuple[Tensor, Tensor]:
        index = columns[:, None]
        shifted = logits.clone()
        # The largest non-target logit of each row, over every process's classes.
        shifted.scatter_(
            1, index, torch.where(owned, -math.inf, shifted.gather(1, index).squeeze(1))[:, None]
        )
        other = shifted.amax(dim=1)
        _all_reduce(other, dist.ReduceOp.MAX, group)
        hits = plain_target > other
        top = torch.maximum(other, target_logits)  # the row maximum with the margin
        shifted.scatter_(
            1, index, torch.where(owned, target_logits, shifted.gather(1, index).squeeze(1))[:, None]
        )
        shifted.sub_(top[:, None])
        exps = shifted.clamp_min_(exp_floor(shifted.dtype)).exp_()
        total = exps.sum(dim=1)
        _all_reduce(total, dist.ReduceOp.SUM, group)
        loss = total.log() - (target_logits - top)
        ctx.save_for_backward(exps, total, index, owned, target_slope)
        ctx.mark_non_differentiable(hits)
        return loss, hits

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, grad_hits: Tensor) -> tuple[Tensor | None, ...]:
        exps, total, index, owned, target_slope = ctx.saved_tensors
        grad = exps.mul_((grad_loss / total)[:, None])
        at_target = (grad.gather(1, index).squeeze(1) - grad_loss) * target_slope
        grad.scatter_(1, index, torch.where(owned, at_target, grad.gather(1, index).squeeze(1))[:, None])
        return grad, None, None, None, None, None, None


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


class ShardedMarginSoftmaxLoss(Loss):
    """Shared machinery of :class:`ShardedArcFaceLoss` and :class:`ShardedCosFaceLoss`.

    Parameters
    ----------
    num_classes : int
        Classes in all (every process passes the same number).
    embedding_dim : int
        Dimension of the embeddings.
    margin, scale, temperature : float
        As for the unsharded loss.
    sample_rate : float
        Share of each shard's classes in each step's softmax, in ``(0, 1]``; every class
        of the gathered batch is always kept. 1 (default) is exact.
    reduction : {"mean", "sum", "none"}
        Over the rows of the gathered batch; ``"none"`` returns the per-row
        cross-entropy of the whole gathered batch, shape ``(total_batch_size,)``, in
        rank order, the same on every process (:attr:`local_rows` are this process's).
    process_group : optional
        The ``torch.distributed`` group (default: all processes). Read at construction:
        build the loss after ``init_process_group``.

    Attributes
    ----------
    weight : Parameter of shape (stop - start, embedding_dim)
        This process's class centres.
    start, stop : int
        The classes this process holds.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        margin: float,
        scale: float,
        temperature: float,
        sample_rate: float = 1.0,
        reduction: Reduction = "mean",
        process_group: Any = None,
    ) -> None:
        super().__init__(reduction=reduction)
        self.num_classes = check_int(num_classes, "num_classes", low=1)
        self.embedding_dim = check_int(embedding_dim, "embedding_dim", low=1)
        self.margin = margin
        self.scale = scale
        self.temperature = temperature
        self.sample_rate = check_real(sample_rate, "sample_rate", low=0.0, high=1.0, low_inclusive=False)
        self.process_group = process_group
        self.world_size = process_count(process_group)
        self.rank = process_index(process_group)
        if self.num_classes < self.world_size:
            raise ValueError(
                f"num_classes={self.num_classes} is below the {self.world_size} processes: every "
                "process must hold at least one class"
            )
        self.start, self.stop = distributed.class_shard(self.num_classes, self.world_size, self.rank)
        # Drawn from a generator seeded by the global seed and the shard's first class: shards
        # differ even when every process was seeded alike (load_full_weight sets given values).
        generator = torch.Generator().manual_seed((torch.initial_seed() + self.start) % 2**63)
        shard = torch.randn(self.stop - self.start, self.embedding_dim, generator=generator) * 0.01
        self.weight = nn.Parameter(shard)
        self._last_logits: Tensor | None = None
        self._last_classes: Tensor | None = None
        self._local_rows = slice(0, 0)

    # -- the margin: the unsharded losses' functions ---------------------------------------
    def _target_and_slope(self, target_cosine: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # -- checkpoints -------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        state = super().get_extra_state()
        state.update(num_classes=self.num_classes, start=self.start, stop=self.stop)
        return state

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        saved = tuple(state.get(key) for key in ("num_classes", "start", "stop"))
        here = (self.num_classes, self.start, self.stop)
        if saved != here:
            raise ValueError(
                f"cannot load the shard of classes [{saved[1]}, {saved[2]}) of {saved[0]} into process "
                f"{self.rank}, which holds [{here[1]}, {here[2]}) of {here[0]}: the world size or rank "
                "changed. Save full_weight() instead and load it with load_full_weight()"
            )

    @torch.no_grad()
    def full_weight(self) -> Tensor:
        """Every process's centres, concatenated: shape (num_classes, embedding_dim). A collective."""
        if self.world_size == 1:
            return self.weight.detach().clone()
        rows = [distributed.class_shard(self.num_classes, self.world_size, r) for r in range(self.world_size)]
        largest = max(stop - start for start, stop in rows)
        padded = self.weight.new_zeros(largest, self.embedding_dim)
        padded[: self.stop - self.start] = self.weight
        parts = gather_same_shape(padded, self.process_group)
        return torch.cat([part[: stop - start] for part, (start, stop) in zip(parts, rows, strict=True)])

    @torch.no_grad()
    def load_full_weight(self, weight: Tensor) -> None:
        """Copy this process's rows ``[start, stop)`` of a full (num_classes, embedding_dim) matrix."""
        if tuple(weight.shape) != (self.num_classes, self.embedding_dim):
            raise ValueError(
                f"weight must have shape ({self.num_classes}, {self.embedding_dim}); "
                f"got {tuple(weight.shape)}"
            )
        self.weight.copy_(weight[self.start : self.stop])

    # -- logits --------------------------------------------------------------------------------
    @property
    def local_rows(self) -> slice:
        """This process's rows in the gathered batch of the last call."""
        return self._local_rows

    @property
    def last_logits(self) -> Tensor | None:
        """This process's block of margin-free logits of the last call, detached.

        Shape ``(total_batch_size, kept classes)``: every row of the gathered batch
        against the classes :attr:`last_classes` of this shard (all of them without
        sampling). ``None`` before the first call.
        """
        return self._last_logits

    @property
    def last_classes(self) -> Tensor | None:
        """The global class of each column of :attr:`last_logits`."""
        return self._last_classes

    def _centres(self, dtype: torch.dtype, rows: Tensor | None = None) -> Tensor:
        weight = self.weight if rows is None else self.weight[rows]
        return l2_normalize(weight.to(dtype)) * (self.scale / self.temperature)

    def shard_logits(self, embeddings: Tensor) -> Tensor:
        """Margin-free logits of ``embeddings`` against this process's classes (no communication).

        Parameters
        ----------
        embeddings : Tensor of shape (batch_size, embedding_dim)

        Returns
        -------
        Tensor of shape (batch_size, stop - start)
            ``scale * cos / temperature`` for classes ``start, ..., stop - 1``.
        """
        check_embeddings(embeddings, "embeddings")
        self._check_dim(embeddings)
        x = l2_normalize(embeddings.to(working_dtype(embeddings.dtype)))
        return pairwise_similarity(x, self._centres(x.dtype), metric="dot")

    @torch.no_grad()
    def predict(self, embeddings: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """The ``k`` best classes of each row over every process's classes. A collective.

        Parameters
        ----------
        embeddings : Tensor of shape (batch_size, embedding_dim)
            This process's rows (processes may hold different numbers).
        k : int
            ``1 <= k <= num_classes``.

        Returns
        -------
        scores : Tensor of shape (batch_size, k)
            Margin-free logits, best first.
        classes : Tensor of shape (batch_size, k) and dtype int64
            Global class indices; ties go to the lower class index (as ``torch.argmax``).
        """
        scores, classes, _ = self._predict(embeddings, k)
        return scores, classes

    def _predict(self, embeddings: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-``k`` scores and classes of this process's rows, and their log-sum-exp over all classes."""
        k = check_int(k, "k", low=1, high=self.num_classes)
        check_embeddings(embeddings, "embeddings")
        self._check_dim(embeddings)
        rows_of = torch.zeros(embeddings.shape[0], dtype=torch.int64, device=embeddings.device)
        x_all, _, rows = distributed.gather_batch(embeddings.detach(), rows_of, self.process_group)
        logits = self.shard_logits(x_all)  # (N, stop - start): every row against this shard
        # A stable sort, not topk: tied classes must come in index order.
        order = logits.argsort(dim=1, descending=True, stable=True)[:, :k]
        scores, classes = logits.gather(1, order), order + self.start
        if scores.shape[1] < k:  # a shard with fewer than k classes: pad with never-chosen entries
            pad = k - scores.shape[1]
            scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), -math.inf)], dim=1)
            classes = torch.cat([classes, classes.new_full((classes.shape[0], pad), self.num_classes)], dim=1)
        peak = logits.amax(dim=1)
        _all_reduce(peak, dist.ReduceOp.MAX, self.process_group)
        total = (logits - peak[:, None]).exp().sum(dim=1)
        _all_reduce(total, dist.ReduceOp.SUM, self.process_group)
        lse = total.log() + peak
        if self.world_size > 1:
            # Every shard's candidates for every row; each process merges its own rows.
            scores = gather_same_shape(scores, self.process_group).permute(1, 0, 2).flatten(1)
            classes = gather_same_shape(classes, self.process_group).permute(1, 0, 2).flatten(1)
        scores, classes = scores[rows], classes[rows]
        top_scores, top_classes = distributed.merge_topk(scores, classes, k)
        return top_scores, top_classes, lse[rows]

    @torch.no_grad()
    def collapse_logits(self, embeddings: Tensor, k: int = 5) -> Tensor:
        """A stand-in for the full logits of this process's rows, for ``ClassCollapseMonitor``.

        The ``k`` best classes of each row (:meth:`predict`) keep their logits; every
        other class gets one value, chosen so that the row's softmax normaliser is the
        true one (and never above the ``k``-th logit). The monitor's predicted class,
        top-``k'`` accuracies for ``k' <= k``, prediction histogram and
        ``mean_max_softmax`` are therefore those of the full logits; ``logit_mean`` and
        ``logit_std`` are the stand-in's. Feed each process's own rows and let the monitor
        combine the processes (its default ``sync_on_compute=True``)::

            collapse = ClassCollapseMonitor(num_classes, topk=(1, 5))
            collapse.update(loss.collapse_logits(embeddings.detach(), k=5), labels)

        A collective. Memory: ``(batch_size, num_classes)``, the size of an unsharded
        head's logits for this process's rows.

        Parameters
        ----------
        embeddings : Tensor of shape (batch_size, embedding_dim)
        k : int
            Classes kept exactly per row (default 5: the monitor's default top-5).

        Returns
        -------
        Tensor of shape (batch_size, num_classes)
        """
        k = check_int(k, "k", low=1, high=self.num_classes)
        scores, classes, lse = self._predict(embeddings, k)
        dense = scores.new_empty(scores.shape[0], self.num_classes)
        others = self.num_classes - k
        if others:
            rest = (1.0 - (scores - lse[:, None]).exp().sum(dim=1)).clamp_min(torch.finfo(scores.dtype).tiny)
            fill = torch.minimum(lse + (rest / others).log(), scores[:, -1])
            dense.copy_(fill[:, None].expand_as(dense))
        dense.scatter_(1, classes, scores)
        return dense

    def _check_dim(self, embeddings: Tensor) -> None:
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings has embedding_dim {embeddings.shape[1]} but "
                f"{type(self).__name__} was built with embedding_dim={self.embedding_dim}"
            )

    # -- the loss --------------------------------------------------------------------------------
    def _sampled_classes(self, labels: Tensor) -> Tensor | None:
        """The local class rows kept this step (sorted), or ``None`` for all of them."""
        local = self.stop - self.start
        keep = math.ceil(self.sample_rate * local)
        if keep >= local:
            return None
        device = self.weight.device
        positive = torch.zeros(local, dtype=torch.bool, device=device)
        mine = labels[(labels >= self.start) & (labels < self.stop)] - self.start
        positive[mine] = True
        # Positives first (score 2), then the others in a random order (score in [0, 1)).
        priority = torch.rand(local, device=device) + 2.0 * positive
        count = max(keep, int(positive.sum()))
        return priority.topk(count).indices.sort().values

    def forward(self, embeddings: Tensor, labels: Tensor, **unexpected: Any) -> Tensor:
        """The margin-softmax loss of every process's rows against every process's classes.

        Parameters
        ----------
        embeddings : Tensor of shape (batch_size, embedding_dim)
            This process's embeddings; ``batch_size`` may differ between processes.
        labels : Tensor of shape (batch_size,)
            Integer class labels in ``[0, num_classes)``.

        Returns
        -------
        Tensor
            A scalar, the same on every process (or per-row values of the whole
            gathered batch for ``reduction="none"``).
        """
        _reject_unexpected(self, unexpected)
        # Checked once gathered, so that every process raises the same error instead of one
        # raising while the others wait in the next collective.
        x_all, labels_all, self._local_rows = distributed.gather_batch(embeddings, labels, self.process_group)
        check_embeddings(x_all, "embeddings")
        self._check_dim(x_all)
        check_class_labels(labels_all, self.num_classes, "labels")
        self._last_logits = None
        group = self.process_group
        if self.world_size > 1:
            # DDP averages the model's gradients over the processes: see the module notes.
            x_all = _ScaleGradient.apply(x_all, float(self.world_size))
        x = l2_normalize(x_all.to(working_dtype(x_all.dtype)))
        kept = self._sampled_classes(labels_all)
        logits = pairwise_similarity(x, self._centres(x.dtype, kept), metric="dot")
        scale = self.scale / self.temperature
        with torch.no_grad():
            owned = (labels_all >= self.start) & (labels_all < self.stop)
            columns = torch.where(owned, labels_all - self.start, torch.zeros_like(labels_all))
            if kept is not None:
                columns = torch.where(owned, torch.searchsorted(kept, columns), torch.zeros_like(columns))
            plain = torch.where(owned, logits.gather(1, columns[:, None]).squeeze(1), 0.0)
            _all_reduce(plain, dist.ReduceOp.SUM, group)  # exactly one process owns each row's class
            target_cosine = plain / scale
            target, slope = self._target_and_slope(target_cosine)
        per_row, hits = _ShardedMarginCrossEntropy.apply(
            logits, columns, owned, target * scale, plain, slope, group
        )
        with torch.no_grad():
            n = logits.shape[0]
            sums = torch.stack([logits.sum() / scale, logits.new_tensor(float(logits.shape[1]))])
            _all_reduce(sums, dist.ReduceOp.SUM, group)
            total_cosine, classes_seen = sums[0], sums[1]
            stats: dict[str, Tensor | float] = {
                "accuracy": hits.float().mean(),
                "accuracy_hits": hits.sum(),
                "accuracy_total": float(n),
                "accuracy_chance": 1.0 / self.num_classes,
                "mean_target_cosine": target_cosine.mean(),
                "mean_nontarget_cosine": (total_cosine - target_cosine.sum())
                / (n * (classes_seen - 1).clamp_min(1)),
            }
        self._last_logits = logits.detach()
        self._last_classes = (
            torch.arange(self.start, self.stop, device=x.device) if kept is None else kept + self.start
        )
        return self._record(self._reduce(per_row), stats)

    def extra_repr(self) -> str:
        parts = [
            f"num_classes={self.num_classes}",
            f"embedding_dim={self.embedding_dim}",
            f"classes=[{self.start}, {self.stop})",
            f"margin={self.margin:g}",
            f"scale={self.scale:g}",
            f"temperature={self.temperature:g}",
        ]
        if self.sample_rate < 1.0:
            parts.append(f"sample_rate={self.sample_rate:g}")
        if self.reduction != "mean":
            parts.append(f"reduction={self.reduction!r}")
        return ", ".join(parts)


class ShardedArcFaceLoss(ShardedMarginSoftmaxLoss):
    r"""ArcFace (:class:`~embedkit.losses.ArcFaceLoss`) with the class centres sharded across processes.

    .. math:: f(\cos\theta_y) = \cos(\theta_y + m) \;(\theta_y \le \pi - m),\quad
              \cos\theta_y - m\sin m \text{ otherwise}

    The margin is computed by :class:`~embedkit.losses.ArcFaceLoss`'s own function. See
    :mod:`embedkit.losses.partial_fc` for the scheme, DDP use and checkpoints, and
    :class:`ShardedMarginSoftmaxLoss` for the parameters. ``margin`` in radians (default
    0.5), ``scale`` 64. One centre per class (no sub-centres).
    """

    hyper_parameters: ClassVar[HyperChecks] = ArcFaceLoss.hyper_parameters
    # The margin math of the unsharded loss, shared rather than copied (it reads self.margin).
    _target_and_slope = ArcFaceLoss._target_and_slope

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        margin: float = 0.5,
        scale: float = 64.0,
        temperature: float = 1.0,
        sample_rate: float = 1.0,
        reduction: Reduction = "mean",
        process_group: Any = None,
    ) -> None:
        super().__init__(
            num_classes,
            embedding_dim,
            margin=margin,
            scale=scale,
            temperature=temperature,
            sample_rate=sample_rate,
            reduction=reduction,
            process_group=process_group,
        )


class ShardedCosFaceLoss(ShardedMarginSoftmaxLoss):
    r"""CosFace (:class:`~embedkit.losses.CosFaceLoss`) with the class centres sharded across processes.

    .. math:: f(\cos\theta_y) = \cos\theta_y - m

    See :class:`ShardedArcFaceLoss`; ``margin`` default 0.35, ``scale`` 64.
    """

    hyper_parameters: ClassVar[HyperChecks] = CosFaceLoss.hyper_parameters
    _target_and_slope = CosFaceLoss._target_and_slope

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        margin: float = 0.35,
        scale: float = 64.0,
        temperature: float = 1.0,
        sample_rate: float = 1.0,
        reduction: Reduction = "mean",
        process_group: Any = None,
    ) -> None:
        super().__init__(
            num_classes,
            embedding_dim,
            margin=margin,
            scale=scale,
            temperature=temperature,
            sample_rate=sample_rate,
            reduction=reduction,
            process_group=process_group,
        )
