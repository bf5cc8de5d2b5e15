"""Inverse-Hessian estimators: one file each, one interface (``fit`` then ``solve``)."""

from influencer.estimators.arnoldi import Arnoldi
from influencer.estimators.base import Estimator, Solver
from influencer.estimators.cg import CG, BlockCG
from influencer.estimators.ekfac import EKFAC
from influencer.estimators.exact import Exact
from influencer.estimators.identity import Identity
from influencer.estimators.kfac import KFAC
from influencer.estimators.lissa import LiSSA

__all__ = ["CG", "EKFAC", "KFAC", "Arnoldi", "BlockCG", "Estimator", "Exact", "Identity", "LiSSA", "Solver"]
