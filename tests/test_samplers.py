"""Hessian samplers: exact sizes, determinism, exact stratum counts, variance, pluggability."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from influencer import CG, ClassificationTask, Influence
from influencer.datasets import load_digits
from influencer.errors import ConfigError
from influencer.models import MLP
from influencer.samplers import (
    SAMPLERS,
    ClassStratifiedSampler,
    FeatureSampler,
    LogitSampler,
    RandomSampler,
    SamplerContext,
    StratifiedSampler,
    draw_stratified,
    kmeans,
    largest_remainder,
    make_sampler,
    register_sampler,
)
from influencer.samplers.logits import confidence
from influencer.training import train_minibatch
from influencer.uses.unlearning import ClassRemoval


@pytest.fixture(scope="module")
def setup():
    """An MLP trained on 600 digits; the pool excludes class 0 (as when that class is removed)."""
    d = load_digits()
    x, y = d.x_train[:600], d.y_train[:600]
    torch.manual_seed(0)
    task = ClassificationTask(weight_decay=1e-3)
    model = MLP(64, (16,), 10)
    train_minibatch(model, task, (x, y), epochs=12, lr=1e-2, batch_size=64)
    pool = torch.nonzero(y != 0).reshape(-1)
    return model, task, (x, y), SamplerContext(model, task, (x, y), pool=pool)


def test_largest_remainder_is_exact():
    gen = torch.Generator().manual_seed(0)
    # quotas 4.2, 2.1, 0.7: floors 4, 2, 0 and the one draw left goes to the largest remainder
    assert largest_remainder(torch.tensor([60, 30, 10]), 7, gen).tolist() == [4, 2, 1]
    assert largest_remainder(torch.tensor([5, 5]), 10, gen).tolist() == [5, 5]
    for trial in range(200):
        counts = torch.randint(1, 40, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen)
        size = int(torch.randint(0, int(counts.sum()) + 1, (1,), generator=gen))
        a = largest_remainder(counts, size, gen)
        quota = size * counts.double() / counts.sum()
        assert int(a.sum()) == size, trial
        assert bool(((a == quota.floor()) | (a == quota.ceil())).all()) and bool((a <= counts).all())


def test_draw_stratified_takes_the_allocation_without_replacement():
    strata = torch.tensor([2, 0, 1, 2, 2, 0, 1, 2, 0, 2])
    allocation = torch.tensor([2, 0, 3])
    picks = draw_stratified(strata, allocation, torch.Generator().manual_seed(3))
    assert len(torch.unique(picks)) == len(picks) == 5
    assert torch.bincount(strata[picks], minlength=3).tolist() == [2, 0, 3]


@pytest.mark.parametrize("name", ["random", "class", "feature", "logit"])
def test_select_is_exact_sorted_deterministic_and_in_the_pool(setup, name):
    _, _, _, context = setup
    sampler = make_sampler(name)
    for size in (1, 9, 37, context.n_pool):
        ids = sampler.select(context, size, seed=5)
        assert len(ids) == size and ids.dtype == torch.int64
        assert torch.equal(ids, torch.unique(ids))  # sorted and distinct
        assert bool(torch.isin(ids, context.pool).all())
        assert torch.equal(ids, sampler.select(context, size, seed=5))
    assert not torch.equal(sampler.select(context, 37, seed=0), sampler.select(context, 37, seed=1))


def test_class_strata_counts_are_exact_and_random_counts_are_not(setup):
    _, _, (_, y), context = setup
    counts = torch.bincount(y[context.pool], minlength=10)
    size = 50
    quota = size * counts.double() / counts.sum()
    stratified, random = [], []
    for seed in range(10):
        stratified.append(
            torch.bincount(y[ClassStratifiedSampler().select(context, size, seed)], minlength=10)
        )
        random.append(torch.bincount(y[RandomSampler().select(context, size, seed)], minlength=10))
    for c in stratified:
        assert c[0] == 0  # never outside the pool
        assert bool(((c == quota.floor()) | (c == quota.ceil())).all())
    # Class counts never vary across seeds under stratification; a random subset's do.
    assert torch.stack(stratified).double().var(0).sum() == 0
    assert torch.stack(random).double().var(0).sum() > 1


def test_logit_sampler_takes_one_point_per_confidence_quantile(setup):
    _, _, _, context = setup
    _, conf = confidence(context.logits())
    size = 24
    rank = torch.empty(context.n_pool, dtype=torch.int64)
    rank[torch.argsort(conf, stable=True)] = torch.arange(context.n_pool)
    bin_of = rank * size // context.n_pool  # equal-count confidence quantiles of the pool
    for seed in range(5):
        ids = LogitSampler(by_class=False).select(context, size, seed)
        positions = torch.searchsorted(context.pool, ids)
        assert torch.bincount(bin_of[positions], minlength=size).tolist() == [1] * size


def test_logit_sampler_by_class_follows_predicted_class_proportions(setup):
    _, _, _, context = setup
    predicted, _ = confidence(context.logits())
    counts = torch.bincount(predicted, minlength=10)
    size = 60
    quota = size * counts.double() / counts.sum()
    ids = LogitSampler(by_class=True).select(context, size, seed=2)
    got = torch.bincount(predicted[torch.searchsorted(context.pool, ids)], minlength=10)
    assert int(got.sum()) == size
    assert bool((got - quota).abs().max() < 1.5)  # per-class bins round to whole numbers of draws


def test_logit_sampler_lowers_the_variance_of_the_sampled_curvature(setup):
    """Across seeds, the subset's last-layer Gauss-Newton trace varies far less than a random subset's.

    That trace, ``mean_i tr(diag(p_i) - p_i p_i^T) (||h_i||^2 + 1)``, is exactly the trace of the
    output layer's block of the subset's curvature ``H_S``; confidence quantiles (alone, or within
    predicted classes) are near-homogeneous strata for it. Seeds are fixed, so this is repeatable.
    """
    _, _, _, context = setup
    probs = torch.softmax(context.logits().double(), dim=1)
    h = context.features().double()  # input of the output layer
    trace = (1 - (probs * probs).sum(1)) * ((h * h).sum(1) + 1)  # (n_pool,) per-example traces

    def spread(sampler):
        means = [
            trace[torch.searchsorted(context.pool, sampler.select(context, 30, s))].mean() for s in range(30)
        ]
        return float(torch.stack(means).var())

    random = spread(RandomSampler())
    assert spread(LogitSampler(by_class=False)) < 0.35 * random
    assert spread(LogitSampler(by_class=True)) < 0.6 * random


def test_feature_sampler_allocates_exactly_by_cluster(setup):
    _, _, _, context = setup
    sampler = FeatureSampler(clusters=6)
    size = 40
    labels = sampler.strata(context, size, torch.Generator().manual_seed(0))
    _, strata, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    quota = size * counts.double() / counts.sum()
    for seed in range(4):
        ids = sampler.select(context, size, seed)
        got = torch.bincount(strata[torch.searchsorted(context.pool, ids)], minlength=len(counts))
        assert int(got.sum()) == size
        assert bool(((got == quota.floor()) | (got == quota.ceil())).all())
    # The clustering is a property of the data: the same for every seed.
    assert torch.equal(labels, sampler.strata(context, size, torch.Generator().manual_seed(9)))


def test_features_are_captured_at_the_named_layer(setup):
    model, _, (x, _), context = setup
    xs = x[context.pool]
    with torch.no_grad():
        hidden = model[0](xs)
        torch.testing.assert_close(context.features("0", "output"), hidden)
        torch.testing.assert_close(context.features(), torch.tanh(hidden))  # input of the head
        torch.testing.assert_close(context.features(""), xs)  # the raw input
        torch.testing.assert_close(context.logits(), model(xs))
    with pytest.raises(ConfigError, match="no submodule named 'head'"):
        context.features("head")


def test_kmeans_recovers_separated_blobs():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(50)
    points = centers[truth] + torch.randn(150, 2, generator=gen)
    labels, found = kmeans(points, 3, torch.Generator().manual_seed(1))
    # the same partition up to renaming: each true blob maps to one cluster and vice versa
    pairs = torch.unique(truth * 3 + labels)
    assert len(pairs) == 3
    assert torch.cdist(found, centers).min(1).values.max() < 1.0


def test_bad_sizes_and_names_are_refused(setup):
    _, _, _, context = setup
    for size in (0, context.n_pool + 1, 2.5, True):
        with pytest.raises(ConfigError):
            RandomSampler().select(context, size)
    with pytest.raises(ConfigError, match="unknown sampler"):
        make_sampler("nearest")
    with pytest.raises(ConfigError):
        FeatureSampler(dims=0)
    with pytest.raises(ConfigError):
        LogitSampler(per_stratum=0.5)


@dataclasses.dataclass(frozen=True)
class InputNormSampler(StratifiedSampler):
    """A user's sampler: equal-count strata of the input norm."""

    strata_count: int = 5
    name = "input-norm"

    def strata(self, context, size, generator):
        norms = context.features("").norm(dim=1)
        rank = torch.empty_like(norms, dtype=torch.int64)
        rank[torch.argsort(norms)] = torch.arange(len(norms))
        return rank * self.strata_count // len(norms)


