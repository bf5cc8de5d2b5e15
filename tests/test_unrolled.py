"""Unrolled attribution: metagradients through the training run against independent references."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from influencer import ClassificationTask, Exact, Influence, Unrolled
from influencer.errors import ConfigError
from influencer.retraining import AdamRetrainer, SGDRetrainer
from influencer.unrolled import Extrapolation
from influencer.validation import lds

TASK = ClassificationTask(weight_decay=1e-2)


def data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def mlp(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def trained(recipe, train, init: nn.Module, task=TASK) -> nn.Module:
    """A copy of ``init`` trained by ``recipe`` (the model an unrolled attribution explains)."""
    model = mlp()
    model.load_state_dict(init.state_dict())
    inf = Influence(model, task, train)
    inf.fn.load_into(recipe.refit(inf, start=inf.parameters_of(init)))
    return model


RECIPES = [
    AdamRetrainer(epochs=2, lr=1e-2, batch_size=16, seed=3),
    AdamRetrainer(epochs=2, lr=1e-2, batch_size=16, seed=3, weight_decay=1e-3, schedule="cosine", warmup=2),
    SGDRetrainer(epochs=2, lr=0.1, batch_size=16, momentum=0.9, seed=3, schedule="linear", weight_decay=1e-3),
]


@pytest.mark.parametrize("recipe", RECIPES, ids=["adam", "adam-schedule", "sgd-momentum"])
def test_metagradient_equals_float64_autograd_through_the_steps(recipe):
    train, test = data(40), data(3, seed=9)
    init = mlp()
    model = trained(recipe, train, init)
    scores = Unrolled(model, TASK, train, recipe=recipe, start=init).fit().scores(test)

    # Reference: plain autograd through every step, the weights a leaf, the whole graph kept.
    fn = Influence(model, TASK, train).fn
    w = torch.ones(40, dtype=torch.float64, requires_grad=True)
    plan = recipe.plan(torch.arange(40))
    state = recipe.initial_state(torch.cat([p.detach().reshape(-1) for p in init.parameters()]))
    state = (state[0].requires_grad_(True), *state[1:])
    for t, ids in enumerate(plan):
        objective = fn.objective(state[0], fn.prepare((train[0][ids], train[1][ids])), 1 / len(ids), w[ids])
        (g,) = torch.autograd.grad(objective, state[0], create_graph=True)
        state = recipe.update(state, g, t, len(plan))
    torch.testing.assert_close(state[0].detach(), fn.theta0, rtol=0, atol=1e-12)  # the same run
    reference = torch.stack([
        -torch.autograd.grad(fn.measurement(state[0], (test[0][j : j + 1], test[1][j : j + 1])).sum(), w,
                             retain_graph=True)[0]
        for j in range(3)
    ])  # fmt: skip
    assert reference.abs().max() > 1e-3  # a real signal, not zeros
    torch.testing.assert_close(scores, reference, rtol=1e-9, atol=1e-13)


def test_full_batch_gradient_descent_to_convergence_matches_exact_influence():
    train, test = data(60), data(4, seed=5)
    task = ClassificationTask(weight_decay=1e-1)
    torch.manual_seed(0)
    init = nn.Linear(5, 3).double()
    recipe = SGDRetrainer(epochs=150, lr=1.5, batch_size=60)  # full batch: one step per epoch
    model = nn.Linear(5, 3).double()
    inf = Influence(model, task, train, estimator=Exact())
    inf = inf.replace(theta=recipe.refit(inf, start=inf.parameters_of(init)))
    inf.fn.load_into(inf.theta)
    gradient = inf.fn.loss_grads(inf.theta, inf.train.take(torch.arange(60))).mean(0)
    assert gradient.abs().max() < 1e-10  # converged
    exact = Influence(model, task, train, estimator=Exact()).fit().scores(test)
    unrolled = Unrolled(model, task, train, recipe=recipe, start=init).fit().scores(test)
    for j in range(4):
        r = torch.corrcoef(torch.stack([exact[j], unrolled[j]]))[0, 1]
        assert r >= 0.99
    torch.testing.assert_close(unrolled, exact, rtol=1e-6, atol=1e-9)  # equal, not only correlated


def test_replay_verification_and_refusal():
    train = data(40)
    init, recipe = mlp(), RECIPES[0]
    model = trained(recipe, train, init)
    fitted = Unrolled(model, TASK, train, recipe=recipe, start=init).fit()
    assert fitted.replay_difference == 0.0  # the same operations: the same bits
    with pytest.raises(ConfigError, match=r"does not reproduce the model: .* = 0\.0[0-9]+ away"):
        Unrolled(model, TASK, train, recipe=recipe.with_seed(4), start=init).fit()  # another data order
    with torch.no_grad():
        model[0].bias.add_(1e-2)
    with pytest.raises(ConfigError, match=r"max \|theta_replay - theta_model\| = 0\.01 away"):
        Unrolled(model, TASK, train, recipe=recipe, start=init).fit()
    with pytest.raises(ConfigError, match="stepwise recipe"):
        Unrolled(model, TASK, train, recipe=object(), start=init)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"call fit\(\)"):
        Unrolled(model, TASK, train, recipe=recipe, start=init).scores(data(2))


def test_weight_zero_equals_dropping_the_example_with_the_order_kept():
    train = data(40)
    recipe = AdamRetrainer(epochs=3, lr=1e-2, batch_size=16, seed=2)
    init = mlp()
    inf = Influence(mlp(), TASK, train)
    start = inf.parameters_of(init)
    dropped = 7
    w = torch.ones(40, dtype=torch.float64)
    w[dropped] = 0.0
    weighted = recipe.refit(inf, start=start, weights=w)

    # Reference: torch.optim.Adam on the data without the example; the others at the same steps in
    # the same batches, each batch divided by its number of slots.
    theta = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=1e-2)
    for ids in recipe.plan(torch.arange(40)):
        kept = ids[ids != dropped]
        losses = inf.fn.loss(theta, (train[0][kept], train[1][kept]))
        objective = (losses.sum() + len(kept) * inf.fn.regularizer(theta)) / len(ids)
        opt.zero_grad()
        objective.backward()
        opt.step()
    torch.testing.assert_close(weighted, theta.detach(), rtol=1e-10, atol=1e-12)
    assert (weighted - recipe.refit(inf, start=start)).abs().max() > 1e-4  # the weight mattered
    with pytest.raises(ConfigError, match=r"weights must be finite floats of shape \(40,\)"):
        recipe.refit(inf, start=start, weights=torch.ones(39))


def test_batching_over_test_examples_equals_one_at_a_time():
    train, test = data(40), data(5, seed=3)
    init, recipe = mlp(), RECIPES[2]
    model = trained(recipe, train, init)
    batched = Unrolled(model, TASK, train, recipe=recipe, start=init, test_batch=4).fit()
    single = Unrolled(model, TASK, train, recipe=recipe, start=init, test_batch=1).fit()
    together = batched.scores(test)
    apart = torch.cat([single.scores((test[0][j : j + 1], test[1][j : j + 1])) for j in range(5)])
    torch.testing.assert_close(together, apart, rtol=1e-10, atol=1e-14)
    assert together.shape == (5, 40)
    torch.testing.assert_close(batched.scores(test, train_indices=[3, 1]), together[:, [3, 1]])
    top = batched.top_k(test, 2)
    assert torch.equal(top.helpful_ids[:, 0], together.argmax(1))


def test_checkpointing_holds_about_two_sqrt_t_states_and_changes_nothing():
    train, test = data(40), data(2, seed=4)
    recipe = SGDRetrainer(epochs=20, lr=0.05, batch_size=16, momentum=0.5, seed=1)  # 3 steps an epoch
    init = mlp()
    model = trained(recipe, train, init)
    steps = 60
    default = Unrolled(model, TASK, train, recipe=recipe, start=init).fit()
    scores = default.scores(test)
    stats = default.reverse_stats
    k = math.ceil(math.sqrt(steps))  # 8
    assert (stats.steps, stats.segment, stats.checkpoints) == (steps, k, math.ceil(steps / k))
    assert stats.max_states_held == stats.checkpoints + k < steps // 3
    every = Unrolled(model, TASK, train, recipe=recipe, start=init, segment=1).fit()  # all 60 kept
    torch.testing.assert_close(every.scores(test), scores, rtol=1e-12, atol=1e-15)
    assert every.reverse_stats.checkpoints == steps


def test_extrapolation_slope_is_one_for_small_reweightings():
    train, test = data(40), data(6, seed=8)
    init, recipe = mlp(), RECIPES[0]
    model = trained(recipe, train, init)
    unrolled = Unrolled(model, TASK, train, recipe=recipe, start=init).fit()
    result = unrolled.extrapolation(test, fraction=0.2, strengths=(1e-4, 1e-2), subsets=2)
    assert result.slopes[0] == pytest.approx(1.0, abs=1e-3)
    assert result.correlations[0] > 0.999
    assert result.actual.shape == (2, 2, 6)
    summary = json.loads(json.dumps(unrolled.extrapolation_result.summary()))
    about = json.loads(json.dumps(unrolled.summary()))
    assert about["method"] == "unrolled" and about["extrapolation"] == summary and about["steps"] == 6
    assert summary["reach"] == 1e-2 and summary["removals_in_reach"] is False  # not measured


def test_extrapolation_reach_and_its_warning():
    far = Extrapolation(0.1, (1e-3, 0.1, 1.0), (1.01, 0.7, 0.06), (0.99, 0.8, 0.2), 2, None, None)
    assert far.reach == 0.1 and not far.removals_in_reach
    near = Extrapolation(0.1, (1e-3, 1.0), (1.0, 0.9), (0.99, 0.9), 2, None, None)
    assert near.reach == 1.0 and near.removals_in_reach


def test_extrapolation_warns_when_even_small_reweightings_cross_a_kink():
    """Adam's first step moves a weight whose batch gradient is exactly 0 by lr * sign(dg): a kink.
    Examples 0 and 1 differ only in feature 2, which no other example has and whose weights start
    at 0, so their gradients there cancel; re-weighting one of them moves those weights by about the
    learning rate however small the re-weighting, which the derivative cannot predict."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    x[2:, 2] = 0.0
    x[1] = x[0] * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    y[1] = y[0]
    torch.manual_seed(0)
    init = nn.Linear(3, 3).double()
    with torch.no_grad():
        init.weight[:, 2] = 0.0
    task, recipe = ClassificationTask(), AdamRetrainer(epochs=3, lr=0.1, batch_size=8)
    model = nn.Linear(3, 3).double()
    inf = Influence(model, task, (x, y))
    inf.fn.load_into(recipe.refit(inf, start=inf.parameters_of(init)))
    unrolled = Unrolled(model, task, (x, y), recipe=recipe, start=init).fit()
    test = (x[:1] * torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64), y[:1])
    with pytest.warns(RuntimeWarning, match=r"do not predict even the smallest .* warm up the learning rate"):
        result = unrolled.extrapolation(test, fraction=0.25, strengths=(1e-4, 1e-2), subsets=3, seed=1)
    assert not 0.5 <= result.slopes[0] <= 2.0


