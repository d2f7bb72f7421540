"""Shared builders for the loss property, precision and contract tests, and the examples' loader.

* ``LOSSES``: every loss configuration under test, by a readable id, built for a
  given number of classes and embedding dimension;
* hypothesis strategies for labelled batches: single-class, all-distinct, P×K and
  random label layouts, with duplicate rows and zero rows mixed in.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from embedkit.losses import (
    ArcFaceLoss,
    CircleLoss,
    ClassifierLoss,
    ContrastiveLoss,
    CosFaceLoss,
    Loss,
    MultiSimilarityLoss,
    NormalizedSoftmaxLoss,
    NTXentLoss,
    ProxyAnchorLoss,
    SubCenterArcFaceLoss,
    SupConLoss,
    TripletMarginLoss,
)

NUM_CLASSES = 5
DIM = 8

LossFactory = Callable[[int, int], Loss]

LOSSES: dict[str, LossFactory] = {
    "contrastive": lambda c, d: ContrastiveLoss(),
    "contrastive_cosine": lambda c, d: ContrastiveLoss(0.1, 0.6, distance="cosine"),
    "triplet_batch_all": lambda c, d: TripletMarginLoss(mining="batch_all"),
    "triplet_all": lambda c, d: TripletMarginLoss(mining="all"),
    "triplet_all_soft": lambda c, d: TripletMarginLoss(mining="all", soft_margin=True),
    "triplet_batch_hard": lambda c, d: TripletMarginLoss(mining="batch_hard"),
    "triplet_semi_hard": lambda c, d: TripletMarginLoss(mining="semi_hard"),
    "triplet_cosine": lambda c, d: TripletMarginLoss(0.3, distance="cosine"),
    "triplet_squared": lambda c, d: TripletMarginLoss(mining="batch_hard", distance="squared_euclidean"),
    "supcon": lambda c, d: SupConLoss(),
    "ntxent": lambda c, d: NTXentLoss(),
    "multi_similarity": lambda c, d: MultiSimilarityLoss(),
    "multi_similarity_no_mining": lambda c, d: MultiSimilarityLoss(mining=False),
    "circle": lambda c, d: CircleLoss(),
    "proxy_anchor": lambda c, d: ProxyAnchorLoss(c, d),
    "normalized_softmax": lambda c, d: NormalizedSoftmaxLoss(c, d),
    "cosface": lambda c, d: CosFaceLoss(c, d),
    "arcface": lambda c, d: ArcFaceLoss(c, d),
    "subcenter_arcface": lambda c, d: SubCenterArcFaceLoss(c, d),
}

# Every loss above is non-negative by definition (hinges, -log of a probability,
# log(1 + Σ exp), softplus).
PAIR_LOSSES = [
    name
    for name in LOSSES
    if name not in {"proxy_anchor", "normalized_softmax", "cosface", "arcface", "subcenter_arcface"}
]
CLASSIFIER_LOSSES = [name for name in LOSSES if name not in PAIR_LOSSES]
MARGIN_SOFTMAX_LOSSES = ["normalized_softmax", "cosface", "arcface", "subcenter_arcface"]

# Losses whose value is a continuous function of the embeddings (no mined subset
# and no "mean over active terms" divisor that jumps at a hinge's kink).
CONTINUOUS_LOSSES = [
    "triplet_all",
    "triplet_all_soft",
    "triplet_batch_hard",
    "triplet_squared",
    "supcon",
    "ntxent",
    "multi_similarity_no_mining",
    "circle",
    *CLASSIFIER_LOSSES,
]


def one_cpu_thread() -> Iterator[None]:
    """Run a module's tests on one intra-op thread, then restore the setting.

    These tests use tiny tensors; with two OpenMP threads on a busy machine a single
    12×5 ``log_softmax`` waits ~20 ms at the thread barrier (0.01 ms on one thread).
    Use as ``_threads = pytest.fixture(autouse=True, scope="module")(one_cpu_thread)``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_loss(
    name: str,
    num_classes: int = NUM_CLASSES,
    dim: int = DIM,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Loss:
    """Build loss ``name`` with deterministic parameters in ``dtype``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loss = LOSSES[name](num_classes, dim)
    return loss.to(dtype)


def is_classifier(loss: Loss) -> bool:
    return isinstance(loss, ClassifierLoss)


def class_parameter(loss: Loss) -> torch.nn.Parameter:
    """The learnable class centres or proxies of a classifier loss."""
    return loss.proxies if isinstance(loss, ProxyAnchorLoss) else loss.weight  # type: ignore[return-value]


def pk_labels(p: int, k: int) -> torch.Tensor:
    """``p`` classes with ``k`` samples each: [0]*k + [1]*k + ..."""
    return torch.arange(p).repeat_interleave(k)


def random_batch(
    n: int = 12, dim: int = DIM, *, num_classes: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian embeddings and P×K labels (``n`` must be a multiple of ``num_classes``)."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, dim, generator=generator, dtype=torch.float64).to(dtype)
    return embeddings, pk_labels(num_classes, n // num_classes)


# -- hypothesis strategies ----------------------------------------------------------
LAYOUTS = ("single_class", "all_distinct", "pk", "random")


@st.composite
def label_layouts(draw: st.DrawFn, num_classes: int = NUM_CLASSES, max_rows: int = 12) -> np.ndarray:
    """Integer labels in ``[0, num_classes)`` in one of the layouts of ``LAYOUTS``."""
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "single_class":
        n = draw(st.integers(1, max_rows))
        return np.full(n, draw(st.integers(0, num_classes - 1)), dtype=np.int64)
    if layout == "all_distinct":
        n = draw(st.integers(1, num_classes))
        return np.asarray(draw(st.permutations(range(num_classes)))[:n], dtype=np.int64)
    if layout == "pk":
        k = draw(st.integers(2, 3))
        p = draw(st.integers(1, min(num_classes, max_rows // k)))
        return np.repeat(np.arange(p), k).astype(np.int64)
    n = draw(st.integers(1, max_rows))
    return np.asarray(draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)), dtype=np.int64)


@st.composite
def labelled_batches(
    draw: st.DrawFn, num_classes: int = NUM_CLASSES, dim: int = DIM, max_rows: int = 12
) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 batch of embeddings and labels with awkward cases mixed in.

    Embeddings are either drawn on a coarse grid (multiples of 1/4 in [-2, 2], so
    exact ties, parallel rows and zero rows are common) or Gaussian from a seed;
    then some rows may be zeroed and some copied onto others (duplicates, possibly
    with different labels).
    """
    labels = draw(label_layouts(num_classes, max_rows))
    n = len(labels)
    if draw(st.booleans()):
        values = draw(hnp.arrays(np.int64, (n, dim), elements=st.integers(-8, 8))) / 4.0
    else:
        seed = draw(st.integers(0, 2**32 - 1))
        values = np.random.default_rng(seed).standard_normal((n, dim))
    rows = st.integers(0, n - 1)
    for i in draw(st.lists(rows, max_size=2)):
        values[i] = 0.0
    for i, j in draw(st.lists(st.tuples(rows, rows), max_size=3)):
        values[j] = values[i]
    return torch.from_numpy(np.ascontiguousarray(values)), torch.from_numpy(labels)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as module ``name`` (the examples are scripts, not a package)."""
    sys.path.insert(0, str(EXAMPLES))  # the example imports its sibling _shared
    try:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module
