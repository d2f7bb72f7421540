"""Which rows of a batch a sampled monitor statistic reads."""

from __future__ import annotations

__all__ = ["spread_rows"]


def spread_rows(num_rows: int, wanted: int | None) -> slice:
    """``wanted`` rows spread evenly over a batch of ``num_rows`` (every k-th), or all rows.

    Evenly spread rather than the first ones: P×K batches keep each identity's rows
    together, so the first rows would cover only the first few identities. A slice is a
    view, so taking the sample costs nothing.
    """
    if wanted is None or wanted >= num_rows:
        return slice(0, num_rows)
    step = num_rows // wanted
    return slice(0, step * wanted, step)
