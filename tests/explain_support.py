"""Small real jobs for the `influencer explain` tests: digit images and a linear model, trained once."""

from __future__ import annotations

import functools
import textwrap

import torch
from torch import nn

from influencer import ClassificationTask
from influencer.app.jobs import Job
from influencer.paper.datasets import load_digits
from influencer.training import train_minibatch

# A user's job module, as `--task tiny_job:build` would import it.
TASK_MODULE = textwrap.dedent(
    """
    import torch
    from influencer import ClassificationTask
    from influencer.paper.datasets import load_digits
    from influencer.training import train_minibatch


    def build():
        split = load_digits(images=True, dtype=torch.float64)
        train = (split.x_train[:90], split.y_train[:90])
        test = (split.x_test[:20], split.y_test[:20])
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).double()
        task = ClassificationTask(weight_decay=1e-2)
        train_minibatch(model, task, train, epochs=4, lr=0.05, batch_size=30)
        return task, model, train, test


    def build_dict():
        task, model, train, test = build()
        return {"task": task, "model": model, "train": train, "test": test, "name": "dict job"}


    def build_wrong():
        return 42
    """
)


@functools.cache
def _data(n_train: int, n_test: int):
    split = load_digits(images=True, dtype=torch.float64)
    return (split.x_train[:n_train], split.y_train[:n_train]), (split.x_test[:n_test], split.y_test[:n_test])


@functools.cache
def _trained_state(n_train: int) -> dict[str, torch.Tensor]:
    model = _linear()
    train, _ = _data(n_train, 1)
    train_minibatch(model, ClassificationTask(weight_decay=1e-2), train, epochs=6, lr=0.05, batch_size=30)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _linear() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()


def tiny_job(n_train: int = 120, n_test: int = 40, **fields) -> Job:
    """Softmax regression on 8x8 digit images (p = 650), a fresh copy of one trained model."""
    model = _linear()
    model.load_state_dict(_trained_state(n_train))
    train, test = _data(n_train, n_test)
    fields.setdefault("classes", [str(c) for c in range(10)])
    return Job(ClassificationTask(weight_decay=1e-2), model, train, test, name="tiny digits", **fields)
