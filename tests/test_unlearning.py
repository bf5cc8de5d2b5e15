"""Class removal by the influence update: exact formula, faithfulness, forgetting, metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vmap

from influencer import CG, ClassificationTask, Exact, Influence, LiSSA
from influencer._kernel.functional import ModelFunction
from influencer.data import as_examples
from influencer.datasets import load_digits, load_tabular
from influencer.errors import ConfigError, DataError
from influencer.models import MLP, LogisticRegression
from influencer.samplers import LogitSampler, RandomSampler
from influencer.training import fit_lbfgs
from influencer.uses.unlearning import ClassRemoval, forget_f1, forget_metrics
from reproductions.sampler_study import PeakMemory, run_sampler_study
from reproductions.unlearning import TrainingRecipe, compare_with_retraining, retrain_without_class


def _optimum(model: torch.nn.Module, task: ClassificationTask, train) -> torch.nn.Module:
    fn = ModelFunction(model, task)
    fn.load_into(fit_lbfgs(fn, as_examples(train), grad_tol=1e-8))
    return model


@pytest.fixture(scope="module")
def iris():
    return load_tabular("iris", dtype=torch.float64)


@pytest.fixture(scope="module")
def iris_logistic(iris):
    torch.manual_seed(0)
    task = ClassificationTask(weight_decay=1e-2)
    return _optimum(LogisticRegression(4, 3).double(), task, iris.train), task


@pytest.fixture(scope="module")
def digits_split():
    """Digits with a validation split carved from the training part (the test part is only reported)."""
    d = load_digits()
    perm = torch.randperm(len(d.y_train), generator=torch.Generator().manual_seed(0))
    val, tr = perm[:200], perm[200:700]
    return (d.x_train[tr], d.y_train[tr]), (d.x_train[val], d.y_train[val]), d.test


@pytest.fixture(scope="module")
def digits_mlp(digits_split):
    train, _, _ = digits_split
    torch.manual_seed(0)
    task = ClassificationTask(weight_decay=1e-3)
    model = MLP(64, (24,), 10)
    TrainingRecipe(epochs=15, lr=1e-2, batch_size=64).train(model, task, train)
    return model, task


def _dense_objective_hessian(model, task, x, y, theta_dict):
    """Dense Hessian of mean_i CE_i + Omega over the given examples, straight from autograd."""
    names = list(theta_dict)
    shapes = [theta_dict[n].shape for n in names]
    sizes = [theta_dict[n].numel() for n in names]

    def objective(flat):
        parts = dict(
            zip(names, (t.view(s) for t, s in zip(flat.split(sizes), shapes, strict=True)), strict=True)
        )
        logits = functional_call(model, parts, (x,))
        penalty = 0.5 * task.weight_decay * sum((t * t).sum() for t in parts.values())
        return F.cross_entropy(logits, y) + penalty

    flat = torch.cat([theta_dict[n].reshape(-1) for n in names])
    return torch.autograd.functional.hessian(objective, flat), objective, flat


def test_update_matches_dense_hessian_formula(iris, iris_logistic):
    model, task = iris_logistic
    x, y = iris.train
    removal = ClassRemoval(Influence(model, task, iris.train, estimator=Exact(damping=1e-3)), 2)
    hessian_ids = removal.retain_ids[::3]
    update = removal.update(hessian_ids)

    params = {k: v.detach() for k, v in model.named_parameters()}
    H, _, flat = _dense_objective_hessian(model, task, x[hessian_ids], y[hessian_ids], params)
    forget = y == 2
    # sum over the removed class of grad(loss_z + Omega), by plain autograd on the summed loss
    _, objective_removed, _ = _dense_objective_hessian(model, task, x[forget], y[forget], params)
    g = torch.autograd.functional.jacobian(objective_removed, flat) * int(forget.sum())
    n, s = len(y), int(forget.sum())
    expected = torch.linalg.solve(H + 1e-3 * torch.eye(len(flat), dtype=H.dtype), g) / (n - s)
    torch.testing.assert_close(update.direction, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(removal.parameters(update, 2.0), flat + 2.0 * expected, rtol=1e-9, atol=1e-12)
    assert update.hessian_ids.tolist() == hessian_ids.tolist()


def test_gauss_newton_update_matches_dense_ggn(iris):
    torch.manual_seed(1)
    task = ClassificationTask(weight_decay=1e-2)
    model = MLP(4, (3,), 3).double()
    TrainingRecipe(epochs=20, lr=1e-2, batch_size=16).train(model, task, iris.train)
    x, y = iris.train
    removal = ClassRemoval(
        Influence(model, task, iris.train, estimator=Exact(damping=1e-2), curvature="gauss_newton"), 0
    )
    ids = removal.retain_ids[:40]
    update = removal.update(ids)

    params = {k: v.detach() for k, v in model.named_parameters()}
    J = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],))[0]), in_dims=(None, 0))(
        params, x[ids]
    )
    J = torch.cat([J[k].reshape(len(ids), 3, -1) for k in params], dim=2)  # (m, C, p)
    prob = torch.softmax(model(x[ids]).detach(), dim=1)
    A = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]  # output Hessian of CE, (m, C, C)
    p = J.shape[2]
    ggn = torch.einsum("mcp,mcd,mdq->pq", J, A, J) / len(ids) + task.weight_decay * torch.eye(
        p, dtype=J.dtype
    )
    g = removal.gradient_sum()
    expected = torch.linalg.solve(ggn + 1e-2 * torch.eye(p, dtype=J.dtype), g) / (
        len(y) - len(removal.forget_ids)
    )
    torch.testing.assert_close(update.direction, expected, rtol=1e-8, atol=1e-12)


def test_newton_step_approaches_retraining_on_a_convex_model(iris, iris_logistic):
    model, task = iris_logistic
    removal = ClassRemoval(Influence(model, task, iris.train, estimator=Exact(), curvature="hessian"), 1)
    update = removal.update()  # H on all retained data
    fn = removal.influence.fn
    retrained = fit_lbfgs(fn, removal.train, removal.retain_ids, removal.theta, grad_tol=1e-8)
    moved = (retrained - removal.theta).norm()
    error = (removal.parameters(update) - retrained).norm()
    # Removing a third of the data is no small perturbation, yet one Newton step from the full-data
    # optimum lands far closer to the retrained optimum than staying put (about 0.22 of the way
    # here); with the wrong sign it moves away.
    assert error < 0.3 * moved
    assert (removal.parameters(update, -1.0) - retrained).norm() > moved
    # The exact scale 1/(n - |S|) of the retained objective beats the first-order 1/n.
    first_order = removal.parameters(update, (removal.n - len(removal.forget_ids)) / removal.n)
    assert error < 0.7 * (first_order - retrained).norm()


def test_lissa_agrees_with_exact(iris, iris_logistic):
    model, task = iris_logistic
    exact = ClassRemoval(Influence(model, task, iris.train, estimator=Exact(damping=0.1)), 0)
    lissa = ClassRemoval(
        Influence(model, task, iris.train, estimator=LiSSA(damping=0.1, depth=60, batch_size=16)), 0
    )
    ids = exact.retain_ids[::2]
    a, b = exact.update(ids), lissa.update(ids)
    assert b.iterations == 60
    # stochastic minibatch Hessians, so close rather than equal (measured: 2% apart)
    assert float((a.direction - b.direction).norm() / a.direction.norm()) < 0.1


def test_removal_forgets_the_class_and_keeps_the_rest(digits_split, digits_mlp):
    train, val, test = digits_split
    model, task = digits_mlp
    before = [p.detach().clone() for p in model.parameters()]
    estimator = CG(damping=1e-2, tol=1e-4, max_iter=300)
    removal = ClassRemoval(Influence(model, task, train, estimator=estimator, curvature="gauss_newton"), 3)
    original = removal.metrics(test)
    update = removal.sampled_update(LogitSampler(), 60, seed=0)
    assert update.iterations is not None and update.iterations > 0
    search = removal.choose_scale(update, val)
    after = removal.metrics(test, update, search.scale)
    assert original.forget_accuracy > 0.85
    assert after.forget_accuracy < 0.2
    assert after.retain_accuracy > original.retain_accuracy - 0.05
    assert after.f1 > 0.85 > original.f1
    # the input model is untouched; the returned copy carries the new parameters
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
    new = removal.model(update, search.scale)
    flat = torch.cat([p.detach().reshape(-1) for p in new.parameters()])
    torch.testing.assert_close(flat, removal.parameters(update, search.scale))
    direct = forget_metrics(new, task, test, 3)
    assert direct == after


def test_retraining_without_the_class_never_predicts_it(digits_split):
    train, _, test = digits_split
    task = ClassificationTask()
    recipe = TrainingRecipe(epochs=3, lr=1e-2)
    removal = ClassRemoval(Influence(MLP(64, (16,), 10), task, train), 5)
    retrained = retrain_without_class(removal, lambda: MLP(64, (16,), 10), recipe)
    metrics = forget_metrics(retrained, task, test, 5)
    assert metrics.forget_accuracy == 0.0
    assert metrics.retain_accuracy > 0.7
    assert metrics.n_forget == int((test[1] == 5).sum())


def test_compare_with_retraining_reports_all_three(digits_split, digits_mlp):
    train, val, test = digits_split
    model, task = digits_mlp
    influence = Influence(model, task, train, estimator=CG(damping=0.05, tol=1e-2), curvature="gauss_newton")
    result = compare_with_retraining(
        influence, 7, val, test, lambda: MLP(64, (24,), 10), TrainingRecipe(epochs=3, lr=1e-2),
        sampler=RandomSampler(), hessian_size=40,
    )  # fmt: skip
    names = [r[0] for r in result.rows()]
    assert names == ["original", "influence", "retrained"]
    assert result.hessian_size == 40
    assert result.influence.f1 > result.original.f1
    assert result.retrained.forget_accuracy == 0.0


def test_forget_f1_values():
    assert forget_f1(0.0, 1.0) == 1.0
    assert forget_f1(1.0, 0.9) == 0.0
    assert forget_f1(0.5, 0.5) == pytest.approx(0.5)
    assert forget_f1(0.2, 0.8) == pytest.approx(0.8)
    assert forget_f1(1.0, 0.0) == 0.0
    with pytest.raises(ConfigError):
        forget_f1(1.5, 0.5)


def test_bad_inputs_are_refused(iris, iris_logistic):
    model, task = iris_logistic
    with pytest.raises(DataError, match="no training example has class 7"):
        ClassRemoval(Influence(model, task, iris.train), 7)
    removal = ClassRemoval(Influence(model, task, iris.train, estimator=Exact(damping=1e-3)), 0)
    with pytest.raises(ConfigError, match="removed class"):
        removal.update(removal.forget_ids[:3])
    update = removal.update(removal.retain_ids[:10])
    with pytest.raises(ConfigError, match="positive"):
        removal.choose_scale(update, iris.test, scales=(1.0, -2.0))
    with pytest.raises(ConfigError, match="finite"):
        removal.parameters(update, float("nan"))
    with pytest.raises(ConfigError):
        TrainingRecipe(epochs=0)


def test_sampler_study_runs_end_to_end(tmp_path, iris, iris_logistic):
    model, task = iris_logistic
    removal = ClassRemoval(Influence(model, task, iris.train, estimator=Exact(damping=1e-3)), 2)
    study = run_sampler_study(
        removal, [RandomSampler(), LogitSampler()], [8, 20], [0, 1], iris.test, iris.test
    )
    assert [(r.sampler, r.size) for r in study.rows] == [
        ("random", 8),
        ("random", 20),
        ("logit", 8),
        ("logit", 20),
    ]
    assert len(study.runs) == 8
    for row in study.rows:  # mse = variance + bias^2, with the variance's 1/(S-1) for S = 2 seeds
        assert row.update_var >= 0 and row.update_mse >= row.update_var / 2 - 1e-12
        assert 0 <= row.f1_mean <= 1
    assert "random" in study.table()
    assert set(study.variance_ratios()) == {"logit"}
    assert set(study.variance_ratios("update_var")["logit"]) == {8, 20}
    paths = study.plot(tmp_path)
    assert paths and all(p.exists() and p.stat().st_size > 0 for p in paths)
    assert study.to_json(tmp_path / "study.json").exists()


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory("cpu") as tracker:
        block = torch.ones(64 * 2**20 // 8, dtype=torch.float64)  # 64 MiB, touched
        del block
    if tracker.kind == "none":
        pytest.skip("peak resident memory cannot be reset on this platform")
    assert tracker.peak >= 60 * 2**20
