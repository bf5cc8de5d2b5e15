"""Linear datamodeling score (Park et al. 2023) against real retraining on random subsets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from influencer import ClassificationTask, Exact, Identity, Influence, RegressionTask
from influencer.errors import ConfigError, DataError
from influencer.retraining import AdamRetrainer, ChainedRetrainer, LBFGSRetrainer
from influencer.retraining_cache import CachedRetrainer
from influencer.training import train_lbfgs
from influencer.uses.validation import (
    choose_damping,
    curvature_scale,
    draw_subsets,
    lds,
    linear_datamodeling_score,
    retrain_on_subsets,
)


class PredictionTask(RegressionTask):
    """Ridge regression whose test measurement is the prediction itself (linear in theta)."""

    def measurement(self, model, batch):
        return self.outputs(model, batch).reshape(-1)


@pytest.fixture(scope="module")
def parity(digits_small):
    """Even vs odd digits: 300 training and 20 test images (binary, so refits are quick)."""
    return (digits_small.x_train, digits_small.y_train % 2), (digits_small.x_test, digits_small.y_test % 2)


@pytest.fixture(scope="module")
def logistic(parity, one_thread):
    torch.manual_seed(0)
    task = ClassificationTask(weight_decay=1e-2)
    model = train_lbfgs(nn.Linear(64, 2).double(), task, parity[0])
    return Influence(model, task, parity[0], estimator=Exact()).fit()


@pytest.fixture(scope="module")
def logistic_retraining(logistic, parity):
    return retrain_on_subsets(logistic, parity[1], subsets=12, alpha=0.5, seed=3)


def test_exact_influence_has_a_high_lds_and_random_scores_none(logistic, logistic_retraining, parity):
    scores = logistic.scores(parity[1])
    result = linear_datamodeling_score(scores, logistic_retraining)
    assert result.correlations.shape == (20,)
    assert result.mean >= 0.9, result.summary()
    assert result.interval[0] <= result.mean <= result.interval[1]
    assert result.interval[0] >= 0.85
    # A random attribution predicts nothing: its LDS is ~0, and its interval is far below exact's.
    noise = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    baseline = linear_datamodeling_score(noise, logistic_retraining)
    assert abs(baseline.mean) < 0.2, baseline.summary()
    assert baseline.interval[1] < result.interval[0]
    # Predictions add up the scores of the examples each subset leaves out.
    left_out = ~logistic_retraining.kept[4]
    np.testing.assert_allclose(result.predicted[4], scores.numpy()[:, left_out].sum(1), rtol=1e-12)
    # The sign convention matters: negated scores anti-correlate.
    flipped = linear_datamodeling_score(-scores, logistic_retraining)
    np.testing.assert_allclose(flipped.correlations, -result.correlations, atol=1e-12)
    summary = result.summary()
    assert summary["subsets"] == 12 and summary["alpha"] == 0.5 and summary["undefined"] == 0


def test_lds_of_ridge_is_first_order_exact_in_the_removed_fraction():
    """Ridge regression with a linear measurement (the prediction): retraining without the ids
    ``U`` moves theta by exactly ``H_S^-1 (1/|S|) G_U``, and the scores' sum ``(1/n) H^-1 G_U``
    differs from it by first-order terms in the removed fraction ``q`` (``n/|S| = 1/(1-q)``) plus
    the removed examples' leverage (``~p/n``, small here)."""
    g = torch.Generator().manual_seed(0)
    n, p, lam = 400, 5, 0.1
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = x @ torch.randn(p, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        n, generator=g, dtype=torch.float64
    )
    test = (torch.randn(20, p, generator=g, dtype=torch.float64), torch.zeros(20, dtype=torch.float64))
    task = PredictionTask(weight_decay=lam)
    model = train_lbfgs(nn.Linear(p, 1, bias=False).double(), task, (x, y))
    inf = Influence(model, task, (x, y), estimator=Exact()).fit()
    scores = inf.scores(test).numpy()
    errors = {}
    for alpha in (0.8, 0.95):
        r = retrain_on_subsets(inf, test, subsets=6, alpha=alpha, seed=1)
        for k in range(3):  # the retraining is the closed form
            s = torch.from_numpy(r.kept[k])
            xs, ys = x[s], y[s]
            w = torch.linalg.solve(
                xs.T @ xs / len(xs) + lam * torch.eye(p, dtype=x.dtype), xs.T @ ys / len(xs)
            )
            expected = test[0] @ w - test[0] @ inf.theta
            np.testing.assert_allclose(r.actual[k], expected.numpy(), rtol=1e-7, atol=1e-10)
        predicted, actual = r.predicted(scores), r.actual
        q = 1 - r.kept[0].mean()
        errors[alpha] = float(np.linalg.norm(predicted - actual) / np.linalg.norm(actual))
        assert errors[alpha] < 1.2 * q + 0.02, (alpha, errors[alpha])
        # the n/|S| factor (exact to first order in the example weights) leaves only the leverage
        rescaled = float(np.linalg.norm(predicted / (1 - q) - actual) / np.linalg.norm(actual))
        assert rescaled < min(errors[alpha], 0.06), (alpha, rescaled)
        assert linear_datamodeling_score(scores, r).mean > 0.95
    assert errors[0.95] < errors[0.8] / 2.5, errors  # the error shrinks with the removed fraction


