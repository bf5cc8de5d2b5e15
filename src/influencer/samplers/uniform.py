"""The baseline: a uniformly random subset."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from influencer.samplers.base import Sampler
from influencer.samplers.context import SamplerContext


@dataclasses.dataclass(frozen=True)
class RandomSampler(Sampler):
    """``size`` candidates drawn uniformly without replacement."""

    name = "random"

    def choose(self, context: SamplerContext, size: int, generator: torch.Generator) -> Tensor:
        return torch.randperm(context.n_pool, generator=generator)[:size]
