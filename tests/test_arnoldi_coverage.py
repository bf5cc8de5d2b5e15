"""Arnoldi says when its low-rank inverse misses the spectrum: a rank-50 inverse of an MLP on
MNIST-1D (where it scores below plain gradient dot products) warns, a rank close to p does not."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from influencer import Arnoldi, ClassificationTask, Influence
from influencer.estimators.arnoldi import dropped_share
from influencer.training import train_minibatch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist1d():
    pytest.importorskip("mnist1d")
    from influencer.datasets import load_mnist1d

    return load_mnist1d(600, dtype=torch.float64)


def trained_mlp(split, hidden: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(40, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10)
        ).double()
    train_minibatch(
        model, ClassificationTask(weight_decay=1e-3), split.train, epochs=20, lr=3e-3, batch_size=64
    )
    return model


def arnoldi_warnings(split, model, curvature, rank=None, iterations=None):
    p = sum(q.numel() for q in model.parameters())
    estimator = Arnoldi(rank=rank or p, iterations=iterations or p, damping=1e-3)
    inf = Influence(
        model, ClassificationTask(weight_decay=1e-3), split.train, estimator=estimator, curvature=curvature
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inf.fit().scores((split.x_test[:20], split.y_test[:20]))
    return [
        str(w.message) for w in caught if w.category is RuntimeWarning and "Arnoldi" in str(w.message)
    ], inf


def test_low_rank_inverse_of_an_mlp_warns(mnist1d):
    found, inf = arnoldi_warnings(mnist1d, trained_mlp(mnist1d, 32), "hessian", rank=50, iterations=100)
    assert len(found) == 1 and "does not capture the spectrum" in found[0] and "Raise rank" in found[0]
    info = inf.solver.info
    assert info["spectrum_captured"] is False and info["cut_ratio"] > 0.05
    assert info["dropped_share_bound"] >= 0.5 and 0.1 < info["outside_fraction"] < 1


@pytest.mark.parametrize("fraction", [1.0, 0.9])
def test_rank_close_to_p_is_quiet(mnist1d, fraction):
    model = trained_mlp(mnist1d, 4)  # p = 214
    p = sum(q.numel() for q in model.parameters())
    found, inf = arnoldi_warnings(mnist1d, model, "gauss_newton", rank=int(fraction * p), iterations=p)
    assert found == [] and "spectrum_captured" not in inf.solver.info


def test_dropped_share_is_a_lower_bound():
    """On a diagonal H the dropped share is known: the bound never exceeds it."""
    gen = torch.Generator().manual_seed(0)
    lam = torch.logspace(0, -3, 40, dtype=torch.float64)
    v = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    damping = 1e-3
    for rank in (5, 20, 39):
        exact = (v[:, rank:] ** 2 / (lam[rank:] + damping)).sum(1) / (v**2 / (lam + damping)).sum(1)
        outside, bound = dropped_share(lam[:rank], v[:, :rank], (v**2).sum(1), damping)
        torch.testing.assert_close(outside, (v[:, rank:] ** 2).sum(1) / (v**2).sum(1))
        assert (bound <= exact + 1e-12).all() and (bound > 0).all()