def test_lds_is_deterministic_by_seed_and_cached(logistic, parity, tmp_path):
    test = (parity[1][0][:6], parity[1][1][:6])
    a = lds(logistic, test, subsets=5, seed=7, cache=tmp_path / "refits")
    entries = sorted(p.name for p in (tmp_path / "refits").glob("*.npy"))
    assert len(entries) == 6  # the full refit and five subsets
    b = lds(logistic, test, subsets=5, seed=7, cache=tmp_path / "refits")  # read back, not retrained
    assert sorted(p.name for p in (tmp_path / "refits").glob("*.npy")) == entries
    np.testing.assert_array_equal(a.kept, b.kept)
    np.testing.assert_array_equal(a.actual, b.actual)
    np.testing.assert_array_equal(a.correlations, b.correlations)
    c = lds(logistic, test, subsets=5, seed=8)
    assert not np.array_equal(a.kept, c.kept)
    kept = draw_subsets(300, 5, 0.5, seed=7)
    np.testing.assert_array_equal(kept, a.kept)
    assert (kept.sum(1) == 150).all()


def test_several_seeds_from_scratch_are_averaged(digits_small, tmp_path):
    """A network retrained from fresh initialisations: per-seed measurements are kept and averaged."""
    x, y = digits_small.train
    task = ClassificationTask(weight_decay=1e-3)

    def init(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10)).double()

    recipe = AdamRetrainer(epochs=2, lr=1e-2, batch_size=100)
    base = init(0)
    inf = Influence(base, task, (x[:120], y[:120]))
    test = (digits_small.x_test[:4], digits_small.y_test[:4])
    r = retrain_on_subsets(inf, test, subsets=3, alpha=0.5, retrain=recipe, start=init, seeds=(0, 1))
    assert r.measurements.shape == (3, 2, 4) and r.full.shape == (2, 4)
    assert not np.allclose(r.measurements[:, 0], r.measurements[:, 1])  # the seeds differ
    np.testing.assert_allclose(r.actual, r.measurements.mean(1) - r.full.mean(0))
    # each model is the recipe with that seed from that initialisation
    ids = torch.arange(120)[torch.from_numpy(r.kept[2])]
    theta = recipe.with_seed(1).refit(inf, ids, inf.parameters_of(init(1)))
    np.testing.assert_allclose(r.measurements[2, 1], inf.measurements(test, theta).numpy(), rtol=1e-10)


