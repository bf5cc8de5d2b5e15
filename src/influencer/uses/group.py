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
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from influencer._kernel.errors import ConfigError, DataError
from influencer._kernel.progress import progress_bar
from influencer._kernel.stats import pearson, spearman
from influencer.influence import Influence
from influencer.paper.plotting import pyplot, save_png
from influencer.retraining import LBFGSRetrainer, Retrainer

GroupKind = Literal["random", "same_class"]


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


# ---- groups and retraining ---------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """A set of training ids to remove, with how it was drawn."""

    ids: Tensor  # (size,)
    kind: str
    fraction: float  # requested size as a fraction of the training set
    label: int | None = None  # the shared class of a same-class group


def make_groups(
    labels: Tensor,
    fractions: Sequence[float],
    per_fraction: int,
    kinds: Sequence[GroupKind] = ("random", "same_class"),
    seed: int = 0,
) -> list[Group]:
    """``per_fraction`` groups of each kind and each size ``round(fraction * n)``.

    ``random``: uniformly without replacement. ``same_class``: all from one class, the class drawn
    at random among those with enough examples (Koh et al. 2019; Basu et al. 2020 call these
    coherent groups; their members push the model the same way, so removal effects are large).
    """
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    n = len(labels)
    if per_fraction < 1:
        raise ConfigError(f"per_fraction must be >= 1, got {per_fraction}")
    for k in kinds:
        if k not in ("random", "same_class"):
            raise ConfigError(f"group kind must be 'random' or 'same_class', got {k!r}")
    gen = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    groups = []
    for frac in fractions:
        if not 0.0 < frac < 1.0:
            raise ConfigError(f"group fractions must be in (0, 1), got {frac}")
        size = max(1, round(frac * n))
        for kind in kinds:
            eligible = classes[counts > size] if kind == "same_class" else classes
            if len(eligible) == 0:
                raise ConfigError(
                    f"no class has more than {size} examples ({frac:.0%} of {n}), so same-class groups "
                    f"of that size cannot be drawn; the largest class has {int(counts.max())}. Use "
                    "smaller fractions"
                )
            for _ in range(per_fraction):
                if kind == "random":
                    ids = torch.randperm(n, generator=gen)[:size]
                    groups.append(Group(ids.sort().values, kind, float(frac)))
                else:
                    c = eligible[torch.randint(len(eligible), (1,), generator=gen)].item()
                    members = torch.nonzero(labels == c).reshape(-1)
                    ids = members[torch.randperm(len(members), generator=gen)[:size]]
                    groups.append(Group(ids.sort().values, kind, float(frac), int(c)))
    return groups


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


# ---- the experiment: predicted vs actual over groups of growing size ---------------------------


