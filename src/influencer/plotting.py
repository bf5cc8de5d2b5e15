"""Figures written to PNG files without a display; matplotlib is imported only when one is drawn.

Influence against retraining: :func:`plot_loo` and :func:`plot_loo_many` draw the leave-one-out
scatter (Koh & Liang 2017, Fig. 2), :func:`plot_lds` the linear datamodeling score (Park et al. 2023)
per test example; :func:`influence_vs_distance` draws scores against input distance (Fig. 1).

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
from influencer._kernel.stats import pearson, spearman
from influencer.uses.validation import LDSResult, LOOResult


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (works on headless machines and in CI)."""
    matplotlib = require("matplotlib", "drawing a figure (influencer.plotting)", "plot")
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


def plot_loo(result: LOOResult, path: str | Path, title: str = "Leave-one-out retraining") -> Path:
    """Scatter of actual vs predicted changes of :func:`~influencer.uses.validation.leave_one_out`
    with the identity line, saved as PNG."""
    return predicted_vs_actual(
        path,
        result.predicted,
        result.actual,
        title=title,
        ylabel="predicted change (influence)",
        pearson=result.pearson,
        spearman=result.spearman,
    )


def plot_loo_many(
    results: Sequence[LOOResult],
    labels: Sequence[str],
    path: str | Path,
    title: str = "Leave-one-out retraining",
) -> Path:
    """Actual vs predicted changes of several :func:`~influencer.uses.validation.leave_one_out`
    results in one scatter, a colour per test example (``labels``), with the identity line; the
    title gives Pearson and Spearman over all the points. Saved as PNG."""
    if len(results) != len(labels) or not results:
        raise ValueError(
            f"need one label per result and at least one result, got {len(results)} and {len(labels)}"
        )
    plt = pyplot()
    predicted = np.concatenate([r.predicted for r in results])
    actual = np.concatenate([r.actual for r in results])
    fig, ax = plt.subplots(figsize=(5.2, 4.5), dpi=120)
    for r, label in zip(results, labels, strict=True):
        ax.scatter(r.actual, r.predicted, s=14, alpha=0.8, label=f"{label} (R = {r.pearson:.2f})")
    lo = float(min(actual.min(), predicted.min()))
    hi = float(max(actual.max(), predicted.max()))
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--")
    ax.set_xlabel("actual change of the test measurement (retrained)")
    ax.set_ylabel("predicted change (influence)")
    overall = f"Pearson R = {pearson(predicted, actual):.3f}, Spearman = {spearman(predicted, actual):.3f}"
    ax.set_title(f"{title}\n{overall} over {predicted.size} removals", fontsize=9)
    ax.ticklabel_format(style="sci", scilimits=(-2, 3))
    if len(results) <= 12:
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return save_png(fig, path)


def plot_lds(
    result: LDSResult,
    path: str | Path,
    title: str = "Linear datamodeling score",
    test_labels: Sequence[str] | None = None,
) -> Path:
    """The LDS of :func:`~influencer.uses.validation.lds`, as PNG: the per-test Spearman
    correlations sorted as bars, with the mean and its confidence interval; and, for the test
    example with the median correlation, predicted vs actual changes over the subsets."""
    plt = pyplot()
    corr = result.correlations
    finite = np.flatnonzero(np.isfinite(corr))
    order = finite[np.argsort(corr[finite], kind="stable")]
    fig, (bars, scatter) = plt.subplots(
        1, 2, figsize=(10, 4.2), dpi=110, gridspec_kw={"width_ratios": [1.6, 1]}
    )
    bars.bar(np.arange(order.size), corr[order], color="#3b6fb6", width=0.85)
    lo, hi = result.interval
    bars.axhspan(lo, hi, color="#e07b39", alpha=0.2, lw=0)
    bars.axhline(result.mean, color="#e07b39", lw=1.5, label=f"mean {result.mean:.3f}")
    bars.axhline(0.0, color="#888", lw=0.7)
    bars.set_ylim(min(-0.1, float(np.nanmin(corr)) - 0.05) if finite.size else -1, 1.0)
    bars.set_xlabel("test example (sorted by correlation)")
    bars.set_ylabel("Spearman: predicted vs actual over subsets")
    if test_labels is not None and order.size <= 30:
        bars.set_xticks(np.arange(order.size), [test_labels[i] for i in order], rotation=90, fontsize=6)
    level = f"{100 * result.level:.0f}%"
    bars.set_title(
        f"{title}: {result.mean:.3f} [{lo:.3f}, {hi:.3f}] ({level} interval)\n"
        f"{result.kept.shape[0]} subsets keeping {result.alpha:g} of the data, "
        f"{len(result.seeds)} seed(s) each",
        fontsize=9,
    )
    bars.legend(fontsize=7, loc="lower right")
    if finite.size:
        j = int(order[order.size // 2])
        scatter.scatter(result.actual[:, j], result.predicted[:, j], s=12, alpha=0.8)
        name = test_labels[j] if test_labels is not None else f"test {j}"
        scatter.set_title(f"{name}: Spearman {corr[j]:.3f} (the median)", fontsize=9)
    scatter.set_xlabel("actual f(S) - f(full) (retrained)")
    scatter.set_ylabel("predicted: sum of left-out scores")
    scatter.ticklabel_format(style="sci", scilimits=(-2, 3))
    fig.tight_layout()
    return save_png(fig, path)
