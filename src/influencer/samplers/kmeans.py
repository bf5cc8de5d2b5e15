"""k-means in torch (k-means++ seeding, Lloyd iterations), on any device, chunked over points."""

from __future__ import annotations

import torch
from torch import Tensor

from influencer._kernel.errors import ConfigError


def _nearest(points: Tensor, centers: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Index ``(n,)`` and squared distance ``(n,)`` of each point's nearest center."""
    idx, dist = [], []
    c_sq = (centers * centers).sum(1)
    for start in range(0, len(points), chunk):
        x = points[start : start + chunk]
        d = (x * x).sum(1, keepdim=True) - 2 * x @ centers.T + c_sq  # (c, k)
        best = d.min(1)
        idx.append(best.indices)
        dist.append(best.values.clamp_min(0))
    return torch.cat(idx), torch.cat(dist)


def kmeans(
    points: Tensor,
    k: int,
    generator: torch.Generator,
    *,
    iterations: int = 50,
    tol: float = 1e-6,
    chunk: int = 8192,
) -> tuple[Tensor, Tensor]:
    """Cluster ``points`` ``(n, d)`` into ``k`` groups; returns labels ``(n,)`` and centers ``(k, d)``.

    Seeding is k-means++ (each new center drawn with probability proportional to the squared
    distance to the nearest chosen one); random draws come from the CPU ``generator`` so results
    do not depend on the device. A cluster left empty is re-seeded at the point farthest from its
    center. Stops when the mean squared distance improves by less than ``tol`` (relative).
    """
    n = len(points)
    if not 1 <= k <= n:
        raise ConfigError(f"k-means needs 1 <= k <= n = {n}, got k = {k}")
    x = points.to(torch.float64 if points.dtype == torch.float64 else torch.float32)
    first = int(torch.randint(n, (1,), generator=generator))
    centers = x[first : first + 1].clone()
    _, dist = _nearest(x, centers, chunk)
    for _ in range(1, k):
        weights = dist.cpu().double()
        if float(weights.sum()) <= 0:  # fewer distinct points than k: pick any unused point
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            pick = int(torch.multinomial(weights, 1, generator=generator))
        centers = torch.cat([centers, x[pick : pick + 1]])
        dist = torch.minimum(dist, ((x - x[pick]) ** 2).sum(1))
    previous = float("inf")
    labels, dist = _nearest(x, centers, chunk)
    for _ in range(iterations):
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        empty = counts == 0
        centers = torch.where(empty[:, None], centers, sums / counts.clamp_min(1)[:, None])
        for j in torch.nonzero(empty).reshape(-1).tolist():
            far = int(dist.argmax())
            centers[j] = x[far]
            dist[far] = 0
        labels, dist = _nearest(x, centers, chunk)
        inertia = float(dist.mean())
        if previous - inertia <= tol * max(previous, 1e-30):
            break
        previous = inertia
    return labels, centers