def test_a_user_defined_sampler_works_end_to_end(setup):
    model, task, train, context = setup
    register_sampler(InputNormSampler)
    try:
        sampler = make_sampler("input-norm", strata_count=4)
        ids = sampler.select(context, 20, seed=0)
        assert len(ids) == 20 and bool(torch.isin(ids, context.pool).all())
        inf = Influence(
            model, task, train, estimator=CG(damping=1e-2), curvature="gauss_newton", hessian_indices=ids
        )
        inf.fit()
        assert torch.equal(inf.curvature.indices, ids)
        shared = SamplerContext.from_influence(inf, pool=context.pool)
        assert torch.equal(sampler.select(shared, 20, seed=0), ids)
        removal = ClassRemoval(
            Influence(model, task, train, estimator=CG(damping=0.1, tol=1e-2), curvature="gauss_newton"), 0
        )
        update = removal.sampled_update(sampler, 20, seed=0)
        assert torch.equal(update.hessian_ids, ids)
    finally:
        SAMPLERS.pop("input-norm", None)


def test_a_sampler_returning_duplicates_is_refused(setup):
    _, _, _, context = setup

    @dataclasses.dataclass(frozen=True)
    class Broken(RandomSampler):
        def choose(self, context, size, generator):
            return torch.zeros(size, dtype=torch.int64)

    with pytest.raises(ConfigError, match="distinct"):
        Broken().select(context, 3)
