"""Which rows of a batch a sampled monitor statistic reads."""

from __future__ import annotations

__all__ = ["spread_rows"]


def spread_rows(num_rows: int, wanted: int | None) -> slice:
    """At most ``wanted`` rows spread over a whole batch of ``num_rows`` (every k-th), or all rows.

    Evenly spread rather than the first ones: P×K batches keep each identity's rows
    together, so the first rows would cover only the first few identities. A slice is a
    view, so taking the sample costs nothing.
    """
    if wanted is None or wanted >= num_rows:
        return slice(0, num_rows)
    # The largest step that still reaches the end of the batch: with num_rows < 2 x wanted
    # a step of num_rows // wanted = 1 would take the first rows only (at batch 80 and 64
    # rows, never the last 2 of every 10 classes of a P x K batch). ceil(num_rows / wanted)
    # spreads ceil-many fewer rows over the whole batch instead.
    step = -(-num_rows // wanted)
    return slice(0, num_rows, step)
