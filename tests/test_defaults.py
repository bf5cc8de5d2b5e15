"""Defaults a user meets first: ``Influence(model, task, train)`` without an estimator returns finite
scores on networks, chosen by :func:`influencer.choose_estimator` and stated with the reason; an
explicit estimator keeps its own settings and errors."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn

from influencer import CG, EKFAC, ClassificationTask, Exact, ExactOrCG, Influence, choose_estimator
from influencer.datasets import load_digits
from influencer.errors import IndefiniteHessianError
from influencer.estimators import SpectralDamping
from influencer.models import SmallCNN
from influencer.training import train_minibatch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_on_an_mlp_with_weight_decay_is_the_undamped_gauss_newton_solve(
    mlp_small, digits_small, caplog
):
    model, task = mlp_small
    train, test = digits_small.train, (digits_small.x_test[:3], digits_small.y_test[:3])
    with caplog.at_level(logging.INFO, logger="influencer"):
        inf = Influence(model, task, train).fit()
        scores = inf.scores(test)
    # Weight decay makes the Gauss-Newton matrix positive definite: undamped, by CG for 3 columns.
    assert inf.estimator == ExactOrCG() and inf.curvature_kind == "gauss_newton"
    reason = inf.settings()["curvature"]["chosen_by_default"]
    assert (
        reason == inf.choice.reason
        and "910 parameters <= 3000, Gauss-Newton matrix positive definite" in reason
    )
    assert reason in caplog.text and torch.isfinite(scores).all()
    assert inf.solver.info["method"] == "cg" and inf.solver.info["damping"] == 0
    # The undamped exact answer, to CG's tolerance.
    explicit = Influence(model, task, train, estimator=Exact(), curvature="gauss_newton").fit()
    assert (
        float(torch.linalg.eigvalsh(explicit.solver.hessian)[0]) > 0 and explicit.solver.info["damping"] == 0
    )
    torch.testing.assert_close(scores, explicit.scores(test), rtol=1e-6, atol=1e-10)


def test_default_without_weight_decay_is_exact_damped_where_singular(mlp_small, digits_small):
    model, _ = mlp_small
    task = ClassificationTask()  # no weight decay: a network's Gauss-Newton matrix may be singular
    train, test = digits_small.train, (digits_small.x_test[:3], digits_small.y_test[:3])
    inf = Influence(model, task, train)
    assert isinstance(inf.estimator, Exact) and inf.curvature_kind == "gauss_newton"
    assert "910 parameters <= 3000: Exact on the dense Gauss-Newton" in inf.choice.reason
    assert torch.isfinite(inf.fit().scores(test)).all()


def test_the_hessian_asked_for_is_exact_damped_from_its_spectrum_when_indefinite(mlp_small, digits_small):
    model, task = mlp_small
    train, test = digits_small.train, (digits_small.x_test[:3], digits_small.y_test[:3])
    inf = Influence(model, task, train, curvature="hessian")
    assert inf.choice is not None and isinstance(inf.estimator, Exact)  # the default, on the Hessian
    scores = inf.fit().scores(test)
    assert torch.isfinite(scores).all() and "damped so that its smallest eigenvalue" in inf.choice.reason
    # The damping lifts the Hessian's smallest eigenvalue to 0.1 x its mean |eigenvalue| (undamped).
    h = inf.solver.hessian  # (p, p) float64
    values = torch.linalg.eigvalsh(h)
    assert values[0] < 0
    damping = inf.solver.info["damping"]
    assert float(values[0]) + damping == pytest.approx(0.1 * float(values.abs().mean()), rel=1e-8)
    # Same scores as the explicit estimator with that damping.
    explicit = Influence(model, task, train, estimator=Exact(damping=damping)).fit().scores(test)
    torch.testing.assert_close(scores, explicit, rtol=1e-9, atol=1e-13)


def test_default_on_a_convex_model_is_the_undamped_influence_function(logistic_small, digits_small):
    model, task = logistic_small
    train, test = digits_small.train, digits_small.test
    inf = Influence(model, task, train).fit()
    assert inf.estimator == ExactOrCG() and inf.solver.info["damping"] == 0.0
    reference = Influence(model, task, train, estimator=CG(tol=1e-12)).fit().scores(test)
    # The default's CG stops at tol 1e-8: its scores agree to that relative level.
    torch.testing.assert_close(
        inf.scores(test), reference, rtol=1e-6, atol=1e-7 * float(reference.abs().max())
    )


@pytest.fixture(scope="module")
def cnn():
    digits = load_digits(dtype=torch.float64, images=True)
    train, test = (digits.x_train[:200], digits.y_train[:200]), (digits.x_test[:4], digits.y_test[:4])
    torch.manual_seed(0)
    task = ClassificationTask(weight_decay=1e-3)
    model = SmallCNN().double()
    train_minibatch(model, task, train, epochs=3, lr=1e-2, batch_size=32)
    return model, task, train, test


def test_default_on_a_cnn_is_ekfac_with_gauss_newton_and_relative_damping(cnn):
    model, task, train, test = cnn
    inf = Influence(model, task, train)
    assert inf.p == 5050 and inf.curvature_kind == "gauss_newton"
    assert inf.estimator == EKFAC(relative_damping=0.1, fisher="exact")
    assert "5050 parameters > 3000: EK-FAC" in inf.settings()["curvature"]["chosen_by_default"]
    scores = inf.fit().scores(test)
    assert scores.shape == (4, 200) and torch.isfinite(scores).all()
    explicit = Influence(
        model, task, train, estimator=EKFAC(relative_damping=0.1, fisher="exact"), curvature="gauss_newton"
    )
    assert torch.equal(explicit.fit().scores(test), scores)
    assert "chosen_by_default" not in explicit.settings()["curvature"]


class Bare(nn.Module):
    """No Linear/Conv layer: EK-FAC cannot model it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 50) * 0.1)
        self.v = nn.Parameter(torch.randn(50, 10) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w) @ self.v


