"""Tiny jobs for `influencer explain --task robust_jobs:<name>`: one that works and the ordinary
mistakes a user makes, each in a build function of its own (data made here: no downloads, no files).

The good job is softmax regression (6 features, 3 classes, p = 21) fitted to the optimum of a
convex objective, so every estimator's solve is well posed and a run takes well under a second.
"""

from __future__ import annotations

import functools
import os
import time

import torch
from torch import nn

from influencer import ClassificationTask, RegressionTask, SmoothHingeTask

N_TRAIN, N_TEST, FEATURES, CLASSES = 48, 12, 6, 3
NOT_CALLABLE = 42


def data(n: int = N_TRAIN, m: int = N_TEST, d: int = FEATURES, c: int = CLASSES):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n + m, d, generator=gen, dtype=torch.float64)
    w = torch.randn(d, c, generator=gen, dtype=torch.float64)
    y = (x @ w + 0.5 * torch.randn(n + m, c, generator=gen, dtype=torch.float64)).argmax(1)
    return (x[:n], y[:n]), (x[n:], y[n:])


def linear(d: int = FEATURES, c: int = CLASSES) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Linear(d, c).double()


def fit(model: nn.Module, task: ClassificationTask, train) -> nn.Module:
    """Full-batch L-BFGS to the optimum of mean loss + L2 (milliseconds for this size)."""
    opt = torch.optim.LBFGS(
        model.parameters(), lr=1, max_iter=100, tolerance_grad=1e-10, tolerance_change=0,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def objective():
        opt.zero_grad()
        value = task.loss(model, train).mean() + task.regularizer(dict(model.named_parameters()))
        value.backward()
        return value

    opt.step(objective)
    return model


@functools.cache
def _fitted_state() -> dict[str, torch.Tensor]:
    model = fit(linear(), ClassificationTask(weight_decay=0.05), data()[0])
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build():
    train, test = data()
    task = ClassificationTask(weight_decay=0.05)
    model = linear()
    model.load_state_dict(_fitted_state())  # fitted once per process
    return {"task": task, "model": model, "train": train, "test": test, "classes": ["ant", "bee", "cat"]}


def slow_build():
    """The good job, after a pause (``ROBUST_JOBS_SLEEP`` seconds): holds the run directory a while."""
    time.sleep(float(os.environ.get("ROBUST_JOBS_SLEEP", "2")))
    return build()


def untrained():
    train, test = data()
    return ClassificationTask(weight_decay=0.05), linear(), train, test


def singular():
    """No weight decay and two features that are always 0: the Hessian is singular."""
    (x, y), (xt, yt) = data()
    pad = torch.zeros(len(x), 2, dtype=x.dtype)
    x, xt = torch.cat([x, pad], 1), torch.cat([xt, pad[: len(xt)]], 1)
    return ClassificationTask(), linear(FEATURES + 2), (x, y), (xt, yt)


def dollar_classes():
    job = build()
    job["classes"] = ["$a$", "cost $5", "x^$"]
    return job


# ---- mistakes ---------------------------------------------------------------------------------


def float_labels():
    (x, y), (xt, yt) = data()
    return ClassificationTask(), linear(), (x, y.double()), (xt, yt.double())


def labels_out_of_range():
    (x, y), test = data()
    y = y.clone()
    y[3] = 7
    return ClassificationTask(), linear(), (x, y), test


def ignored_label():
    (x, y), test = data()
    y = y.clone()
    y[3] = -100
    return ClassificationTask(), linear(), (x, y), test


def labels_out_of_range_in_test_data():
    train, (xt, yt) = data()
    yt = yt.clone()
    yt[5] = 3
    return ClassificationTask(), linear(), train, (xt, yt)


def hinge_with_01_labels():
    (x, y), (xt, yt) = data()
    return SmoothHingeTask(), linear(c=1), (x, (y > 0).long()), (xt, (yt > 0).long())


def wrong_test_shape():
    train, (xt, yt) = data()
    return ClassificationTask(), linear(), train, (xt[:, :5], yt)


def wrong_output_shape():
    train, test = data()
    model = nn.Sequential(linear(), nn.Unflatten(1, (CLASSES, 1)))
    return ClassificationTask(), model, train, test


def regression_output_mismatch():
    (x, y), (xt, yt) = data()
    return RegressionTask(), linear(), (x, y.double()), (xt, yt.double())


def model_fails_on_inputs():
    train, test = data()
    return ClassificationTask(), linear(d=FEATURES + 1), train, test


def no_trainable_parameters():
    train, test = data()
    model = linear()
    model.requires_grad_(False)
    return ClassificationTask(), model, train, test


def nan_test_example():
    task, model, train, (xt, yt) = untrained()
    xt = xt.clone()
    xt[9, 2] = float("nan")
    return task, model, train, (xt, yt)


def needs_arguments(size):
    return build()


def returns_wrong():
    return data()


def raises():
    raise ValueError("the data file data/train.csv has 3 columns, expected 7")


def ignored_label_opted_in():
    """Label -100 marks an example left out of the loss, and the task says so."""
    (x, y), test = data()
    y = y.clone()
    y[3] = -100
    task = ClassificationTask(weight_decay=0.05, ignore_index=-100)
    return task, fit(linear(), task, (x, y)), (x, y), test


def negative_label_late():
    """160 training examples, label -1 at id 100: beyond the first batch the checks see."""
    (x, y), test = data(n=160)
    y = y.clone()
    y[100] = -1
    return ClassificationTask(weight_decay=0.05), linear(), (x, y), test


class _PairModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = linear()

    def forward(self, x):
        return self.linear(x), x  # (logits, features): a tuple, not a tensor


def forward_returns_tuple():
    train, test = data()
    return ClassificationTask(weight_decay=0.05), _PairModel(), train, test


class _ItemModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = linear()

    def forward(self, x):
        return self.linear(x) * float(x.abs().max().item() > 0)


def forward_calls_item():
    train, test = data()
    return ClassificationTask(weight_decay=0.05), _ItemModel(), train, test
