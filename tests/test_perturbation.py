"""I_pert,loss: against finite differences, a double-backward loop, and real retraining."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from influencer import ClassificationTask, Exact, Influence, Task
from influencer._kernel.functional import ModelFunction
from influencer.data import as_examples
from influencer.datasets import Split, load_digits, load_tabular
from influencer.errors import DataError
from influencer.models import MLP, LogisticRegression, SmallCNN
from influencer.training import fit_lbfgs
from influencer.uses.perturbation import (
    PatchedExamples,
    PerturbationInfluence,
    feature_rank,
    replace_input,
    top_features,
)
from reproductions.perturbation import check_perturbation

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def wine() -> Split:
    return load_tabular("wine", dtype=torch.float64)


@pytest.fixture(scope="module")
def fitted(wine: Split) -> Influence:
    """Multinomial logistic regression at its optimum (float64) with exact influence."""
    torch.manual_seed(0)
    task = ClassificationTask(weight_decay=1e-2)
    model = LogisticRegression(13, 3).double()
    fn = ModelFunction(model, task)
    fn.load_into(fit_lbfgs(fn, as_examples(wine.train)))
    return Influence(model, task, wine.train, estimator=Exact()).fit()


def loop_reference(inf: Influence, directions: Tensor, ids: list[int]) -> Tensor:
    """``-(1/n) grad_x (s . grad_theta loss)`` by double backward, one example and direction at a time."""
    x_all, y_all = inf.train.take(torch.tensor(ids))
    theta = inf.theta.clone().requires_grad_(True)
    out = torch.zeros(len(directions), len(ids), *x_all.shape[1:], dtype=torch.float64)
    for c in range(len(ids)):
        x = x_all[c : c + 1].clone().requires_grad_(True)
        loss = inf.fn.loss(theta, (x, y_all[c : c + 1])).sum()
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        for j, s in enumerate(directions):
            out[j, c] = torch.autograd.grad(g @ s, x, retain_graph=True)[0][0]
    return -out / inf.n


def test_matches_double_backward_loop(fitted: Influence, wine: Split) -> None:
    test = (wine.x_test[:3], wine.y_test[:3])
    ids = list(range(0, fitted.n, 9))
    effects = PerturbationInfluence(fitted).effects(test, ids)  # (3, c, 13)
    reference = loop_reference(fitted, fitted.test_directions(test), ids)
    assert effects.shape == (3, len(ids), 13)
    torch.testing.assert_close(effects, reference, rtol=1e-10, atol=1e-14)


def test_is_minus_input_gradient_of_the_score(fitted: Influence, wine: Split) -> None:
    """Central differences of score_i = s . g_i / n in x_i (theta, s fixed) give -effect."""
    test = (wine.x_test[:2], wine.y_test[:2])
    s = fitted.test_directions(test)  # (2, p)
    ids = [3, 50, 120]
    effects = PerturbationInfluence(fitted).effects_from_directions(s, ids)
    x, y = fitted.train.take(torch.tensor(ids))
    h = 1e-5
    numeric = torch.zeros_like(effects)
    for j in range(13):
        step = torch.zeros_like(x)
        step[:, j] = h
        up = fitted.fn.loss_grads(fitted.theta, (x + step, y)) @ s.T / fitted.n  # (c, 2)
        down = fitted.fn.loss_grads(fitted.theta, (x - step, y)) @ s.T / fitted.n
        numeric[:, :, j] = -((up - down) / (2 * h)).T
    torch.testing.assert_close(effects, numeric, rtol=1e-6, atol=1e-11)


def test_predicts_retrained_test_loss(fitted: Influence, wine: Split) -> None:
    """Moving x_i by delta and retraining to the optimum changes the test loss by effect . delta."""
    test = (wine.x_test[:1], wine.y_test[:1])
    pert = PerturbationInfluence(fitted)
    effects = pert.effects(test)[0]  # (n, 13)
    fn = fitted.fn
    x, y = wine.train

    def retrained_test_loss(i: int, delta: Tensor) -> float:
        moved = x.clone()
        moved[i] += delta
        theta = fit_lbfgs(
            fn, as_examples((moved, y)), theta0=fitted.theta, inverse_hessian=fitted.solver.solve
        )
        return float(fn.measurement(theta, test)[0])

    for i in effects.abs().sum(1).topk(2).indices.tolist():
        # Along the ascent direction the test loss must rise; the first-order prediction must match
        # the (central) retrained difference to well below the size of the effect.
        delta = 1e-3 * effects[i] / effects[i].norm()
        actual = (retrained_test_loss(i, delta) - retrained_test_loss(i, -delta)) / 2
        predicted = float((effects[i] * delta).sum())
        assert predicted > 0
        assert actual == pytest.approx(predicted, rel=1e-4)
        # A random direction too (either sign).
        rnd = torch.randn(13, generator=torch.Generator().manual_seed(i), dtype=torch.float64) * 1e-3
        actual = (retrained_test_loss(i, rnd) - retrained_test_loss(i, -rnd)) / 2
        assert actual == pytest.approx(float((effects[i] * rnd).sum()), rel=1e-3, abs=1e-12)


def test_scales_and_signs_agree(fitted: Influence, wine: Split) -> None:
    test = (wine.x_test[:2], wine.y_test[:2])
    pert = PerturbationInfluence(fitted)
    effects = pert.effects(test)
    torch.testing.assert_close(pert.influence_pert_loss(test), fitted.n * effects)
    attribution = pert.attribution(test, torch.arange(fitted.n))
    torch.testing.assert_close(attribution.score_gradient, -effects)
    torch.testing.assert_close(attribution.gradient_x_input, -effects * wine.x_train)


def test_batch_size_invariance(fitted: Influence, wine: Split) -> None:
    test = (wine.x_test[:4], wine.y_test[:4])
    s = fitted.test_directions(test)
    small = PerturbationInfluence(fitted, batch_size=7).effects_from_directions(s)
    large = PerturbationInfluence(fitted, batch_size=1000).effects_from_directions(s)
    chunks = list(PerturbationInfluence(fitted, batch_size=50).mixed_chunks(s))
    assert [len(ids) for ids, _ in chunks] == [50, 50, fitted.n - 100]
    torch.testing.assert_close(small, large, rtol=1e-12, atol=1e-16)
    torch.testing.assert_close(torch.cat([m for _, m in chunks], 1), -fitted.n * small)


class DictTask(Task):
    """Cross-entropy on dict batches {"pixels": x, "target": y}."""

    def outputs(self, model: nn.Module, batch: dict) -> Tensor:
        return model(batch["pixels"])

    def output_loss(self, outputs: Tensor, batch: dict) -> Tensor:
        return nn.functional.cross_entropy(outputs, batch["target"], reduction="none")

    def regularizer(self, params: dict) -> Tensor:
        return 0.5e-2 * sum((p * p).sum() for p in params.values())


def test_custom_input_leaf(fitted: Influence, wine: Split) -> None:
    """A dict batch with the input under a key gives the same I_pert as the tuple batch."""
    model = nn.Linear(13, 3).double()
    model.load_state_dict(fitted.fn.model.state_dict())
    data = {"pixels": wine.x_train, "target": wine.y_train}
    inf = Influence(model, DictTask(), data, estimator=Exact()).fit()
    test = {"pixels": wine.x_test[:2], "target": wine.y_test[:2]}
    mine = PerturbationInfluence(inf, input="pixels").effects(test)
    theirs = PerturbationInfluence(fitted).effects((wine.x_test[:2], wine.y_test[:2]))
    torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-14)
    with pytest.raises(DataError, match="cannot find the input"):
        PerturbationInfluence(inf, input="x")


def test_through_frozen_features_and_nonlinear_models() -> None:
    """A CNN with influence over its head only, and a tanh MLP: I_pert back-propagates through both."""
    d = load_digits(images=True, dtype=torch.float64)
    x, y = d.x_train[:60], d.y_train[:60]
    torch.manual_seed(0)
    cnn = SmallCNN(10, channels=4).double()
    task = ClassificationTask(weight_decay=1e-2)
    inf = Influence(cnn, task, (x, y), params=["head"], estimator=Exact(damping=1e-3)).fit()
    test = (d.x_test[:2], d.y_test[:2])
    ids = [0, 17, 42]
    effects = PerturbationInfluence(inf).effects(test, ids)
    assert effects.shape == (2, 3, 1, 8, 8)
    torch.testing.assert_close(effects, loop_reference(inf, inf.test_directions(test), ids))

    mlp = MLP(64, (8,), 10).double()
    flat = (x.reshape(60, 64), y)
    inf = Influence(mlp, task, flat, estimator=Exact(damping=1e-2), curvature="gauss_newton").fit()
    test = (d.x_test[:2].reshape(2, 64), d.y_test[:2])
    effects = PerturbationInfluence(inf).effects(test, ids)
    torch.testing.assert_close(effects, loop_reference(inf, inf.test_directions(test), ids))


class EmbeddingBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(self.embed(ids).mean(1))


class Rounding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(13, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.round(x))


def test_clear_errors_for_inputs_without_gradient(wine: Split) -> None:
    task = ClassificationTask(weight_decay=1e-2)
    tokens = torch.randint(0, 20, (30, 5), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (30,), generator=torch.Generator().manual_seed(1))
    inf = Influence(EmbeddingBag().double(), task, (tokens, labels))  # I_pert checks before fit()
    with pytest.raises(DataError, match=r"dtype torch\.int64.*floating"):
        PerturbationInfluence(inf)
    fitted = Influence(LogisticRegression(13, 3).double(), task, wine.train)
    with pytest.raises(DataError, match=r"input at \(1,\)"):
        PerturbationInfluence(fitted, input=1)  # the labels
    rounding = Influence(Rounding().double(), task, wine.train)
    with pytest.raises(DataError, match="zero gradient with respect to the input"):
        PerturbationInfluence(rounding)


def test_feature_ranking_helpers() -> None:
    attr = torch.tensor([[0.1, -3.0, 2.0, 0.0], [5.0, 1.0, -1.5, 0.5]])
    ids, values = top_features(attr, 2)
    assert ids.tolist() == [[1, 2], [0, 2]]
    assert values.tolist() == [[-3.0, 2.0], [5.0, -1.5]]
    assert feature_rank(attr, 2).tolist() == [2, 2]
    images = attr.reshape(2, 1, 2, 2)
    assert feature_rank(images, 0, feature_dims=3).tolist() == [3, 1]


def test_patched_examples_replace_only_their_rows(wine: Split) -> None:
    data = as_examples(wine.train)
    new = torch.full((2, 13), 7.0, dtype=torch.float64)
    patched = PatchedExamples(data, [5, 2], new)
    x, y = patched.take(torch.tensor([1, 2, 5, 6]))
    assert torch.equal(x[1], new[1]) and torch.equal(x[2], new[0])
    assert torch.equal(x[0], wine.x_train[1]) and torch.equal(x[3], wine.x_train[6])
    assert torch.equal(y, wine.y_train[[1, 2, 5, 6]])
    assert replace_input({"a": 1, "b": (2, 3)}, ("b", 0), 9) == {"a": 1, "b": (9, 3)}
    with pytest.raises(DataError, match="once"):
        PatchedExamples(data, [1, 1], torch.zeros(2, 13))


def test_check_perturbation_against_retraining(fitted: Influence, wine: Split, tmp_path: Path) -> None:
    test = (wine.x_test[:1], wine.y_test[:1])
    pert = PerturbationInfluence(fitted)
    check = check_perturbation(pert, test, k=4, size=1e-3, direction="sign")
    assert check.train_ids.size == 4 and (check.delta_norm == pytest.approx(1e-3))
    assert (check.predicted > 0).all() and (check.actual > 0).all()  # sign steps ascend the test loss
    np.testing.assert_allclose(check.actual, check.predicted, rtol=5e-3)
    grid = check_perturbation(pert, test, [0, 1], size=0.25, direction="random", grid=0.1)
    assert grid.delta_norm.tolist() == pytest.approx([0.2, 0.2])  # 0.25 rounded toward zero onto the grid
    with pytest.raises(DataError, match="outside bounds"):
        check_perturbation(pert, test, [0, 1], bounds=(0.0, 1.0))  # standardised features are not in [0, 1]
    assert check.plot(tmp_path / "check.png").read_bytes()[:4] == b"\x89PNG"
