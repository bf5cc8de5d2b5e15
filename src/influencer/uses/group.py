r"""Group influence: the effect of removing a whole set ``U`` of training examples at once.

Notation (as in :mod:`influencer._kernel.scores`): ``J(theta) = (1/n) sum_{i in S} l_i(theta)`` with
``l_i = loss_i + Omega``, minimised at ``theta*``; ``H`` its Hessian (plus any damping ``lambda I``);
``g_i = grad l_i(theta*)``. For a group ``U`` of ``m = |U|`` examples let ``q = m / n``,

* ``G_U = sum_{i in U} g_i``                      (p,)
* ``H_U = sum_{i in U} Hess l_i(theta*) + m lambda I``  (the group's share of the curvature,
  damping counted like the regulariser, once per example)

and ``theta_{-U}`` the minimiser of the mean of ``l_i`` over ``S \ U`` (the retrained model).

**First order** (Koh & Liang 2017; Koh, Ang, Teo & Liang 2019): the sum of the individual removal
effects::

    theta_{-U} - theta*  ~=  (1/n) H^-1 G_U                  so   score_1(U) = sum_{i in U} score(z_i)

**Second order** (Basu, You & Feizi, "On Second-Order Group Influence Functions for Black-Box
Predictions", ICML 2020)::

    theta_{-U} - theta*  ~=  (1 - 2q) / (1 - q)^2 * (1/n) H^-1 G_U
                           + 1 / (1 - q)^2 * (1/n^2) H^-1 H_U H^-1 G_U

and ``score_2(U) = grad f(z_test)^T (that)``. Where it comes from: removing ``U`` is a Newton
problem with gradient ``-(1/n) G_U`` and curvature ``H_rem = H - H_U / n`` (exact when ``H`` does
not depend on theta, e.g. least squares). Write ``H_U / n = q H + D``, where ``D`` is how far the
group's curvature is from its proportional share. Then ``H_rem = (1 - q) H - D`` and::

    theta_{-U} - theta* = ((1 - q) H - D)^-1 (1/n) G_U
                        = 1/(1-q) (1/n) H^-1 G_U  +  1/(1-q)^2 (1/n) H^-1 D H^-1 G_U  +  O(D^2)

Substituting ``D = H_U / n - q H`` gives Basu et al.'s formula above. So the second-order estimate

* is exact to all orders in the group fraction ``q`` and to first order in ``D``: exact when the
  group's curvature is proportional to the whole set's (``H_U = m H``); its error is the next term
  ``1/(1-q)^3 (1/n) H^-1 D H^-1 D H^-1 G_U``;
* equals, to second order in ``1/n``, the Taylor expansion of ``theta_{-U}`` in the removal
  weight *except for the third-derivative term* ``-(1/2n^2) H^-1 grad^3 J[u, u]`` with
  ``u = H^-1 G_U``: it assumes the Hessian changes little between ``theta*`` and ``theta_{-U}``
  (exactly so for least squares; approximately for logistic regression).

Both estimates assume ``theta*`` is a minimum, ``H`` (and ``H_rem``) positive definite, and treat
the test measurement as linear in theta between the two optima.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from influencer._kernel.errors import DataError
from influencer._kernel.progress import progress_bar
from influencer.influence import Influence
from influencer.retraining import LBFGSRetrainer, Retrainer


def _group_ids(influence: Influence, ids: Sequence[int] | Tensor) -> Tensor:
    idx = influence.train.check_indices(ids)
    if idx.numel() == 0:
        raise DataError("a group must contain at least one training id")
    if torch.unique(idx).numel() != idx.numel():
        raise DataError("a group lists some training id more than once; pass each id once")
    if idx.numel() >= influence.n:
        raise DataError(f"a group of {idx.numel()} removes the whole training set of {influence.n}")
    return idx


def _damping(influence: Influence) -> float:
    return float(getattr(influence.estimator, "damping", 0.0))


def group_gradient(influence: Influence, ids: Sequence[int] | Tensor) -> Tensor:
    """``G_U = sum_{i in U} g_i`` ``(p,)``, streamed in chunks (and summed over ranks)."""
    return influence.gradient_sum(_group_ids(influence, ids))


def group_curvature_product(influence: Influence, ids: Sequence[int] | Tensor, vectors: Tensor) -> Tensor:
    """``H_U v`` for each row of ``vectors`` ``(k, p)``: the group's summed curvature (same kind as H).

    ``H_U = sum_{i in U} Hess l_i + |U| lambda I`` with ``lambda`` the estimator's damping.
    """
    idx = _group_ids(influence, ids)
    v = vectors.reshape(-1, influence.p).to(influence.theta)
    # Each l_i = loss_i + Omega, so the group carries |U| copies of Omega's curvature and of the
    # damping; curvature_product averages over the group.
    return len(idx) * (influence.curvature_product(v, idx) + _damping(influence) * v)


@dataclass(frozen=True)
class GroupParams:
    """Predicted parameter change ``theta_{-U} - theta*`` ``(k, p)`` for each of ``k`` groups."""

    first_order: Tensor  # (k, p)
    second_order: Tensor  # (k, p)


def _coefficients(sizes: Tensor, n: int) -> tuple[Tensor, Tensor]:
    q = sizes / n
    return (1 - 2 * q) / (1 - q) ** 2, 1 / (1 - q) ** 2


def _group_terms(
    influence: Influence, groups: Sequence[Sequence[int] | Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``G_U``, ``H^-1 G_U``, ``H_U H^-1 G_U`` ``(k, p)`` and the sizes ``(k,)`` of ``k`` groups."""
    if len(groups) == 0:
        raise DataError("pass at least one group of training ids")
    ids = [_group_ids(influence, g) for g in groups]
    grads = torch.stack([group_gradient(influence, g) for g in ids])  # (k, p)
    u = influence.inverse_hvp(grads)  # (k, p)
    hu = torch.cat([group_curvature_product(influence, g, u[j : j + 1]) for j, g in enumerate(ids)])
    sizes = torch.tensor([len(g) for g in ids], dtype=u.dtype, device=u.device)
    return grads, u, hu, sizes


