"""The true Fisher of K-FAC/EK-FAC from sampled labels: unbiased, converging at the Monte-Carlo rate.

Oracles: the exact expectation over all labels (``fisher="exact"``), and each example's output
Hessian computed by automatic differentiation of the task's loss (``output_hessian_factor``).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from influencer import EKFAC, KFAC, ClassificationTask, Influence
from influencer._kernel.curvature import Curvature
from influencer._kernel.functional import ModelFunction
from influencer.data import as_examples
from influencer.estimators.kronecker import covariance_factors, find_layers, output_hessian_factor
from influencer.tasks import CausalLMTask

F64 = torch.float64


@pytest.fixture(scope="module")
def mlp_curvature(digits_small) -> Curvature:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    fn = ModelFunction(model, ClassificationTask(), None, dtype=F64)
    data = as_examples((digits_small.x_train[:200], digits_small.y_train[:200]))
    return Curvature(fn, fn.theta0, data, kind="gauss_newton", batch_size=200)


def test_sampled_labels_converge_to_the_exact_expectation_as_one_over_sqrt_samples(mlp_curvature):
    """With S labels per example the factors S are a mean of S independent unbiased estimates, so
    their RMS error over seeds falls as 1/sqrt(S): a log-log slope of -1/2 from 1 to 64 samples.
    A bias would flatten the curve; a wrong weight (e.g. a missing 1/S) would bend it upwards."""
    layers = find_layers(mlp_curvature.fn)
    exact = [s for _, s in covariance_factors(mlp_curvature, layers, "exact")]
    norm2 = sum(float(e.pow(2).sum()) for e in exact)
    counts, rms = (1, 4, 16, 64), []
    for samples in counts:
        errors = []
        for seed in range(6):
            got = covariance_factors(mlp_curvature, layers, "sampled", samples, seed)
            errors.append(
                sum(float((s - e).pow(2).sum()) for (_, s), e in zip(got, exact, strict=True)) / norm2
            )
        rms.append(math.sqrt(sum(errors) / len(errors)))
    logs, logr = torch.tensor(counts, dtype=F64).log(), torch.tensor(rms, dtype=F64).log()
    slope = float(((logs - logs.mean()) * (logr - logr.mean())).sum() / (logs - logs.mean()).pow(2).sum())
    assert -0.6 < slope < -0.4, (slope, rms)  # measured: -0.51 (rms 0.21, 0.097, 0.050, 0.025)
    assert 0.7 < rms[-1] * math.sqrt(64) / rms[0] < 1.4  # the 1/sqrt(S) constant, end to end
    assert rms[-1] < 0.05


def _hessian_from(directions: torch.Tensor, samples: int | None) -> torch.Tensor:
    """``(B, D, D)``: the directions' summed (exact) or averaged (sampled) outer products."""
    h = directions @ directions.mT
    return h if samples is None else h / samples


def test_classification_directions_give_the_output_hessian_with_ignored_and_soft_labels():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, dtype=F64, generator=gen)
    hard = ClassificationTask(ignore_index=-1)
    labels = torch.tensor([0, 3, -1, 2, 1])
    soft = torch.softmax(torch.randn(5, 4, dtype=F64, generator=gen), dim=1) * 0.5  # total 0.5
    for task, batch in ((hard, (None, labels)), (ClassificationTask(), (None, soft))):
        reference = output_hessian_factor(SimpleNamespace(task=task), logits, batch)
        reference = reference @ reference.mT  # (B, C, C) by automatic differentiation
        exact = _hessian_from(task.fisher_directions(logits, batch, None, gen), None)
        torch.testing.assert_close(exact, reference, rtol=1e-12, atol=1e-14)
        samples = 20_000
        sampled = _hessian_from(task.fisher_directions(logits, batch, samples, gen), samples)
        rel = float((sampled - reference).norm() / reference.norm())
        assert rel < 0.03  # Monte-Carlo error ~ 1/sqrt(20,000) per entry


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_language_model_sampled_tokens_give_the_output_hessian(reduction):
    """One next token sampled per scored position: positions are independent given the inputs,
    padding and ``-100`` labels get no direction, and ``mean`` weighs a token by 1/count."""
    gen = torch.Generator().manual_seed(1)
    batch, t, v = 2, 4, 3
    logits = torch.randn(batch, t, v, dtype=F64, generator=gen)
    ids = torch.tensor([[0, 2, 1, 1], [2, 0, 1, 0]])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]),
        "labels": torch.tensor([[0, 2, -100, 1], [2, 0, 1, 0]]),
    }
    task = CausalLMTask(reduction=reduction)
    factor = output_hessian_factor(SimpleNamespace(task=task), logits, inputs)
    reference = factor @ factor.mT  # (B, T*V, T*V)
    samples = 20_000
    directions = task.fisher_directions(logits, inputs, samples, gen)
    assert directions.shape == (batch, t * v, samples)
    sampled = _hessian_from(directions, samples)
    assert float((sampled - reference).norm() / reference.norm()) < 0.03
    # Unscored positions (the -100 label, the token after padding, the last position) get nothing.
    per_position = directions.reshape(batch, t, v, samples).abs().amax(dim=(2, 3))
    assert per_position[0, 1] == 0 and per_position[1, 0] == 0 and (per_position[:, -1] == 0).all()
    assert task.fisher_directions(logits, inputs, None, gen) is None  # exact: T * V passes, refused


def test_auto_fisher_is_chosen_by_the_number_of_outputs_and_stated(digits_small):
    """``fisher="auto"`` (the default) takes the exact expectation for at most two outputs per
    example and one sampled label otherwise; settings state the rule, ``info`` what was used."""
    x, y = digits_small.x_train[:120], digits_small.y_train[:120]
    torch.manual_seed(0)
    ten = nn.Linear(64, 10).double()
    binary = nn.Linear(64, 2).double()
    task = ClassificationTask(weight_decay=1e-2)
    settings = KFAC().settings()
    assert settings["fisher"] == "auto" and settings["exact_max_outputs"] == 2
    assert "at most 2 outputs per example" in settings["fisher_used"]
    for estimator in (KFAC(damping=1e-3), EKFAC(damping=1e-3)):
        info = Influence(ten, task, (x, y), estimator=estimator).fit().solver.info
        assert (info["fisher"], info["outputs_per_example"], info["fisher_samples"]) == ("sampled", 10, 1)
        info = Influence(binary, task, (x, y % 2), estimator=estimator).fit().solver.info
        assert (info["fisher"], info["outputs_per_example"]) == ("exact", 2)
    # The same model with exact_max_outputs=10 takes the exact expectation: the same factors.
    auto = Influence(ten, task, (x, y), estimator=KFAC(damping=1e-3, exact_max_outputs=10)).fit()
    exact = Influence(ten, task, (x, y), estimator=KFAC(damping=1e-3, fisher="exact")).fit()
    assert auto.solver.info["fisher"] == "exact"
    for (a1, s1), (a2, s2) in zip(auto.solver.factors, exact.solver.factors, strict=True):
        assert torch.equal(a1, a2) and torch.equal(s1, s2)
