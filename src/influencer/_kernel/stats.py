"""Correlation statistics used to compare predicted and actual influence."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"need two sequences of equal length, got {a.size} and {b.size}")
    if a.size < 2:
        raise ValueError("a correlation needs at least two pairs")
    return a, b


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson's correlation coefficient; NaN when either sequence is constant."""
    a, b = _pair(x, y)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def ranks(x: ArrayLike) -> np.ndarray:
    """Ranks starting at 1, ties sharing their average rank."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    r = np.empty(a.size)
    start = 0
    for end in range(1, a.size + 1):
        if end == a.size or sorted_a[end] != sorted_a[start]:
            r[order[start:end]] = 0.5 * (start + end - 1) + 1.0
            start = end
    return r


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman's rank correlation (Pearson on average ranks)."""
    a, b = _pair(x, y)
    return pearson(ranks(a), ranks(b))


def bootstrap_interval(
    values: ArrayLike, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval ``(low, high)`` of the mean of ``values`` ``(k,)``.

    Resamples the values with replacement (seeded, so the interval is reproducible); NaN values
    are left out first. ``(nan, nan)`` when fewer than two values remain.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    a = a[np.isfinite(a)]
    if a.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, a.size, size=(resamples, a.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)
