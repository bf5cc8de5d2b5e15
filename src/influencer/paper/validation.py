"""The leave-one-out figure (Koh & Liang 2017, Fig. 2): predicted vs retrained test-loss changes."""

from __future__ import annotations

from pathlib import Path

from influencer.paper.plotting import predicted_vs_actual
from influencer.uses.validation import LOOResult


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
