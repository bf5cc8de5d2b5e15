"""Inverse-Hessian estimators: one file each, one interface (``fit`` then ``solve``)."""

from influencer.estimators.arnoldi import Arnoldi
from influencer.estimators.base import Estimator, Solver
from influencer.estimators.cg import CG
from influencer.estimators.exact import Exact
from influencer.estimators.identity import Identity
from influencer.estimators.lissa import LiSSA

__all__ = ["CG", "Arnoldi", "Estimator", "Exact", "Identity", "LiSSA", "Solver"]
