"""All pairwise similarity and distance math between two sets of embeddings.

Every loss, miner, monitor and evaluation routine gets its N×M matrices from here,
so numerical care is taken once:

* half-precision inputs (float16, bfloat16) and autocast regions are computed in
  float32, so cosines stay inside [-1, 1] up to float32 rounding and nothing
  overflows;
* euclidean distances have a finite (zero) gradient at zero distance, including
  between duplicate embeddings, where ``sqrt`` would otherwise give ``inf``;
* zero vectors have cosine 0 to everything instead of NaN.

Conventions: a *similarity* is higher for closer points, a *distance* lower.
``pairwise_distance(..., metric="cosine")`` is ``1 - cos``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal, get_args

import torch
from torch import Tensor

from ._checks import check_choice, check_embeddings, check_matching_dim

__all__ = [
    "METRICS",
    "Metric",
    "l2_normalize",
    "pairwise_distance",
    "pairwise_similarity",
    "working_dtype",
]

Metric = Literal["cosine", "dot", "euclidean", "squared_euclidean"]
METRICS: tuple[str, ...] = get_args(Metric)

# Below this norm a vector is treated as zero when normalising.
_NORM_EPS = 1e-12


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype pairwise math runs in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _full_precision(device: torch.device) -> AbstractContextManager[object]:
    """Switch autocast off so matmuls run in the working dtype, not in half precision."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def _prepare(x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, bool]:
    check_embeddings(x, "x", check_finite=False)
    same = y is None or y is x
    if y is not None:
        check_embeddings(y, "y", check_finite=False)
        check_matching_dim(x, y, "x", "y")
    dtype = working_dtype(x.dtype if y is None else torch.promote_types(x.dtype, y.dtype))
    x = x.to(dtype)
    return x, (x if y is None else y.to(dtype)), same


def l2_normalize(x: Tensor) -> Tensor:
    """Scale each row to unit L2 norm; all-zero rows stay zero (never NaN).

    Parameters
    ----------
    x : Tensor of shape (n, d)

    Returns
    -------
    Tensor of shape (n, d)
    """
    # Not F.normalize: it divides a zero row by eps, which gives that row a gradient of
    # about 1/eps (1e12, inf once cast back to float16). A row at or below eps is zero
    # here, with a zero gradient; other rows are divided by their exact norm.
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    is_zero = norm <= _NORM_EPS
    safe = torch.where(is_zero, torch.ones_like(norm), norm)
    return torch.where(is_zero, torch.zeros_like(x), x / safe)


def pairwise_similarity(x: Tensor, y: Tensor | None = None, *, metric: Metric = "cosine") -> Tensor:
    """Similarity between every row of ``x`` and every row of ``y`` (higher = closer).

    Parameters
    ----------
    x : Tensor of shape (n, d)
        Query embeddings.
    y : Tensor of shape (m, d), optional
        Reference embeddings; ``x`` itself when omitted.
    metric : {"cosine", "dot", "euclidean", "squared_euclidean"}
        ``"cosine"`` and ``"dot"`` are returned as they are; the euclidean metrics are
        returned negated (``-d`` and ``-d**2``) so that higher is always closer.

    Returns
    -------
    Tensor of shape (n, m)
        In float32, or float64 when an input is float64.
    """
    check_choice(metric, "metric", METRICS)
    if metric in ("euclidean", "squared_euclidean"):
        return -pairwise_distance(x, y, metric=metric)
    x, y, same = _prepare(x, y)
    with _full_precision(x.device):
        if metric == "cosine":
            x = l2_normalize(x)
            y = x if same else l2_normalize(y)
        return x @ y.T


def pairwise_distance(
    x: Tensor, y: Tensor | None = None, *, metric: Metric = "euclidean", normalize: bool = False
) -> Tensor:
    """Distance between every row of ``x`` and every row of ``y`` (lower = closer).

    Parameters
    ----------
    x : Tensor of shape (n, d)
        Query embeddings.
    y : Tensor of shape (m, d), optional
        Reference embeddings; ``x`` itself when omitted.
    metric : {"euclidean", "squared_euclidean", "cosine", "dot"}
        ``"cosine"`` gives ``1 - cos`` (in [0, 2]); ``"dot"`` gives ``-x·y``.
    normalize : bool
        Scale rows to unit norm before a euclidean distance (in the working dtype).

    Returns
    -------
    Tensor of shape (n, m)
        In float32, or float64 when an input is float64. Euclidean distances are
        exactly 0 for identical rows, with a zero (finite) gradient there.
    """
    check_choice(metric, "metric", METRICS)
    if metric in ("cosine", "dot"):
        return (1.0 if metric == "cosine" else 0.0) - pairwise_similarity(x, y, metric=metric)
    x, y, same = _prepare(x, y)
    with _full_precision(x.device):
        if normalize:
            x = l2_normalize(x)
            y = x if same else l2_normalize(y)
        x_sq = (x * x).sum(dim=1)
        y_sq = x_sq if same else (y * y).sum(dim=1)
        scale = x_sq[:, None] + y_sq[None, :]
        squared = (scale - 2.0 * (x @ y.T)).clamp_min(0.0)
        # The expansion |x|²+|y|²-2x·y loses ~eps·(|x|²+|y|²) to cancellation; treat
        # anything below that as an exact zero so duplicates get distance 0.
        is_zero = squared <= 8.0 * torch.finfo(squared.dtype).eps * scale
        squared = squared.masked_fill(is_zero, 0.0)
        if metric == "squared_euclidean":
            return squared
        # Double-where keeps the gradient of sqrt finite (zero) at zero distance.
        safe = torch.where(is_zero, torch.ones_like(squared), squared)
        return torch.where(is_zero, torch.zeros_like(squared), safe.sqrt())
