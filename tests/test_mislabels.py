"""Finding and fixing flipped labels: rankings, the simulation, and its settings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from influencer import ClassificationTask, Exact, Influence
from influencer.datasets import load_digits, load_tabular
from influencer.errors import ConfigError, DataError
from influencer.models import LogisticRegression
from influencer.models.kernels import RBFKernelModel
from influencer.training import train_lbfgs
from influencer.uses.mislabels import rank_for_review, training_losses
from reproductions.mislabels import MislabelConfig, flip_labels, simulate_fixing, subsample


@pytest.fixture(scope="module")
def digits():
    return subsample(load_digits(dtype=torch.float64), 200, seed=0)


def test_flip_labels():
    y = torch.arange(10).repeat(30)
    noisy, ids = flip_labels(y, 0.1, seed=4)
    assert len(ids) == 30 and torch.equal(ids, ids.sort().values)
    changed = torch.nonzero(noisy != y).reshape(-1)
    assert torch.equal(changed, ids)  # exactly the listed ids changed, each to another class
    assert set(noisy.tolist()) <= set(range(10))
    assert len(set(noisy[ids].tolist())) > 3  # to random classes, not one fixed shift
    assert torch.equal(flip_labels(y, 0.1, seed=4)[0], noisy)
    signed = torch.tensor([-1, 1] * 50)
    noisy_signed, ids = flip_labels(signed, 0.2, seed=0)
    assert torch.equal(noisy_signed[ids], -signed[ids])
    with pytest.raises(ConfigError):
        flip_labels(y, 0.0)
    with pytest.raises(DataError, match="single class"):
        flip_labels(torch.zeros(10, dtype=torch.long), 0.1)


def test_rankings_order_the_scores():
    wine = load_tabular("wine", dtype=torch.float64)
    x, y = wine.train
    model = LogisticRegression(x.shape[1], 3).double()
    task = ClassificationTask(weight_decay=1e-2)
    train_lbfgs(model, task, (x, y), dtype=torch.float64, grad_tol=1e-7, newton_steps=0)
    inf = Influence(model, task, (x, y), estimator=Exact()).fit()
    si = inf.self_influence()
    order = rank_for_review(inf, "self_influence")
    assert torch.equal(order, torch.argsort(si, descending=True, stable=True))
    with torch.no_grad():
        losses = F.cross_entropy(model(x), y, reduction="none")
    torch.testing.assert_close(training_losses(inf), losses)
    assert torch.equal(rank_for_review(inf, "loss"), torch.argsort(losses, descending=True, stable=True))
    rand = rank_for_review(inf, "random", seed=1)
    assert torch.equal(rand.sort().values, torch.arange(len(y)))
    assert torch.equal(rand, rank_for_review(inf, "random", seed=1))
    with pytest.raises(ConfigError, match="strategy"):
        rank_for_review(inf, "gradient_norm")  # type: ignore[arg-type]


def test_self_influence_finds_flips_that_loss_and_random_miss(digits):
    """A kernel model partly fits the flipped labels; self-influence still singles them out."""
    x = digits.x_train

    def make_model(seed: int) -> RBFKernelModel:
        return RBFKernelModel.from_data(x, 10, landmarks=50, gamma=0.5, seed=seed).double()

    config = MislabelConfig(check_fractions=(0.1, 0.2), seeds=(0, 1))
    res = simulate_fixing(make_model, ClassificationTask(weight_decay=1e-3), digits, config)
    assert res.found.shape == res.accuracy.shape == (3, 2, 2)
    si, loss, rand = (res.mean_found(s) for s in ("self_influence", "loss", "random"))
    # At 10% and 20% checked (10% flipped): self-influence finds most flips, far more than either baseline.
    assert (si >= 0.75).all(), si
    assert (si > loss + 0.2).all(), (si, loss)
    assert (si > rand + 0.4).all(), (si, rand)
    assert (rand < 0.45).all()  # checking 20% at random finds about 20% of the flips
    # Fixing what self-influence finds recovers test accuracy at least as well as the baselines.
    acc = {s: res.mean_accuracy(s) for s in res.strategies}
    assert acc["self_influence"][-1] >= res.noisy_accuracy.mean()
    assert acc["self_influence"][-1] >= max(acc["loss"][-1], acc["random"][-1])
    assert res.clean_accuracy.mean() > res.noisy_accuracy.mean()
    assert set(res.summary()["strategies"]) == {"self_influence", "loss", "random"}
    assert "self_influence" in res.format_table()


def test_plot(digits, tmp_path):
    import numpy as np

    from reproductions.mislabels import MislabelResult

    found = np.random.default_rng(0).uniform(size=(3, 2, 2))
    res = MislabelResult(
        np.array([0.1, 0.2]),
        ("self_influence", "loss", "random"),
        (0, 1),
        found,
        found,
        np.ones(2),
        np.ones(2),
        0.1,
    )
    path = res.plot(tmp_path / "fix.png")
    assert path.exists() and path.stat().st_size > 10_000


def test_config_validation():
    with pytest.raises(ConfigError, match="flip_fraction"):
        MislabelConfig(flip_fraction=1.5)
    with pytest.raises(ConfigError, match="increasing"):
        MislabelConfig(check_fractions=(0.2, 0.1))
    with pytest.raises(ConfigError, match="strategies"):
        MislabelConfig(strategies=("loss", "oracle"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="seeds"):
        MislabelConfig(seeds=(1, 1))
    with pytest.raises(ConfigError, match="n_train"):
        subsample(load_digits(), 10_000)


def test_self_influence_ranking_shows_progress_when_asked(capsys):
    wine = load_tabular("wine", dtype=torch.float64)
    model = LogisticRegression(wine.x_train.shape[1], 3).double()
    task = ClassificationTask(weight_decay=1e-2)
    train_lbfgs(model, task, wine.train, dtype=torch.float64, grad_tol=1e-7, newton_steps=0)
    inf = Influence(model, task, wine.train, estimator=Exact(), batch_size=40).fit()
    quiet = rank_for_review(inf)
    assert "self-influence" not in capsys.readouterr().err
    shown = rank_for_review(inf, progress=True)
    assert "self-influence" in capsys.readouterr().err  # a bar over the training chunks
    assert torch.equal(shown, quiet) and inf.progress is None  # the Influence itself is unchanged
    loud = Influence(model, task, wine.train, estimator=Exact(), batch_size=40, progress=True).fit()
    rank_for_review(loud)
    assert "self-influence" in capsys.readouterr().err
