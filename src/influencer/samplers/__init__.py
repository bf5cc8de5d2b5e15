"""Representative subsets of the training data to estimate the Hessian on.

Usage::

    from influencer.samplers import SamplerContext, LogitSampler
    context = SamplerContext(model, task, train)               # pool=... restricts the candidates
    ids = LogitSampler().select(context, size=200, seed=0)      # (200,) sorted training ids
    inf = Influence(model, task, train, hessian_indices=ids).fit()

Built-ins: :class:`RandomSampler` (baseline), :class:`ClassStratifiedSampler` (by label),
:class:`FeatureSampler` (k-means strata in a layer's feature space) and :class:`LogitSampler`
(predicted class x confidence quantile). Subclass :class:`Sampler` or :class:`StratifiedSampler`
to add your own; :func:`register_sampler` makes it available by name.
"""

from __future__ import annotations

from typing import Any

from influencer._kernel.errors import ConfigError
from influencer.samplers.base import Sampler, StratifiedSampler, draw_stratified, largest_remainder
from influencer.samplers.classes import ClassStratifiedSampler
from influencer.samplers.context import SamplerContext
from influencer.samplers.features import FeatureSampler
from influencer.samplers.kmeans import kmeans
from influencer.samplers.logits import LogitSampler
from influencer.samplers.uniform import RandomSampler

SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (RandomSampler, ClassStratifiedSampler, FeatureSampler, LogitSampler)
}


def register_sampler(cls: type[Sampler]) -> type[Sampler]:
    """Make a :class:`Sampler` subclass available to :func:`make_sampler` under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Sampler)):
        raise ConfigError(f"only Sampler subclasses can be registered, got {cls!r}")
    if cls.name in SAMPLERS and SAMPLERS[cls.name] is not cls:
        raise ConfigError(
            f"a different sampler is already registered as {cls.name!r}; give yours another name"
        )
    SAMPLERS[cls.name] = cls
    return cls


def make_sampler(name: str, **options: Any) -> Sampler:
    """The sampler registered as ``name``, configured with ``options``."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}")
    return SAMPLERS[name](**options)


__all__ = [
    "SAMPLERS",
    "ClassStratifiedSampler",
    "FeatureSampler",
    "LogitSampler",
    "RandomSampler",
    "Sampler",
    "SamplerContext",
    "StratifiedSampler",
    "draw_stratified",
    "kmeans",
    "largest_remainder",
    "make_sampler",
    "register_sampler",
]
