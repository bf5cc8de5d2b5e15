"""The Influence API the uses build on: replace(), settings(), gradient_sum(), curvature_product()."""

from __future__ import annotations

import copy

import pytest
import torch

from influencer import CG, ClassificationTask, Exact, Influence
from influencer.errors import DataError


@pytest.fixture()
def logistic(logistic_small, digits_small):
    model, task = logistic_small
    return model, task, digits_small.train, digits_small.test


def test_replace_theta_equals_an_influence_of_the_model_with_those_weights(logistic):
    model, task, train, test = logistic
    inf = Influence(model, task, train, estimator=Exact())
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.weight.mul_(1.1)
    other = Influence(moved, task, train, estimator=Exact()).fit()
    replaced = inf.replace(theta=other.theta).fit()
    torch.testing.assert_close(replaced.scores(test), other.scores(test), rtol=1e-10, atol=1e-14)
    assert replaced.curvature is not inf.curvature and inf.curvature is None  # the original is untouched
    torch.testing.assert_close(inf.theta, Influence(model, task, train).theta)


def test_replace_curvature_subset_kind_estimator_and_data(logistic):
    model, task, train, test = logistic
    ids = torch.arange(0, 300, 2)
    base = Influence(model, task, train, estimator=Exact())
    direct = Influence(
        model, task, train, estimator=CG(tol=1e-12), curvature="gauss_newton", hessian_indices=ids
    )
    replaced = base.replace(estimator=CG(tol=1e-12), curvature="gauss_newton", hessian_indices=ids)
    torch.testing.assert_close(replaced.fit().scores(test), direct.fit().scores(test), rtol=1e-9, atol=1e-14)
    assert base.replace().hessian_indices is None and replaced.replace().hessian_indices.equal(ids)
    # other training data of the same structure: e.g. relabelled
    x, y = train
    relabelled = (x, (y + 1) % 10)
    torch.testing.assert_close(
        base.replace(train=relabelled).gradient_sum(),
        Influence(model, task, relabelled).gradient_sum(),
    )
    with pytest.raises(DataError, match="theta must have shape"):
        base.replace(theta=torch.zeros(3, dtype=torch.float64))


def test_replace_dtype_computes_in_that_precision(logistic):
    model, task, train, test = logistic
    single = copy.deepcopy(model).float()
    inf = Influence(single, task, train, estimator=Exact(), dtype=torch.float32)
    wide = inf.replace(dtype=torch.float64)
    assert wide.theta.dtype == torch.float64 and inf.theta.dtype == torch.float32
    reference = Influence(model, task, train, estimator=Exact()).replace(theta=wide.theta).fit()
    torch.testing.assert_close(wide.fit().scores(test), reference.scores(test), rtol=1e-10, atol=1e-14)


def test_gradient_sum_and_curvature_product_against_dense_references(logistic):
    model, task, train, _ = logistic
    inf = Influence(model, task, train, estimator=Exact(), batch_size=7).fit()
    ids = torch.tensor([3, 4, 50, 299])
    grads = torch.cat([g for _, g in inf.train_gradients(ids)])
    torch.testing.assert_close(inf.gradient_sum(ids), grads.sum(0), rtol=1e-12, atol=1e-14)
    # the dense Hessian of the objective restricted to ids, by autograd on a hand-written loss
    x, y = train
    theta = inf.theta.clone()

    def objective(t):
        w, b = t[:640].view(10, 64), t[640:]
        logits = x[ids] @ w.T + b
        loss = torch.nn.functional.cross_entropy(logits, y[ids], reduction="mean")
        return loss + 0.5 * 1e-2 * (t * t).sum()

    dense = torch.autograd.functional.hessian(objective, theta)
    v = torch.randn(3, inf.p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(inf.curvature_product(v, ids), v @ dense, rtol=1e-10, atol=1e-12)
    # default: the curvature's own examples (all of them here)
    torch.testing.assert_close(inf.curvature_product(v), inf.curvature.matvec(v))
    with pytest.raises(DataError, match="at least one"):
        inf.curvature_product(v, [])


def test_settings_change_exactly_with_what_results_depend_on(logistic):
    model, task, train, _ = logistic
    inf = Influence(model, task, train, estimator=CG(damping=1e-3))
    s = inf.settings()
    assert s == Influence(model, task, train, estimator=CG(damping=1e-3)).settings()
    # another estimator changes the curvature part only
    other = inf.replace(estimator=CG(damping=1e-2)).settings()
    assert other["gradients"] == s["gradients"] and other["curvature"] != s["curvature"]
    assert inf.replace(hessian_indices=[1, 2, 3]).settings()["curvature"] != s["curvature"]
    # weights, data, task hyperparameters and parameter choice change the gradient part
    assert inf.replace(theta=inf.theta * 1.01).settings()["gradients"] != s["gradients"]
    x, y = train
    assert inf.replace(train=(x, (y + 1) % 10)).settings()["gradients"] != s["gradients"]
    assert (
        Influence(model, ClassificationTask(weight_decay=2e-2), train).settings()["gradients"]
        != s["gradients"]
    )
    assert Influence(model, task, train, params=["weight"]).settings()["gradients"] != s["gradients"]

    class Tempered(ClassificationTask):  # a hyperparameter held as an attribute, settings() not overridden
        def __init__(self, temperature: float) -> None:
            super().__init__(weight_decay=1e-2)
            self.temperature = temperature

        def output_loss(self, outputs, batch):
            return super().output_loss(outputs / self.temperature, batch)

    hot, cold = (
        Influence(model, Tempered(2.0), train).settings(),
        Influence(model, Tempered(1.0), train).settings(),
    )
    assert hot["gradients"]["task"] != cold["gradients"]["task"]
    assert s["gradients"]["model"]["classes"], "the model's class (and its source) is part of the fingerprint"


def test_outputs_losses_and_measurements_at_other_parameters(logistic):
    model, task, train, test = logistic
    inf = Influence(model, task, train, batch_size=7)
    x, y = test
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(inf.outputs(test), logits)
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(inf.losses(test), ce)
    torch.testing.assert_close(inf.measurements(test), ce)
    assert inf.losses().shape == (300,)
    doubled = inf.theta * 2
    with torch.no_grad():
        torch.testing.assert_close(inf.outputs(test, doubled), 2 * logits)
