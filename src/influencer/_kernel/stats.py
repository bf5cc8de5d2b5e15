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
