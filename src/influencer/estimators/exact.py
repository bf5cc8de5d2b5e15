"""Exact inverse HVPs from the dense Hessian (small models; float64 by default)."""

from __future__ import annotations

import dataclasses
import math

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

    ``fallback_relative_damping``: ``None`` (default) refuses a ``H + damping I`` that is not
    positive definite (an indefinite Hessian, or a singular one such as a network's Gauss-Newton
    matrix). A number ``r > 0`` damps it instead, by the amount that lifts its smallest eigenvalue
    to ``r`` times its mean absolute eigenvalue (both of ``H + damping I``; ``r = 0.1`` on a
    singular Gauss-Newton matrix is Grosse et al.'s 0.1 x mean eigenvalue); a positive definite one
    stays as it is. The damping used is ``solver.info["damping"]``.
    """

    float64: bool = True
    max_params: int = 20_000
    fallback_relative_damping: float | None = None
    name = "exact"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("Exact.max_params", self.max_params, integer=True)
        if self.fallback_relative_damping is not None:
            require_positive("Exact.fallback_relative_damping", self.fallback_relative_damping)

    def fit(self, curvature: Curvature) -> ExactSolver:
        if curvature.p > self.max_params:
            raise ConfigError(
                f"Exact needs a dense {curvature.p}x{curvature.p} Hessian, more than max_params="
                f"{self.max_params}; use CG, LiSSA or Arnoldi, or choose fewer parameters (params=[...])"
            )
        h = curvature.dense(torch.float64 if self.float64 else None)
        return ExactSolver(h, self.damping, self.fallback_relative_damping)

    def load_solver(self, curvature: Curvature, state: dict[str, Tensor], info: dict) -> ExactSolver:
        solver = object.__new__(ExactSolver)
        solver.hessian, solver.evals, solver.evecs = state["hessian"], state["evals"], state["evecs"]
        solver.damping = float(state["damping"])
        solver.info = dict(info)
        return solver


class ExactSolver(Solver):
    def __init__(self, hessian: Tensor, damping: float, fallback: float | None = None) -> None:
        p = hessian.shape[0]
        eye = torch.eye(p, dtype=hessian.dtype, device=hessian.device)
        evals, evecs = torch.linalg.eigh(hessian + damping * eye)
        lo, hi = float(evals[0]), float(evals[-1])
        floor = numerical_floor(hessian.dtype, p)
        reason = "as given"
        if lo <= floor * max(abs(hi), 1e-30) and fallback is not None:
            # Lift the smallest eigenvalue to fallback x the mean absolute one (of H + damping I).
            target = fallback * float(evals.abs().mean())
            if target > 0:
                damping += target - lo
                reason = (
                    f"H + damping I was not positive definite (eigenvalues {lo:.3g} to {hi:.3g}): damped "
                    f"so that its smallest eigenvalue is {fallback:g} x its mean absolute eigenvalue"
                )
                evals, evecs = torch.linalg.eigh(hessian + damping * eye)
                lo, hi = float(evals[0]), float(evals[-1])
        if lo <= floor * max(abs(hi), 1e-30):
            kind = "singular" if lo > -floor * max(abs(hi), 1e-30) else "indefinite"
            needed, suggest = damping_needed(lo - damping, hi - damping, floor)
            raise IndefiniteHessianError(
                f"the Hessian + damping ({damping:g}) is {kind}: smallest eigenvalue {lo:.3g}, largest "
                f"{hi:.3g}. Its inverse does not exist at {str(hessian.dtype).removeprefix('torch.')} "
                f"precision; pass damping > {needed:.2g} (e.g. damping={suggest:.2g}), use "
                "curvature='gauss_newton', or train the model to a minimum"
            )
        self.hessian = hessian
        self.evals, self.evecs = evals, evecs
        self.damping = damping
        self.info = {
            "min_eigenvalue": lo,
            "max_eigenvalue": hi,
            "condition_number": hi / lo,
            "damping": damping,
            "damping_reason": reason,
        }

    def state_dict(self) -> dict[str, Tensor]:
        damping = torch.tensor(self.damping, dtype=torch.float64)
        return {"hessian": self.hessian, "evals": self.evals, "evecs": self.evecs, "damping": damping}

    def solve(self, vectors: Tensor) -> Tensor:
        q = self.evecs
        v = vectors.to(q)
        return (((v @ q) / self.evals) @ q.T).to(vectors.dtype)


# ---- when is a computed eigenvalue indistinguishable from zero? -----------------------------------


def numerical_floor(dtype: torch.dtype, p: int) -> float:
    """Eigenvalues below ``floor * |largest|`` cannot be told from zero in ``dtype``.

    Rounding each entry of a ``(p, p)`` matrix by a relative ``eps`` moves its eigenvalues by up to
    ``||E||_2 <= ||E||_F <= eps * sqrt(p) * ||H||_2``; ten times that leaves room for the error of
    the Hessian-vector products the matrix is built from (float32 digits logistic regression,
    p = 650: 4.5e-8 measured against float64, the floor 4e-6 of the largest eigenvalue 0.13).
    """
    return 10.0 * math.sqrt(p) * torch.finfo(dtype).eps


def damping_needed(lo: float, hi: float, floor: float) -> tuple[float, float]:
    """``(minimum, suggestion)``: the damping ``D`` above which ``H + D I``, with undamped extreme
    eigenvalues ``lo`` and ``hi``, clears :func:`numerical_floor` (``lo + D > floor * (hi + D)``),
    and a value that does with room to spare, both rounded up to two significant digits."""
    minimum = max((floor * abs(hi) - lo) / (1.0 - floor), 0.0)
    suggest = max(2.0 * minimum, 1e-4 * abs(hi), 1e-8)
    return _round_up(minimum), _round_up(suggest)


def _round_up(x: float) -> float:
    if x <= 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return math.ceil(x / step * (1 - 1e-12)) * step
