"""Logit-based sampling: stratify on the model's confidence (and predicted class)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from influencer._kernel.errors import ConfigError
from influencer.samplers.base import StratifiedSampler, auto_strata
from influencer.samplers.context import SamplerContext


def confidence(outputs: Tensor) -> tuple[Tensor, Tensor]:
    """Predicted class ``(n,)`` and its probability ``(n,)`` from logits ``(n, C)`` or scores ``(n, 1)``."""
    if outputs.shape[1] == 1:  # one score: a binary classifier with a sigmoid
        p1 = torch.sigmoid(outputs[:, 0].double())
        predicted = (p1 >= 0.5).to(torch.int64)
        return predicted, torch.where(predicted == 1, p1, 1 - p1)
    probs = torch.softmax(outputs.double(), dim=1)
    best = probs.max(1)
    return best.indices, best.values


def quantile_bins(values: Tensor, groups: Tensor, bins_per_group: Tensor) -> Tensor:
    """Within each group, bin ``values`` ``(n,)`` into equal-count quantile bins; returns ``(n,)`` bin ids.

    ``groups`` ``(n,)`` in ``[0, g)``, ``bins_per_group`` ``(g,)``. Ties are split by position, so
    the bins of a group hold ``floor`` or ``ceil`` of ``N_g / b_g`` points each.
    """
    order = torch.argsort(values, stable=True)
    order = order[torch.sort(groups[order], stable=True).indices]  # by group, then value
    sorted_groups = groups[order]
    starts = torch.searchsorted(sorted_groups, sorted_groups)
    group_size = torch.bincount(groups, minlength=len(bins_per_group))[sorted_groups]
    rank = torch.arange(len(values)) - starts
    bins = torch.empty_like(rank)
    bins[order] = rank * bins_per_group[sorted_groups] // group_size
    return bins


@dataclasses.dataclass(frozen=True)
class LogitSampler(StratifiedSampler):
    """Strata: equal-count quantiles of the model's confidence, within each predicted class when the
    subset is large enough.

    A cross-entropy example's curvature is ``J^T (diag(p) - p p^T) J``: its size is set by how unsure
    the model is (near zero for a confident prediction) and its direction by the predicted class.
    The curvature is heavy-tailed (on a well-trained classifier a tenth of the points carry about
    half of it), and confidence ranks it almost perfectly, so confidence quantiles are strata of
    near-equal curvature: each gets its share of draws and the few unsure points that dominate ``H``
    are never over- or under-represented. Equal-count strata also make every point's chance of
    selection equal, so the subset's curvature stays unbiased.

    Args:
        per_stratum: draws per stratum; the subset of ``m`` points uses ``m / per_stratum``
            confidence strata (1: one draw from each of ``m`` quantiles).
        by_class: split the strata by predicted class too. ``None`` (default) does so once every
            predicted class can get at least two confidence strata; below that the budget is
            better spent on the confidence quantiles, which matter most.
    """

    per_stratum: float = 1.0
    by_class: bool | None = None
    name = "logit"

    def __post_init__(self) -> None:
        if not self.per_stratum >= 1:
            raise ConfigError(f"LogitSampler.per_stratum must be >= 1, got {self.per_stratum!r}")
        if self.by_class not in (None, True, False):
            raise ConfigError(f"LogitSampler.by_class must be True, False or None, got {self.by_class!r}")

    def strata(self, context: SamplerContext, size: int, generator: torch.Generator) -> Tensor:
        predicted, conf = (t.cpu() for t in confidence(context.logits()))
        total = auto_strata(size, self.per_stratum, context.n_pool)
        _, groups, counts = torch.unique(predicted, return_inverse=True, return_counts=True)
        by_class = self.by_class if self.by_class is not None else total >= 2 * len(counts)
        if not by_class:
            groups, counts = torch.zeros_like(groups), torch.tensor([context.n_pool])
        quota = total * counts.double() / context.n_pool  # strata per group, proportional to its size
        bins = torch.round(quota).to(torch.int64).clamp(min=1).minimum(counts)
        return groups * int(bins.max()) + quantile_bins(conf, groups, bins)
