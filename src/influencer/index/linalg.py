"""The leading eigenvectors of a covariance, for a store's PCA basis (its Gram matrices:
:func:`influencer._kernel.gram.gram`)."""

from __future__ import annotations

import torch
from torch import Tensor


def top_eigenvectors(m: Tensor, k: int, seed: int = 0, iterations: int = 16) -> Tensor:
    """The ``k`` leading eigenvectors of a symmetric PSD ``m`` ``(d, d)`` as rows ``(k, d)``, signs fixed.

    A subspace iteration from a seeded random start, ``2 k`` wide, then the Rayleigh-Ritz vectors of
    ``m`` in that subspace: ``O(d^2 k)`` per iteration instead of a full eigendecomposition's
    ``O(d^3)``; the leading ``k``-dimensional subspace is found to working precision whenever the
    spectrum decays past ``2 k`` (a covariance of activations or gradients). Small matrices
    (``d <= 4 k``) use ``eigh`` directly. Each row's largest-magnitude entry is made positive.
    """
    m = 0.5 * (m + m.T)
    d = m.shape[0]
    width = min(d, 2 * k)
    if d <= 4 * k:
        _, vectors = torch.linalg.eigh(m)
    else:
        gen = torch.Generator().manual_seed(seed)
        basis = torch.randn(d, width, generator=gen, dtype=torch.float64).to(m.device, m.dtype)
        for _ in range(iterations):
            basis = torch.linalg.qr(m @ basis).Q
        _, small = torch.linalg.eigh(basis.T @ m @ basis)  # (width, width), ascending
        vectors = basis @ small
    top = vectors[:, -k:].flip(1).T.contiguous()  # descending eigenvalues; rows laid out as stored
    # the sign of an eigenvector is arbitrary: make each row's largest-magnitude entry positive
    pivot = top.gather(1, top.abs().argmax(1, keepdim=True))
    return top * torch.where(pivot < 0, -1.0, 1.0).to(top)