def test_cached_retrainer_keys_and_refuses_foreign_directories(logistic, tmp_path):
    ids = torch.arange(0, 300, 2)
    counting = CountingRetrainer()
    cached = CachedRetrainer(counting, tmp_path / "c")
    first = cached.refit(logistic, ids)
    again = cached.refit(logistic, ids)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert counting.calls == [len(ids)]
    cached.refit(logistic, ids[:-1])  # other ids: another entry
    cached.refit(logistic, ids, logistic.theta + 1e-3)  # another start: another entry
    assert counting.calls == [len(ids), len(ids) - 1, len(ids)]
    # a corrupt entry is recomputed
    for entry in (tmp_path / "c").glob("*.npy"):
        entry.write_bytes(b"not an array")
    cached.refit(logistic, ids)
    assert len(counting.calls) == 4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError, match="not a retraining cache"):
        CachedRetrainer(counting, tmp_path / "other")


@dataclasses.dataclass(frozen=True)
class CountingRetrainer(LBFGSRetrainer):
    calls: list = dataclasses.field(default_factory=list, init=False, compare=False)

    def refit(self, influence, ids=None, start=None):
        self.calls.append(len(influence.train.check_indices(ids)))
        return super().refit(influence, ids, start)


def test_retrainer_settings_and_seeds():
    adam = AdamRetrainer(epochs=3)
    assert adam.with_seed(5).seed == 5 and adam.with_seed(5).settings()["seed"] == 5
    assert LBFGSRetrainer().with_seed(5) == LBFGSRetrainer()
    chain = ChainedRetrainer((adam, LBFGSRetrainer(newton_steps=0)))
    assert chain.with_seed(2).steps[0].seed == 2
    assert chain.settings()["steps"][1]["newton_steps"] == 0
    with pytest.raises(ConfigError, match="Retrainer steps"):
        ChainedRetrainer(())


def test_bad_lds_inputs_are_refused(logistic, logistic_retraining, parity):
    with pytest.raises(ConfigError, match="alpha"):
        draw_subsets(10, 5, 1.0)
    with pytest.raises(ConfigError, match="subsets must be"):
        draw_subsets(10, 2, 0.5)
    with pytest.raises(ConfigError, match="same model"):
        retrain_on_subsets(logistic, parity[1], subsets=3, seeds=(0, 1))
    with pytest.raises(DataError, match="shape"):
        linear_datamodeling_score(np.zeros((3, 300)), logistic_retraining)
    with pytest.raises(DataError, match="NaN"):
        linear_datamodeling_score(np.full((20, 300), np.nan), logistic_retraining)


def test_curvature_scale_is_the_mean_eigenvalue(logistic):
    dense = logistic.curvature_product(torch.eye(logistic.p, dtype=torch.float64))  # (p, p)
    mean_eigenvalue = float(torch.trace(dense)) / logistic.p
    off_diagonal = float((dense**2).sum() - (dense.diagonal() ** 2).sum())
    sd = (2 * off_diagonal / 64) ** 0.5 / logistic.p  # Hutchinson's spread with Rademacher probes
    estimate = curvature_scale(logistic, probes=64)
    assert abs(estimate - mean_eigenvalue) < 4 * sd, (estimate, mean_eigenvalue, sd)
    assert sd < 0.2 * mean_eigenvalue  # the check above is not vacuous


def test_choose_damping_prefers_what_retraining_confirms(logistic, logistic_retraining, parity):
    choice = choose_damping(logistic, parity[1], logistic_retraining, [1e-4, 30.0])
    # a damping far above the curvature turns influence into a gradient dot product: less faithful
    assert choice.damping == 1e-4 and choice.lds[0] > choice.lds[1] + 0.05, choice.summary()
    relative = choose_damping(logistic, parity[1], logistic_retraining, relative=(1e-2, 1.0))
    assert relative.scale == pytest.approx(curvature_scale(logistic))
    assert relative.candidates == pytest.approx((1e-2 * relative.scale, relative.scale))
    with pytest.raises(ConfigError, match="no damping to choose"):
        choose_damping(logistic.replace(estimator=Identity()), parity[1], logistic_retraining)
