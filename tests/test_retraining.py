"""One retraining abstraction: refit to the optimum on a subset, warm-started (or from scratch)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from influencer import ClassificationTask, Influence, RegressionTask
from influencer.errors import ConfigError, DataError
from influencer.models import MLP
from influencer.retraining import AdamRetrainer, LBFGSRetrainer
from influencer.training import train_minibatch


def test_lbfgs_refit_on_a_subset_is_the_closed_form_ridge_optimum(digits):
    x, y = digits.x_train[:200], digits.y_train[:200].double()
    lam = 0.1
    model = nn.Linear(64, 1, bias=False).double()
    inf = Influence(model, RegressionTask(weight_decay=lam), (x, y))
    retrainer = LBFGSRetrainer()
    theta_star = retrainer.refit(inf)
    keep = torch.arange(200)[torch.arange(200) % 7 != 3]

    def ridge(ids):  # argmin mean_i 0.5 (x_i w - y_i)^2 + lam/2 |w|^2
        xs, ys = x[ids], y[ids]
        return torch.linalg.solve(
            xs.T @ xs / len(ids) + lam * torch.eye(64, dtype=x.dtype), xs.T @ ys / len(ids)
        )

    # |grad J| <= 1e-10 puts theta within 1e-10 / lambda_min(H) = 1e-9 of the optimum
    tol = {"rtol": 0, "atol": 1e-9}
    torch.testing.assert_close(theta_star, ridge(torch.arange(200)), **tol)
    torch.testing.assert_close(retrainer.refit(inf, keep, theta_star), ridge(keep), **tol)
    # relabelled data through replace(): the refit follows the data it is given
    relabelled = inf.replace(train=(x, y + 1.0))
    shifted = torch.linalg.solve(x.T @ x / 200 + lam * torch.eye(64, dtype=x.dtype), x.T @ (y + 1.0) / 200)
    torch.testing.assert_close(
        retrainer.refit(relabelled, torch.arange(200), theta_star), shifted, rtol=1e-9, atol=1e-11
    )


def test_adam_refit_from_scratch_equals_training_the_module(digits_small):
    task = ClassificationTask(weight_decay=1e-3)
    torch.manual_seed(3)
    fresh = MLP(64, (8,), 10).double()
    trained = copy.deepcopy(fresh)
    ids = torch.arange(0, 300, 3)
    x, y = digits_small.train
    train_minibatch(trained, task, (x[ids], y[ids]), epochs=3, lr=1e-2, batch_size=16, seed=5)

    inf = Influence(copy.deepcopy(fresh), task, digits_small.train)
    retrainer = AdamRetrainer(epochs=3, lr=1e-2, batch_size=16, seed=5)
    theta = retrainer.refit(inf, ids, start=inf.parameters_of(fresh))
    torch.testing.assert_close(theta, inf.parameters_of(trained), rtol=1e-9, atol=1e-12)
    # reproducible, and the influence's own model is never touched
    torch.testing.assert_close(retrainer.refit(inf, ids, start=inf.parameters_of(fresh)), theta)
    torch.testing.assert_close(inf.theta, inf.parameters_of(fresh))
    # model_at gives a copy with those weights
    model = inf.model_at(theta)
    torch.testing.assert_close(inf.parameters_of(model), theta)
    assert not model.training


def test_bad_retrainer_settings_and_shapes_are_refused(digits_small):
    with pytest.raises(ConfigError, match="grad_tol"):
        LBFGSRetrainer(grad_tol=0)
    with pytest.raises(ConfigError, match="epochs"):
        AdamRetrainer(epochs=0)
    model = MLP(64, (8,), 10).double()
    inf = Influence(model, ClassificationTask(), digits_small.train)
    with pytest.raises(ConfigError, match="start must have shape"):
        AdamRetrainer(epochs=1).refit(inf, start=torch.zeros(3))
    with pytest.raises(DataError, match="does not have this model's parameters"):
        inf.parameters_of(MLP(64, (9,), 10))


def test_adam_trajectory_holds_the_checkpoints_of_the_same_run(digits_small):
    task = ClassificationTask(weight_decay=1e-3)
    torch.manual_seed(0)
    model = MLP(64, (4,), 10).double()
    inf = Influence(model, task, digits_small.train)
    adam = AdamRetrainer(epochs=3, lr=1e-2, batch_size=100, seed=2)
    path = adam.trajectory(inf, None, None, [1, 3])
    torch.testing.assert_close(path[1], adam.refit(inf), rtol=0, atol=0)
    torch.testing.assert_close(path[0], AdamRetrainer(epochs=1, lr=1e-2, batch_size=100, seed=2).refit(inf))
    with pytest.raises(ConfigError, match="epochs must increase"):
        adam.trajectory(inf, None, None, [3, 1])
    with pytest.raises(ConfigError, match="epochs must increase"):
        adam.trajectory(inf, None, None, [4])
