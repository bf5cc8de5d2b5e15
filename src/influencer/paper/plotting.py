"""Figures written to PNG files without a display; matplotlib is imported only when one is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (works on headless machines and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (parent folders created), close it, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    pyplot().close(fig)
    return path


def predicted_vs_actual(
    path: str | Path,
    predicted: np.ndarray,
    actual: np.ndarray,
    *,
    title: str,
    ylabel: str,
    pearson: float,
    spearman: float,
) -> Path:
    """Scatter of predicted ``(k,)`` against actual ``(k,)`` changes with the identity line, as PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.scatter(actual, predicted, s=14, alpha=0.8)
    lo = float(min(actual.min(), predicted.min()))
    hi = float(max(actual.max(), predicted.max()))
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--")
    ax.set_xlabel("actual change in test loss (retrained)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\nPearson R = {pearson:.3f}, Spearman = {spearman:.3f}", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)
