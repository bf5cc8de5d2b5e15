"""The model on the test set, and the choice of examples: which test examples to explain, and
which training examples to estimate the curvature on."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from influencer.app.job.checks import check_finite_losses
from influencer.app.job.job import Job, labels_of
from influencer.app.run.logs import Stopwatch
from influencer.app.settings.explain import ExplainConfig
from influencer.data import to_device
from influencer.errors import ConfigError
from influencer.progress import progress_bar
from influencer.samplers import SamplerContext

log = logging.getLogger("influencer.explain")


@dataclasses.dataclass
class Evaluation:
    """The model on the whole test set: labels, predictions and losses, each ``(n_test,)``.

    ``predictions`` are class labels for a classifier (then ``classification`` is True and
    ``accuracy`` is set), real values for a regression, or None when the task has no outputs.
    """

    labels: np.ndarray | None
    predictions: np.ndarray | None
    losses: np.ndarray
    accuracy: float | None
    classification: bool

    def correct(self, i: int) -> bool | None:
        if self.labels is None or self.predictions is None or not self.classification:
            return None
        return bool(self.labels[i] == self.predictions[i])

    def describe(self, i: int, classes: Any = None, loss: bool = True) -> str:
        """``"label 3, predicted 5, wrong, loss 2.1"`` for test example ``i``."""
        parts = []
        if self.labels is not None:
            parts.append(f"label {label_text(self.labels[i], classes)}")
        if self.predictions is not None:
            parts.append(f"predicted {label_text(self.predictions[i], classes)}")
        ok = self.correct(i)
        if ok is not None:
            parts.append("correct" if ok else "wrong")
        if loss:
            parts.append(f"loss {self.losses[i]:.3g}")
        return ", ".join(parts)


def label_text(value: Any, classes: Any) -> str:
    """A label or prediction as a person reads it: the class name when there is one."""
    if isinstance(value, (np.integer, int)) and classes is not None and 0 <= int(value) < len(classes):
        return str(classes[int(value)])
    if isinstance(value, (np.floating, float)):
        return f"{float(value):.4g}"
    return str(value)


def evaluate(job: Job, device: torch.device, config: ExplainConfig) -> Evaluation:
    """Predictions and per-example losses on the test set, chunk by chunk."""
    model, task = job.model, job.task
    dtype = next(model.parameters()).dtype
    labels, preds, losses = [], [], []
    with_outputs = True
    chunks = job.test.chunks(config.batch_size)
    total = -(-len(job.test) // config.batch_size)
    with torch.no_grad():
        for ids, batch in progress_bar(
            chunks, "evaluating", config.progress and total > 4, total=total, unit="batch"
        ):
            task.check_batch(batch, ids)
            batch = to_device(batch, device, dtype)
            losses.append(task.loss(model, batch).double().cpu())
            y = labels_of(batch)
            labels.append(y.cpu() if y is not None else None)
            if with_outputs:
                try:
                    out = task.outputs(model, batch)
                except Exception:  # a task that overrides loss() may have no usable outputs()
                    with_outputs = False
                    continue
                task.check_outputs(out, batch, ids)
                preds.append(out.detach().cpu())
    loss = torch.cat(losses).numpy()
    y = torch.cat(labels).numpy() if all(t is not None for t in labels) else None
    if not with_outputs or not preds:
        return Evaluation(y, None, loss, None, False)
    out = torch.cat(preds)
    integer_labels = y is not None and np.issubdtype(y.dtype, np.integer)
    if out.ndim == 2 and out.shape[1] > 1 and integer_labels:
        pred = out.argmax(1).numpy()
    elif out.numel() == len(out) and integer_labels and set(np.unique(y).tolist()) <= {-1, 1}:
        pred = np.where(out.reshape(-1).numpy() >= 0, 1, -1)  # one score per example, labels +-1
    elif out.numel() == len(out):
        return Evaluation(y, out.reshape(-1).double().numpy(), loss, None, False)  # regression
    else:
        return Evaluation(y, None, loss, None, False)
    accuracy = float((pred == y).mean()) if y is not None else None
    return Evaluation(y, pred, loss, accuracy, True)


def choose_test_ids(config: ExplainConfig, evaluation: Evaluation, n_test: int) -> np.ndarray:
    """``config.test_ids``, or: up to half misclassified (highest loss first), the rest correct,
    spread over different labels (highest-loss and random picks when there are no classes)."""
    if config.test_ids is not None:
        bad = [i for i in config.test_ids if i >= n_test]
        if bad:
            raise ConfigError(
                f"test_ids {bad} are out of range: the test set has {n_test} examples (0..{n_test - 1})"
            )
        return np.asarray(config.test_ids, dtype=np.int64)
    k = min(config.num_test, n_test)
    rng = np.random.default_rng(config.seed)
    if evaluation.classification and evaluation.labels is not None and evaluation.predictions is not None:
        wrong = np.flatnonzero(evaluation.labels != evaluation.predictions)
        wrong = wrong[np.argsort(-evaluation.losses[wrong], kind="stable")][: k // 2]
        right = rng.permutation(np.flatnonzero(evaluation.labels == evaluation.predictions))
        chosen, seen = list(wrong), set(evaluation.labels[wrong].tolist())
        for i in right:  # one per label first, then any
            if len(chosen) < k and evaluation.labels[i] not in seen:
                chosen.append(int(i))
                seen.add(evaluation.labels[i])
        chosen += [int(i) for i in right if int(i) not in chosen][: k - len(chosen)]
    else:
        high = np.argsort(-evaluation.losses, kind="stable")[: k // 2]
        rest = [int(i) for i in rng.permutation(n_test) if i not in set(high.tolist())]
        chosen = list(high) + rest[: k - len(high)]
    return np.asarray(chosen[:k], dtype=np.int64)


def describe_test_choice(config: ExplainConfig, evaluation: Evaluation, test_ids: np.ndarray) -> str:
    """How :func:`choose_test_ids` chose ``test_ids``, in words (for the report, summary and log)."""
    ids = ", ".join(f"#{int(i)}" for i in test_ids)
    if config.test_ids is not None:
        return f"given ({ids})"
    n = len(evaluation.losses)
    if evaluation.classification and evaluation.labels is not None and evaluation.predictions is not None:
        wrong = int((evaluation.labels[test_ids] != evaluation.predictions[test_ids]).sum())
        labels = len(set(evaluation.labels[test_ids].tolist()))
        return (
            f"chosen from {n}: {wrong} misclassified with the highest loss, then {len(test_ids) - wrong} "
            f"correctly classified spread over labels (random order, seed {config.seed}; {labels} labels "
            f"in all): {ids}"
        )
    high = len(test_ids) // 2
    return (
        f"chosen from {n}: {high} with the highest loss, then {len(test_ids) - high} at random "
        f"(seed {config.seed}): {ids}"
    )


def log_accuracy(evaluation: Evaluation, n_test: int) -> None:
    """Log the test accuracy of a classification job (nothing for other tasks)."""
    if evaluation.accuracy is not None:
        log.info(
            "test accuracy: %.2f%% (%d of %d)",
            100 * evaluation.accuracy,
            round(evaluation.accuracy * n_test),
            n_test,
        )


def evaluate_and_choose(
    on: Job, n_test: int, config: ExplainConfig, device: torch.device, clock: Stopwatch
) -> tuple[Evaluation, np.ndarray, str]:
    """Evaluate the job's test set (timed as ``evaluate``), refuse non-finite test losses, log the
    accuracy, and choose the test examples to explain: ``(evaluation, test_ids, how they were chosen)``.
    """
    with clock("evaluate"):
        evaluation = evaluate(on, device, config)
    check_finite_losses(evaluation.losses)
    log_accuracy(evaluation, n_test)
    test_ids = choose_test_ids(config, evaluation, n_test)
    choice = describe_test_choice(config, evaluation, test_ids)
    log.info("explaining test examples %s", choice)
    return evaluation, test_ids, choice


def choose_hessian_ids(config: ExplainConfig, job: Job, device: torch.device) -> Tensor | None:
    """Training ids ``(hessian_size,)`` the curvature is estimated on, or None for all of them."""
    if config.hessian_size is None:
        return None
    if config.hessian_size > len(job.train):
        raise ConfigError(
            f"hessian_size {config.hessian_size} is more than the {len(job.train)} training examples; "
            "lower it, or leave it unset to use them all"
        )
    context = SamplerContext(job.model, job.task, job.train, device=device, batch_size=config.batch_size)
    ids = config.make_sampler().select(context, config.hessian_size, seed=config.seed)
    log.info(
        "curvature estimated on %d of %d training examples (%s sampler, seed %d)",
        len(ids),
        len(job.train),
        config.hessian_sampler,
        config.seed,
    )
    return ids
