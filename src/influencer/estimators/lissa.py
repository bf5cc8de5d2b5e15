"""LiSSA: stochastic Neumann-series estimate of the inverse HVP (Agarwal et al. 2017)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from influencer._kernel.curvature import Curvature
from influencer._kernel.errors import ConfigError, ConvergenceError, NonFiniteError
from influencer.estimators.base import Estimator, Solver, require_positive


@dataclasses.dataclass(frozen=True, kw_only=True)
class LiSSA(Estimator):
    """Recursion ``h_j = v + h_{j-1} - (H_j + damping I) h_{j-1} / scale``, ``h_0 = v``.

    ``H_j`` is the Hessian on a fresh random minibatch of ``batch_size`` examples. After ``depth``
    steps ``h / scale`` estimates ``(H + damping I)^-1 v``; ``repeats`` independent runs are
    averaged. It converges when every eigenvalue of ``(H + damping I) / scale`` lies in (0, 2), so
    ``scale`` must exceed half the largest eigenvalue; ``scale=None`` sets it to 1.5x the largest
    eigenvalue of ``H + damping I`` (found by power iteration). Memory does not grow with depth:
    ``h`` is updated in place and no autograd graph is kept.
    """

    depth: int = 1000
    repeats: int = 1
    scale: float | None = None
    batch_size: int = 32
    seed: int = 0
    name = "lissa"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("LiSSA.depth", self.depth, integer=True)
        require_positive("LiSSA.repeats", self.repeats, integer=True)
        require_positive("LiSSA.batch_size", self.batch_size, integer=True)
        if self.scale is not None:
            require_positive("LiSSA.scale", self.scale)

    def fit(self, curvature: Curvature) -> LiSSASolver:
        scale = self.scale
        info: dict = {}
        if scale is None:
            top = abs(curvature.largest_eigenvalue(seed=self.seed))
            info["largest_eigenvalue"] = top
            scale = 1.5 * (top + self.damping)
            if scale <= 0:
                raise ConfigError("the curvature is zero on the Hessian data; LiSSA cannot invert it")
        return LiSSASolver(curvature, self, float(scale), info)


class LiSSASolver(Solver):
    def __init__(self, curvature: Curvature, config: LiSSA, scale: float, info: dict) -> None:
        self.curvature = curvature
        self.config = config
        self.scale = scale
        self.info = {**info, "scale": scale}

    def solve(self, vectors: Tensor) -> Tensor:
        cfg = self.config
        v = vectors.detach().reshape(-1, self.curvature.p).to(self.curvature.theta)
        # A fresh generator per call: the same column always sees the same minibatches, so results
        # do not depend on how right-hand sides are grouped into calls.
        gen = torch.Generator().manual_seed(cfg.seed)
        v_norm = v.norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
        total = torch.zeros_like(v)
        for _ in range(cfg.repeats):
            h = v.clone()
            for step in range(1, cfg.depth + 1):
                hv = self.curvature.sample_matvec(h, gen, cfg.batch_size)
                # h <- v + h - (H h + damping h) / scale, in place: memory flat in depth.
                h.mul_(1.0 - cfg.damping / self.scale).sub_(hv, alpha=1.0 / self.scale).add_(v)
                if step % 25 == 0 or step == cfg.depth:
                    self._check(h, v_norm, step)
            total += h
        return (total / (cfg.repeats * self.scale)).reshape(vectors.shape).to(vectors.dtype)

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
