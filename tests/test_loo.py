"""Leave-one-out retraining validation on real data (Koh & Liang 2017, Fig. 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from influencer import CG, ClassificationTask, Exact, Influence, SmoothHingeTask
from influencer._kernel.functional import ModelFunction
from influencer.data import as_examples
from influencer.plotting import plot_loo
from influencer.training import fit_lbfgs
from influencer.uses.validation import leave_one_out


def fit(model: nn.Module, task, train) -> nn.Module:
    fn = ModelFunction(model, task)
    fn.load_into(fit_lbfgs(fn, as_examples(train)))
    return model


@pytest.fixture(scope="module")
def digits_logistic(digits):
    torch.manual_seed(0)
    task = ClassificationTask(weight_decay=1e-3)
    model = fit(nn.Linear(64, 10).double(), task, digits.train)
    return model, task


def test_digits_logistic_regression_loo_pearson_at_least_098(digits, digits_logistic, tmp_path):
    model, task = digits_logistic
    inf = Influence(model, task, digits.train, estimator=Exact()).fit()
    losses = task.loss(model, digits.test).detach()
    j = int(losses.argsort(descending=True)[3])  # a badly predicted test digit: large influences
    result = leave_one_out(inf, (digits.x_test[j : j + 1], digits.y_test[j : j + 1]), k=50)
    assert result.pearson >= 0.98, result.summary()
    assert result.spearman >= 0.9, result.summary()
    assert result.optimum_shift < 1e-6
    # predictions are on the scale of the real changes, with the same sign convention
    slope = float(np.dot(result.predicted, result.actual) / np.dot(result.actual, result.actual))
    assert 0.7 < slope < 1.3
    png = plot_loo(result, tmp_path / "loo.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loo_with_cg_and_helpful_selection(digits, digits_logistic):
    model, task = digits_logistic
    inf = Influence(model, task, digits.train, estimator=CG(tol=1e-10)).fit()
    result = leave_one_out(inf, (digits.x_test[:1], digits.y_test[:1]), k=10, select="helpful")
    assert (result.predicted > 0).all()
    assert (result.actual > 0).all()  # removing a helpful point really raises the test loss
    assert result.pearson >= 0.95


def test_smooth_hinge_svm_loo(digits):
    """Binary SVM (digits 1 vs 7) with the smooth hinge and L2: influence tracks LOO retraining,
    less closely as the hinge sharpens (t -> 0), as in Koh & Liang's Fig. 3."""
    keep = (digits.y_train == 1) | (digits.y_train == 7)
    x = digits.x_train[keep]
    y = torch.where(digits.y_train[keep] == 1, 1.0, -1.0).double()
    tkeep = (digits.y_test == 1) | (digits.y_test == 7)
    xt, yt = digits.x_test[tkeep], torch.where(digits.y_test[tkeep] == 1, 1.0, -1.0).double()
    pearsons = {}
    for t in (0.5, 0.1):
        task = SmoothHingeTask(temperature=t, weight_decay=1e-2)
        torch.manual_seed(0)
        model = fit(nn.Linear(64, 1).double(), task, (x, y))
        inf = Influence(model, task, (x, y), estimator=Exact()).fit()
        j = int(task.loss(model, (xt, yt)).detach().argmax())  # the worst test point
        pearsons[t] = leave_one_out(inf, (xt[j : j + 1], yt[j : j + 1]), k=20).pearson
    assert pearsons[0.5] >= 0.98, pearsons
    assert pearsons[0.1] >= 0.9, pearsons
    assert pearsons[0.5] > pearsons[0.1], pearsons
