"""Group influence: closed-form checks on ridge regression, consistency, and retraining."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from influencer import ClassificationTask, Exact, Influence, RegressionTask
from influencer.datasets import load_tabular
from influencer.errors import ConfigError, DataError
from influencer.models import LogisticRegression
from influencer.training import fit_lbfgs, train_lbfgs
from influencer.uses.group import (
    group_curvature_product,
    group_influence,
    group_params,
    retrain_without_groups,
)
from reproductions.group import GroupComparison, compare_group_influence, make_groups

LAM = 0.05


@pytest.fixture(scope="module")
def cancer():
    return load_tabular("breast_cancer", dtype=torch.float64)


def ridge_influence(x: torch.Tensor, y: torch.Tensor) -> Influence:
    model = nn.Linear(x.shape[1], 1, bias=False).double()
    task = RegressionTask(weight_decay=LAM)
    train_lbfgs(model, task, (x, y))
    return Influence(model, task, (x, y), estimator=Exact()).fit()


def ridge(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    return torch.linalg.solve(x.T @ x / len(x) + LAM * torch.eye(d, dtype=x.dtype), x.T @ y / len(x))


def solve_with(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(a, b)


def ridge_terms(x: torch.Tensor, y: torch.Tensor, group: torch.Tensor):
    """Closed-form H, H_U, G_U, q and the exact removal change for ridge regression."""
    n, d = x.shape
    w = ridge(x, y)
    h = x.T @ x / n + LAM * torch.eye(d, dtype=x.dtype)
    g = x * (x @ w - y)[:, None] + LAM * w  # (n, d): grad of 0.5 r_i^2 + LAM/2 |w|^2
    xu = x[group]
    h_u = xu.T @ xu + len(group) * LAM * torch.eye(d, dtype=x.dtype)
    keep = torch.ones(n, dtype=torch.bool)
    keep[group] = False
    exact = ridge(x[keep], y[keep]) - w
    return h, h_u, g[group].sum(0), len(group) / n, exact


def test_second_order_on_ridge_is_basu_formula_and_first_order_in_d(cancer):
    x, y = cancer.x_train[:150], cancer.y_train[:150].double()
    n = len(x)
    inf = ridge_influence(x, y)
    group = torch.nonzero(y == 1).reshape(-1)[:30]  # a same-class group, q = 0.2
    h, h_u, g_u, q, exact = ridge_terms(x, y, group)
    solve = lambda v: torch.linalg.solve(h, v)  # noqa: E731
    u = solve(g_u)
    basu = (1 - 2 * q) / (1 - q) ** 2 * u / n + 1 / (1 - q) ** 2 * solve(h_u @ u) / n**2
    est = group_params(inf, [group])
    torch.testing.assert_close(est.first_order[0], u / n, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(est.second_order[0], basu, rtol=1e-8, atol=1e-12)

    # The derivation: with D = H_U / n - q H the estimate is the removal Newton step to first order in D ...
    dev = h_u / n - q * h
    resummed = u / (n * (1 - q)) + solve(dev @ u) / (n * (1 - q) ** 2)
    torch.testing.assert_close(est.second_order[0], resummed, rtol=1e-8, atol=1e-12)
    # ... of the exact removal for least squares, a Newton step with curvature (1 - q) H - D:
    torch.testing.assert_close(exact, solve_with((1 - q) * h - dev, g_u) / n, rtol=1e-8, atol=1e-12)
    assert (exact - est.second_order[0]).norm() < 0.5 * (exact - est.first_order[0]).norm()


def test_second_order_is_exact_when_the_group_curvature_is_proportional(cancer):
    # Two copies of the same inputs with different targets: the Hessian does not depend on y, so
    # removing the second copy leaves H_U = n H / 2 exactly (D = 0) while the optimum moves.
    x0, y0 = cancer.x_train[:60], cancer.y_train[:60].double()
    x = torch.cat([x0, x0])
    y = torch.cat([y0, 1.0 - y0 + 0.3 * x0[:, 0]])
    inf = ridge_influence(x, y)
    group = torch.arange(60, 120)
    *_, exact = ridge_terms(x, y, group)
    assert exact.norm() > 1e-2  # removing the group does move the optimum
    est = group_params(inf, [group])
    torch.testing.assert_close(est.second_order[0], exact, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(est.first_order[0], exact / 2, rtol=1e-7, atol=1e-10)  # q = 1/2


def test_group_curvature_product_is_the_sum_of_member_hessians(cancer):
    x, y = cancer.x_train[:80], cancer.y_train[:80].double()
    inf = ridge_influence(x, y)
    group = torch.tensor([3, 7, 11, 40])
    _, h_u, *_ = ridge_terms(x, y, group)
    v = torch.randn(2, x.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(group_curvature_product(inf, group, v), v @ h_u.T, rtol=1e-9, atol=1e-10)


@pytest.fixture(scope="module")
def logistic(cancer):
    torch.manual_seed(0)
    x, y = cancer.x_train[:200], cancer.y_train[:200]
    model = LogisticRegression(x.shape[1], 2).double()
    task = ClassificationTask(weight_decay=1e-2)
    train_lbfgs(model, task, (x, y))
    return Influence(model, task, (x, y), estimator=Exact()).fit(), (x, y)


def test_group_influence_matches_scores_and_parameter_changes(cancer, logistic):
    inf, _ = logistic
    test = (cancer.x_test[:4], cancer.y_test[:4])
    groups = [torch.tensor([0, 5, 9]), torch.arange(20, 60)]
    est = group_influence(inf, groups, test)
    scores = inf.scores(test)  # (4, 200)
    for j, g in enumerate(groups):
        torch.testing.assert_close(est.first_order[j], scores[:, g].sum(1), rtol=1e-8, atol=1e-12)
    grads = inf.gradients(test)  # (4, p): the test-loss change is linear in the parameter change
    params = group_params(inf, groups)
    torch.testing.assert_close(est.second_order, params.second_order @ grads.T, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(est.first_order, params.first_order @ grads.T, rtol=1e-8, atol=1e-12)
    assert est.sizes.tolist() == [3, 40]


def test_second_order_is_closer_to_retraining_for_large_same_class_groups(cancer, logistic):
    inf, (_, y) = logistic
    groups = [g.ids for g in make_groups(y, [0.2], 3, kinds=("same_class",), seed=1)]
    test = (cancer.x_test[:10], cancer.y_test[:10])
    est = group_influence(inf, groups, test)
    actual = retrain_without_groups(inf, groups, test)
    err1 = (est.first_order - actual).abs().mean(1)  # (groups,) mean over test examples
    err2 = (est.second_order - actual).abs().mean(1)
    assert (err2 < 0.8 * err1).all(), (err1, err2)

    # In parameter space too, against the retrained optimum.
    params = group_params(inf, groups)
    fn = inf.fn
    for j, g in enumerate(groups):
        keep = torch.ones(inf.n, dtype=torch.bool)
        keep[g] = False
        theta = fit_lbfgs(fn, inf.train, torch.nonzero(keep).reshape(-1), inf.theta, grad_tol=1e-9)
        delta = theta - inf.theta
        assert (params.second_order[j] - delta).norm() < 0.8 * (params.first_order[j] - delta).norm()


def test_make_groups(cancer):
    y = cancer.y_train
    n = len(y)
    groups = make_groups(y, [0.05, 0.2], 4, seed=3)
    assert len(groups) == 2 * 2 * 4
    for g in groups:
        assert len(g.ids) == round(g.fraction * n)
        assert torch.unique(g.ids).numel() == len(g.ids)
        if g.kind == "same_class":
            assert (y[g.ids] == g.label).all()
    again = make_groups(y, [0.05, 0.2], 4, seed=3)
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(groups, again, strict=True))
    with pytest.raises(ConfigError, match="largest class"):
        make_groups(y, [0.7], 1, kinds=("same_class",))
    with pytest.raises(ConfigError, match="fractions"):
        make_groups(y, [1.5], 1)


def test_bad_groups_are_refused(logistic):
    inf, _ = logistic
    with pytest.raises(DataError, match="more than once"):
        group_params(inf, [torch.tensor([1, 1, 2])])
    with pytest.raises(DataError, match="at least one"):
        group_params(inf, [torch.tensor([], dtype=torch.long)])
    with pytest.raises(DataError, match="whole training set"):
        group_params(inf, [torch.arange(inf.n)])
    with pytest.raises(DataError, match="indices"):
        group_params(inf, [torch.tensor([inf.n])])


def test_comparison_table_and_plot(cancer, logistic, tmp_path):
    inf, (_, y) = logistic
    groups = make_groups(y, [0.02, 0.1], 3, seed=0)
    test = (cancer.x_test[:2], cancer.y_test[:2])
    result = compare_group_influence(inf, groups, test)
    assert result.actual.shape == result.first_order.shape == (12, 2)
    rows = {(r["kind"], r["fraction"]): r for r in result.table()}
    assert set(rows) == {(k, f) for k in ("random", "same_class") for f in (0.02, 0.1, "all")}
    for (kind, fraction), r in rows.items():
        # Each cell recomputed from the raw arrays: correlation over its groups, per test example
        # and then averaged; relative error over groups and tests.
        mask = (result.kinds == kind) & ((result.fractions == fraction) if fraction != "all" else True)
        assert r["groups"] == mask.sum() == (3 if fraction != "all" else 6)
        actual = result.actual[mask]
        for order, pred in (("first", result.first_order[mask]), ("second", result.second_order[mask])):
            pearsons = [np.corrcoef(pred[:, t], actual[:, t])[0, 1] for t in range(2)]
            spearmans = [scipy.stats.spearmanr(pred[:, t], actual[:, t])[0] for t in range(2)]
            assert r[f"{order}_pearson"] == pytest.approx(np.mean(pearsons), abs=1e-12)
            assert r[f"{order}_spearman"] == pytest.approx(np.mean(spearmans), abs=1e-12)
            rel = np.abs(pred - actual).mean() / np.abs(actual).mean()
            assert r[f"{order}_rel_error"] == pytest.approx(rel, rel=1e-12)
    # A perfect predictor scores r = 1 and no error.
    perfect = GroupComparison(
        result.kinds, result.fractions, result.sizes, result.first_order, result.actual, result.actual
    )
    for r in perfect.table():
        assert r["second_pearson"] == pytest.approx(1.0) and r["second_rel_error"] == 0.0
    assert "same_class" in result.format_table()
    path = result.plot(tmp_path / "groups.png")
    assert path.exists() and path.stat().st_size > 20_000