@dataclass(frozen=True)
class GroupComparison:
    """Predicted (first/second order) and actual test-measurement changes for many groups.

    Arrays are ``(k, m)`` for ``k`` groups and ``m`` test examples; ``kinds[j]`` and
    ``fractions[j]`` describe group ``j``. :meth:`table` reports, per kind and size, the Pearson
    and Spearman correlation of predicted with actual changes over the groups (averaged over test
    examples) and the relative error ``mean |predicted - actual| / mean |actual|``.
    """

    kinds: np.ndarray  # (k,) str
    fractions: np.ndarray  # (k,)
    sizes: np.ndarray  # (k,)
    first_order: np.ndarray  # (k, m)
    second_order: np.ndarray  # (k, m)
    actual: np.ndarray  # (k, m)

    @staticmethod
    def _corr(pred: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
        """Pearson and Spearman over groups, averaged over test examples."""
        ps = [pearson(pred[:, t], actual[:, t]) for t in range(actual.shape[1])]
        ss = [spearman(pred[:, t], actual[:, t]) for t in range(actual.shape[1])]
        return float(np.nanmean(ps)), float(np.nanmean(ss))

    @staticmethod
    def _rel_error(pred: np.ndarray, actual: np.ndarray) -> float:
        """``mean |pred - actual| / mean |actual|`` over groups and tests (robust to near-zero effects)."""
        scale = np.abs(actual).mean()
        return float(np.abs(pred - actual).mean() / scale) if scale > 0 else float("nan")

    def table(self) -> list[dict[str, Any]]:
        """One row per (kind, fraction) plus one per kind pooled over all sizes."""
        out = []
        for kind in dict.fromkeys(self.kinds.tolist()):
            cells = [(f, (self.kinds == kind) & (self.fractions == f)) for f in np.unique(self.fractions)]
            cells.append(("all", self.kinds == kind))
            for frac, mask in cells:
                if mask.sum() < 3:
                    continue
                row: dict[str, Any] = {"kind": kind, "fraction": frac, "groups": int(mask.sum())}
                for name, pred in (("first", self.first_order), ("second", self.second_order)):
                    r, rho = self._corr(pred[mask], self.actual[mask])
                    row[f"{name}_pearson"] = r
                    row[f"{name}_spearman"] = rho
                    row[f"{name}_rel_error"] = self._rel_error(pred[mask], self.actual[mask])
                out.append(row)
        return out

    def format_table(self) -> str:
        head = (
            f"{'kind':<11}{'size':>6}{'groups':>7}  {'Pearson 1st':>11}{'2nd':>7}  "
            f"{'Spearman 1st':>12}{'2nd':>7}  {'rel.err 1st':>11}{'2nd':>7}"
        )
        lines = [head]
        for r in self.table():
            size = "all" if r["fraction"] == "all" else f"{r['fraction']:.0%}"
            lines.append(
                f"{r['kind']:<11}{size:>6}{r['groups']:>7}"
                f"  {r['first_pearson']:>11.3f}{r['second_pearson']:>7.3f}"
                f"  {r['first_spearman']:>12.3f}{r['second_spearman']:>7.3f}"
                f"  {r['first_rel_error']:>11.3f}{r['second_rel_error']:>7.3f}"
            )
        return "\n".join(lines)

    def plot(self, path: str | Path, test_index: int = 0) -> Path:
        """Correlation vs group size per kind, and predicted-vs-actual scatters, saved as PNG."""
        plt = pyplot()

        kinds = list(dict.fromkeys(self.kinds.tolist()))
        rows = [r for r in self.table() if r["fraction"] != "all"]
        fig, axes = plt.subplots(1, 2 + len(kinds), figsize=(4.2 * (2 + len(kinds)), 4), dpi=120)
        for ax, metric, label in (
            (axes[0], "pearson", "Pearson r, predicted vs actual"),
            (axes[1], "rel_error", "mean |predicted - actual| / mean |actual|"),
        ):
            for kind, ls in zip(kinds, ("-", "--", ":"), strict=False):
                rs = [r for r in rows if r["kind"] == kind]
                x = [100 * r["fraction"] for r in rs]
                for order, marker, color in (("first", "o", "C0"), ("second", "s", "C3")):
                    ax.plot(
                        x,
                        [r[f"{order}_{metric}"] for r in rs],
                        ls,
                        marker=marker,
                        color=color,
                        label=f"{order} order, {kind}",
                    )
            ax.set_xlabel("group size (% of training set)")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        axes[0].set_title("Correlation with retraining (mean over test examples)", fontsize=9)
        axes[1].set_title("Relative error of the predicted change", fontsize=9)
        for ax, kind in zip(axes[2:], kinds, strict=True):
            mask = self.kinds == kind
            a = self.actual[mask, test_index]
            for pred, name, c in ((self.first_order, "1st", "C0"), (self.second_order, "2nd", "C3")):
                ax.scatter(a, pred[mask, test_index], s=10, alpha=0.7, color=c, label=f"{name} order")
            lo = float(
                min(
                    a.min(),
                    self.first_order[mask, test_index].min(),
                    self.second_order[mask, test_index].min(),
                )
            )
            hi = float(
                max(
                    a.max(),
                    self.first_order[mask, test_index].max(),
                    self.second_order[mask, test_index].max(),
                )
            )
            ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--")
            ax.set_xlabel("actual change in test loss (retrained)")
            ax.set_ylabel("predicted change")
            ax.set_title(f"{kind} groups (test example {test_index})", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return save_png(fig, path)


def compare_group_influence(
    influence: Influence,
    groups: Sequence[Group],
    test: Any,
    *,
    retrain: Retrainer | None = None,
) -> GroupComparison:
    """Predict (first and second order) and actually retrain for every group; see :class:`GroupComparison`."""
    pred = group_influence(influence, [g.ids for g in groups], test)
    actual = retrain_without_groups(influence, [g.ids for g in groups], test, retrain=retrain)
    return GroupComparison(
        np.array([g.kind for g in groups]),
        np.array([g.fraction for g in groups]),
        pred.sizes.numpy().astype(int),
        pred.first_order.detach().double().cpu().numpy(),
        pred.second_order.detach().double().cpu().numpy(),
        actual.detach().double().cpu().numpy(),
    )
