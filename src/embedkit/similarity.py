"""All pairwise similarity and distance math between two sets of embeddings.

Every loss, miner, monitor and evaluation routine gets its N×M matrices from here,
so numerical care is taken once:

* half-precision inputs (float16, bfloat16) and autocast regions are computed in
  float32, so cosines stay inside [-1, 1] up to float32 rounding and nothing
  overflows;
* euclidean distances have a finite (zero) gradient at zero distance, including
  between duplicate embeddings, where ``sqrt`` would otherwise give ``inf``;
* zero vectors (norm at most 1e-12) have cosine 0 to everything instead of NaN,
  with a zero gradient;
* inputs are divided by an exact power of two before squaring, so huge finite rows
  (``|x|`` above 1e19 in float32) do not overflow into NaN.

Euclidean distances use the expansion ``|x|² + |y|² − 2x·y`` (one matmul); its
cancellation error, about ``eps·(|x|² + |y|²)`` on the squared distance, is rounded to
an exact zero. In float32 that makes distances below about ``1.4e-3·|x|`` read as 0;
use float64 inputs where such near-duplicates must be told apart.

Conventions: a *similarity* is higher for closer points, a *distance* lower.
``pairwise_distance(..., metric="cosine")`` is ``1 - cos``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._checks import check_choice, check_embeddings, check_int, check_matching_dim

__all__ = [
    "BLOCK_BYTES",
    "METRICS",
    "ZERO_NORM",
    "Metric",
    "chunked_topk",
    "l2_normalize",
    "pairwise_distance",
    "pairwise_similarity",
    "rows_per_block",
    "similarity_blocks",
    "working_dtype",
]

Metric = Literal["cosine", "dot", "euclidean", "squared_euclidean"]
METRICS: tuple[str, ...] = get_args(Metric)

#: Below this L2 norm a row is treated as zero when normalising (cosine 0, zero gradient).
ZERO_NORM = 1e-12


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype pairwise math runs in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _full_precision(device: torch.device) -> AbstractContextManager[object]:
    """Switch autocast off so matmuls run in the working dtype, not in half precision."""
    if _autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


_AUTOCAST_TAKES_DEVICE = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 4)


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``, on every supported torch (>= 2.1).

    ``torch.is_autocast_enabled`` takes a device type only from torch 2.4; before, it
    answered for CUDA alone and the CPU had ``is_autocast_cpu_enabled``.
    """
    # Decided by version, not by catching the TypeError: torch.compile (dynamo) turns an
    # exception inside a traced call into its own internal error on torch < 2.4.
    if _AUTOCAST_TAKES_DEVICE:
        return bool(torch.is_autocast_enabled(device_type))
    if device_type == "cpu":
        return bool(torch.is_autocast_cpu_enabled())
    if device_type == "cuda":
        return bool(torch.is_autocast_enabled())
    return False


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
    # here, with a zero gradient; other rows are divided by their exact norm. Rows are
    # first divided by a power of two (exact) so |x|² cannot overflow for huge rows.
    scale = _power_of_two_scale(x, dim=1)
    x = x / scale
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    is_zero = norm * scale <= ZERO_NORM
    safe = torch.where(is_zero, torch.ones_like(norm), norm)
    return torch.where(is_zero, torch.zeros_like(x), x / safe)


