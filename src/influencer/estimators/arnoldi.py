"""Low-rank inverse from the top eigenpairs of H, found by a Krylov (Arnoldi/Lanczos) iteration.

Following Schioppa et al. (AAAI 2022), ``(H + damping I)^-1 v ~ U diag(1 / (lambda + damping)) U^T v``
on the span of the ``rank`` largest-magnitude eigenvectors ``U``; the rest of ``v`` is dropped.
After fitting, every solve is two thin matrix products, so it suits many test points and
self-influence over a whole training set.

The low-rank inverse is only as good as the share of the spectrum, and of each gradient, that the
kept eigenvectors hold: :func:`coverage_warning` warns (``RuntimeWarning``, and in
``solver.info``) when the spectrum has not decayed at the cut, or when most of
``v^T (H + damping I)^-1 v`` of the solved vectors provably lies in the dropped directions.
"""

from __future__ import annotations

import dataclasses
import warnings

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
        solver = ArnoldiSolver(values, vectors, self.damping)
        if values.numel() < curvature.p:  # directions were dropped
            ratio = float(values.abs().min() / values.abs().max().clamp_min(torch.finfo(values.dtype).tiny))
            solver.info["cut_ratio"] = ratio
            if ratio > CUT_RATIO:
                coverage_warning(
                    solver,
                    f"its smallest kept eigenvalue is {100 * ratio:.3g}% of the largest: the spectrum has "
                    "not decayed at the cut, so the dropped directions, each weighted more than any kept "
                    "one in the inverse, can carry much of the scores",
                )
        return solver

    def load_solver(self, curvature: Curvature, state: dict[str, Tensor], info: dict) -> ArnoldiSolver:
        solver = ArnoldiSolver(state["values"], state["vectors"], self.damping)
        solver.info = dict(info)
        return solver


# The cut is "not small" when the smallest kept |eigenvalue| exceeds this fraction of the largest.
CUT_RATIO = 0.05
# Warn when at least this fraction of v^T (H + damping I)^-1 v provably lies in dropped directions.
DROPPED_SHARE = 0.5


def coverage_warning(solver: ArnoldiSolver, why: str) -> None:
    """Warn once per solver that the kept eigenpairs do not capture what the solves need."""
    solver.info["spectrum_captured"] = False
    if solver.warned:
        return
    solver.warned = True
    warnings.warn(
        f"Arnoldi with rank {solver.values.numel()} does not capture the spectrum: {why}. Raise rank and "
        "iterations, or compare with CG or EKFAC on a few test examples",
        RuntimeWarning,
        stacklevel=4,
    )


def dropped_share(values: Tensor, coeffs: Tensor, norms2: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Per vector ``v`` (coefficients ``U v`` ``(k, rank)``, ``||v||^2`` ``(k,)``): the fraction of
    ``||v||^2`` outside the kept subspace, and a lower bound on the fraction of
    ``v^T (H + damping I)^-1 v`` there (every dropped eigenvalue is at most the smallest kept one
    in magnitude, so the dropped part weighs at least ``||v_out||^2 / (|lambda_min| + damping)``)."""
    inside = coeffs.pow(2).sum(1)
    outside = (norms2 - inside).clamp_min(0.0)
    kept = (coeffs.pow(2) / (values.abs() + damping)).sum(1)
    dropped = outside / (values.abs().min() + damping)
    tiny = torch.finfo(coeffs.dtype).tiny
    return outside / norms2.clamp_min(tiny), dropped / (kept + dropped).clamp_min(tiny)


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
        self.warned = False

    def state_dict(self) -> dict[str, Tensor]:
        return {"values": self.values, "vectors": self.vectors}

    def solve(self, vectors: Tensor) -> Tensor:
        u = self.vectors
        v = vectors.to(u)
        projected = v @ u.T  # (k, rank)
        if len(v) and u.shape[0] < u.shape[1]:
            outside, share = dropped_share(self.values, projected, v.pow(2).sum(1), self.damping)
            self.info["outside_fraction"] = float(outside.median())
            self.info["dropped_share_bound"] = float(share.median())
            if float(share.median()) >= DROPPED_SHARE:
                coverage_warning(
                    self,
                    f"{100 * float(outside.median()):.3g}% of the solved vectors' squared norm lies outside "
                    f"the kept subspace, and at least {100 * float(share.median()):.3g}% of "
                    "v^T (H + damping I)^-1 v (median over vectors)",
                )
        coeffs = projected / (self.values + self.damping)  # (k, rank)
        return (coeffs @ u).to(vectors.dtype)
