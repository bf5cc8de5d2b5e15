"""Low-rank inverse from the top eigenpairs of H, found by a Krylov (Arnoldi/Lanczos) iteration.

Following Schioppa et al. (AAAI 2022), ``(H + damping I)^-1 v ~ U diag(1 / (lambda + damping)) U^T v``
on the span of the ``rank`` largest-magnitude eigenvectors ``U``; the rest of ``v`` is dropped.
After fitting, every solve is two thin matrix products, so it suits many test points and
self-influence over a whole training set.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from influencer._kernel.curvature import Curvature
from influencer._kernel.errors import ConfigError, IndefiniteHessianError
from influencer._kernel.progress import progress_bar
from influencer.estimators.base import Estimator, Solver, require_positive


@dataclasses.dataclass(frozen=True, kw_only=True)
class Arnoldi(Estimator):
    """``iterations`` HVP passes build a Krylov basis; the top ``rank`` Ritz pairs are kept.

    For a symmetric H, Arnoldi is the Lanczos recursion; the basis is fully re-orthogonalised
    so the Ritz pairs stay accurate, and restarted when it becomes invariant so that repeated
    eigenvalues are resolved. ``iterations = rank = p`` recovers the exact inverse.
    Memory: ``(iterations + 1) x p``.
    """

    rank: int = 50
    iterations: int = 100
    seed: int = 0
    name = "arnoldi"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("Arnoldi.rank", self.rank, integer=True)
        require_positive("Arnoldi.iterations", self.iterations, integer=True)
        if self.iterations < self.rank:
            raise ConfigError(f"Arnoldi.iterations ({self.iterations}) must be >= rank ({self.rank})")

    def fit(self, curvature: Curvature) -> ArnoldiSolver:
        values, vectors = lanczos(curvature, min(self.iterations, curvature.p), self.seed)
        keep = values.abs().argsort(descending=True)[: self.rank]
        values, vectors = values[keep], vectors[keep]
        if (values + self.damping <= 0).any():
            raise IndefiniteHessianError(
                f"the Hessian has eigenvalue {float(values.min()):.3g} <= -damping ({self.damping:g}) "
                "among its top eigenpairs; increase damping or use curvature='gauss_newton'"
            )
        return ArnoldiSolver(values, vectors, self.damping)


def lanczos(curvature: Curvature, iterations: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Ritz values ``(m,)`` and orthonormal Ritz vectors ``(m, p)`` of H from an m-step Krylov space."""
    p, dtype, device = curvature.p, curvature.dtype, curvature.device
    gen = torch.Generator().manual_seed(seed)
    basis = torch.zeros(iterations + 1, p, dtype=dtype, device=device)
    q = torch.randn(p, generator=gen, dtype=dtype).to(device)
    basis[0] = q / q.norm()
    alphas, betas = [], []
    for j in progress_bar(range(iterations), desc="Arnoldi", enabled=curvature.progress):
        w = curvature.matvec(basis[j])
        alphas.append(float(basis[j] @ w))
        # Two rounds of Gram-Schmidt against the whole basis keep it orthogonal in floating point.
        for _ in range(2):
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        if j == iterations - 1:
            break
        beta = float(w.norm())
        if beta <= 1e-10 * max(abs(a) for a in alphas):
            # The Krylov space is invariant (its Ritz pairs are exact). A single start vector sees
            # one direction per distinct eigenvalue, so restart from a fresh orthogonal direction
            # to resolve repeated eigenvalues; T gets a zero off-diagonal entry there.
            w = torch.randn(p, generator=gen, dtype=dtype).to(device)
            for _ in range(2):
                w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
            if float(w.norm()) <= 1e-8:
                break  # the basis already spans the whole space
            betas.append(0.0)
            basis[j + 1] = w / w.norm()
            continue
        betas.append(beta)
        basis[j + 1] = w / beta
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    values, s = torch.linalg.eigh(t)
    vectors = s.T.to(dtype=dtype, device=device) @ basis[:m]
    return values.to(dtype=dtype, device=device), vectors


class ArnoldiSolver(Solver):
    def __init__(self, values: Tensor, vectors: Tensor, damping: float) -> None:
        self.values, self.vectors, self.damping = values, vectors, damping
        self.info = {"rank": int(values.numel()), "eigenvalues": values.tolist()}

    def solve(self, vectors: Tensor) -> Tensor:
        u = self.vectors
        coeffs = (vectors.to(u) @ u.T) / (self.values + self.damping)  # (k, rank)
        return (coeffs @ u).to(vectors.dtype)
