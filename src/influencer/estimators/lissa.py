"""LiSSA: stochastic Neumann-series estimate of the inverse HVP (Agarwal et al. 2017)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from influencer._kernel.curvature import Curvature
from influencer._kernel.errors import ConfigError, ConvergenceError, IndefiniteHessianError, NonFiniteError
from influencer._kernel.progress import progress_bar
from influencer.estimators.base import Estimator, Solver, check_on_unconverged, require_positive, unconverged

# Right-hand sides per solve whose residual is checked with the full curvature (one HVP pass).
CHECKED_COLUMNS = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class LiSSA(Estimator):
    """Recursion ``h_j = v + h_{j-1} - (H_j + damping I) h_{j-1} / scale``, ``h_0 = v``.

    ``H_j`` is the Hessian on a fresh random minibatch of ``batch_size`` examples. After ``depth``
    steps ``h / scale`` estimates ``(H + damping I)^-1 v``; ``repeats`` independent runs are
    averaged. It converges when every eigenvalue of ``(H + damping I) / scale`` lies in (0, 2), so
    ``scale`` must exceed half the largest eigenvalue; ``scale=None`` sets it to 1.5x the largest
    eigenvalue of ``H + damping I`` (found by power iteration). Memory does not grow with depth:
    ``h`` is updated in place and no autograd graph is kept.

    Every solve is checked at the end: for up to ``CHECKED_COLUMNS`` right-hand sides ``v`` the
    estimate ``x`` is multiplied by the full damped curvature (one extra HVP pass). Negative
    curvature (``x^T (H + damping I) x <= 0``, or a negative largest eigenvalue found by the power
    iteration) raises :class:`IndefiniteHessianError`; a relative residual
    ``||(H + damping I) x - v|| / ||v||`` above ``tol`` (a singular system, too little depth, too
    much minibatch noise) raises :class:`ConvergenceError`, or only warns with
    ``on_unconverged="warn"``. ``info`` records the residual and ``converged``. The default ``tol``
    allows LiSSA's minibatch noise: well-posed problems at the default settings stay well below it
    (0.1-0.4 on small digits models; 1e-4 on the digits CNN's head).

    These checks see negative curvature once the series has grown along it; a short series
    (small ``depth``) on a Hessian with slightly negative eigenvalues can still pass them (an
    Adam-trained MLP with eigenvalues down to -0.008: refused at depth 1000, not at depth 300).
    For networks away from a minimum use ``curvature="gauss_newton"``, which is positive
    semi-definite, or check the spectrum with :class:`Exact` or :class:`Arnoldi`.
    """

    depth: int = 1000
    repeats: int = 1
    scale: float | None = None
    batch_size: int = 32
    seed: int = 0
    tol: float = 0.5
    on_unconverged: str = "raise"
    name = "lissa"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("LiSSA.depth", self.depth, integer=True)
        require_positive("LiSSA.repeats", self.repeats, integer=True)
        require_positive("LiSSA.batch_size", self.batch_size, integer=True)
        if self.scale is not None:
            require_positive("LiSSA.scale", self.scale)
        require_positive("LiSSA.tol", self.tol)
        check_on_unconverged("LiSSA.on_unconverged", self.on_unconverged)

    def fit(self, curvature: Curvature) -> LiSSASolver:
        scale = self.scale
        info: dict = {}
        if scale is None:
            top = curvature.largest_eigenvalue(seed=self.seed)
            if top + self.damping < 0:  # the largest-magnitude eigenvalue is negative
                raise IndefiniteHessianError(
                    f"LiSSA: the curvature has an eigenvalue of about {top:.3g}, more negative than the "
                    f"damping ({self.damping:g}) offsets, so H + damping I is not positive definite and its "
                    f"inverse is meaningless; pass damping > {-top:.3g}, use curvature='gauss_newton', or "
                    "train the model closer to a minimum"
                )
            top = abs(top)
            info["largest_eigenvalue"] = top
            scale = 1.5 * (top + self.damping)
            if scale <= 0:
                raise ConfigError("the curvature is zero on the Hessian data; LiSSA cannot invert it")
        return LiSSASolver(curvature, self, float(scale), info)

    def load_solver(self, curvature: Curvature, state: dict[str, Tensor], info: dict) -> LiSSASolver:
        return LiSSASolver(curvature, self, float(state["scale"]), dict(info))


class LiSSASolver(Solver):
    def __init__(self, curvature: Curvature, config: LiSSA, scale: float, info: dict) -> None:
        self.curvature = curvature
        self.config = config
        self.scale = scale
        self.info = {**info, "scale": scale}

    def state_dict(self) -> dict[str, Tensor]:
        return {"scale": torch.tensor(self.scale, dtype=torch.float64)}  # the power iteration's, if any

    def solve(self, vectors: Tensor) -> Tensor:
        cfg = self.config
        v = vectors.detach().reshape(-1, self.curvature.p).to(self.curvature.theta)
        # A fresh generator per call: the same column always sees the same minibatches, so results
        # do not depend on how right-hand sides are grouped into calls.
        gen = torch.Generator().manual_seed(cfg.seed)
        v_norm = v.norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
        total = torch.zeros_like(v)
        desc = f"LiSSA ({len(v)} vectors)"
        for _ in range(cfg.repeats):
            h = v.clone()
            for step in progress_bar(
                range(1, cfg.depth + 1), desc, getattr(self.curvature, "progress", False), unit="step"
            ):
                hv = self.curvature.sample_matvec(h, gen, cfg.batch_size)
                # h <- v + h - (H h + damping h) / scale, in place: memory flat in depth.
                h.mul_(1.0 - cfg.damping / self.scale).sub_(hv, alpha=1.0 / self.scale).add_(v)
                if step % 25 == 0 or step == cfg.depth:
                    self._check(h, v_norm, step)
            total += h
        x = total / (cfg.repeats * self.scale)
        self._verify(v, x)
        return x.reshape(vectors.shape).to(vectors.dtype)

    # ---- convergence: is x a solution of (H + damping I) x = v? ------------------------------------

    def _verify(self, v: Tensor, x: Tensor) -> None:
        """Refuse negative curvature and (by default) an unconverged solve; see :class:`LiSSA`."""
        cfg = self.config
        nonzero = torch.nonzero(v.norm(dim=1) > 0).reshape(-1).cpu()
        if not len(nonzero):
            return
        picks = (
            torch.linspace(0, len(nonzero) - 1, min(len(nonzero), CHECKED_COLUMNS)).round().long().unique()
        )
        cols = nonzero[picks].to(v.device)
        ax = self.curvature.matvec(x[cols]) + cfg.damping * x[cols]  # (c, p): one HVP pass
        tiny = torch.finfo(x.dtype).tiny
        curvature = (x[cols] * ax).sum(1) / (x[cols] * x[cols]).sum(1).clamp_min(tiny)
        residual = float(((ax - v[cols]).norm(dim=1) / v[cols].norm(dim=1)).max())
        residual = max(residual, self.info.get("max_relative_residual", 0.0))  # the worst of all calls
        self.info = {**self.info, "max_relative_residual": residual, "converged": residual <= cfg.tol}
        if float(curvature.min()) <= 0:
            raise IndefiniteHessianError(
                f"LiSSA met negative curvature: x^T (H + {cfg.damping:g} I) x / ||x||^2 = "
                f"{float(curvature.min()):.3g} for its estimate x, so the Hessian + damping is not positive "
                "definite and the estimate is meaningless; increase damping, use curvature='gauss_newton', "
                "or train the model closer to a minimum"
            )
        if residual > cfg.tol:
            unconverged(
                "LiSSA",
                cfg.on_unconverged,
                f"LiSSA did not converge: the relative residual ||(H + damping I) x - v|| / ||v|| is "
                f"{residual:.3g} > tol={cfg.tol:g}",
                f"raise damping (now {cfg.damping:g}) if the Hessian is singular or badly conditioned, "
                f"depth (now {cfg.depth}) or batch_size (now {cfg.batch_size}), or use CG",
            )

    def _check(self, h: Tensor, v_norm: Tensor, step: int) -> None:
        # Each term of a convergent series has norm <= ||v||, so ||h_j|| <= (j + 1) ||v||.
        growth = float((h.norm(dim=1) / v_norm).max())
        if not growth == growth or growth == float("inf"):
            raise NonFiniteError(
                f"LiSSA diverged to NaN/inf at step {step}: increase scale (now {self.scale:.3g}) or damping"
            )
        if growth > 4.0 * (step + 1):
            raise ConvergenceError(
                f"LiSSA is diverging (||h||/||v|| = {growth:.3g} after {step} steps): scale "
                f"{self.scale:.3g} is below half the largest minibatch eigenvalue, or the Hessian is "
                "indefinite. Increase scale, damping or batch_size"
            )
