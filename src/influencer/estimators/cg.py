"""Conjugate gradient on ``(H + damping I) x = v`` for many right-hand sides at once."""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import Tensor

from influencer._kernel.curvature import Curvature
from influencer._kernel.errors import IndefiniteHessianError, NonFiniteError
from influencer.estimators.base import Estimator, Solver, require_positive


@dataclasses.dataclass(frozen=True, kw_only=True)
class CG(Estimator):
    """Block conjugate gradient: ``k`` independent CG runs sharing each pass over the data.

    Each iteration costs one HVP pass over the Hessian's examples for the columns not yet
    converged. Stops a column when ``||r|| <= tol * ||v||``. Needs ``H + damping I`` positive
    definite; meeting negative curvature raises :class:`IndefiniteHessianError`.
    """

    tol: float = 1e-8
    max_iter: int = 200
    name = "cg"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("CG.tol", self.tol)
        require_positive("CG.max_iter", self.max_iter, integer=True)

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
        out = torch.zeros_like(b)
        rs_out = (b * b).sum(1)  # (k,) squared residual norms, final once a column stops
        target = cfg.tol * b.norm(dim=1)
        # The running state holds only the columns still iterating, packed: no per-iteration
        # gathers and scatters; a column leaves it (and is written out) when it converges.
        ids = torch.nonzero(rs_out.sqrt() > target).reshape(-1)
        x = torch.zeros_like(b[ids])
        r = b[ids]
        d = r.clone()
        rs, tol = rs_out[ids], target[ids]
        iters = 0
        while len(ids) and iters < cfg.max_iter:
            iters += 1
            ad = self._apply(d)
            curv = (d * ad).sum(1)
            alpha = rs / curv
            x.addcmul_(alpha[:, None], d)
            r.addcmul_(alpha[:, None], ad, value=-1.0)
            new_rs = (r * r).sum(1)
            keep = new_rs.sqrt() > tol
            # One host sync per iteration for all three decisions.
            negative, finite, converged = torch.stack(
                [(curv <= 0).any(), torch.isfinite(new_rs).all(), ~keep.all()]
            ).tolist()
            if negative:
                raise IndefiniteHessianError(
                    f"CG met negative curvature (d^T (H + {cfg.damping:g} I) d = {float(curv.min()):.3g}): "
                    "the Hessian is not positive definite at these parameters. Increase damping, use "
                    "curvature='gauss_newton', or train the model closer to a minimum"
                )
            if not finite:
                raise NonFiniteError("CG produced a non-finite residual; check the gradients and damping")
            d.mul_((new_rs / rs)[:, None]).add_(r)
            rs = new_rs
            if converged:
                done = ~keep
                out[ids[done]], rs_out[ids[done]] = x[done], rs[done]
                ids, x, r, d, rs, tol = ids[keep], x[keep], r[keep], d[keep], rs[keep], tol[keep]
        out[ids], rs_out[ids] = x, rs
        rel = (rs_out.sqrt() / b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)).max()
        self.info = {"iterations": iters, "max_relative_residual": float(rel)}
        if len(ids):
            warnings.warn(
                f"CG stopped after max_iter={cfg.max_iter} with {len(ids)} of {len(b)} systems "
                f"unconverged (worst relative residual {float(rel):.2e} > tol={cfg.tol:g}); raise "
                "max_iter or damping for an accurate solve",
                RuntimeWarning,
                stacklevel=3,
            )
        return out.reshape(vectors.shape).to(vectors.dtype)