def test_default_without_supported_layers_is_cg_on_gauss_newton_damped_by_the_mean_eigenvalue(
    digits_small, tmp_path
):
    torch.manual_seed(0)
    model, task = Bare().double(), ClassificationTask(weight_decay=1e-3)
    train, test = digits_small.train, (digits_small.x_test[:3], digits_small.y_test[:3])
    choice = choose_estimator(model, task, train)
    assert choice.curvature == "gauss_newton" and isinstance(choice.estimator, SpectralDamping)
    assert "no Linear/Conv layer" in choice.reason
    inf = Influence(model, task, train).fit()
    scores = inf.scores(test)
    assert torch.isfinite(scores).all()
    # The damping is 0.1 x trace(G)/p estimated with sign probes: within 20% of the dense trace here.
    dense = inf.curvature_product(torch.eye(inf.p, dtype=torch.float64))
    damping = inf.solver.info["damping"]
    assert abs(damping / (0.1 * float(dense.trace()) / inf.p) - 1) < 0.2
    explicit = Influence(model, task, train, estimator=CG(damping=damping), curvature="gauss_newton").fit()
    torch.testing.assert_close(explicit.scores(test), scores, rtol=1e-6, atol=1e-12)
    inf.save(tmp_path)  # the damping found at fit time is saved with it
    loaded = Influence.load(tmp_path, model, task, train)
    assert loaded.solver.info["damping"] == damping and torch.equal(loaded.scores(test), scores)


def test_choice_follows_the_parameters_and_curvature_asked_for(cnn):
    model, task, train, _ = cnn
    head = choose_estimator(model, task, train, params=["head"])
    assert head.params == ["head.weight", "head.bias"] and isinstance(head.estimator, ExactOrCG)
    assert isinstance(
        choose_estimator(model, task, train, params=["head"], curvature="hessian").estimator, Exact
    )
    assert choose_estimator(model, task, train, params=["head"], curvature="gauss_newton").curvature == (
        "gauss_newton"
    )
    asked = choose_estimator(model, task, train, curvature="hessian")
    assert asked.curvature == "hessian" and "the Hessian was asked for" in asked.reason
    # replace() with another estimator is no longer the default's choice
    inf = Influence(model, task, train, params=["head"])
    assert "chosen_by_default" in inf.settings()["curvature"]
    assert "chosen_by_default" not in inf.replace(estimator=CG()).settings()["curvature"]


def test_an_explicit_cg_keeps_the_paper_behaviour_and_names_the_fix(mlp_small, digits_small):
    model, task = mlp_small
    train, test = digits_small.train, (digits_small.x_test[:3], digits_small.y_test[:3])
    inf = Influence(model, task, train, estimator=CG())
    assert inf.choice is None and inf.curvature_kind == "hessian" and inf.estimator == CG()
    with pytest.raises(IndefiniteHessianError, match="CG met negative curvature") as refused:
        inf.fit().scores(test)
    assert "Increase damping" in str(refused.value) and "curvature='gauss_newton'" in str(refused.value)
    with pytest.raises(IndefiniteHessianError, match=r"pass damping > [0-9.e-]+ \(e.g. damping=") as exact:
        Influence(model, task, train, estimator=Exact()).fit()
    damping = float(re.search(r"e\.g\. damping=([0-9.e+-]+)\)", str(exact.value)).group(1))
    fixed = Influence(model, task, train, estimator=CG(damping=damping)).fit().scores(test)
    assert torch.isfinite(fixed).all()
