"""How a gradient index turns test gradients into test directions: ``score = d_test . Pg_i / n``.

Three choices, each a frozen dataclass with JSON-able :meth:`settings` (part of a query's
fingerprint):

* :class:`ProjectedFisher` (default) preconditions **after** projection, in the ``k``-dimensional
  space: ``d = (F_k + lambda I)^-1 P grad f(test)`` with the projected empirical Fisher
  ``F_k = (1/n) sum_i Pg_i (Pg_i)^T`` accumulated while the index was built (TRAK / LoGra), by
  default block-diagonal over a Kronecker projector's layers (like EK-FAC). One Cholesky
  factorisation per index and damping; nothing per training example; only projected test
  gradients (so a Kronecker projector never forms a ``p``-dim gradient). The default choice.
* :class:`EstimatorPreconditioner` preconditions **before** projection, in parameter space: ``d =
  P (H + damping I)^-1 grad f(test)`` with the :class:`~influencer.Influence`'s fitted estimator
  (e.g. :class:`~influencer.EKFAC`). Needs the full test gradients (``m x p``) and one solve per
  test example; training gradients stay projected, so scores are an *unbiased* estimate of that
  estimator's scores, but with a random projection a noisy one: the estimate's variance is
  ``|d|^2 |g_i|^2 / k`` while ``H^-1`` turns ``d`` away from every ``g_i`` (cosines of ~1e-3 on an
  MLP, against ~2e-2 without it), so it needs a far larger ``k`` than the other two for the same
  agreement (LDS 0.24 against the projected Fisher's 0.49 with a random Kronecker 16 x 16 in
  ``benchmarks/bench_lds.py``). The Kronecker projector's PCA basis keeps the directions the
  curvature is built from, which removes most of that loss (0.53 against 0.54). Use it with a
  PCA basis, with :class:`~influencer.index.IdentityProjector` (exact scores from stored
  gradients), or when that estimator's scores themselves are the target and ``k`` can be large.
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
    """``(F_k + lambda I)^-1``, by default block-diagonal over the projector's layers.

    Args:
        damping: absolute damping added to every block.
        relative_damping: plus this times each block's mean eigenvalue (``trace / size``), so one
            value suits layers and models of any scale (0.1 is a common choice, as for EK-FAC).
        blocks: ``"layers"``: keep only the diagonal blocks of a layer-wise projection
            (:class:`~influencer.index.KroneckerProjector`), each damped relative to its own scale,
            like EK-FAC's block-diagonal curvature; ``"full"``: the whole ``k x k`` matrix, damped
            relative to its mean eigenvalue. A dense projection has one block, so both agree.

    ``F_k`` has rank at most ``n``: it is singular without damping when ``k > n``.
    """

    damping: float = 0.0
    relative_damping: float = 0.1
    blocks: str = "layers"
    name = "projected_fisher"

    def __post_init__(self) -> None:
        for field in ("damping", "relative_damping"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"ProjectedFisher.{field} must be a finite number >= 0, got {value!r}")
        if self.blocks not in ("layers", "full"):
            raise ConfigError(f"ProjectedFisher.blocks must be 'layers' or 'full', got {self.blocks!r}")

    def factor(self, index: GradientIndex) -> list[tuple[int, int, Tensor]]:
        """Per block ``(start, stop, Cholesky factor)`` (float64) of its damped Fisher; computed once.

        Cholesky (``k^3 / 3`` flops) rather than an eigendecomposition: several times faster at the
        ``k`` of thousands a store uses.
        """
        key = (self.name, self.damping, self.relative_damping, self.blocks)
        if key not in index.cache:
            if self.blocks == "full" and index.fisher_kind == "layers" and len(index.projection.blocks) > 1:
                raise ConfigError(
                    "this index holds only the per-layer blocks of the projected Fisher (built with "
                    "fisher='layers'); query with ProjectedFisher(blocks='layers'), or rebuild it with "
                    "fisher='full' for blocks='full'"
                )
            f = index.fisher()
            f = 0.5 * (f + f.T)
            blocks = index.projection.blocks if self.blocks == "layers" else [("all", 0, index.k)]
            factors = []
            for name, start, stop in blocks:
                fb = f[start:stop, start:stop]
                size = stop - start
                lam = self.damping + self.relative_damping * float(fb.diagonal().sum()) / size
                damped = fb + lam * torch.eye(size, dtype=f.dtype, device=f.device)
                chol, info = torch.linalg.cholesky_ex(damped)
                top = float(damped.diagonal().max())
                pivot = float(chol.diagonal().min()) ** 2 if int(info) == 0 else 0.0
                # a pivot at round-off level relative to the largest entry: numerically singular
                if pivot <= max(top, 1e-300) * size * torch.finfo(torch.float64).eps * 10:
                    where = "" if name == "all" else f" (block of layer {name!r}, size {size})"
                    raise IndefiniteHessianError(
                        f"the projected Fisher (k={index.k}, n={index.n}){where} plus damping {lam:.3g} is "
                        "singular (it has rank at most n). Pass ProjectedFisher(relative_damping=0.1) or "
                        f"damping > 0 (e.g. damping={max(top * 1e-3, 1e-12):.2g})"
                    )
                factors.append((start, stop, chol))
            index.cache[key] = factors
        return index.cache[key]

    def apply(self, index: GradientIndex, projected: Tensor) -> Tensor:
        v = projected.to(torch.float64)
        out = torch.empty_like(v)
        for start, stop, chol in self.factor(index):
            out[:, start:stop] = torch.cholesky_solve(v[:, start:stop].T, chol).T
        return out.to(projected.dtype)

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
