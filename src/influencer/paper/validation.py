"""Figures of influence against retraining: the leave-one-out scatter (Koh & Liang 2017, Fig. 2)
and the linear datamodeling score (Park et al. 2023) per test example."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from influencer._kernel.stats import pearson, spearman
from influencer.paper.plotting import predicted_vs_actual, pyplot, save_png
from influencer.uses.validation import LDSResult, LOOResult


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
