"""RBF-kernel models, and comparing two models' influence against input-space distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influencer import CG, Exact, Influence, SmoothHingeTask
from influencer.errors import ConfigError, DataError
from influencer.models.kernels import RBFKernelModel, median_gamma
from influencer.training import objective_and_grad, train_lbfgs
from influencer.uses.comparison import compare_models
from reproductions.comparison import (
    DigitsComparisonConfig,
    digits_comparison,
    plot_comparison,
    two_class_digits,
)


@pytest.fixture(scope="module")
def pair():
    return two_class_digits((1, 7))


def test_rbf_features_and_median_gamma(pair):
    x = pair.x_train.reshape(len(pair.x_train), -1)[:50]
    model = RBFKernelModel.from_data(x, 3, gamma=0.7).double()
    z = pair.x_test[:4]  # images (4, 1, 8, 8) are flattened to match the centres
    expected = torch.exp(-0.7 * ((z.reshape(4, 1, -1) - x[None]) ** 2).sum(-1))
    torch.testing.assert_close(model.features(z), expected, rtol=1e-10, atol=1e-12)
    assert model(z).shape == (4, 3)
    assert [n for n, _ in model.named_parameters()] == ["head.weight", "head.bias"]  # centres are a buffer
    d2 = torch.cdist(x, x) ** 2
    off = d2[~torch.eye(50, dtype=torch.bool)]
    assert median_gamma(x) == pytest.approx(1 / float(off.median()), rel=1e-9)
    small = RBFKernelModel.from_data(x, 1, landmarks=10, seed=3)
    assert small.centers.shape == (10, 64)
    assert all(any(torch.equal(c, r) for r in x) for c in small.centers)  # landmarks are training points
    with pytest.raises(ConfigError, match="gamma"):
        RBFKernelModel(x, 1, gamma=0.0)
    with pytest.raises(ConfigError, match="landmarks"):
        RBFKernelModel.from_data(x, 1, landmarks=51)
    with pytest.raises(DataError, match="features"):
        model.features(torch.zeros(2, 10, dtype=torch.float64))


def test_rbf_svm_trains_to_the_optimum_and_estimators_agree(pair):
    x = pair.x_train.reshape(len(pair.x_train), -1)[:120]
    y = 2 * pair.y_train[:120] - 1
    model = RBFKernelModel.from_data(x, 1, gamma=1.0).double()
    task = SmoothHingeTask(temperature=0.1, weight_decay=1e-3)
    train_lbfgs(model, task, (x, y))
    inf = Influence(model, task, (x, y), estimator=Exact()).fit()
    _, g = objective_and_grad(inf.fn, inf.theta, inf.train, torch.arange(120), 1024)
    assert float(g.abs().max()) < 1e-9  # a minimum, as influence assumes
    test = (pair.x_test[:3].reshape(3, -1), 2 * pair.y_test[:3] - 1)
    exact = inf.scores(test)
    cg = Influence(model, task, (x, y), estimator=CG(tol=1e-10, max_iter=2000)).fit().scores(test)
    torch.testing.assert_close(cg, exact, rtol=1e-5, atol=1e-9 * float(exact.abs().max()))


@pytest.fixture(scope="module")
def comparison():
    return digits_comparison(DigitsComparisonConfig(n_test=12, cnn_epochs=15))


def test_rbf_influence_is_local_and_cnn_influence_is_not(comparison):
    """Koh & Liang's Fig. 1: the RBF SVM's helpful examples are near in pixel space, the CNN's are not."""
    result, _ = comparison
    rbf, cnn = result.stats["rbf_svm"], result.stats["cnn"]
    assert rbf.accuracy >= 0.9 and cnn.accuracy >= 0.9
    # The RBF model's top helpful images lie in the nearest few percent of the training set ...
    assert rbf.top_distance_percentile < 0.2
    assert rbf.top_near_fraction > 0.25
    assert rbf.top_same_label > 0.95
    # ... while the CNN's are spread over the data (a random pick sits at percentile 0.5).
    assert cnn.top_distance_percentile > rbf.top_distance_percentile + 0.15
    assert cnn.top_near_fraction < rbf.top_near_fraction - 0.15
    # And the RBF model's |influence| is concentrated near the test input.
    assert rbf.near_mass > cnn.near_mass + 0.1
    assert rbf.half_mass_fraction < cnn.half_mass_fraction


def test_comparison_scores_and_statistics_are_consistent(comparison):
    result, data = comparison
    m, n = len(result.test_labels), len(result.train_labels)
    assert result.distances.shape == (m, n)
    flat_train = data.x_train.reshape(n, -1)
    torch.testing.assert_close(
        torch.as_tensor(result.distances[2, 5]), (data.x_test[2].reshape(-1) - flat_train[5]).norm()
    )
    for name in result.names:
        s = result.scores[name]
        assert s.shape == (m, n) and np.isfinite(s).all()
        top = result.top_helpful(name, 0)
        assert len(top) == result.k and s[0, top].min() >= np.delete(s[0], top).max()
    assert set(result.summary()["models"]) == {"rbf_svm", "cnn"}
    assert "rbf_svm" in result.format_table()


def test_plot(comparison, tmp_path):
    result, data = comparison
    m = len(result.test_labels)
    path = plot_comparison(
        result, tmp_path / "cmp.png", images=(data.x_train, data.x_test[:m]), class_names=data.classes
    )
    assert path.exists() and path.stat().st_size > 20_000


def test_compare_models_refuses_mismatched_inputs(pair):
    x = pair.x_train.reshape(len(pair.x_train), -1)[:40]
    y = 2 * pair.y_train[:40] - 1
    model = RBFKernelModel.from_data(x, 1, gamma=1.0).double()
    task = SmoothHingeTask(weight_decay=1e-2)
    train_lbfgs(model, task, (x, y))
    inf = Influence(model, task, (x, y), estimator=Exact()).fit()
    test = (pair.x_test[:2].reshape(2, -1), 2 * pair.y_test[:2] - 1)
    with pytest.raises(ConfigError, match="one entry per model"):
        compare_models({"a": inf}, {"b": test}, x, y, test[0], test[1])
    with pytest.raises(DataError, match="same data"):
        compare_models({"a": inf}, {"a": test}, pair.x_train[:41], pair.y_train[:41], test[0], test[1])
    with pytest.raises(ConfigError, match="near_fraction"):
        compare_models({"a": inf}, {"a": test}, x, y, test[0], test[1], near_fraction=1.0)
    with pytest.raises(ConfigError, match="two different digits"):
        two_class_digits((3, 3))
