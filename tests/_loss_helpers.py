"""Random batches and comparison helpers for the loss reference tests.

Label layouts
-------------
``"pk"``
    P classes with K items each (the last class may be short), shuffled.
``"long_tailed"``
    Zipf-like class sizes (a few large classes, many singletons), shuffled, with
    non-contiguous label values.
Degenerate batches: ``"one_class"`` (no negative pair), ``"all_distinct"`` (no
positive pair), ``"two_same"`` / ``"two_different"`` (two items), ``"duplicates"``
(a PK batch in which some rows are exact copies of others, one copy carrying a
different label).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from _factories import one_cpu_thread

LAYOUTS = ("pk", "long_tailed")
DEGENERATE_LAYOUTS = ("one_class", "all_distinct", "two_same", "two_different", "duplicates")
SEEDS = (0, 1, 2)
SIZES = ((8, 4), (33, 16), (96, 4))  # (batch size N, embedding dim D)

RTOL = 1e-5
ATOL = 1e-8


def make_labels(layout: str, n: int, rng: np.random.Generator, *, contiguous: bool = False) -> Tensor:
    """Integer labels of ``n`` items in the given layout (see the module docstring)."""
    if layout in ("pk", "duplicates"):
        k = 2 if n < 16 else (3 if n % 3 == 0 else 4)
        labels = np.repeat(np.arange(-(-n // k)), k)[:n]
    elif layout == "long_tailed":
        sizes: list[int] = []
        rank = 1
        while sum(sizes) < n:
            sizes.append(max(1, int(n / 3 / rank**1.3)))
            rank += 1
        labels = np.repeat(np.arange(len(sizes)), sizes)[:n]
    elif layout == "one_class":
        labels = np.zeros(n, dtype=np.int64)
    elif layout == "all_distinct":
        labels = np.arange(n)
    elif layout == "two_same":
        labels = np.zeros(2, dtype=np.int64)
    elif layout == "two_different":
        labels = np.arange(2)
    else:
        raise ValueError(layout)
    labels = rng.permutation(labels)
    if not contiguous:
        # Label values need not be 0..C-1 for pair losses.
        labels = labels * 7 + 3
    return torch.as_tensor(labels, dtype=torch.int64)


def make_batch(layout: str, n: int, d: int, seed: int, *, contiguous: bool = False) -> tuple[Tensor, Tensor]:
    """Float64 embeddings of shape (n', d) and labels in ``layout`` (n' = 2 for the two-item layouts)."""
    rng = np.random.default_rng(seed)
    labels = make_labels(layout, n, rng, contiguous=contiguous)
    x = torch.as_tensor(rng.standard_normal((len(labels), d)), dtype=torch.float64)
    if layout == "duplicates":
        # Copy a few rows onto others of the same class, and one row onto a row of another class.
        for i in range(len(labels)):
            same = (labels == labels[i]).nonzero().flatten().tolist()
            later = [j for j in same if j > i]
            if later and i % 3 == 0:
                x[later[0]] = x[i]
        other = (labels != labels[1]).nonzero().flatten()
        x[int(other[-1])] = x[1]
    return x, labels


def make_reference_set(labels: Tensor, m: int, d: int, seed: int) -> tuple[Tensor, Tensor]:
    """A reference set of ``m`` items whose labels overlap the queries' (plus one label of its own)."""
    rng = np.random.default_rng(seed + 1000)
    pool = np.concatenate([np.unique(labels.numpy()), [int(labels.max()) + 11]])
    ref_labels = torch.as_tensor(rng.choice(pool, size=m), dtype=torch.int64)
    ref = torch.as_tensor(rng.standard_normal((m, d)), dtype=torch.float64)
    return ref, ref_labels


def value_and_grads(fn, *tensors: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``fn(*leaves)`` and the gradient of it w.r.t. fresh leaf copies of ``tensors`` (zeros if unused)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    if not torch.is_tensor(value):
        value = torch.tensor(float(value), dtype=torch.float64)
    if value.requires_grad:
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
    else:
        grads = [None] * len(leaves)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)]
    return value.detach().to(torch.float64).reshape(()), grads


def assert_close(actual: Tensor, expected: Tensor, what: str = "") -> None:
    """Float64 comparison at the acceptance tolerance (1e-5 relative)."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual,
        expected,
        rtol=RTOL,
        atol=ATOL * max(1.0, scale),
        msg=lambda m: f"{what}: {m}",
    )


def duplicate_groups(x: Tensor) -> Tensor:
    """An (n, g) 0/1 matrix assigning each row of ``x`` to its group of exactly equal rows."""
    _, inverse = torch.unique(x, dim=0, return_inverse=True)
    return torch.nn.functional.one_hot(inverse).to(x.dtype)


# These tests make thousands of tiny tensor ops; thread hand-offs cost more than the
# arithmetic, so the modules importing this fixture run on one intra-op thread.
one_thread = pytest.fixture(autouse=True, scope="module")(one_cpu_thread)
