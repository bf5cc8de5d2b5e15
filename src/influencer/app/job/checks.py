"""Checks of a job before the work starts: every ordinary mistake in the data, the model or the
settings is refused here in one line that names the fix, before the first full pass over the data.

In order: settings that depend on the data's size (``top_k``, ``num_test``), the parameters to
explain with, the test data against the training data's layout, the labels (by the task's
:meth:`~influencer.Task.check_batch`), and then one forward pass on the first two training and
test examples, whose outputs the task checks against the targets (:meth:`~influencer.Task.check_outputs`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from influencer.app.job.job import Job
from influencer.app.settings.explain import ExplainConfig
from influencer.data import Examples, TensorExamples
from influencer.errors import ConfigError, DataError, NonFiniteError
from influencer.functional import ModelFunction, select_parameters
from influencer.tasks import Task

log = logging.getLogger("influencer.explain")


def influence_params(config: ExplainConfig, job: Job) -> list[str] | None:
    """The parameter names or module prefixes to explain with (None: every trainable one)."""
    if config.params is None:
        return list(job.params) if job.params is not None else None
    return None if config.params == ("all",) else list(config.params)


def check_job(config: ExplainConfig, job: Job, device: torch.device) -> None:
    """Refuse a job that cannot be explained as asked (see the module docstring)."""
    n_train, n_test = len(job.train), len(job.test)
    if config.top_k > n_train:
        raise ConfigError(
            f"top_k {config.top_k} is more than the {n_train} training examples: choose --top-k {n_train} "
            "or less"
        )
    if config.test_ids is None and config.num_test > n_test:
        log.warning(
            "num_test %d is more than the %d test examples: explaining all of them", config.num_test, n_test
        )
    select_parameters(job.model, influence_params(config, job))  # refuses a model with nothing to train
    check_layout(job.task, job.train, job.test)
    for what, data in (("training", job.train), ("test", job.test)):
        _check_labels(job.task, data, what)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    fn = ModelFunction(job.model, job.task, influence_params(config, job), device, dtype)
    for what, data in (("training", job.train), ("test", job.test)):
        first = data.take(torch.arange(min(2, len(data))))
        fn.check(fn.prepare(first), what=what)
        if isinstance(data, TensorExamples) and type(job.task).check_outputs is not Task.check_outputs:
            # Every example's targets against the number of outputs the model gave the first ones:
            # outputs of that shape for all of them, without running the model on all of them.
            with torch.no_grad():
                shape = fn.outputs(fn.theta0, fn.prepare(first)).shape[1:]
            outputs = torch.zeros((1, *shape)).expand(len(data), *shape)
            try:
                job.task.check_outputs(outputs, data.tree, torch.arange(len(data)))
            except DataError as exc:
                raise DataError(f"{what} data: {exc}") from exc


def check_layout(task: Task, train: Examples, test: Examples) -> None:
    """Refuse test data whose examples are not shaped like the training data's."""
    if task.variable_length:
        return
    mine, theirs = train.example_spec(), test.example_spec()

    def kinds(spec: list[tuple[tuple[int, ...], torch.dtype]]) -> list[tuple[tuple[int, ...], bool]]:
        return [(s, d.is_floating_point) for s, d in spec]

    if kinds(mine) != kinds(theirs):
        raise DataError(
            "the test examples are not shaped like the training examples: each training example has "
            f"tensors [{_spec_text(mine)}] (shape per example, dtype), each test example "
            f"[{_spec_text(theirs)}]; preprocess the test data the same way as the training data"
        )


def _spec_text(spec: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> str:
    return ", ".join(f"{tuple(s)} {str(d).removeprefix('torch.')}" for s, d in spec)


def _check_labels(task: Task, data: Examples, what: str) -> None:
    """The task's label checks on all of ``data`` when it is held in memory, else its first chunk
    (the rest are checked chunk by chunk as they are used)."""
    try:
        if isinstance(data, TensorExamples):
            task.check_batch(data.tree, torch.arange(len(data)))
        else:
            ids = torch.arange(min(len(data), 256))
            task.check_batch(data.take(ids), ids)
    except DataError as exc:
        raise DataError(f"{what} data: {exc}") from exc


def check_finite_losses(losses: np.ndarray, what: str = "test") -> None:
    """Refuse a NaN or infinite per-example loss ``(n,)``, naming the examples by id."""
    bad = np.flatnonzero(~np.isfinite(losses))
    if len(bad):
        raise NonFiniteError(
            f"the loss is NaN or infinite on {what} example(s) {bad[:10].tolist()}"
            + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            + ": check those inputs (NaN or inf values?) and the model's weights"
        )
