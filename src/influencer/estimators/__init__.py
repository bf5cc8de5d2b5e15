"""Inverse-Hessian estimators: one file each, one interface (``fit(curvature)`` then ``solve``).

A custom estimator subclasses :class:`Estimator` (a frozen, validated dataclass) and returns a
:class:`Solver` from ``fit``; :class:`Curvature` is the operator it is given (``matvec``,
``sample_matvec``, ``dense``, ``largest_eigenvalue``).
"""

from influencer._kernel.curvature import Curvature, CurvatureKind
from influencer.estimators.arnoldi import Arnoldi
from influencer.estimators.auto import Choice, SpectralDamping, choose_estimator
from influencer.estimators.base import Estimator, Solver
from influencer.estimators.cg import CG, BlockCG
from influencer.estimators.ekfac import EKFAC
from influencer.estimators.exact import Exact
from influencer.estimators.exact_or_cg import ExactOrCG
from influencer.estimators.identity import Identity
from influencer.estimators.kfac import KFAC
from influencer.estimators.lissa import LiSSA

__all__ = [
    "CG",
    "EKFAC",
    "KFAC",
    "Arnoldi",
    "BlockCG",
    "Choice",
    "Curvature",
    "CurvatureKind",
    "Estimator",
    "Exact",
    "ExactOrCG",
    "Identity",
    "LiSSA",
    "Solver",
    "SpectralDamping",
    "choose_estimator",
]
