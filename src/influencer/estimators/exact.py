"""Exact inverse HVPs from the dense Hessian (small models; float64 by default)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from influencer._kernel.curvature import Curvature
from influencer._kernel.errors import ConfigError, IndefiniteHessianError
from influencer.estimators.base import Estimator, Solver, require_positive


@dataclasses.dataclass(frozen=True, kw_only=True)
class Exact(Estimator):
    """Forms ``H`` ``(p, p)`` with ``p`` HVPs and eigendecomposes ``H + damping I``.

    ``float64`` computes the Hessian in double precision whatever the model's dtype, which makes
    this the reference the other estimators are tested against. Refuses models with more than
    ``max_params`` parameters (memory grows as p^2).
    """

    float64: bool = True
    max_params: int = 20_000
    name = "exact"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("Exact.max_params", self.max_params, integer=True)

    def fit(self, curvature: Curvature) -> ExactSolver:
        if curvature.p > self.max_params:
            raise ConfigError(
                f"Exact needs a dense {curvature.p}x{curvature.p} Hessian, more than max_params="
                f"{self.max_params}; use CG, LiSSA or Arnoldi, or choose fewer parameters (params=[...])"
            )
        h = curvature.dense(torch.float64 if self.float64 else None)
        return ExactSolver(h, self.damping)


class ExactSolver(Solver):
    def __init__(self, hessian: Tensor, damping: float) -> None:
        p = hessian.shape[0]
        damped = hessian + damping * torch.eye(p, dtype=hessian.dtype, device=hessian.device)
        evals, evecs = torch.linalg.eigh(damped)
        lo, hi = float(evals[0]), float(evals[-1])
        # Below this the smallest eigenvalue is indistinguishable from zero at this precision.
        floor = max(abs(hi), 1e-30) * p * torch.finfo(hessian.dtype).eps * 10
        if lo <= floor:
            kind = "singular" if lo > -floor else "indefinite"
            suggest = max(abs(lo) * 2, abs(hi) * 1e-4, 1e-8)
            raise IndefiniteHessianError(
                f"the Hessian + damping ({damping:g}) is {kind}: smallest eigenvalue {lo:.3g}, largest "
                f"{hi:.3g}. Its inverse does not exist; pass damping > {max(-lo, 0):.3g} (e.g. "
                f"damping={suggest:.2g}), use curvature='gauss_newton', or train the model to a minimum"
            )
        self.hessian = hessian
        self.evals, self.evecs = evals, evecs
        self.info = {"min_eigenvalue": lo, "max_eigenvalue": hi, "condition_number": hi / lo}

    def solve(self, vectors: Tensor) -> Tensor:
        q = self.evecs
        v = vectors.to(q)
        return (((v @ q) / self.evals) @ q.T).to(vectors.dtype)