def _power_of_two_scale(x: Tensor, dim: int | None = None) -> Tensor:
    """A detached power of two just above ``max |x|`` (1 for all-zero input).

    Dividing by a power of two is exact in binary floating point, so results are
    bit-identical for ordinary inputs, while entries end up in (-1, 1) and their
    squares cannot overflow however large the (finite) input is.
    """
    with torch.no_grad():
        peak = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
        _, exponent = torch.frexp(peak)
        # A float exponent: torch < 2.4 computes ldexp as x * 2**e in the exponent's integer
        # dtype, where every negative power of two is 0 (then 0/0 for tiny rows).
        return torch.ldexp(torch.ones_like(peak, dtype=torch.float64), exponent.double()).to(peak.dtype)


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
    if metric == "cosine":
        # Rounding can put a cosine a few ulp outside [-1, 1]; a distance is never negative.
        return (1.0 - pairwise_similarity(x, y, metric="cosine")).clamp(0.0, 2.0)
    if metric == "dot":
        return -pairwise_similarity(x, y, metric="dot")
    x, y, same = _prepare(x, y)
    with _full_precision(x.device):
        unit: Tensor | None = None
        if normalize:
            x = l2_normalize(x)
            y = x if same else l2_normalize(y)
        else:
            # Computed on x / s and y / s for a power of two s (exact), then scaled back:
            # huge finite rows give a large distance, not inf - inf = NaN.
            unit = _power_of_two_scale(x)
            if not same:
                unit = torch.maximum(unit, _power_of_two_scale(y))
            x = x / unit
            y = x if same else y / unit
        return _Euclidean.apply(x, y, unit, same, metric == "squared_euclidean")


class _Euclidean(torch.autograd.Function):
    """Euclidean (or squared euclidean) distances between the rows of ``x`` and ``y``, fused.

    Forward builds the N×M result in place from one GEMM (``|x|² + |y|² − 2x·y``) and
    one buffer for the exact-zero threshold, instead of a dozen N×M temporaries.
    Backward turns the incoming N×M gradient ``g`` into
    ``∂L/∂x_i = Σ_j w_ij (x_i − y_j)`` with two matmuls: ``w = g / d`` (euclidean) or
    ``2g`` (squared), 0 where the distance is an exact zero (a finite, zero gradient).

    ``x`` and ``y`` come divided by ``unit`` (a power of two, or ``None`` for 1); the
    result is scaled back by it.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, unit: Tensor | None, same: bool, squared: bool) -> Tensor:
        x_sq = (x * x).sum(dim=1)
        y_sq = x_sq if same else (y * y).sum(dim=1)
        scale = x_sq[:, None] + y_sq[None, :]
        out = torch.addmm(scale, x, y.T, alpha=-2.0)
        # The expansion loses ~eps·(|x|²+|y|²) to cancellation: anything below that (every
        # negative rounding included) is an exact zero, so duplicates get distance 0.
        is_zero = torch.le(out, scale.mul_(8.0 * torch.finfo(out.dtype).eps))
        del scale
        out.masked_fill_(is_zero, 0.0)
        del is_zero
        if not squared:
            out.sqrt_()
        if unit is not None:
            out.mul_(unit * unit if squared else unit)
        ctx.save_for_backward(x, y, unit, out)
        ctx.same, ctx.squared = same, squared
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, y, unit, out = ctx.saved_tensors
        # With respect to the scaled inputs: ∂d/∂x_i = unit²·(x_i − y_j)/d (euclidean,
        # ``out`` = d) and 2·unit²·(x_i − y_j) (squared), both 0 at an exact zero.
        if ctx.squared:
            weight = grad.masked_fill(out == 0, 0.0)
            weight = weight * (2.0 if unit is None else 2.0 * unit * unit)
        else:
            weight = grad / out
            weight.masked_fill_(out == 0, 0.0)
            if unit is not None:
                weight.mul_(unit * unit)
        if ctx.same:
            # Two GEMMs: BLAS reads weight.T in place, where weight + weight.T would be a slow
            # strided pass over N×N.
            row_col = weight.sum(dim=1) + weight.sum(dim=0)
            grad_x = row_col[:, None] * x - weight @ x - weight.T @ x
            return grad_x, None, None, None, None
        grad_x = weight.sum(dim=1)[:, None] * x - weight @ y
        grad_y = weight.sum(dim=0)[:, None] * y - weight.T @ x
        return grad_x, grad_y, None, None, None


# --- Scaled cosine scores with a fused backward (the margin-softmax heads) ---------------------


def _scaled_cosine(
    x: Tensor, y: Tensor, *, x_scale: float = 1.0, y_scale: float = 1.0, group: int = 1
) -> Tensor:
    """``x_scale * y_scale * cos(x_i, y_j)``, each group of ``group`` rows of ``y`` reduced to its maximum.

    Equal to ``x_scale * y_scale * pairwise_similarity(x, y, metric="cosine")`` (for
    ``group > 1``, viewed as (n, m / group, group) and maximised over the last
    dimension), with a cheaper graph: both inputs are normalised outside autograd and
    the backward is written out (:class:`_ScaledCosine`). Zero rows score 0 with a zero
    gradient, as in :func:`l2_normalize`. The scales are applied to the normalised
    factors, not to the (n, m) product, so pass the whole scale on the factor with fewer
    rows.

    Parameters
    ----------
    x : Tensor of shape (n, d)
        In the working dtype (:func:`working_dtype`).
    y : Tensor of shape (m, d)
        The same dtype as ``x``; ``m`` a multiple of ``group``, whose rows
        ``j * group + k`` (k < group) form group ``j``.
    x_scale, y_scale : float
        Multiply the normalised rows of ``x`` and of ``y``.
    group : int
        Rows of ``y`` per group; the gradient of a group's score goes to the row that
        attains the maximum (the first on a tie), as ``max`` sends it.

    Returns
    -------
    Tensor of shape (n, m / group)
        Differentiable once (no double backward).
    """
    scores: Tensor = _ScaledCosine.apply(x, y, x_scale, y_scale, group)
    return scores


def _scaled_unit_rows(x: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``scale * l2_normalize(x)`` without an autograd graph, and the gain its backward needs.

    Parameters
    ----------
    x : Tensor of shape (n, d)
    scale : float

    Returns
    -------
    unit : Tensor of shape (n, d)
        ``scale * x / |x|``; zero for rows of norm at most :data:`ZERO_NORM`.
    gain : Tensor of shape (n, 1)
        ``scale / |x|`` (0 for those zero rows), the factor of the backward.
    """
    if x.dtype != torch.float64 and x.device.type == "cpu":
        # Squares of float32 entries neither overflow nor (in rows above ZERO_NORM)
        # underflow in float64: one reduction instead of l2_normalize's power-of-two
        # rescaling (CPU only: float64 is slow on many GPUs). Only rows of norm above
        # 1e38 get a subnormal, less precise gain.
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float64)
        gain = torch.where(norm <= ZERO_NORM, 0.0, scale / norm).to(x.dtype)
        return x * gain, gain
    # As l2_normalize: rows are divided by a power of two first (exact), so |x|² cannot
    # overflow; the norm of the divided row lies in [0.5, sqrt(d)], so scale / norm is safe.
    power = _power_of_two_scale(x, dim=1)
    unit = x / power
    norm = torch.linalg.vector_norm(unit, dim=1, keepdim=True)
    factor = torch.where(norm * power <= ZERO_NORM, 0.0, scale / norm)
    return unit.mul_(factor), factor / power


