"""The two statistics the gate rests on: McNemar's paired test and a percentile bootstrap CI."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The gate's default per-category rule (no category may lose more than ten points), shared by
# `gate.GateSettings` and the cascade's threshold choice.
CATEGORY_MARGIN = 0.10


def mcnemar(b: int, c: int, *, mid_p: bool = True) -> float:
    """Two-sided p-value of McNemar's exact test on the discordant pair counts.

    `b`: rows the reference got right and the candidate wrong; `c`: the reverse. Under the
    null each discordant row is a fair coin, so the count is Binomial(b + c, 1/2). The exact
    p is 2 * P(X <= min(b, c)); the mid-p subtracts P(X = min(b, c)) once, which keeps the
    nominal error rate far better than the conservative exact test (Fagerland et al. 2013).
    """
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be non-negative")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # Exact integer arithmetic: n is at most the gold set size, so this stays cheap.
    below = sum(math.comb(n, i) for i in range(k + 1))
    total = 2**n
    exact = min(1.0, 2 * below / total)
    if not mid_p:
        return exact
    return min(1.0, (2 * below - math.comb(n, k)) / total)


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def bootstrap_interval(
    values: np.ndarray, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Percentile bootstrap CI of the mean of `values` (per-row 0/1, or paired differences)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(values.mean()), float(low), float(high))
