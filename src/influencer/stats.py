"""Correlations and intervals used to compare predicted and actual effects."""

from influencer._kernel.stats import bootstrap_interval, pearson, ranks, spearman

__all__ = ["bootstrap_interval", "pearson", "ranks", "spearman"]
