"""Conjugate gradient on ``(H + damping I) x = v`` for many right-hand sides at once."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from influencer._kernel.curvature import Curvature
from influencer._kernel.errors import ConfigError, IndefiniteHessianError, NonFiniteError
from influencer._kernel.progress import SolveProgress
from influencer.estimators.base import (
    Estimator,
    Solver,
    check_on_unconverged,
    prefixed,
    require_positive,
    unconverged,
    unprefixed,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CG(Estimator):
    """Conjugate gradient for ``k`` right-hand sides sharing each pass over the data.

    ``block=True`` (default): block conjugate gradient (O'Leary 1980) over all right-hand sides
    together. The search space grows by one direction per unconverged column each iteration, so it
    needs fewer iterations than ``k`` separate runs (2-3x measured on the benchmark models with 10
    right-hand sides) for the same HVP cost per iteration. The search block is re-orthonormalised
    every step and directions that became dependent are dropped (breakdown-free block CG, Ji & Li
    2017). A column's answer then depends, at the tolerance's level, on the columns solved with it.
    ``block=False``: ``k`` independent CG runs, each column's answer its own.

    Each iteration costs one HVP pass over the Hessian's examples for the columns (block
    directions) not yet converged. Stops a column when ``||r|| <= tol * ||v||``. Needs
    ``H + damping I`` positive definite; meeting negative curvature raises
    :class:`IndefiniteHessianError`. A column still above ``tol`` after ``max_iter`` iterations
    (a singular or badly conditioned system) raises :class:`ConvergenceError`, or only warns with
    ``on_unconverged="warn"``; ``info`` records ``converged`` and the worst relative residual
    either way.

    ``preconditioner``: another estimator (e.g. ``KFAC(damping=...)``) whose solve approximates
    ``(H + damping I)^-1``; it is fitted on the same curvature and CG then iterates on the
    preconditioned system (fewer iterations where it captures the curvature's spread). The
    answer and stopping rule (on the unpreconditioned residual) are unchanged: exact at
    convergence whatever the preconditioner, as long as it is symmetric positive definite.
    """

    tol: float = 1e-8
    max_iter: int = 200
    on_unconverged: str = "raise"
    preconditioner: Estimator | None = None
    block: bool = True
    name = "cg"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("CG.tol", self.tol)
        require_positive("CG.max_iter", self.max_iter, integer=True)
        check_on_unconverged("CG.on_unconverged", self.on_unconverged)
        if not isinstance(self.block, bool):
            raise ConfigError(f"{type(self).__name__}.block must be True or False, got {self.block!r}")
        if self.preconditioner is None:
            return
        if not isinstance(self.preconditioner, Estimator):
            raise ConfigError(
                f"{type(self).__name__}.preconditioner must be an estimator such as KFAC(damping=...) "
                f"or None, got {self.preconditioner!r}"
            )
        if isinstance(self.preconditioner, CG) or self.preconditioner.name == "lissa":
            # CG needs the same linear map at every step; an iterative or stochastic solve is not one.
            raise ConfigError(
                f"{type(self).__name__}.preconditioner must be a fixed linear solve (KFAC, EKFAC, "
                f"Arnoldi, Exact), not the iterative {type(self.preconditioner).__name__}"
            )

    def settings(self) -> dict[str, Any]:
        out = {"estimator": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}
        if self.preconditioner is None:
            del out["preconditioner"]  # the settings (and cache fingerprints) of unpreconditioned CG
        else:
            out["preconditioner"] = self.preconditioner.settings()
        return out

    def fit(self, curvature: Curvature) -> CGSolver:
        return CGSolver(curvature, self)

    def load_solver(self, curvature: Curvature, state: dict[str, Tensor], info: dict) -> CGSolver:
        # Only a preconditioner is fitted; CG itself iterates at every solve.
        pre = self.preconditioner
        loaded = None if pre is None else pre.load_solver(curvature, unprefixed(state, "preconditioner."), {})
        return CGSolver(curvature, self, loaded)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockCG(CG):
    """:class:`CG` with ``block=True`` (its default), under the name it had before that default."""

    name = "block_cg"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.block:
            raise ConfigError("BlockCG always solves in blocks; for independent columns use CG(block=False)")

    def settings(self) -> dict[str, Any]:
        out = super().settings()
        del out["block"]  # always True: the name says it
        return out


class CGSolver(Solver):
    def __init__(self, curvature: Curvature, config: CG, preconditioner: Solver | None = None) -> None:
        self.curvature = curvature
        self.config = config
        self.info: dict = {}
        self.preconditioner = preconditioner
        if preconditioner is None and config.preconditioner is not None:
            self.preconditioner = config.preconditioner.fit(curvature)

    def state_dict(self) -> dict[str, Tensor]:
        return (
            {}
            if self.preconditioner is None
            else prefixed(self.preconditioner.state_dict(), "preconditioner.")
        )

    def _precondition(self, r: Tensor) -> Tensor:
        return r if self.preconditioner is None or len(r) == 0 else self.preconditioner.solve(r)

    def _apply(self, v: Tensor) -> Tensor:
        return self.curvature.matvec(v) + self.config.damping * v

    def _negative_curvature(self, value: float) -> IndefiniteHessianError:
        dtype = self.curvature.dtype
        if dtype in (torch.float16, torch.bfloat16):
            return IndefiniteHessianError(
                f"CG met d^T (H + {self.config.damping:g} I) d = {value:.3g} in {str(dtype)[6:]}, whose "
                f"{3 if dtype == torch.float16 else 2} significant digits cannot resolve these products: "
                "the cause is likely the precision, not the Hessian; solve in float32 or float64 "
                "(Influence(..., dtype=torch.float32))"
            )
        return IndefiniteHessianError(
            f"CG met negative curvature (d^T (H + {self.config.damping:g} I) d = {value:.3g}): "
            "the Hessian is not positive definite at these parameters. Increase damping, use "
            "curvature='gauss_newton', or train the model closer to a minimum"
        )

    def solve(self, vectors: Tensor) -> Tensor:
        cfg = self.config
        b = vectors.detach().reshape(-1, self.curvature.p).to(self.curvature.theta)
        # The block's small dense factorisations have no half-precision kernels: columns run alone.
        if cfg.block and b.dtype not in (torch.float16, torch.bfloat16):
            return self._solve_block(b).reshape(vectors.shape).to(vectors.dtype)
        out = torch.zeros_like(b)
        rs_out = (b * b).sum(1)  # (k,) squared residual norms, final once a column stops
        target = cfg.tol * b.norm(dim=1)
        # The running state holds only the columns still iterating, packed: no per-iteration
        # gathers and scatters; a column leaves it (and is written out) when it converges.
        ids = torch.nonzero(rs_out.sqrt() > target).reshape(-1)
        x = torch.zeros_like(b[ids])
        r = b[ids]
        z = self._precondition(r)
        d = z.clone()
        rs, tol = rs_out[ids], target[ids]
        rz = (r * z).sum(1) if self.preconditioner is not None else rs
        iters = 0
        bar = self._progress()
        while len(ids) and iters < cfg.max_iter:
            iters += 1
            ad = self._apply(d)
            curv = (d * ad).sum(1)
            alpha = rz / curv
            x.addcmul_(alpha[:, None], d)
            r.addcmul_(alpha[:, None], ad, value=-1.0)
            new_rs = (r * r).sum(1)
            keep = new_rs.sqrt() > tol
            if bar.enabled:
                bar.update(iters, cfg.tol * float((new_rs.sqrt() / tol).max()))
            # One host sync per iteration for all three decisions.
            negative, finite, converged = torch.stack(
                [(curv <= 0).any(), torch.isfinite(new_rs).all(), ~keep.all()]
            ).tolist()
            if negative:
                raise self._negative_curvature(float(curv.min()))
            if not finite:
                raise NonFiniteError("CG produced a non-finite residual; check the gradients and damping")
            if self.preconditioner is None:
                d.mul_((new_rs / rs)[:, None]).add_(r)
                rs = rz = new_rs
            else:
                z = self._precondition(r)
                new_rz = (r * z).sum(1)
                d.mul_((new_rz / rz)[:, None]).add_(z)
                rs, rz = new_rs, new_rz
            if converged:
                done = ~keep
                out[ids[done]], rs_out[ids[done]] = x[done], rs[done]
                ids, x, r, d, rs, rz, tol = (
                    ids[keep],
                    x[keep],
                    r[keep],
                    d[keep],
                    rs[keep],
                    rz[keep],
                    tol[keep],
                )
        out[ids], rs_out[ids] = x, rs
        bar.close()
        self._finish(b, rs_out, iters, len(ids))
        return out.reshape(vectors.shape).to(vectors.dtype)

    def _solve_block(self, b: Tensor) -> Tensor:
        """Block CG on the rows of ``b`` ``(k, p)``; search directions are orthonormal rows ``P``."""
        cfg = self.config
        out = torch.zeros_like(b)
        rs_out = (b * b).sum(1)
        target = cfg.tol * b.norm(dim=1)
        ids = torch.nonzero(rs_out.sqrt() > target).reshape(-1)
        x, r, tol = torch.zeros_like(b[ids]), b[ids], target[ids]
        p = _orthonormal_rows(self._precondition(r))  # (s, p), s <= active columns
        iters = 0
        bar = self._progress()
        while len(ids) and len(p) and iters < cfg.max_iter:
            iters += 1
            q = self._apply(p)  # (s, p)
            pap = p @ q.T
            pap = 0.5 * (pap + pap.T)  # (s, s): H in the orthonormal search basis
            chol, failed = torch.linalg.cholesky_ex(pap)
            if bool(failed):
                raise self._negative_curvature(float(torch.linalg.eigvalsh(pap)[0]))
            alpha = torch.cholesky_solve(p @ r.T, chol)  # (s, k)
            x.addmm_(alpha.T, p)
            r.addmm_(alpha.T, q, alpha=-1.0)
            rs = (r * r).sum(1)
            keep = rs.sqrt() > tol
            if bar.enabled:
                bar.update(iters, cfg.tol * float((rs.sqrt() / tol).max()))
            finite, converged = torch.stack([torch.isfinite(rs).all(), ~keep.all()]).tolist()
            if not finite:
                raise NonFiniteError("CG produced a non-finite residual; check the gradients and damping")
            if converged:
                done = ~keep
                out[ids[done]], rs_out[ids[done]] = x[done], rs[done]
                ids, x, r, tol = ids[keep], x[keep], r[keep], tol[keep]
            # Next block: the (preconditioned) residuals made H-conjugate to the current one, then
            # orthonormalised; any basis of that span gives the same iterate.
            z = self._precondition(r)
            beta = torch.cholesky_solve(q @ z.T, chol)  # (s, k_active)
            p = _orthonormal_rows(z - beta.T @ p)
        out[ids], rs_out[ids] = x, (r * r).sum(1)
        bar.close()
        self._finish(b, rs_out, iters, len(ids))
        return out

    def _progress(self) -> SolveProgress:
        return SolveProgress(
            type(self.config).__name__,
            getattr(self.curvature, "progress", False),  # duck-typed curvatures may have none
            self.config.tol,
            self.config.max_iter,
        )

    def _finish(self, b: Tensor, rs: Tensor, iters: int, left: int) -> None:
        cfg = self.config
        rel = (rs.sqrt() / b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)).max() if len(b) else rs.sum()
        self.info = {"iterations": iters, "max_relative_residual": float(rel), "converged": not left}
        if left:
            unconverged(
                type(cfg).__name__,
                cfg.on_unconverged,
                f"CG did not converge: after max_iter={cfg.max_iter} iterations {left} of "
                f"{len(b)} systems still have a relative residual up to {float(rel):.2e} > tol={cfg.tol:g}",
                "raise max_iter, or raise damping (now "
                f"{cfg.damping:g}) if the Hessian is singular or badly conditioned",
            )


def _orthonormal_rows(z: Tensor) -> Tensor:
    """Orthonormal rows ``(s, p)`` spanning the rows of ``z`` ``(k, p)``; dependent directions dropped."""
    if len(z) == 0:
        return z
    _, sv, vh = torch.linalg.svd(z, full_matrices=False)
    rank = int((sv > sv[0] * max(z.shape) * torch.finfo(z.dtype).eps).sum()) if float(sv[0]) > 0 else 0
    return vh[:rank]
