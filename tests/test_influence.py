"""Influence scores against closed forms, independent dense references and retraining."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from influencer import CG, ClassificationTask, Exact, Influence, LiSSA, RegressionTask, top_k
from influencer._kernel.stats import pearson
from influencer.errors import ConfigError
from influencer.testing import dense_reference_scores, ridge_reference


@pytest.fixture(scope="module")
def ridge_problem(digits):
    """Least squares on 8x8 digits (target: the digit value), no bias, L2 penalty."""
    x, y = digits.x_train[:600], digits.y_train[:600].double()
    xt, yt = digits.x_test[:6], digits.y_test[:6].double()
    lam = 0.05
    ref = ridge_reference(x, y, lam, xt, yt)
    model = nn.Linear(64, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(ref.w[None])
    return model, RegressionTask(weight_decay=lam), (x, y), (xt, yt), ref


@pytest.mark.parametrize("estimator", [Exact(), CG(tol=1e-12)])
def test_ridge_scores_equal_the_closed_form(ridge_problem, estimator):
    model, task, train, test, ref = ridge_problem
    inf = Influence(model, task, train, estimator=estimator).fit()
    torch.testing.assert_close(inf.scores(test), ref.scores, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(inf.influence_up_loss(test), -600 * ref.scores, rtol=1e-8, atol=1e-10)


def test_ridge_up_params_is_the_derivative_of_the_reweighted_optimum(ridge_problem):
    """I_up,params = d theta / d eps for argmin J + eps * l_i; ridge has theta(eps) in closed form.

    theta(eps) solves A(eps) theta = b(eps) with A = X^T X / n + lam I + eps (x x^T + lam I) and
    b = X^T y / n + eps x y, so d theta / d eps = A^-1 (x y - (x x^T + lam I) theta) at eps = 0.
    """
    model, task, (x, y), *_ = ridge_problem
    inf = Influence(model, task, (x, y), estimator=Exact()).fit()
    i, lam, n = 7, 0.05, len(x)
    eye = torch.eye(64, dtype=x.dtype)
    a = x.T @ x / n + lam * eye
    da = torch.outer(x[i], x[i]) + lam * eye
    theta = torch.linalg.solve(a, x.T @ y / n)
    derivative = torch.linalg.solve(a, x[i] * y[i] - da @ theta)
    up = inf.influence_up_params([i])[0]
    torch.testing.assert_close(up, derivative, rtol=1e-9, atol=1e-12)
    # and a central difference of the closed form agrees to its own (rounding-limited) accuracy
    eps = 1e-4
    fd = (
        torch.linalg.solve(a + eps * da, x.T @ y / n + eps * x[i] * y[i])
        - torch.linalg.solve(a - eps * da, x.T @ y / n - eps * x[i] * y[i])
    ) / (2 * eps)
    assert float((up - fd).norm() / fd.norm()) < 1e-5  # O(eps^2) truncation


def test_ridge_scores_predict_exact_leave_one_out_refits(ridge_problem):
    *_, ref = ridge_problem
    for j in range(ref.scores.shape[0]):
        assert pearson(ref.scores[j], ref.loo_change[j]) > 0.99
    # the first-order prediction has the right scale, not just the right ranking
    ratio = (ref.scores * ref.loo_change).sum() / (ref.loo_change**2).sum()
    assert 0.9 < float(ratio) < 1.1


def test_logistic_scores_match_the_dense_float64_reference(digits_small, logistic_small):
    model, task = logistic_small
    test = (digits_small.x_test[:5], digits_small.y_test[:5])
    reference = dense_reference_scores(model, task, digits_small.train, test)
    exact = Influence(model, task, digits_small.train, estimator=Exact()).fit().scores(test)
    cg = Influence(model, task, digits_small.train, estimator=CG(tol=1e-12)).fit().scores(test)
    torch.testing.assert_close(exact, reference, rtol=1e-7, atol=1e-12)
    assert float((cg - reference).norm() / reference.norm()) < 1e-6
    lissa = Influence(model, task, digits_small.train, estimator=LiSSA(depth=200, batch_size=150)).fit()
    assert pearson(lissa.scores(test).flatten(), reference.flatten()) > 0.98


def test_mlp_scores_match_the_dense_reference_with_damping(digits_small, mlp_small):
    model, task = mlp_small
    test = (digits_small.x_test[:3], digits_small.y_test[:3])
    train = (digits_small.x_train[:120], digits_small.y_train[:120])
    reference = dense_reference_scores(model, task, train, test, damping=0.5)
    exact = Influence(model, task, train, estimator=Exact(damping=0.5)).fit().scores(test)
    cg = Influence(model, task, train, estimator=CG(damping=0.5, tol=1e-12)).fit().scores(test)
    torch.testing.assert_close(exact, reference, rtol=1e-7, atol=1e-12)
    assert float((cg - exact).norm() / exact.norm()) < 1e-6


def test_scores_do_not_depend_on_batch_sizes(digits_small, logistic_small):
    model, task = logistic_small
    test = (digits_small.x_test[:4], digits_small.y_test[:4])
    runs = [
        Influence(
            model,
            task,
            digits_small.train,
            estimator=CG(tol=1e-12),
            batch_size=b,
            hessian_batch_size=h,
            solve_batch=s,
        )
        .fit()
        .scores(test)
        for b, h, s in [(300, 300, 4), (7, 50, 1), (64, 1000, 3), (None, 512, 256)]
    ]
    for r in runs[1:]:
        torch.testing.assert_close(r, runs[0], rtol=1e-9, atol=1e-13)


def test_default_batch_size_fills_a_gradient_block(digits_small, logistic_small):
    """Default chunks hold ~256 MiB of (B, p) gradients, 128 to 4,096 examples: a small model's
    training set goes through in one chunk, a large one keeps the old 128."""
    from influencer.influence import GRADIENT_BLOCK_BYTES, default_batch_size

    model, task = logistic_small
    inf = Influence(model, task, digits_small.train)
    assert inf.batch_size == default_batch_size(inf.p, inf.fn.dtype) == 4096  # p = 650
    assert default_batch_size(10**6, torch.float32) == 128
    assert default_batch_size(10**5, torch.float64) == GRADIENT_BLOCK_BYTES // (8 * 10**5) == 335
    assert Influence(model, task, digits_small.train, batch_size=5).batch_size == 5
    with pytest.raises(ConfigError, match="batch_size, hessian_batch_size and solve_batch must be >= 1"):
        Influence(model, task, digits_small.train, batch_size=0)


def test_every_data_form_gives_the_same_scores(digits_small, logistic_small):
    model, task = logistic_small
    x, y = digits_small.train
    test = (digits_small.x_test[:2], digits_small.y_test[:2])

    class Pairs(Dataset):
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int):
            return x[i], y[i]

    forms = [
        (x, y),
        (x.numpy(), y.numpy()),
        TensorDataset(x, y),
        Pairs(),
        DataLoader(Pairs(), batch_size=16, shuffle=True),
    ]
    scores = [
        Influence(model, task, f, estimator=Exact(), dtype=torch.float64).fit().scores(test) for f in forms
    ]
    for s in scores[1:]:
        torch.testing.assert_close(s, scores[0], rtol=1e-10, atol=1e-14)


def test_self_influence_is_the_diagonal_of_train_on_train_scores(digits_small, logistic_small):
    model, task = logistic_small
    inf = Influence(model, task, digits_small.train, estimator=Exact()).fit()
    ids = torch.tensor([0, 5, 17, 123])
    x, y = digits_small.train
    pairwise = inf.scores((x[ids], y[ids]), train_indices=ids)
    torch.testing.assert_close(inf.self_influence(ids), pairwise.diagonal(), rtol=1e-10, atol=1e-14)


def test_self_influence_without_a_regulariser_is_a_positive_quadratic_form(digits_small, logistic_small):
    # Without Omega, g_i = grad loss_i and self-influence is g_i^T (H + damping I)^-1 g_i / n > 0.
    model, _ = logistic_small
    inf = Influence(model, ClassificationTask(), digits_small.train, estimator=Exact(damping=1e-2)).fit()
    si = inf.self_influence()
    g = torch.cat([g for _, g in inf.train_gradients()])
    h = inf.curvature.dense() + 1e-2 * torch.eye(inf.p, dtype=g.dtype)
    expected = (g * torch.linalg.solve(h, g.T).T).sum(1) / inf.n
    torch.testing.assert_close(si, expected, rtol=1e-8, atol=1e-14)
    assert (si > 0).all()


def test_removal_params_is_the_sum_of_up_params(digits_small, logistic_small):
    model, task = logistic_small
    inf = Influence(model, task, digits_small.train, estimator=Exact()).fit()
    ids = [3, 4, 99]
    torch.testing.assert_close(inf.removal_params(ids), -inf.influence_up_params(ids).sum(0) / inf.n)


def test_top_k_orders_helpful_and_harmful(digits_small, logistic_small):
    model, task = logistic_small
    inf = Influence(model, task, digits_small.train, estimator=Exact()).fit()
    scores = inf.scores((digits_small.x_test[:3], digits_small.y_test[:3]))
    top = top_k(scores, 5)
    for j in range(3):
        order = scores[j].argsort(descending=True)
        assert top.helpful_ids[j].tolist() == order[:5].tolist()
        assert top.harmful_ids[j].tolist() == order.flip(0)[:5].tolist()
        assert (top.helpful_scores[j] > 0).all() and (top.harmful_scores[j] < 0).all()
        # the most helpful training points of a test digit mostly share its label
        same = (digits_small.y_train[top.helpful_ids[j]] == digits_small.y_test[j]).float().mean()
        assert same >= 0.6


def test_gauss_newton_and_hessian_agree_for_least_squares(ridge_problem):
    model, task, train, test, _ = ridge_problem
    h = Influence(model, task, train, estimator=Exact()).fit().scores(test)
    g = Influence(model, task, train, estimator=Exact(), curvature="gauss_newton").fit().scores(test)
    torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-14)


def test_hessian_subset_uses_only_those_examples(digits_small, logistic_small):
    model, task = logistic_small
    ids = torch.arange(0, 300, 3)
    sub = Influence(model, task, digits_small.train, estimator=Exact(), hessian_indices=ids).fit()
    only = Influence(
        model, task, (digits_small.x_train[ids], digits_small.y_train[ids]), estimator=Exact()
    ).fit()
    torch.testing.assert_close(sub.solver.hessian, only.solver.hessian)
    assert sub.n == 300  # scores still use all training points and the 1/n of the full set


def test_float32_model_gives_float32_scores_close_to_float64(digits_small, logistic_small):
    model, task = logistic_small
    m32 = nn.Linear(64, 10)
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    train = (digits_small.x_train.float(), digits_small.y_train)
    test = (digits_small.x_test[:2].float(), digits_small.y_test[:2])
    s32 = Influence(m32, task, train, estimator=CG(tol=1e-6)).fit().scores(test)
    s64 = (
        Influence(model, task, digits_small.train, estimator=Exact())
        .fit()
        .scores((test[0].double(), test[1]))
    )
    assert s32.dtype == torch.float32
    assert pearson(s32.flatten(), s64.flatten()) > 0.9999


def test_classification_task_reports_per_example_losses():
    task = ClassificationTask()
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    out = task.output_loss(logits, (None, torch.tensor([0, 0])))
    torch.testing.assert_close(
        out, torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0]), reduction="none")
    )
