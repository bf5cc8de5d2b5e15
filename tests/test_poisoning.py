"""Training-set poisoning: valid poisoned images, exact gradients, and real flips after retraining."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from influencer import ClassificationTask, Exact, Influence
from influencer._kernel.functional import ModelFunction
from influencer.data import as_examples
from influencer.datasets import Split
from influencer.errors import ConfigError, DataError
from influencer.models import SmallCNN
from influencer.training import fit_lbfgs
from influencer.uses.poisoning import PoisonConfig, PoisoningAttack
from reproductions.poisoning import binary_digits, success_rates

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> Split:
    return binary_digits((3, 8))


@pytest.fixture(scope="module")
def logistic(digits: Split) -> PoisoningAttack:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double()
    return PoisoningAttack(
        Influence(model, ClassificationTask(weight_decay=1e-3), digits.train, estimator=Exact())
    )


def on_grid(x: torch.Tensor, grid: float) -> bool:
    levels = x / grid
    return bool(((levels - levels.round()).abs() < 1e-9).all())


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="below one grid level"):
        PoisonConfig(step=1 / 32)
    with pytest.raises(ConfigError, match="max_change"):
        PoisonConfig(max_change=0.0)
    with pytest.raises(ConfigError, match="lower < upper"):
        PoisonConfig(lower=1.0, upper=0.0)
    with pytest.raises(ConfigError, match="select"):
        PoisonConfig(select="random")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_steps"):
        PoisonConfig(max_steps=0)


def test_projection_keeps_values_valid() -> None:
    gen = torch.Generator().manual_seed(0)
    original = torch.randint(0, 17, (50, 64), generator=gen).double() / 16
    wild = original + torch.randn(50, 64, generator=gen, dtype=torch.float64)
    for bound in (2 / 16, 2.5 / 16):  # a bound between grid levels rounds toward the original
        cfg = PoisonConfig(max_change=bound)
        out = cfg.project(wild, original)
        assert on_grid(out, 1 / 16)
        assert float((out - original).abs().max()) <= 2 / 16 + 1e-12
        assert float(out.min()) >= 0 and float(out.max()) <= 1
        # Moves as far as allowed toward the requested value.
        want = (wild - original).clamp(-2 / 16, 2 / 16)
        inside = ((original + want) >= 0) & ((original + want) <= 1) & (want.abs() == 2 / 16)
        torch.testing.assert_close(out[inside], (original + want)[inside])
    continuous = PoisonConfig(max_change=0.1, step=0.01, grid=None).project(wild, original)
    assert float((continuous - original).abs().max()) <= 0.1 + 1e-12


def test_inputs_must_lie_on_the_grid(digits: Split) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double()
    task = ClassificationTask(weight_decay=1e-3)
    x, y = digits.train
    with pytest.raises(DataError, match="value grid"):
        PoisoningAttack(Influence(model, task, (x * 0.999, y)))
    with pytest.raises(DataError, match="outside the valid range"):
        PoisoningAttack(Influence(model, task, (x * 2, y)))


def test_feature_pullback_equals_the_full_model_gradient(digits: Split) -> None:
    """Cached features + vjp to the pixels == I_pert through the whole CNN with params=["head"]."""
    torch.manual_seed(0)
    cnn = SmallCNN(2, channels=2).double()
    task = ClassificationTask(weight_decay=1e-2)
    x, y = digits.x_train[:40], digits.y_train[:40]
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    whole = PoisoningAttack(Influence(cnn, task, (x, y), params=["head"], estimator=Exact()))
    with torch.no_grad():
        features = cnn.features(x)
    split = PoisoningAttack(
        Influence(cnn.head, task, (features, y), estimator=Exact()), features=cnn.features, inputs=x
    )
    torch.testing.assert_close(whole.theta, split.theta, rtol=1e-7, atol=1e-9)
    ids = [0, 5, 33, 39]
    a = whole.input_effects(digits.test, 2, ids)
    b = split.input_effects(digits.test, 2, ids)
    assert a.shape == (4, 1, 8, 8)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    assert all(
        torch.equal(v, before[k]) for k, v in cnn.state_dict().items()
    )  # the user's model is untouched


def test_attack_flips_the_retrained_prediction(logistic: PoisoningAttack, digits: Split) -> None:
    # The correctly predicted test image with the smallest margin.
    with torch.no_grad():
        logits = logistic.influence.model_at(logistic.theta)(digits.x_test)
    margin = (logits[:, 1] - logits[:, 0]) * (2 * digits.y_test - 1)
    target = int(torch.where(margin > 0, margin, torch.inf).argmin())
    result = logistic.attack(digits.test, target, k=5)
    assert result.success and result.prediction_after != result.label
    assert result.losses[-1] > result.losses[0] > 0
    assert result.predicted_increase[0] > 0 and result.losses[1] > result.losses[0]

    poisoned = result.poisoned
    assert on_grid(poisoned, 1 / 16) and result.linf <= 2 / 16 + 1e-12
    assert float(poisoned.min()) >= 0 and float(poisoned.max()) <= 1
    assert 0 < result.mean_abs_change <= 2 / 16

    # The flip is real: retrain from scratch on the poisoned training set.
    x, y = digits.x_train.clone(), digits.y_train
    x[torch.as_tensor(result.poisoned_ids)] = poisoned
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double()
    fn = ModelFunction(model, ClassificationTask(weight_decay=1e-3))
    theta = fit_lbfgs(fn, as_examples((x, y)))
    with torch.no_grad():
        prediction = int(fn.outputs(theta, digits.x_test[target : target + 1]).argmax())
    assert prediction != result.label


def test_success_rates_summary_and_plot(digits: Split, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double()
    config = PoisonConfig(max_steps=2)
    influence = Influence(model, ClassificationTask(weight_decay=1e-2), digits.train, estimator=Exact())
    attack = PoisoningAttack(influence, config=config)
    summary = success_rates(attack, digits.test, budgets=(1, 3), num_targets=2, seed=1)
    assert summary.budgets == (1, 3) and summary.targets.size == 2
    for b in (1, 3):
        assert [r.target for r in summary.results[b]] == summary.targets.tolist()
        assert all(r.poisoned_ids.size == b and r.prediction_before == r.label for r in summary.results[b])
        assert all(r.steps <= 2 and r.losses.size == r.steps + 1 for r in summary.results[b])
    info = summary.summary()
    assert set(info["by_budget"]) == {1, 3}
    assert 0.0 <= info["by_budget"][3]["success_rate"] <= 1.0
    assert summary.plot(tmp_path / "rates.png").read_bytes()[:4] == b"\x89PNG"


def test_feature_setup_checks_its_inputs(digits: Split) -> None:
    torch.manual_seed(0)
    cnn = SmallCNN(2, channels=2).double()
    task = ClassificationTask(weight_decay=1e-2)
    x, y = digits.x_train[:20], digits.y_train[:20]
    with torch.no_grad():
        features = cnn.features(x)
    head = Influence(cnn.head, task, (features, y))
    with pytest.raises(ConfigError, match="needs inputs="):
        PoisoningAttack(head, features=cnn.features)
    with pytest.raises(ConfigError, match="goes with features="):
        PoisoningAttack(Influence(cnn, task, (x, y), params=["head"]), inputs=x)
    with pytest.raises(DataError, match=r"not features\(inputs\)"):
        PoisoningAttack(head, features=cnn.features, inputs=x.flip(0))
    with pytest.raises(DataError, match="19 examples"):
        PoisoningAttack(head, features=cnn.features, inputs=x[:19])
