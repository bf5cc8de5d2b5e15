"""Conjugate gradient on ``(H + damping I) x = v`` for many right-hand sides at once."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from influencer._kernel.curvature import Curvature
from influencer._kernel.errors import IndefiniteHessianError, NonFiniteError
from influencer.estimators.base import (
    Estimator,
    Solver,
    check_on_unconverged,
    require_positive,
    unconverged,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CG(Estimator):
    """Block conjugate gradient: ``k`` independent CG runs sharing each pass over the data.

    Each iteration costs one HVP pass over the Hessian's examples for the columns not yet
    converged. Stops a column when ``||r|| <= tol * ||v||``. Needs ``H + damping I`` positive
    definite; meeting negative curvature raises :class:`IndefiniteHessianError`. A column still
    above ``tol`` after ``max_iter`` iterations (a singular or badly conditioned system) raises
    :class:`ConvergenceError`, or only warns with ``on_unconverged="warn"``; ``info`` records
    ``converged`` and the worst relative residual either way.
    """

    tol: float = 1e-8
    max_iter: int = 200
    on_unconverged: str = "raise"
    name = "cg"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("CG.tol", self.tol)
        require_positive("CG.max_iter", self.max_iter, integer=True)
        check_on_unconverged("CG.on_unconverged", self.on_unconverged)

    def fit(self, curvature: Curvature) -> CGSolver:
        return CGSolver(curvature, self)


class CGSolver(Solver):
    def __init__(self, curvature: Curvature, config: CG) -> None:
        self.curvature = curvature
        self.config = config
        self.info: dict = {}

    def _apply(self, v: Tensor) -> Tensor:
        return self.curvature.matvec(v) + self.config.damping * v

    def solve(self, vectors: Tensor) -> Tensor:
        cfg = self.config
        b = vectors.detach().reshape(-1, self.curvature.p).to(self.curvature.theta)
        x = torch.zeros_like(b)
        r = b.clone()
        d = r.clone()
        rs = (r * r).sum(1)  # (k,)
        target = cfg.tol * b.norm(dim=1)
        active = torch.nonzero(rs.sqrt() > target).reshape(-1)
        iters = 0
        while active.numel() and iters < cfg.max_iter:
            iters += 1
            ad = self._apply(d[active])
            curv = (d[active] * ad).sum(1)
            if (curv <= 0).any():
                raise IndefiniteHessianError(
                    f"CG met negative curvature (d^T (H + {cfg.damping:g} I) d = {float(curv.min()):.3g}): "
                    "the Hessian is not positive definite at these parameters. Increase damping, use "
                    "curvature='gauss_newton', or train the model closer to a minimum"
                )
            alpha = rs[active] / curv
            x[active] += alpha[:, None] * d[active]
            r[active] -= alpha[:, None] * ad
            new_rs = (r[active] * r[active]).sum(1)
            if not torch.isfinite(new_rs).all():
                raise NonFiniteError("CG produced a non-finite residual; check the gradients and damping")
            d[active] = r[active] + (new_rs / rs[active])[:, None] * d[active]
            rs[active] = new_rs
            active = active[new_rs.sqrt() > target[active]]
        rel = (rs.sqrt() / b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)).max()
        self.info = {
            "iterations": iters,
            "max_relative_residual": float(rel),
            "converged": not active.numel(),
        }
        if active.numel():
            unconverged(
                "CG",
                cfg.on_unconverged,
                f"CG did not converge: after max_iter={cfg.max_iter} iterations {active.numel()} of "
                f"{len(b)} systems still have a relative residual up to {float(rel):.2e} > tol={cfg.tol:g}",
                "raise max_iter, or raise damping (now "
                f"{cfg.damping:g}) if the Hessian is singular or badly conditioned",
            )
        return x.reshape(vectors.shape).to(vectors.dtype)
