"""Class-stratified sampling: every class gets its proportional share of the subset."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from influencer.samplers.base import StratifiedSampler
from influencer.samplers.context import SamplerContext


@dataclasses.dataclass(frozen=True)
class ClassStratifiedSampler(StratifiedSampler):
    """Strata are the true labels; counts per class are ``size * N_c / n`` rounded by largest remainder."""

    name = "class"

    def strata(self, context: SamplerContext, size: int, generator: torch.Generator) -> Tensor:
        return context.labels()
