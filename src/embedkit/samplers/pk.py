"""P classes × K samples per batch: a fast, deterministic, resumable, rank-aware batch sampler.

How an epoch is planned
-----------------------
Everything below is vectorised numpy; the only Python loops run over the
``p`` columns of the plan, over the fewer than ``p`` padding slots, and over the
batches being yielded.

1. **Chunks.** Each class's samples are shuffled and cut into chunks of ``k``.
   A class with ``n >= k`` samples gives ``ceil(n / k)`` chunks; its last, short
   chunk is topped up with other samples of the same class (the first ones of the
   shuffled order), so no sample repeats inside a chunk. A class with ``n < k``
   samples gives one chunk, handled by the ``small_classes`` policy.
2. **Epoch length.** A class can fill at most one slot of a batch, so with ``B``
   batches it can place at most ``B`` chunks. Let ``m_c`` be the chunk count of
   class ``c``, ``B_fit`` the smallest ``B >= 1`` with ``sum_c min(m_c, B) <= B * p``
   (every chunk fits under that cap) and ``m_(p)`` the ``p``-th largest ``m_c``. The
   epoch has ``B = max(B_fit, m_(p))`` batches: it holds every chunk it can, and it
   never ends while ``p`` classes still have chunks left. ``B`` depends only on the
   labels, ``p`` and ``k``, so ``len(sampler)`` is exact and free.
3. **Coverage.** Every sample of every eligible class appears at least once per
   epoch exactly when no class has more than ``B`` chunks
   (:attr:`PKSampler.covers_all_samples`). That holds whenever no class has more
   than ``ceil(M / p)`` chunks (``M = sum_c m_c``; then ``B = ceil(M / p)``). It fails
   only when fewer than ``p`` classes are too large for the rest: once the others run
   out, no batch of ``p`` distinct classes can be formed. Those classes are capped at
   ``B`` chunks — a new random subset of their samples each epoch — and every sample
   of every other class still appears.
4. **Arrangement.** The classes are put in a random order and their chunks laid
   down column by column into a ``B × p`` grid; each column's rows are shuffled
   independently (a class that continues from one column into the next is kept
   off the rows it already holds). A class's chunks therefore land in distinct
   batches, and which classes meet in a batch is random.
5. **Tail.** ``B * p - sum_c min(m_c, B)`` slots (fewer than ``p``) stay empty; each
   is filled with a fresh chunk of a class that is not yet in that batch. Every batch
   is complete.
6. **Replicas.** All ranks build the same global plan from ``(seed, epoch)``. When
   ``B`` is not a multiple of ``num_replicas`` the first batches of the plan are
   repeated until it is (as ``DistributedSampler`` pads), and rank ``r`` takes
   batches ``r, r + num_replicas, ...``: disjoint positions, equal lengths.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Sampler

from .._checks import check_choice, check_int
from ..labels import encode_labels

__all__ = ["PKSampler", "SmallClassPolicy"]

SmallClassPolicy = Literal["replace", "drop", "error"]
_SMALL_CLASS_POLICIES = ("replace", "drop", "error")
_STATE_VERSION = 1
_STATE_KEYS = (
    "version",
    "seed",
    "epoch",
    "batches_done",
    "num_samples",
    "labels_crc32",
    "p",
    "k",
    "small_classes",
    "num_replicas",
)


def _resolve_replicas(num_replicas: Any, rank: Any) -> tuple[int, int]:
    """Fill ``num_replicas``/``rank`` from ``torch.distributed`` when it is initialised."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if distributed else 1
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else 0
    num_replicas = check_int(num_replicas, "num_replicas", low=1)
    rank = check_int(rank, "rank", low=0)
    if rank >= num_replicas:
        raise ValueError(f"rank must lie in [0, num_replicas - 1] = [0, {num_replicas - 1}]; got {rank}")
    return num_replicas, rank


def _epoch_length(chunks: np.ndarray, p: int) -> int:
    """Batches per epoch: ``max(B_fit, m_p)`` (see the module docstring).

    ``B_fit`` is the smallest ``B >= 1`` with ``sum(min(chunks, B)) <= B * p`` — every
    chunk fits when a class fills at most one slot per batch — and ``m_p`` is the
    ``p``-th largest chunk count: the epoch never ends while ``p`` classes still have
    chunks left. Between the two, exactly ``p`` classes have chunks left, so the
    longer epoch needs no more top-up chunks than ``B_fit`` does.
    """
    ordered = np.sort(chunks)
    cumulative = np.concatenate([[0], np.cumsum(ordered)])
    num_classes = ordered.size

    def fits(b: int) -> bool:
        below = int(np.searchsorted(ordered, b, side="left"))
        return int(cumulative[below]) + b * (num_classes - below) <= b * p

    # sum(min(m, B)) / B never increases with B, so the predicate is monotone.
    low, high = 1, max(1, math.ceil(int(cumulative[-1]) / p))
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return max(low, int(ordered[num_classes - p]))