def test_recipe_settings_are_validated():
    with pytest.raises(ConfigError, match="schedule must be one of"):
        SGDRetrainer(schedule="step")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"momentum must be in \[0, 1\)"):
        SGDRetrainer(momentum=1.0)
    with pytest.raises(ConfigError, match="betas"):
        AdamRetrainer(betas=(0.9, 1.5))
    # Settings added later enter the key only when changed: caches of earlier refits stay valid.
    assert "schedule" not in AdamRetrainer().settings()
    assert AdamRetrainer(schedule="cosine").settings()["schedule"] == "cosine"
    lr = [SGDRetrainer(lr=1.0, warmup=2, schedule="linear").learning_rate(t, 6) for t in range(6)]
    assert lr == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_single_model_lds_of_the_exact_derivative_is_near_one_for_small_reweightings():
    train, test = data(40), data(6, seed=8)
    init, recipe = mlp(), RECIPES[0]
    model = trained(recipe, train, init)
    unrolled = Unrolled(model, TASK, train, recipe=recipe, start=init).fit()
    scores = unrolled.scores(test)
    start = unrolled.start
    options = dict(scores=scores, subsets=8, alpha=0.9, retrain=recipe, start=start, setting="single-model")
    result = lds(unrolled.influence, test, eps=1e-3, **options)
    assert result.mean >= 0.95 and result.summary()["setting"] == "single-model"
    assert result.summary()["eps"] == 1e-3
    # the actual changes are the predicted ones, to first order in eps (predicted carries eps)
    assert np.abs(result.actual - result.predicted).max() <= 0.05 * np.abs(result.predicted).max()
    with pytest.raises(ConfigError, match="pass one seed"):
        lds(unrolled.influence, test, seeds=(0, 1), **options)
    with pytest.raises(ConfigError, match="pass start= the initial model"):
        lds(unrolled.influence, test, **{**options, "start": None})
    with pytest.raises(ConfigError, match="setting='single-model'"):
        lds(unrolled.influence, test, scores=scores, subsets=8, eps=0.5, retrain=recipe, start=start)


