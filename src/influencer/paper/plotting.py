"""Figures written to PNG files without a display; matplotlib is imported only when one is drawn.

matplotlib comes with the ``plot`` extra (``pip install 'influencer[plot]'``); drawing without it
raises :class:`~influencer._kernel.extras.MissingExtraError`, which says so in one line.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from influencer._kernel.extras import require


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (works on headless machines and in CI)."""
    matplotlib = require("matplotlib", "drawing a figure (influencer.paper.plotting)", "plot")
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


def figure_png(fig: Any) -> bytes:
    """``fig`` as PNG bytes (for embedding in a page); the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    pyplot().close(fig)
    return buf.getvalue()


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


def influence_vs_distance(
    distances: np.ndarray,
    scores: np.ndarray,
    titles: Sequence[str],
    same_label: np.ndarray | None = None,
) -> Any:
    """One panel per test example: score ``(m, n)`` against input distance ``(m, n)`` to each
    training example, coloured by whether its label matches the test label (``same_label``
    ``(m, n)`` bool, or None for one colour), as in Koh & Liang's Figure 1. Returns the figure."""
    plt = pyplot()
    m = len(scores)
    cols = min(m, 4)
    rows = -(-m // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.9 * rows), dpi=100, squeeze=False)
    for j, ax in enumerate(axes.flat):
        if j >= m:
            ax.axis("off")
            continue
        if same_label is None:
            ax.scatter(distances[j], scores[j], s=5, alpha=0.6, color="#3b6fb6", linewidths=0)
        else:
            for mask, color, label in (
                (~same_label[j], "#e07b39", "other label"),
                (same_label[j], "#3b6fb6", "same label"),
            ):
                ax.scatter(
                    distances[j][mask],
                    scores[j][mask],
                    s=5,
                    alpha=0.6,
                    color=color,
                    linewidths=0,
                    label=label,
                )
        ax.axhline(0.0, color="#888", lw=0.7)
        ax.set_title(titles[j], fontsize=9, parse_math=False)  # titles hold user text ("$5", "x^2")
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if j % cols == 0:
            ax.set_ylabel("score (+ helpful)", fontsize=8)
        if j // cols == rows - 1:
            ax.set_xlabel("input distance to test example", fontsize=8)
    if same_label is not None:
        axes.flat[0].legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    return fig
