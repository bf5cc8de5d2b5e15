"""K-FAC: Kronecker-factored Gauss-Newton inverse (Martens & Grosse 2015; Grosse & Martens 2016).

Each layer's Gauss-Newton block is approximated by ``S ⊗ A`` (see :mod:`.kronecker`), whose
eigenvectors are ``Q_S ⊗ Q_A`` and eigenvalues ``d_S d_A^T``, so

    (S ⊗ A + lambda I)^-1 v  =  Q_S [(Q_S^T V Q_A) / (d_S d_A^T + lambda)] Q_A^T

on ``V`` ``(d_out, d_in)``, the layer's slice of ``v``. Layers are independent (block-diagonal).
"""

from __future__ import annotations

import dataclasses

from influencer._kernel.curvature import Curvature
from influencer.estimators.kronecker import KroneckerEstimator, KroneckerSolver, eigenbasis


@dataclasses.dataclass(frozen=True, kw_only=True)
class KFAC(KroneckerEstimator):
    """K-FAC inverse for models whose chosen parameters are in ``nn.Linear``/``nn.Conv2d`` layers.

    One pass over the curvature's examples accumulates ``A`` ``(d_in, d_in)`` and ``S``
    ``(d_out, d_out)`` per layer (``d_in`` = fan-in + 1 with a bias); fitting then costs one
    eigendecomposition of each and every solve two small matrix products per layer. Exact when a
    layer's curvature truly factorises, e.g. a linear model with squared error. Memory:
    ``d_in^2 + d_out^2`` per layer. Scores of ``m`` test examples never form their ``(m, p)``
    directions: each is solved in layer form as a few dozen rank-one terms per wide layer
    (:meth:`KroneckerSolver.solve_rows`), and costs ``T R (d_out + d_in)`` per training example
    instead of ``d_out d_in``. See :class:`KroneckerEstimator` for ``fisher``, the regulariser and
    the damping options.
    """

    name = "kfac"

    def fit(self, curvature: Curvature) -> KroneckerSolver:
        record: dict = {}
        layers, factors = self.factors(curvature, record)
        bases, values = [], []
        for a, s in factors:
            d_a, q_a = eigenbasis(a)
            d_s, q_s = eigenbasis(s)
            bases.append((q_s, q_a))
            values.append(d_s[:, None] * d_a[None, :])  # (d_out, d_in)
        return self.solver(curvature, layers, factors, bases, values, record)
