"""Block CG for a few right-hand sides, the dense matrix for many: the same system either way."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import Tensor

from influencer._kernel.curvature import Curvature
from influencer._kernel.errors import ConvergenceError
from influencer.estimators.base import Estimator, Solver, prefixed, require_positive, unprefixed
from influencer.estimators.cg import CG
from influencer.estimators.exact import Exact, ExactSolver


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExactOrCG(Estimator):
    """``(H + damping I)^-1`` by whichever needs fewer curvature products for the columns asked.

    Costs are counted in curvature products of one vector over the examples: the dense matrix
    takes ``p`` of them once (then every solve is an eigendecomposition away), block CG on ``k``
    columns about ``k`` per iteration. A solve of ``k`` columns runs block CG for at most
    ``ceil(p / k)`` iterations (where building the matrix would have been cheaper) and, if CG has
    not reached ``tol`` by then, builds the dense matrix and solves there: never more than twice
    the cheaper method's products. Once CG has converged in ``t`` iterations, a later solve of
    ``k`` columns with ``k t >= p`` goes to the dense matrix directly. Both solve
    ``(H + damping I) x = v``: the answers agree to CG's ``tol`` (``solver.info["method"]`` says
    which ran last). Needs ``H + damping I`` positive definite, as both methods do.
    """

    tol: float = 1e-8
    float64: bool = True
    max_params: int = 20_000
    name = "exact_or_cg"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("ExactOrCG.tol", self.tol)
        require_positive("ExactOrCG.max_params", self.max_params, integer=True)

    def fit(self, curvature: Curvature) -> ExactOrCGSolver:
        return ExactOrCGSolver(curvature, self)

    def exact(self) -> Exact:
        """The dense method this one switches to (no fallback damping: the same system as CG)."""
        return Exact(damping=self.damping, float64=self.float64, max_params=self.max_params)

    def load_solver(
        self, curvature: Curvature, state: dict[str, Tensor], info: dict[str, Any]
    ) -> ExactOrCGSolver:
        solver = ExactOrCGSolver(curvature, self)
        dense = unprefixed(state, "exact.")
        if dense:
            solver.dense = self.exact().load_solver(curvature, dense, info)
            solver.info = dict(info)
        return solver


class ExactOrCGSolver(Solver):
    def __init__(self, curvature: Curvature, config: ExactOrCG) -> None:
        self.curvature = curvature
        self.config = config
        self.dense: ExactSolver | None = None
        self.cg_iterations: int | None = None  # of the last converged CG solve
        self.info: dict[str, Any] = {"method": "none yet", "damping": config.damping}

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.dense is None else prefixed(self.dense.state_dict(), "exact.")

    def solve(self, vectors: Tensor) -> Tensor:
        k, p = max(1, vectors.reshape(-1, self.curvature.p).shape[0]), self.curvature.p
        if self.dense is None and k >= p:
            self._build_dense("as many columns as parameters")
        elif self.dense is None and self.cg_iterations is not None and k * self.cg_iterations >= p:
            self._build_dense("the last CG solve's iterations x these columns reach p")
        if self.dense is not None:
            return self.dense.solve(vectors)
        budget = math.ceil(p / k)
        cg = CG(damping=self.config.damping, tol=self.config.tol, max_iter=budget).fit(self.curvature)
        try:
            out = cg.solve(vectors)
        except ConvergenceError:
            self._build_dense(f"block CG had not converged after {budget} iterations (p / columns)")
            return self.dense.solve(vectors)  # type: ignore[union-attr]
        self.cg_iterations = int(cg.info["iterations"])
        self.info = {**cg.info, "method": "cg", "damping": self.config.damping}
        return out

    def _build_dense(self, why: str) -> None:
        self.dense = self.config.exact().fit(self.curvature)
        self.info = {**self.dense.info, "method": "exact", "why_exact": why}