def _draw_below(rng: np.random.Generator, high: np.ndarray) -> np.ndarray:
    """Uniform integers in ``[0, high)`` for an array of bounds (bias below ``high / 2**62``)."""
    return rng.integers(0, 1 << 62, size=high.shape, dtype=np.int64) % high


def _shuffle_within(class_key: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Permutation sorting by class with a uniformly random order inside each class.

    ``class_key`` holds each position's class index shifted left by 32 bits. Random
    32-bit tie-breakers and a *stable* sort make the result the same on every machine
    (an unstable sort may order equal keys differently on different CPUs).
    """
    key = class_key | rng.integers(0, 1 << 32, size=class_key.size, dtype=np.uint64)
    return np.argsort(key, kind="stable")


def _label_bytes(names: np.ndarray) -> bytes:
    """The distinct labels as bytes, for the checksum that ties a saved state to its labels."""
    if names.dtype.kind in "iuUS":
        return names.tobytes()
    return repr(names.tolist()).encode()


def _describe_small(values: np.ndarray, counts: np.ndarray, k: int) -> str:
    shown = ", ".join(
        f"label {v} ({c} sample{'s' if c != 1 else ''})" for v, c in zip(values[:8], counts[:8], strict=True)
    )
    more = f" and {values.size - 8} more" if values.size > 8 else ""
    return f"{values.size} class(es) have fewer than k={k} samples: {shown}{more}"


class PKSampler(Sampler[list[int]]):
    """Batches of ``p`` distinct classes × ``k`` samples each, for ``DataLoader(batch_sampler=...)``.

    Every batch holds exactly ``p * k`` dataset indices: ``k`` consecutive indices of
    one class, then ``k`` of the next, for ``p`` distinct classes. An epoch covers
    every sample at least once whenever the label distribution allows it (see
    :attr:`covers_all_samples` and the guide), is a pure function of
    ``(seed, epoch)``, and is split into disjoint, equal-length shards across ranks.

    Parameters
    ----------
    labels : list, ndarray or Tensor of shape (n_samples,)
        Class label of every sample of the dataset, in dataset order: integers of any
        dtype, strings (e.g. identity names) or other hashable ids (see
        :func:`~embedkit.labels.encode_labels`). Names and their integer codes give the
        same batches.
    p : int
        Number of distinct classes per batch (>= 1).
    k : int
        Number of samples per class in a batch (>= 1).
    small_classes : {"replace", "drop", "error"}
        What to do with classes that have fewer than ``k`` samples.
        ``"replace"`` (default): the class gives one chunk holding all of its samples,
        topped up to ``k`` by sampling its samples with replacement.
        ``"drop"``: leave such classes out entirely (their samples are never drawn).
        ``"error"``: raise a ``ValueError`` naming them.
    seed : int
        Seed of the plan; with the epoch it fixes every batch. Never reads the global RNG.
    num_replicas : int, optional
        Number of ranks sharing the epoch. Read from ``torch.distributed`` when it is
        initialised, else 1.
    rank : int, optional
        This process's rank in ``[0, num_replicas)``. Read from ``torch.distributed``
        when it is initialised, else 0.

    Raises
    ------
    TypeError
        If ``labels`` holds floats, booleans or unhashable items, or ``p``, ``k``, ``seed``,
        ``num_replicas`` or ``rank`` is not an integer.
    ValueError
        If ``labels`` is not 1-D or is empty, ``p < 1``, ``k < 1``, ``p`` is larger than
        the number of eligible classes, ``rank`` is out of range, or
        ``small_classes="error"`` and some class has fewer than ``k`` samples.

    Notes
    -----
    Call :meth:`set_epoch` at the start of every epoch (as with
    ``DistributedSampler``); without it every pass repeats the same epoch.

    Examples
    --------
    >>> sampler = PKSampler(labels, p=32, k=4, seed=0)
    >>> loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4)
    >>> for epoch in range(num_epochs):
    ...     sampler.set_epoch(epoch)
    ...     for images, targets in loader:
    ...         ...
    """

    def __init__(
        self,
        labels: Any,
        p: int,
        k: int,
        *,
        small_classes: SmallClassPolicy = "replace",
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        # Any hashable labels, planned by their codes: the codes follow the sorted order of the
        # labels, so names and their integer codes give the same batches.
        codes, names = encode_labels(labels, "labels")
        label_array = np.ascontiguousarray(codes)
        self._p = check_int(p, "p", low=1)
        self._k = check_int(k, "k", low=1)
        self._small_classes = check_choice(small_classes, "small_classes", _SMALL_CLASS_POLICIES)
        self._seed = check_int(seed, "seed", low=0)
        self._num_replicas, self._rank = _resolve_replicas(num_replicas, rank)
        self._num_samples = int(label_array.size)
        self._crc32 = zlib.crc32(_label_bytes(names), zlib.crc32(label_array.data))

        # Group sample indices by class once; each epoch only reshuffles inside classes.
        order = np.argsort(label_array, kind="stable")
        sorted_labels = label_array[order]
        starts = np.concatenate([[0], np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1])
        counts = np.diff(np.append(starts, label_array.size))
        classes = sorted_labels[starts]
        total_classes = int(classes.size)

        small = counts < self._k
        self._dropped_classes = names[:0]
        if small.any():
            if self._small_classes == "error":
                small_names = names[classes[small]]
                raise ValueError(
                    f"small_classes='error' but {_describe_small(small_names, counts[small], self._k)}. "
                    "Pass small_classes='replace' to top them up by sampling with replacement, or "
                    "small_classes='drop' to leave them out."
                )
            if self._small_classes == "drop":
                self._dropped_classes = names[classes[small]]
                order = order[np.repeat(~small, counts)]
                counts = counts[~small]
                classes = classes[~small]
                starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

        num_classes = int(classes.size)
        if self._p > num_classes:
            detail = f"the labels have {total_classes} classes"
            if self._dropped_classes.size:
                detail += (
                    f", of which {self._dropped_classes.size} have fewer than k={self._k} samples and "
                    "are dropped (small_classes='drop')"
                )
            raise ValueError(
                f"p={self._p} is larger than the number of eligible classes, {num_classes} ({detail}); "
                f"expected p <= {num_classes}. Lower p or use more classes."
            )

        self._order = order.astype(np.int64, copy=False)
        self._starts = starts.astype(np.int64, copy=False)
        self._counts = counts.astype(np.int64, copy=False)
        self._classes = classes
        self._class_key = np.repeat(np.arange(num_classes, dtype=np.uint64), counts) << np.uint64(32)
        self._chunks = np.where(counts >= self._k, -(-counts // self._k), 1).astype(np.int64)
        self._global_batches = _epoch_length(self._chunks, self._p)
        self._per_replica = -(-self._global_batches // self._num_replicas)

        self._epoch = 0
        self._position = 0  # batches of the current epoch yielded by the last iteration
        self._resume: int | None = None  # batches to skip on the next iteration
        self._cache: tuple[tuple[int, int], np.ndarray] | None = None

    # -- properties --------------------------------------------------------------
    @property
    def p(self) -> int:
        """Number of distinct classes per batch."""
        return self._p

    @property
    def k(self) -> int:
        """Number of samples per class in a batch."""
        return self._k

    @property
    def batch_size(self) -> int:
        """``p * k``, the number of indices in every batch."""
        return self._p * self._k

    @property
    def seed(self) -> int:
        """The seed of the plan."""
        return self._seed

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will yield."""
        return self._epoch

    @property
    def num_replicas(self) -> int:
        """Number of ranks sharing each epoch."""
        return self._num_replicas

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self._rank

    @property
    def num_classes(self) -> int:
        """Number of eligible classes (after ``small_classes="drop"``)."""
        return int(self._classes.size)

    @property
    def dropped_classes(self) -> np.ndarray:
        """Labels left out by ``small_classes="drop"`` (empty otherwise), shape (n_dropped,)."""
        return self._dropped_classes.copy()

    @property
    def num_batches(self) -> int:
        """Batches per epoch on this rank (the length of a full, un-resumed epoch)."""
        return self._per_replica

    @property
    def covers_all_samples(self) -> bool:
        """Whether every sample of every eligible class appears in each epoch (across all ranks).

        False when a few (fewer than ``p``) classes are too large for the rest: a class
        appears at most once per batch, so only as many of its chunks fit in an epoch
        as there are batches. It is True whenever no class holds more than ``1/p`` of
        the samples.
        """
        return bool(self._chunks.max() <= self._global_batches)

    # -- epoch control -----------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration yields (call it at the start of each epoch).

        A resume point loaded by :meth:`load_state_dict` is kept when ``epoch`` is the
        loaded epoch, so the usual loop ``set_epoch(epoch); for batch in loader`` resumes
        correctly; any other epoch starts from its first batch.
        """
        epoch = check_int(epoch, "epoch", low=0)
        if epoch != self._epoch:
            self._resume = None
            self._position = 0
        self._epoch = epoch

    def __len__(self) -> int:
        """Number of batches the next iteration yields on this rank (fewer after a resume)."""
        return self._per_replica - (self._resume or 0)

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.global_plan()[self._rank :: self._num_replicas]
        start = self._resume or 0
        self._resume = None
        self._position = start
        for index in range(start, plan.shape[0]):
            self._position = index + 1
            yield plan[index].tolist()

    # -- resume ------------------------------------------------------------------
    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        """The state needed to resume mid-epoch: seed, epoch and batches already done.

        Parameters
        ----------
        batches_done : int, optional
            Batches of the current epoch your training loop has finished. By default
            the number this rank's sampler has yielded, which runs ahead of the loop by
            the DataLoader's prefetch (``num_workers * prefetch_factor`` batches) when
            ``num_workers > 0``; pass the loop's own count to resume exactly there.

        Returns
        -------
        dict
            Plain Python values (safe for ``torch.save``). Ranks advance in lockstep, so
            the state saved by any rank resumes every rank.
        """
        done = self._resume if self._resume is not None else self._position
        if batches_done is not None:
            done = check_int(batches_done, "batches_done", low=0, high=self._per_replica)
        return {
            "version": _STATE_VERSION,
            "seed": self._seed,
            "epoch": self._epoch,
            "batches_done": int(done),
            "num_samples": self._num_samples,
            "labels_crc32": self._crc32,
            "p": self._p,
            "k": self._k,
            "small_classes": self._small_classes,
            "num_replicas": self._num_replicas,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next iteration yields exactly the remaining batches.

        Raises
        ------
        TypeError
            If ``state_dict`` is not a mapping.
        ValueError
            If keys are missing, or the state was saved with different labels, ``p``,
            ``k``, ``small_classes`` or ``num_replicas``.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a mapping from PKSampler.state_dict(); got {type(state_dict).__name__}"
            )
        missing = [key for key in _STATE_KEYS if key not in state_dict]
        if missing:
            raise ValueError(
                f"state_dict is missing key(s) {missing}; expected the output of PKSampler.state_dict()"
            )
        if state_dict["version"] != _STATE_VERSION:
            raise ValueError(f"state_dict has version {state_dict['version']!r}; expected {_STATE_VERSION}")
        if state_dict["num_samples"] != self._num_samples or state_dict["labels_crc32"] != self._crc32:
            raise ValueError(
                f"state_dict was saved for different labels ({state_dict['num_samples']} samples, "
                f"crc32 {state_dict['labels_crc32']}); this sampler has {self._num_samples} samples, "
                f"crc32 {self._crc32}. Build the sampler from the same labels in the same order."
            )
        for key, mine in (
            ("p", self._p),
            ("k", self._k),
            ("small_classes", self._small_classes),
            ("num_replicas", self._num_replicas),
        ):
            if state_dict[key] != mine:
                raise ValueError(
                    f"state_dict was saved with {key}={state_dict[key]!r} but this sampler has "
                    f"{key}={mine!r}; expected the same value to resume the same batches"
                )
        seed = check_int(state_dict["seed"], "state_dict['seed']", low=0)
        epoch = check_int(state_dict["epoch"], "state_dict['epoch']", low=0)
        done = check_int(
            state_dict["batches_done"], "state_dict['batches_done']", low=0, high=self._per_replica
        )
        self._seed = seed
        self._epoch = epoch
        self._resume = done
        self._position = done

    # -- the plan ----------------------------------------------------------------
    def global_plan(self) -> np.ndarray:
        """Every rank's batches for the current epoch, in global order.

        Returns
        -------
        ndarray of shape (num_batches * num_replicas, p * k) and dtype int64
            Dataset indices; rank ``r`` yields rows ``r, r + num_replicas, ...``.
            Rows past the epoch's own batches (only when its batch count is not a
            multiple of ``num_replicas``) repeat its first batches.
        """
        key = (self._seed, self._epoch)
        if self._cache is None or self._cache[0] != key:
            plan = self._build(self._epoch)
            plan.flags.writeable = False
            self._cache = (key, plan)
        return self._cache[1]

    def _build(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self._seed, epoch])
        p, k, num_batches = self._p, self._k, self._global_batches
        counts, starts = self._counts, self._starts
        num_classes = counts.size

        # 1. Shuffle inside every class.
        shuffled = self._order[_shuffle_within(self._class_key, rng)]

        # 2. Chunks of k positions inside each class; at most num_batches per class.
        used = np.minimum(self._chunks, num_batches)
        num_chunks = int(used.sum())
        first_chunk = np.cumsum(used) - used
        chunk_class = np.repeat(np.arange(num_classes), used)
        chunk_rank = np.arange(num_chunks) - np.repeat(first_chunk, used)
        position = chunk_rank[:, None] * k + np.arange(k)
        # Only a class's last chunk can run past its samples; fix those rows alone.
        last = first_chunk + used - 1
        tail = position[last]
        size = counts[:, None]
        # A short last chunk wraps round to the class's first (shuffled) samples:
        # distinct from the chunk's own samples because the class has >= k samples.
        tail = np.where(tail >= size, tail - size, tail)
        short = (size < k) & (np.arange(k) >= size)
        if short.any():  # classes with fewer than k samples: top up with replacement
            tail[short] = _draw_below(rng, np.broadcast_to(size, short.shape)[short])
        position[last] = tail
        position += starts[chunk_class][:, None]
        samples = shuffled[position]

        # 3. Classes in random order, chunks laid down column by column.
        class_order = rng.permutation(num_classes)
        run = used[class_order]
        sequence = (
            np.arange(num_chunks)
            - np.repeat(np.cumsum(run) - run, run)
            + np.repeat(first_chunk[class_order], run)
        )
        sequence = np.concatenate([sequence, np.full(num_batches * p - num_chunks, -1, dtype=np.int64)])
        sequence_class = np.where(sequence >= 0, chunk_class[np.maximum(sequence, 0)], -1)
        columns = sequence.reshape(p, num_batches)
        column_class = sequence_class.reshape(p, num_batches)
        rows = np.argsort(rng.random((p, num_batches)), axis=1, kind="stable")
        # A class that runs from column j - 1 into column j must avoid its rows of column j - 1.
        boundary = np.flatnonzero(
            (column_class[:-1, -1] >= 0) & (column_class[:-1, -1] == column_class[1:, 0])
        )
        for j in boundary + 1:
            taken = np.zeros(num_batches, dtype=bool)
            taken[rows[j - 1][column_class[j - 1] == column_class[j, 0]]] = True
            head = int(np.count_nonzero(column_class[j] == column_class[j, 0]))
            free = rows[j][~taken[rows[j]]]
            rest = np.concatenate([free[head:], rows[j][taken[rows[j]]]])
            # The head gets random free rows; the rest of the column is reshuffled so that
            # the rows freed here do not all go to the class at the end of the column.
            rows[j] = np.concatenate([free[:head], rest[rng.permutation(rest.size)]])
        grid = np.empty((num_batches, p), dtype=np.int64)
        grid[rows, np.arange(p)[:, None]] = columns

        # 4. Fill the (fewer than p) empty slots with fresh chunks of absent classes.
        extra: list[np.ndarray] = []
        for row in np.flatnonzero((grid < 0).any(axis=1)):
            empty = np.flatnonzero(grid[row] < 0)
            present = np.sort(chunk_class[grid[row][grid[row] >= 0]])
            pick = rng.choice(num_classes - present.size, size=empty.size, replace=False)
            fill_classes = pick + np.searchsorted(present - np.arange(present.size), pick, side="right")
            for slot, cls in zip(empty, fill_classes, strict=True):
                n = int(counts[cls])
                if n >= k:
                    inside = rng.choice(n, size=k, replace=False)
                else:
                    inside = np.concatenate([np.arange(n), rng.integers(0, n, size=k - n)])
                grid[row, slot] = num_chunks + len(extra)
                extra.append(shuffled[starts[cls] + inside])
        if extra:
            samples = np.concatenate([samples, np.stack(extra)])

        # 5. Random batch order; pad to a multiple of num_replicas by repeating the first batches.
        grid = grid[rng.permutation(num_batches)]
        batches = samples[grid].reshape(num_batches, p * k)
        total = self._per_replica * self._num_replicas
        if total != num_batches:
            batches = batches[np.arange(total) % num_batches]
        return batches

    def __repr__(self) -> str:
        return (
            f"PKSampler(p={self._p}, k={self._k}, num_samples={self._num_samples}, "
            f"num_classes={self.num_classes}, small_classes={self._small_classes!r}, seed={self._seed}, "
            f"epoch={self._epoch}, num_replicas={self._num_replicas}, rank={self._rank}, "
            f"num_batches={self._per_replica})"
        )