def test_readme_unrolled_example_runs(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Unrolled attribution\n.*?```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "'slopes'" in capsys.readouterr().out
    summary = namespace["unrolled"].extrapolation_result.summary()
    assert summary["strengths"] == [1e-3, 0.1, 1.0] and summary["slopes"][0] == pytest.approx(1.0, abs=0.1)
    assert namespace["scores"].shape == (10, len(namespace["data"].x_train))


def test_per_token_measurements_of_a_causal_lm_sum_to_the_sequence_and_match_replays():
    """Per-token scores (``per_token_examples``) of a tiny GPT-2: their sum over a sequence's tokens
    is the sequence's score (the derivative is linear in the measurement), and one of them matches
    a central finite difference of real re-weighted replays."""
    tf = pytest.importorskip("transformers")
    from influencer.tasks import CausalLMTask, per_token_examples

    lengths = [7, 3, 5, 2, 6, 4]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 20, (len(lengths), 7), generator=gen)
    mask = (torch.arange(7) < torch.tensor(lengths)[:, None]).long()
    train = {"input_ids": ids * mask, "attention_mask": mask}
    test = {
        "input_ids": torch.randint(1, 20, (1, 6), generator=gen),
        "attention_mask": torch.ones(1, 6).long(),
    }

    def gpt2() -> nn.Module:
        torch.manual_seed(0)
        config = tf.GPT2Config(vocab_size=20, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
                               eos_token_id=0, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)  # fmt: skip
        return tf.GPT2LMHeadModel(config).double().eval()

    task, recipe = CausalLMTask(), AdamRetrainer(epochs=2, lr=1e-2, batch_size=3, seed=1)
    init, model = gpt2(), gpt2()
    inf = Influence(model, task, train)
    start = inf.parameters_of(init)
    inf.fn.load_into(recipe.refit(inf, start=start))
    unrolled = Unrolled(model, task, train, recipe=recipe, start=init).fit()
    tokens = per_token_examples(test, index=0)  # 5 copies, each scoring one token
    per_token = unrolled.scores(tokens)
    assert per_token.shape == (5, 6)
    torch.testing.assert_close(per_token.sum(0), unrolled.scores(test)[0], rtol=1e-9, atol=1e-12)

    # score = -d f / d w_i: a central difference of replays with example 2's weight 1 +- h (its
    # error falls as h^2: 7e-5 at h = 1e-5, 7e-7 at 1e-6; Adam's first steps are far from linear)
    h, i, j = 1e-7, 2, 3
    changed = []
    for sign in (1.0, -1.0):
        w = torch.ones(6, dtype=torch.float64)
        w[i] += sign * h
        theta = recipe.refit(inf, start=start, weights=w)
        changed.append(inf.measurements({k: v[j : j + 1] for k, v in tokens.items()}, theta))
    numeric = -(changed[0] - changed[1]) / (2 * h)
    torch.testing.assert_close(per_token[j, i : i + 1], numeric, rtol=1e-5, atol=1e-9)
    assert per_token[j, i].abs() > 1e-4  # the example matters to that token
