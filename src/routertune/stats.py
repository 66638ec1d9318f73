"""Statistics shared by every measurement: the paired bootstrap over items, linear interpolation of a
per-item curve at a measured skip, and paired timing ratios (median and its order-statistics interval) for
speed measurements whose variants ran interleaved. Imports only numpy and the standard library."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    weights: np.ndarray | None = None,
    iterations: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Mean of a - b over items (weighted by `weights`, e.g. tokens per text: a ratio of sums) and its
    percentile bootstrap interval, resampling items with replacement. Returns (difference, low, high)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired values must be two equal-length non-empty vectors, got {a.shape} and {b.shape}")
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64)
    diff = a - b
    point = float((diff * w).sum() / w.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(iterations, len(a)))
    samples = (diff[idx] * w[idx]).sum(1) / w[idx].sum(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return point, float(low), float(high)


def interpolate(points: list[tuple[float, np.ndarray]], x: float) -> tuple[np.ndarray, tuple[float, float]] | None:
    """Per-item values of a curve at measured skip `x`: linear between the two measured points around it
    (points: (measured skip, per-item values)). None when the curve does not reach `x` (no extrapolation)."""
    pts = sorted(points, key=lambda p: p[0])
    for (x0, v0), (x1, v1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 - x0 < 1e-12:
                return v0, (x0, x1)
            t = (x - x0) / (x1 - x0)
            return (1 - t) * v0 + t * v1, (x0, x1)
    for x0, v0 in pts:
        if abs(x0 - x) < 1e-12:
            return v0, (x0, x0)
    return None


def median(values: list[float]) -> float:
    """The median as a plain float."""
    return float(statistics.median(values))


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of numerator[i] / denominator[i]: the samples of one index ran back to back (interleaved), so
    a slow spell of the machine hits both sides of a pair and cancels in its ratio."""
    return median([a / b for a, b in zip(numerator, denominator)])


def paired_ratio_ci(numerator: list[float], denominator: list[float], level: float = 0.95) -> list[float]:
    """[low, high, coverage]: distribution-free confidence interval of the median paired ratio, from order
    statistics (the sign-test interval). With few pairs the widest interval [min, max] covers less than
    `level` (5 pairs: 93.8%); `coverage` says how much."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    n = len(ratios)
    if n == 0:
        return [float("nan"), float("nan"), 0.0]

    def outside(k: int) -> float:  # P(the median lies outside [r_k, r_(n-k+1)]), 1-based k
        return 2 * sum(math.comb(n, j) for j in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and outside(k + 1) <= 1 - level:
        k += 1
    return [ratios[k - 1], ratios[n - k], 1 - outside(k)]


def median_interval(values: list[float], resamples: int = 4000, seed: int = 0) -> list[float]:
    """Percentile bootstrap 95% interval of the median of `values` (e.g. repeats), resampled with replacement."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]
