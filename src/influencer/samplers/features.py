"""Feature-based sampling: cluster the training points in a layer's feature space, draw proportionally."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from influencer._kernel.errors import ConfigError
from influencer.samplers.base import StratifiedSampler, auto_strata
from influencer.samplers.context import SamplerContext
from influencer.samplers.kmeans import kmeans


def project(features: Tensor, dims: int, generator: torch.Generator) -> Tensor:
    """Centred features reduced to at most ``dims`` principal components ``(n, min(d, dims))``.

    Exact PCA from the ``d x d`` covariance when ``d <= 4096``; beyond that a seeded Gaussian
    random projection (distances preserved up to small distortion), to keep memory bounded.
    """
    x = features - features.mean(0)
    d = x.shape[1]
    if d <= dims:
        return x
    if d <= 4096:
        cov = (x.T @ x).double()
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        return x @ vecs[:, -dims:].to(x.dtype)
    proj = torch.randn(d, dims, generator=generator, dtype=torch.float64).to(x) / dims**0.5
    return x @ proj


@dataclasses.dataclass(frozen=True)
class FeatureSampler(StratifiedSampler):
    """Strata: k-means clusters of the activations at ``layer``; each gets draws in proportion to its size.

    For a classifier, nearby points in the representation the head sees have similar per-example
    curvature (the head's block is ``(diag(p) - p p^T)`` times ``h h^T``), so clusters there are
    homogeneous strata and a proportional draw makes the subset follow the feature distribution.

    Args:
        layer: submodule name (``None``: the input of the last module with parameters, i.e. the
            penultimate representation; ``""``: the raw input).
        capture: ``"input"`` or ``"output"`` of that submodule.
        clusters: number of clusters; ``None`` chooses about ``size / per_stratum``.
        per_stratum: target draws per cluster when ``clusters`` is automatic.
        dims: features are reduced to this many principal components before clustering.
        iterations: Lloyd iterations at most.
        cluster_seed: seed of the clustering. The strata are a property of the data, so they are
            the same for every draw (and computed once per context and size); only the draw within
            them depends on ``select``'s seed. A clustering that changed with every seed would add
            its own variance to the subsets.
    """

    layer: str | None = None
    capture: str = "input"
    clusters: int | None = None
    per_stratum: float = 2.0
    dims: int = 32
    iterations: int = 50
    cluster_seed: int = 0
    name = "feature"

    def __post_init__(self) -> None:
        if self.capture not in ("input", "output"):
            raise ConfigError(f"FeatureSampler.capture must be 'input' or 'output', got {self.capture!r}")
        for field in ("clusters", "dims", "iterations"):
            value = getattr(self, field)
            if value is None and field == "clusters":
                continue
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"FeatureSampler.{field} must be a positive integer, got {value!r}")
        if not self.per_stratum >= 1:
            raise ConfigError(f"FeatureSampler.per_stratum must be >= 1, got {self.per_stratum!r}")
        if not isinstance(self.cluster_seed, int):
            raise ConfigError(f"FeatureSampler.cluster_seed must be an integer, got {self.cluster_seed!r}")

    def strata(self, context: SamplerContext, size: int, generator: torch.Generator) -> Tensor:
        k = min(self.clusters or auto_strata(size, self.per_stratum, context.n_pool), context.n_pool)

        def cluster() -> Tensor:
            fixed = torch.Generator().manual_seed(self.cluster_seed)
            points = project(context.features(self.layer, self.capture), self.dims, fixed)
            return kmeans(points, k, fixed, iterations=self.iterations)[0].cpu()

        key = ("kmeans", self.layer, self.capture, k, self.dims, self.iterations, self.cluster_seed)
        return context.memo(key, cluster)