def group_params(influence: Influence, groups: Sequence[Sequence[int] | Tensor]) -> GroupParams:
    """First- and second-order predicted ``theta_{-U} - theta*`` for each group (see module doc)."""
    _, u, hu, sizes = _group_terms(influence, groups)
    n = influence.n
    c1, c2 = _coefficients(sizes, n)
    first = u / n
    second = c1[:, None] * first + c2[:, None] * influence.inverse_hvp(hu) / n**2
    return GroupParams(first, second)


@dataclass(frozen=True)
class GroupInfluence:
    """Predicted change of each test measurement ``(k, m)`` when each of ``k`` groups is removed.

    Same sign convention as single-example scores (:mod:`influencer._kernel.scores`): with the test loss
    as measurement, positive = the group is helpful (removing it raises the test loss).
    """

    sizes: Tensor  # (k,) group sizes
    first_order: Tensor  # (k, m) sum of the members' removal scores
    second_order: Tensor  # (k, m) Basu et al.'s second-order group influence


def group_influence(
    influence: Influence, groups: Sequence[Sequence[int] | Tensor], test: Any
) -> GroupInfluence:
    """First- and second-order group influence of each group on each test example.

    Costs one inverse-HVP per group and per test example and one curvature product over each
    group's members: ``score_2 = c1 s^T G_U / n + c2 s^T H_U H^-1 G_U / n^2`` with
    ``s = H^-1 grad f(test)``, so ``H^-1 H_U H^-1 G_U`` is never formed.
    """
    directions = influence.test_directions(test)  # (m, p)
    grads, _, hu, sizes = _group_terms(influence, groups)
    n = influence.n
    c1, c2 = _coefficients(sizes, n)
    first = grads @ directions.T / n  # (k, m)
    second = c1[:, None] * first + c2[:, None] * (hu @ directions.T) / n**2
    return GroupInfluence(sizes.cpu(), first, second)


# ---- the actual effect: retraining without each group ------------------------------------------


def group_retrainer(grad_tol: float = 1e-9) -> Retrainer:
    """L-BFGS to the optimum, polished by Newton steps (:class:`~influencer.retraining.LBFGSRetrainer`).

    Removing a large group moves the curvature further than removing one point, so the
    full-data Hessian is a poorer preconditioner and the polish may need more steps (10, not 5).
    ``grad_tol`` 1e-9 puts the optimum ~1e-9 / lambda_min from the true one, far below the
    test-loss changes a group's removal causes.
    """
    return LBFGSRetrainer(grad_tol=grad_tol, newton_steps=10)


def retrain_without_groups(
    influence: Influence,
    groups: Sequence[Sequence[int] | Tensor],
    test: Any,
    *,
    retrain: Retrainer | None = None,
    float64: bool = True,
) -> Tensor:
    """Actual change of each test measurement ``(k, m)`` after removing each group and retraining.

    The model is first retrained on all the data (to start from the exact optimum), then without
    each group, warm-started from there. Default: L-BFGS to the optimum (convex models).
    """
    reference = influence.replace(dtype=torch.float64) if float64 else influence
    retrainer = retrain or group_retrainer()
    theta_star = retrainer.refit(reference)
    base = reference.measurements(test, theta_star)
    out = []
    for g in progress_bar(groups, "group retraining", influence.progress):
        keep = torch.ones(influence.n, dtype=torch.bool)
        keep[_group_ids(influence, g)] = False
        theta = retrainer.refit(reference, torch.nonzero(keep).reshape(-1), theta_star)
        out.append(reference.measurements(test, theta) - base)
    return torch.stack(out)
