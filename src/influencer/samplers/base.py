"""The sampler interface: choose which training examples the Hessian is estimated on.

``H`` is an average of per-example curvatures. Estimating it on a small random subset is cheap but
noisy: per-example curvatures are heavy-tailed (a confidently classified point contributes almost
nothing, an ambiguous one a lot), so a random subset may over- or under-represent the few points
that dominate ``H``, and influence estimates change from seed to seed. A *representative*
subset spreads its draws over strata of similar points, so the subset's share of each kind of
point is right by construction and only the within-stratum spread is left to chance.

Every sampler is a frozen dataclass with :meth:`Sampler.select` ``(context, size, seed)`` ->
``(size,)`` sorted training ids, to be passed as ``Influence(..., hessian_indices=ids)``. Write your
own by subclassing :class:`Sampler` (implement :meth:`Sampler.choose`) or, for stratified designs,
:class:`StratifiedSampler` (implement :meth:`StratifiedSampler.strata`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from influencer._kernel.errors import ConfigError
from influencer.samplers.context import SamplerContext


def check_size(size: int, available: int) -> int:
    """``size`` as an int in ``[1, available]``, or a :class:`ConfigError` saying what is allowed."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise ConfigError(
            f"the subset size must be an integer number of examples, got {size!r}; for a fraction f "
            f"of the pool pass round(f * {available})"
        )
    if not 1 <= size <= available:
        raise ConfigError(
            f"the subset size must be between 1 and the {available} candidate examples, got {size}"
        )
    return size


def largest_remainder(counts: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Split ``size`` draws over strata in proportion to ``counts`` ``(k,)``, summing exactly to ``size``.

    Each stratum gets ``floor(size * N_h / n)``; the draws left over go to the largest fractional
    parts (Hamilton's method), ties broken at random so equal strata are treated alike. Integer
    arithmetic throughout, so the counts are exact. Never exceeds a stratum's size when
    ``size <= n``. Returns ``(k,)`` int64.
    """
    counts = counts.to(torch.int64).cpu()
    n = int(counts.sum())
    if not 0 <= size <= n:
        raise ConfigError(f"cannot draw {size} examples from strata holding {n}")
    base = size * counts // n
    remainder = size * counts % n  # fractional part times n
    left = size - int(base.sum())
    if left:
        shuffle = torch.randperm(len(counts), generator=generator)
        # A stable sort of a shuffled order: largest remainder first, random among equals.
        order = shuffle[torch.sort(remainder[shuffle], descending=True, stable=True).indices]
        base[order[:left]] += 1
    return base


def draw_stratified(strata: Tensor, allocation: Tensor, generator: torch.Generator) -> Tensor:
    """Positions ``(sum(allocation),)``: ``allocation[h]`` drawn uniformly without replacement per stratum.

    ``strata`` ``(n,)`` holds each point's stratum in ``[0, k)``. Vectorised: every point gets a
    random key, points are ordered by (stratum, key), and the first ``allocation[h]`` of each
    stratum are kept.
    """
    strata = strata.cpu()
    keys = torch.rand(len(strata), generator=generator)
    by_key = torch.argsort(keys)
    order = by_key[torch.sort(strata[by_key], stable=True).indices]  # grouped by stratum, random within
    sorted_strata = strata[order]
    starts = torch.searchsorted(sorted_strata, sorted_strata, right=False)
    rank = torch.arange(len(strata)) - starts  # position within its stratum
    keep = rank < allocation[sorted_strata]
    return torch.sort(order[keep]).values


@dataclasses.dataclass(frozen=True)
class Sampler(ABC):
    """Chooses ``size`` training ids to estimate the Hessian on. Deterministic for a given seed."""

    name: ClassVar[str] = "sampler"

    def select(self, context: SamplerContext, size: int, seed: int = 0) -> Tensor:
        """``(size,)`` sorted, distinct training ids from ``context``'s pool."""
        if not isinstance(context, SamplerContext):
            raise ConfigError(f"select needs a SamplerContext, got {type(context).__name__}")
        size = check_size(size, context.n_pool)
        generator = torch.Generator().manual_seed(int(seed))
        positions = torch.as_tensor(self.choose(context, size, generator)).reshape(-1).to(torch.int64).cpu()
        if len(positions) != size or len(torch.unique(positions)) != size:
            raise ConfigError(
                f"{type(self).__name__}.choose must return {size} distinct pool positions, got "
                f"{len(positions)} ({len(torch.unique(positions))} distinct)"
            )
        if int(positions.min()) < 0 or int(positions.max()) >= context.n_pool:
            raise ConfigError(
                f"{type(self).__name__}.choose returned positions outside [0, {context.n_pool})"
            )
        return torch.sort(context.pool[positions]).values

    @abstractmethod
    def choose(self, context: SamplerContext, size: int, generator: torch.Generator) -> Tensor:
        """Positions ``(size,)`` into ``context.pool`` (not training ids); randomness from ``generator``."""

    def settings(self) -> dict[str, Any]:
        """JSON-able description for reports and cache keys."""
        return {"sampler": self.name, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class StratifiedSampler(Sampler):
    """Proportional stratified sampling: subclasses say which stratum each candidate is in.

    Draws are allocated to strata in proportion to their sizes by largest remainder (so the total
    is exact) and taken uniformly without replacement within each stratum. Uniform, rather than
    preferring points near a stratum's centre, keeps every point's chance of selection at
    ``size / n`` up to rounding, so the subset's average curvature stays an (almost) unbiased
    estimate of the full one; favouring central points would systematically drop the atypical
    points, which are exactly those with the largest curvature.
    """

    @abstractmethod
    def strata(self, context: SamplerContext, size: int, generator: torch.Generator) -> Tensor:
        """Stratum label of every candidate, ``(n_pool,)`` integers (any values)."""

    def choose(self, context: SamplerContext, size: int, generator: torch.Generator) -> Tensor:
        labels = torch.as_tensor(self.strata(context, size, generator)).reshape(-1).cpu()
        if len(labels) != context.n_pool:
            raise ConfigError(
                f"{type(self).__name__}.strata must label all {context.n_pool} candidates, got {len(labels)}"
            )
        _, strata, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        allocation = largest_remainder(counts, size, generator)
        return draw_stratified(strata, allocation, generator)


def auto_strata(size: int, per_stratum: float, available: int) -> int:
    """Number of strata giving about ``per_stratum`` draws each (at least 1, at most ``available``)."""
    return int(max(1, min(available, round(size / per_stratum))))
