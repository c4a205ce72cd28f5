"""Error bars for bench figures: a mean with its confidence interval, and a ratio of two means
with a bootstrap interval. Every headline number of a results page goes through one of these.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable

import numpy as np

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (any statistics table);
# past 30 the normal quantile 1.96 is within 2 % of t's.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


@dataclass(frozen=True)
class Estimate:
    """A figure with its 95 % interval [low, high]; ``n`` the number of independent values
    (seeds, rounds, resamples) it rests on. low = high = value when n < 2: no error bar."""

    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        if self.n < 2 or not math.isfinite(self.low):
            return f"{self.value:.3g} (n={self.n}, no interval)"
        return f"{self.value:.3g} [{self.low:.3g}, {self.high:.3g}]"

    def as_summary(self, key: str) -> dict[str, float | None]:
        """``summary.json`` keys: KEY, KEY_ci_low, KEY_ci_high; the bounds are null when n < 2
        (bounds equal to the value would read as a measured certainty)."""
        interval = self.n >= 2 and math.isfinite(self.low)
        return {key: self.value, f"{key}_ci_low": self.low if interval else None,
                f"{key}_ci_high": self.high if interval else None}


def t95(df: int) -> float:
    """Two-sided 95 % quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"t95 needs df >= 1, got {df}")
    return _T95[df - 1] if df <= len(_T95) else 1.96


def mean_ci(values: list[float]) -> Estimate:
    """The mean of ``values`` (independent draws: one per seed or round) with its 95 % Student-t
    interval, mean ± t95(n-1) · sd / √n."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = statistics.fmean(values)
    if n < 2:
        return Estimate(mean, mean, mean, n)
    half = t95(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n)


def ratio_ci(numerator: list[float], denominator: list[float], paired: bool = False, resamples: int = 4000,
             seed: int = 0) -> Estimate:
    """mean(numerator) / mean(denominator) with a 95 % percentile-bootstrap interval.

    ``paired``: the i-th values of both lists come from one draw (the same seed or probe prompt),
    so they are resampled together; otherwise each list is resampled on its own. A resample whose
    denominator mean is 0 is dropped.
    """
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if not len(num) or not len(den):
        raise ValueError("ratio_ci of an empty list")
    if paired and len(num) != len(den):
        raise ValueError(f"paired ratio_ci needs lists of one length, got {len(num)} and {len(den)}")
    value = float(num.mean() / den.mean())
    n = min(len(num), len(den))
    if n < 2:
        return Estimate(value, value, value, n)
    rng = np.random.default_rng(seed)
    pick_num = rng.integers(0, len(num), size=(resamples, len(num)))
    pick_den = pick_num if paired else rng.integers(0, len(den), size=(resamples, len(den)))
    top, bottom = num[pick_num].mean(axis=1), den[pick_den].mean(axis=1)
    ratios = top[bottom != 0] / bottom[bottom != 0]
    low, high = np.percentile(ratios, [2.5, 97.5])
    return Estimate(value, float(low), float(high), n)


def bootstrap_ci(statistic: Callable[[np.ndarray], float | None], n: int, resamples: int = 4000,
                 seed: int = 0) -> Estimate | None:
    """``statistic`` of n independent units (it takes their indices, shape (n,)) with a 95 %
    percentile interval from resampling the units with replacement, for figures that are not a
    ratio of means (``ratio_ci``). Resamples where ``statistic`` is None are dropped; None where
    it is None on all n units."""
    value = statistic(np.arange(n))
    if value is None:
        return None
    rng = np.random.default_rng(seed)
    draws = [d for d in (statistic(rng.integers(0, n, n)) for _ in range(resamples)) if d is not None]
    if n < 2 or not draws:
        return Estimate(value, value, value, n)
    low, high = np.percentile(draws, [2.5, 97.5])
    return Estimate(value, float(low), float(high), n)


def crossing(curve: list[tuple[float, int, float]], target: float, axis: int) -> float | None:
    """Where an accuracy curve ((wall_s, samples, accuracy) per reading) first reaches ``target``,
    in its ``axis`` (0: training seconds, 1: completions generated): linear between the reading
    before and the first reading at or above it (that reading's own x when it is the first); None
    when no reading gets there."""
    for i, point in enumerate(curve):
        if point[2] >= target:
            if i == 0:
                return float(point[axis])
            before = curve[i - 1]
            return before[axis] + (target - before[2]) / (point[2] - before[2]) * (point[axis] - before[axis])
    return None
