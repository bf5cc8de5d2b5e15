"""How a gradient index turns test gradients into test directions: ``score = d_test . Pg_i / n``.

Three choices, each a frozen dataclass with JSON-able :meth:`settings` (part of a query's
fingerprint):

* :class:`ProjectedFisher` (default) preconditions **after** projection, in the ``k``-dimensional
  space: ``d = (F_k + lambda I)^-1 P grad f(test)`` with the projected empirical Fisher
  ``F_k = (1/n) sum_i Pg_i (Pg_i)^T`` accumulated while the index was built (TRAK / LoGra). One
  ``k x k`` eigendecomposition per index and damping; costs nothing per training example, and needs
  only projected test gradients (so a Kronecker projector never forms a ``p``-dim gradient). It is
  the empirical Fisher of the stored gradients, not the Gauss-Newton matrix: use it when ``p`` is
  large and there is no better curvature, with ``k`` well below ``n`` or with damping.
* :class:`EstimatorPreconditioner` preconditions **before** projection, in parameter space: ``d =
  P (H + damping I)^-1 grad f(test)`` with the :class:`~influencer.Influence`'s fitted estimator
  (e.g. :class:`~influencer.EKFAC`, whose Gauss-Newton eigenbasis is fitted on all parameters).
  Needs the full test gradients (``m x p``) and one solve per test example; training gradients
  stay projected, so scores are an unbiased estimate of that estimator's scores. Use it when the
  curvature matters (non-convex networks, LDS) and the test set is moderate.
* :class:`NoPreconditioner`: ``d = P grad f(test)``, projected gradient dot products (TracIn at one
  checkpoint; equals ``Influence(estimator=Identity())`` in expectation).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from influencer._kernel.errors import ConfigError, IndefiniteHessianError, NonFiniteError

if TYPE_CHECKING:
    from influencer.index.gradient_index import GradientIndex


@dataclasses.dataclass(frozen=True)
class Preconditioner(ABC):
    """Maps test examples to test directions ``(m, k)`` in the index's projected space."""

    name: ClassVar[str] = "preconditioner"

    def settings(self, index: GradientIndex) -> dict[str, Any]:
        """What the directions depend on besides the index and the test data (JSON-able)."""
        return {"kind": self.name, **dataclasses.asdict(self)}

    @abstractmethod
    def directions(self, index: GradientIndex, test: Any) -> Tensor:
        """Test directions ``(m, k)`` for a block of test examples, in the influence's dtype."""

    def apply(self, index: GradientIndex, projected: Tensor) -> Tensor:
        """The preconditioner applied to projected vectors ``(c, k)`` (for self-influence)."""
        raise ConfigError(
            f"{type(self).__name__} has no projected-space form; use ProjectedFisher or NoPreconditioner "
            "for self-influence from the index (or Influence.self_influence)"
        )


@dataclasses.dataclass(frozen=True)
class NoPreconditioner(Preconditioner):
    """Projected gradient dot products, no curvature."""

    name = "none"

    def directions(self, index: GradientIndex, test: Any) -> Tensor:
        return index.test_gradients(test)

    def apply(self, index: GradientIndex, projected: Tensor) -> Tensor:
        return projected


@dataclasses.dataclass(frozen=True)
class ProjectedFisher(Preconditioner):
    """``(F_k + lambda I)^-1`` with ``lambda = damping + relative_damping * trace(F_k) / k``.

    The relative term scales with the Fisher's mean eigenvalue, so one value suits models of any
    scale (0.1 is a common choice); ``F_k`` has rank at most ``n`` and is singular without damping
    when ``k > n``.
    """

    damping: float = 0.0
    relative_damping: float = 0.1
    name = "projected_fisher"

    def __post_init__(self) -> None:
        for field in ("damping", "relative_damping"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"ProjectedFisher.{field} must be a finite number >= 0, got {value!r}")

    def factor(self, index: GradientIndex) -> tuple[Tensor, float]:
        """Cholesky factor ``(k, k)`` float64 of ``F_k + lambda I`` and ``lambda``; computed once per index.

        Cholesky (``k^3 / 3`` flops) rather than an eigendecomposition: it is several times faster
        at the ``k`` of thousands a store uses.
        """
        key = (self.name, self.damping, self.relative_damping)
        if key not in index.cache:
            f = index.fisher()
            k = f.shape[0]
            lam = self.damping + self.relative_damping * float(f.diagonal().sum()) / k
            damped = 0.5 * (f + f.T) + lam * torch.eye(k, dtype=f.dtype, device=f.device)
            chol, info = torch.linalg.cholesky_ex(damped)
            top = float(damped.diagonal().max())
            pivot = float(chol.diagonal().min()) ** 2 if int(info) == 0 else 0.0
            # a pivot at round-off level relative to the largest entry: numerically singular
            if pivot <= max(top, 1e-300) * k * torch.finfo(torch.float64).eps * 10:
                raise IndefiniteHessianError(
                    f"the projected Fisher (k={index.k}, n={index.n}) plus damping {lam:.3g} is singular "
                    f"(it has rank at most n). Pass ProjectedFisher(relative_damping=0.1) or damping > 0 "
                    f"(e.g. damping={max(top * 1e-3, 1e-12):.2g})"
                )
            index.cache[key] = (chol, lam)
        return index.cache[key]

    def apply(self, index: GradientIndex, projected: Tensor) -> Tensor:
        chol, _ = self.factor(index)
        v = projected.to(chol).T  # (k, c)
        return torch.cholesky_solve(v, chol).T.to(projected.dtype)

    def directions(self, index: GradientIndex, test: Any) -> Tensor:
        return self.apply(index, index.test_gradients(test))


@dataclasses.dataclass(frozen=True)
class EstimatorPreconditioner(Preconditioner):
    """``P (H + damping I)^-1 grad f(test)`` with the influence's fitted estimator (before projection)."""

    name = "estimator"

    def settings(self, index: GradientIndex) -> dict[str, Any]:
        return {"kind": self.name, "curvature": index.influence.settings()["curvature"]}

    def directions(self, index: GradientIndex, test: Any) -> Tensor:
        inf = index.influence
        s = inf.test_directions(test)  # (m, p); raises unless the influence is fitted
        if not torch.isfinite(s).all():
            raise NonFiniteError(
                "the inverse-HVP of a test gradient is NaN or infinite: the estimator diverged; "
                "increase its damping or check the test inputs"
            )
        return index.projection.project(s)
