"""Is an accuracy above, at or below chance? Wilson intervals for counted rates.

"0.0% top-1 accuracy" with 518 classes says nothing until it is compared with the
chance level 1/518 = 0.19% *and* with the number of trials behind it (case study 01:
45 hits out of 25,729 is 0.17%, consistent with chance). This module makes that
comparison once, for the monitors and the loss signals.
"""

from __future__ import annotations

import math
from typing import Literal

from .._checks import check_real
from ..evaluation.report import Rate, format_percent

__all__ = ["ChanceVerdict", "chance_verdict", "describe_rate", "wilson_interval"]

ChanceVerdict = Literal["above_chance", "at_chance", "below_chance", "undetermined"]


def wilson_interval(hits: int, total: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``hits / total``.

    Parameters
    ----------
    hits : int
        Successes, ``0 <= hits <= total``.
    total : int
        Trials, at least 1.
    confidence : float
        Two-sided coverage, in (0, 1).

    Returns
    -------
    (float, float)
        The lower and upper ends, within [0, 1]. Unlike the normal approximation it
        stays informative at 0 hits: ``0/25729`` gives ``[0, 0.015%]``.
    """
    confidence = check_real(
        confidence, "confidence", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )
    if total < 1 or not 0 <= hits <= total:
        raise ValueError(f"wilson_interval needs 0 <= hits <= total and total >= 1; got {hits}/{total}")
    # Imported here: scipy.stats costs over a second at `import embedkit`.
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    p = hits / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # The bounds are exactly 0 at 0 hits and 1 at all hits; rounding must not move them.
    low = 0.0 if hits == 0 else max(0.0, centre - half)
    high = 1.0 if hits == total else min(1.0, centre + half)
    return low, high


def chance_verdict(rate: Rate, *, confidence: float = 0.95) -> ChanceVerdict:
    """Compare a counted accuracy with its chance level.

    Parameters
    ----------
    rate : Rate
        Hits, trials and the chance level (``rate.chance`` must be set).
    confidence : float
        Coverage of the Wilson interval (default 95%).

    Returns
    -------
    {"above_chance", "at_chance", "below_chance", "undetermined"}
        ``"above_chance"`` / ``"below_chance"`` when the interval lies entirely above /
        below chance. When it contains chance, ``"at_chance"`` if it is also narrow
        enough to rule out the accuracy being even halfway from chance to perfect
        (upper end below ``chance + (1 - chance) / 2``), else ``"undetermined"``: too
        few trials to say anything (e.g. 3/3 with two classes), and always when chance
        is 1 (top-5 of 2 classes: every guess scores).
    """
    if not isinstance(rate, Rate):
        raise TypeError(f"rate must be an embedkit Rate; got {type(rate).__name__}")
    if rate.chance is None:
        raise ValueError(f"rate has no chance level ({rate}); expected Rate(hits, total, chance=...)")
    if rate.total == 0 or rate.chance >= 1.0:
        # No trials, or a metric every guess passes (top-k with k >= classes).
        return "undetermined"
    low, high = wilson_interval(rate.hits, rate.total, confidence=confidence)
    chance = rate.chance
    if low > chance:
        return "above_chance"
    if high < chance:
        return "below_chance"
    return "at_chance" if high < chance + (1.0 - chance) / 2 else "undetermined"


def describe_rate(rate: Rate, *, confidence: float = 0.95) -> str:
    """A counted accuracy with its chance level and Wilson interval, for messages.

    Parameters
    ----------
    rate : Rate
        Hits, trials (at least 1) and optionally the chance level.
    confidence : float
        Coverage of the interval.

    Returns
    -------
    str
        E.g. ``"45/25729 = 0.175% (chance 0.193%), 95% CI [0.13%, 0.234%]"``.
    """
    low, high = wilson_interval(rate.hits, rate.total, confidence=confidence)
    return f"{rate}, {100 * confidence:g}% CI [{format_percent(low)}, {format_percent(high)}]"