def _unit_rows_backward(grad_unit: Tensor, unit: Tensor, gain: Tensor, scale: float) -> Tensor:
    """Gradient with respect to ``x`` of ``unit = scale * x / |x|`` (see :func:`_scaled_unit_rows`).

    ``d unit / d x = (scale / |x|) (I - û ûᵀ)``, so the gradient is ``gain * g`` minus its
    component along ``û = unit / scale``. ``grad_unit`` is consumed (overwritten).
    """
    along = torch.linalg.vecdot(grad_unit, unit, dim=1)[:, None] * (gain / -(scale * scale))
    return grad_unit.mul_(gain).addcmul_(unit, along)


class _ScaledCosine(torch.autograd.Function):
    """The autograd Function of :func:`_scaled_cosine`; ``forward(x, y, x_scale, y_scale, group)``.

    * The rows of both inputs are normalised (and scaled) outside autograd — a few passes
      over the two small factors instead of an :func:`l2_normalize` graph each way — and
      backward projects the gradient analytically (:func:`_unit_rows_backward`).
    * With groups, ``y`` is normalised into a member-major copy, so a batched matmul gives
      one contiguous (n, m / group) block per group member, whose elementwise maximum is
      the score (a reduction over an inner dimension of 3 is many times slower). Only the
      index of the winning member is kept (as float); backward spreads the gradient one
      member at a time through an (n, m / group) buffer, never an (n, m) one.

    Comparisons are written as 0/1 floats and combined with ``maximum``: on CPU, bool
    masks (``masked_fill``, ``where``) cost 5-20 times more per entry. Matmuls run in the
    working dtype with autocast off, forward and backward.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, x_scale: float, y_scale: float, group: int) -> Tensor:
        # no_grad is what eager runs forward under anyway; torch.compile before 2.2 traces
        # forward with gradients on, where the out= writes below would fail.
        with torch.no_grad(), _full_precision(x.device):
            u, x_gain = _scaled_unit_rows(x, x_scale)
            choice = None
            if group == 1:
                v, y_gain = _scaled_unit_rows(y, y_scale)
                scores = u @ v.T
            else:
                groups = y.shape[0] // group
                member_major = y.view(groups, group, -1).transpose(0, 1).reshape(y.shape)
                v, y_gain = _scaled_unit_rows(member_major, y_scale)
                blocks = u @ v.view(group, groups, -1).transpose(1, 2)  # (group, n, groups)
                scores = torch.maximum(blocks[0], blocks[1])  # propagates NaN, as max does
                # The last member that beat the running maximum (strictly, so the first
                # wins a tie) is the winner: choice = max_k k * [member k beat it].
                choice = torch.gt(blocks[1], blocks[0], out=torch.empty_like(scores))
                for k in range(2, group):
                    beat = torch.gt(blocks[k], scores, out=blocks[0])
                    torch.maximum(scores, blocks[k], out=scores)
                    torch.maximum(choice, beat.mul_(k), out=choice)
        ctx.save_for_backward(u, v, x_gain, y_gain, choice)
        ctx.scales = (x_scale, y_scale)
        ctx.group = group
        return scores

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        u, v, x_gain, y_gain, choice = ctx.saved_tensors
        x_scale, y_scale = ctx.scales
        group = ctx.group
        want_x, want_y = ctx.needs_input_grad[:2]
        grad_x = grad_y = None
        with _full_precision(grad.device):
            if choice is None:
                if want_x:
                    grad_x = _unit_rows_backward(grad @ v, u, x_gain, x_scale)
                if want_y:
                    grad_y = _unit_rows_backward(grad.T @ u, v, y_gain, y_scale)
                return grad_x, grad_y, None, None, None
            members = v.view(group, -1, v.shape[1])
            gains = y_gain.view(group, -1, 1)
            grad_unit_x = None
            if want_y:
                # Written member by member into the layout of y (class-major), no transpose copy.
                grad_y = v.new_empty(members.shape[1], group, v.shape[1])
            part = torch.empty_like(grad)
            for k in range(group):
                torch.eq(choice, k, out=part).mul_(grad)  # the gradient of member k's scores
                if want_x:
                    if grad_unit_x is None:
                        grad_unit_x = part @ members[k]
                    else:
                        grad_unit_x.addmm_(part, members[k])
                if grad_y is not None:
                    grad_y[:, k] = _unit_rows_backward(part.T @ u, members[k], gains[k], y_scale)
            if grad_unit_x is not None:
                grad_x = _unit_rows_backward(grad_unit_x, u, x_gain, x_scale)
        return grad_x, None if grad_y is None else grad_y.view(v.shape), None, None, None


# --- Chunked iteration: bounded memory for any number of rows -----------------------------------

#: Default memory budget, in bytes, for one block of scores in the chunked routines below.
BLOCK_BYTES = 2**27


def rows_per_block(num_columns: int, *, bytes_per_entry: int = 4, budget: int = BLOCK_BYTES) -> int:
    """How many query rows fit in one ``(rows, num_columns)`` block within ``budget`` bytes.

    Parameters
    ----------
    num_columns : int
        Columns of the block (the number of reference embeddings).
    bytes_per_entry : int
        Bytes held per block entry, temporaries included.
    budget : int
        Memory budget in bytes.

    Returns
    -------
    int
        At least 1: one row of ``num_columns`` entries is the smallest block there is.
    """
    return max(1, budget // max(1, bytes_per_entry * num_columns))


def similarity_blocks(
    x: Tensor,
    y: Tensor | None = None,
    *,
    metric: Metric = "cosine",
    chunk_size: int | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``pairwise_similarity(x, y)`` one block of rows at a time.

    The references ``y`` are converted (and, for cosine, normalised) once; each block
    holds ``chunk_size`` rows of ``x`` against all of ``y``, so memory stays at about
    ``chunk_size * m`` scores whatever ``n`` is.

    Parameters
    ----------
    x : Tensor of shape (n, d)
        Query embeddings.
    y : Tensor of shape (m, d), optional
        Reference embeddings; ``x`` itself when omitted.
    metric : {"cosine", "dot", "euclidean", "squared_euclidean"}
        As in :func:`pairwise_similarity` (higher = closer).
    chunk_size : int, optional
        Rows per block; by default as many as fit in :data:`BLOCK_BYTES` (at least 1).

    Yields
    ------
    start : int
        Index of the block's first row in ``x``.
    block : Tensor of shape (rows, m)
        Equal to ``pairwise_similarity(x[start:start + rows], y, metric=metric)``.
    """
    check_choice(metric, "metric", METRICS)
    x, y, _ = _prepare(x, y)
    if chunk_size is None:
        chunk_size = rows_per_block(y.shape[0])
    check_int(chunk_size, "chunk_size", low=1)
    block_metric: Metric = metric
    if metric == "cosine":
        with _full_precision(y.device):
            y = l2_normalize(y)
        block_metric = "dot"
    for start in range(0, x.shape[0], chunk_size):
        rows = x[start : start + chunk_size]
        if metric == "cosine":
            with _full_precision(rows.device):
                rows = l2_normalize(rows)
        yield start, pairwise_similarity(rows, y, metric=block_metric)


