"""Shared fixtures: small real data sets and models trained to the optimum, in float64."""

from __future__ import annotations

import os
from collections.abc import Iterator

# OpenMP threads sleep instead of spinning while they wait: on a small shared CPU spinning threads
# starve every other process (and each other), making small tensor work many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from influencer import ClassificationTask
from influencer.datasets import Split, load_digits
from influencer.models import MLP, LogisticRegression
from influencer.training import train_lbfgs, train_minibatch


@pytest.fixture(autouse=True)
def job_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test gets its own job cache (the built-in model, features, refits), as a fresh machine
    would: no test sees another's trained model. Subprocesses inherit it through the environment."""
    monkeypatch.setenv("INFLUENCER_CACHE", str(tmp_path_factory.mktemp("job-cache")))
    yield


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: intra-op threads only add contention on a shared CPU (opt in per module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits() -> Split:
    return load_digits(dtype=torch.float64)


@pytest.fixture(scope="session")
def digits_small(digits: Split) -> Split:
    """300 training and 20 test digits: small enough for dense references."""
    return Split(
        "digits-small",
        digits.x_train[:300],
        digits.y_train[:300],
        digits.x_test[:20],
        digits.y_test[:20],
        digits.classes,
    )


@pytest.fixture(scope="session")
def logistic_small(digits_small: Split) -> tuple[torch.nn.Module, ClassificationTask]:
    torch.manual_seed(0)
    task = ClassificationTask(weight_decay=1e-2)
    model = LogisticRegression(64, 10).double()
    return train_lbfgs(model, task, digits_small.train), task


@pytest.fixture(scope="session")
def mlp_small(digits_small: Split) -> tuple[torch.nn.Module, ClassificationTask]:
    """A tanh MLP (p = 64*12+12 + 12*10+10 = 910) trained with Adam: not at an exact optimum, so
    its Hessian may be indefinite; tests use damping or the Gauss-Newton curvature."""
    torch.manual_seed(0)
    task = ClassificationTask(weight_decay=1e-3)
    model = MLP(64, (12,), 10).double()
    train_minibatch(model, task, digits_small.train, epochs=40, lr=1e-2, batch_size=32)
    return model, task
