"""Ensembles: influence averaged over independently trained models or checkpoints."""

from __future__ import annotations

import pytest
import torch

from influencer import CG, EKFAC, ClassificationTask, Influence
from influencer.ensemble import Ensemble
from influencer.errors import ConfigError, DataError
from influencer.models import MLP
from influencer.training import train_minibatch


@pytest.fixture(scope="module")
def trained(digits_small, one_thread):
    """Three MLPs trained on the same data from three seeds."""
    task = ClassificationTask(weight_decay=1e-2)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = MLP(64, (6,), 10).double()
        train_minibatch(model, task, digits_small.train, epochs=5, lr=1e-2, batch_size=50, seed=seed)
        models.append(model)
    return task, models


def _influence(model, task, data):
    return Influence(model, task, data, estimator=EKFAC(damping=1e-3), curvature="gauss_newton")


def test_ensemble_is_the_weighted_mean_of_its_members(trained, digits_small):
    task, models = trained
    members = [_influence(m, task, digits_small.train) for m in models]
    test = digits_small.test
    each = [m.fit().scores(test) for m in members]
    ens = Ensemble(members, weights=[1.0, 2.0, 1.0]).fit()
    assert ens.weights == (0.25, 0.5, 0.25) and len(ens) == 3 and ens.n == 300
    torch.testing.assert_close(ens.scores(test), 0.25 * each[0] + 0.5 * each[1] + 0.25 * each[2])
    torch.testing.assert_close(ens.scores(test, [5, 2]), ens.scores(test)[:, [5, 2]])
    selfs = [m.self_influence(range(10)) for m in members]
    torch.testing.assert_close(
        ens.self_influence(range(10)), 0.25 * selfs[0] + 0.5 * selfs[1] + 0.25 * selfs[2]
    )
    # one member: its own scores, unchanged
    torch.testing.assert_close(Ensemble(members[:1]).scores(test), each[0], rtol=0, atol=0)
    assert len(ens.settings()["members"]) == 3 and ens.settings()["weights"] == [0.25, 0.5, 0.25]


def test_from_checkpoints_shares_the_settings(trained, digits_small):
    task, models = trained
    base = _influence(models[0], task, digits_small.train)
    thetas = torch.stack([base.parameters_of(m) for m in models])
    ens = Ensemble.from_checkpoints(base, thetas).fit()
    assert all(m.estimator == base.estimator and m.curvature_kind == "gauss_newton" for m in ens.members)
    torch.testing.assert_close(ens.members[2].theta, thetas[2])
    direct = _influence(models[2], task, digits_small.train).fit().scores(digits_small.test)
    torch.testing.assert_close(ens.members[2].scores(digits_small.test), direct)
    expected = (
        sum(_influence(m, task, digits_small.train).fit().scores(digits_small.test) for m in models) / 3
    )
    torch.testing.assert_close(ens.scores(digits_small.test), expected)


def test_bad_ensembles_are_refused(trained, digits_small):
    task, models = trained
    a = Influence(models[0], task, digits_small.train, estimator=CG(damping=1e-2))
    x, y = digits_small.train
    other = Influence(models[1], task, (x[:200], y[:200]), estimator=CG(damping=1e-2))
    with pytest.raises(DataError, match="other training data"):
        Ensemble([a, other])
    with pytest.raises(ConfigError, match="at least one"):
        Ensemble([])
    with pytest.raises(ConfigError, match="weights"):
        Ensemble([a, a], weights=[1.0, -1.0])
    with pytest.raises(ConfigError, match="2 members"):
        Ensemble([a, a], weights=[1.0])
    with pytest.raises(ConfigError, match="Influence objects"):
        Ensemble([a, "model"])
    with pytest.raises(ConfigError, match="fit"):
        Ensemble([a]).scores(digits_small.test)