def chunked_topk(
    x: Tensor,
    y: Tensor | None = None,
    k: int = 1,
    *,
    metric: Metric = "cosine",
    exclude_self: bool = False,
    chunk_size: int | None = None,
    callback: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` most similar rows of ``y`` for every row of ``x``, block by block.

    Parameters
    ----------
    x : Tensor of shape (n, d)
        Query embeddings.
    y : Tensor of shape (m, d), optional
        Reference embeddings; ``x`` itself when omitted.
    k : int
        Neighbours per query, ``1 <= k <= m`` (``m - 1`` with ``exclude_self``).
    metric : {"cosine", "dot", "euclidean", "squared_euclidean"}
        As in :func:`pairwise_similarity`; scores are similarities (higher = closer).
    exclude_self : bool
        Row ``i`` of ``x`` is row ``i`` of ``y`` (``n == m``): never return it as its own
        neighbour. It is removed by index, so a duplicate of the query is still found.
    chunk_size : int, optional
        Query rows per block (see :func:`similarity_blocks`).
    callback : callable, optional
        Called with the number of rows finished after each block (for progress bars).

    Returns
    -------
    scores : Tensor of shape (n, k)
        Similarities, best first, in the working dtype.
    indices : Tensor of shape (n, k) and dtype int64
        Row indices into ``y``.
    """
    check_embeddings(x, "x", check_finite=False)
    m = x.shape[0] if y is None else y.shape[0]
    if exclude_self and m != x.shape[0]:
        raise ValueError(f"exclude_self=True needs x and y to be the same set; got {x.shape[0]} and {m} rows")
    check_int(k, "k", low=1, high=m - int(exclude_self))
    all_scores, all_indices = [], []
    for start, block in similarity_blocks(x, y, metric=metric, chunk_size=chunk_size):
        if exclude_self:
            rows = torch.arange(block.shape[0], device=block.device)
            block[rows, rows + start] = -torch.inf
        scores, indices = torch.topk(block, k, dim=1, largest=True, sorted=True)
        all_scores.append(scores)
        all_indices.append(indices)
        if callback is not None:
            callback(block.shape[0])
    return torch.cat(all_scores), torch.cat(all_indices)
