"""Remove a class from a trained classifier with one influence (Newton) step, and measure it.

Removing the set ``S`` of training examples of class ``c`` changes the objective to the mean over
the ``n - |S|`` retained examples, ``J_R``. At the trained ``theta`` (where ``sum_i g_i ~ 0`` over
all ``n`` examples) its gradient is ``grad J_R = -(1/(n - |S|)) sum_{z in S} g_z``, so one Newton
step on ``J_R`` gives::

    theta_new = theta + (1/(n - |S|)) H_R^-1 sum_{z in S} g_z

with ``H_R`` the Hessian of ``J_R``, estimated on a (representative) subset of the *retained*
data. This is the removal convention of :mod:`influencer._kernel.scores` (removing ``S`` moves ``theta`` by
``+(1/n) H^-1 sum g_z`` to first order) with the exact scale ``1/(n - |S|)`` of the retained
objective instead of ``1/n``. ``H_R`` has the influence's curvature kind and estimator; for a
network the Hessian is indefinite, so give the influence the Gauss-Newton matrix and damping.
An optional step-size search scales the update by the
factor that maximises the forgetting F1 on a held-out validation split (never the test set).

Quality is measured by the accuracy on the removed class ``a_f`` (lower is better), on the rest
``a_r`` (higher is better) and ``F1 = 2 (1 - a_f) a_r / (1 - a_f + a_r)``
(``reproductions.unlearning`` compares it with retraining from scratch without the class).
Nothing here modifies the model it is given.

Usage::

    inf = Influence(model, task, train, estimator=CG(damping=1e-2), curvature="gauss_newton")
    removal = ClassRemoval(inf, forget_class=3)
    update = removal.sampled_update(LogitSampler(), size=200)      # H_R on 200 retained examples
    scale = removal.choose_scale(update, validation).scale
    forgetful = removal.model(update, scale)                        # a copy; `model` is untouched
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from influencer._kernel.data import Examples, as_examples, to_device
from influencer._kernel.errors import ConfigError, DataError, NonFiniteError
from influencer._kernel.task import Task, predictions
from influencer.estimators import LiSSA
from influencer.influence import Influence
from influencer.samplers import Sampler, SamplerContext


def forget_f1(forget_accuracy: float, retain_accuracy: float) -> float:
    """``2 (1 - a_f) a_r / (1 - a_f + a_r)``: the harmonic mean of forgetting and retained accuracy."""
    for name, value in (("forget_accuracy", forget_accuracy), ("retain_accuracy", retain_accuracy)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must lie in [0, 1], got {value}")
    denominator = 1.0 - forget_accuracy + retain_accuracy
    return 0.0 if denominator == 0 else 2.0 * (1.0 - forget_accuracy) * retain_accuracy / denominator


@dataclasses.dataclass(frozen=True)
class ForgetMetrics:
    """Accuracy on the removed class ``a_f``, on the other classes ``a_r``, and their F1."""

    forget_accuracy: float
    retain_accuracy: float
    f1: float
    n_forget: int
    n_retain: int


def class_labels(data: Examples, batch_size: int = 4096) -> Tensor:
    """Integer labels ``(n,)`` read from ``(inputs, labels)`` batches."""
    parts = []
    for _, batch in data.chunks(batch_size):
        y = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        if not isinstance(y, Tensor) or y.is_floating_point() or y.ndim != 1:
            raise DataError("class removal needs (inputs, integer labels) data, or pass labels=...")
        parts.append(y.cpu())
    return torch.cat(parts).to(torch.int64)


def forget_metrics(
    model: nn.Module,
    task: Task,
    data: Any,
    forget_class: int,
    *,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> ForgetMetrics:
    """:class:`ForgetMetrics` of ``model`` on labelled ``data`` (``(inputs, labels)``), streamed in chunks."""
    examples = as_examples(data)
    labels = class_labels(examples)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    correct = []
    for ids, batch in examples.chunks(batch_size):
        pred = predictions(task, model, to_device(batch, device, dtype)).cpu()
        correct.append(pred == labels[ids])
    hit = torch.cat(correct)
    forget = labels == forget_class
    if not forget.any() or forget.all():
        raise DataError(f"the evaluation data must contain class {forget_class} and at least one other class")
    a_f = float(hit[forget].double().mean())
    a_r = float(hit[~forget].double().mean())
    return ForgetMetrics(a_f, a_r, forget_f1(a_f, a_r), int(forget.sum()), int((~forget).sum()))


@dataclasses.dataclass(frozen=True)
class RemovalUpdate:
    """``direction = (1/(n - |S|)) H_R^-1 sum_{z in S} g_z`` ``(p,)``.

    The new parameters are ``theta + scale * direction`` (:meth:`ClassRemoval.parameters`).
    """

    direction: Tensor
    hessian_ids: Tensor  # (m,) retained training ids H_R was estimated on
    iterations: int | None  # CG iterations, or LiSSA's HVP steps (depth x repeats)
    solver_info: dict[str, Any]
    seconds: float  # curvature fit + inverse HVP


@dataclasses.dataclass(frozen=True)
class ScaleSearch:
    """Step-size search: the chosen factor and the validation metrics of every candidate."""

    scale: float
    candidates: tuple[float, ...]
    metrics: tuple[ForgetMetrics, ...]


class ClassRemoval:
    """Influence-based removal of class ``forget_class`` from the model of a trained ``influence``.

    The update uses the influence's parameters, training data, curvature kind and estimator;
    ``H_R`` is the same curvature estimated on retained examples only. For a network use
    ``curvature="gauss_newton"`` and a damped estimator (e.g. ``CG(damping=1e-2)``): its Hessian
    is indefinite.

    Args:
        influence: an :class:`~influencer.influence.Influence` of the trained model (need not be
            fitted: every update fits its own ``H_R``).
        forget_class: the class to remove.
        labels: class of each training example ``(n,)``; default read from ``(inputs, labels)``.
    """

    def __init__(
        self, influence: Influence, forget_class: int, *, labels: Sequence[int] | Tensor | None = None
    ) -> None:
        if not isinstance(influence, Influence):
            raise ConfigError(f"influence must be an influencer.Influence, got {type(influence).__name__}")
        self.influence = influence
        y = (
            class_labels(self.train)
            if labels is None
            else torch.as_tensor(labels).reshape(-1).to(torch.int64)
        )
        if len(y) != len(self.train):
            raise DataError(
                f"labels must have one entry per training example ({len(self.train)}), got {len(y)}"
            )
        self.labels = y.cpu()
        self.forget_class = int(forget_class)
        forget = self.labels == self.forget_class
        if not forget.any():
            raise DataError(f"no training example has class {forget_class}: nothing to remove")
        if forget.all():
            raise DataError(f"every training example has class {forget_class}: nothing would be left")
        self.forget_ids = torch.nonzero(forget).reshape(-1)  # (|S|,)
        self.retain_ids = torch.nonzero(~forget).reshape(-1)  # (n - |S|,)
        self._gradient_sum: Tensor | None = None

    @property
    def train(self) -> Examples:
        """The training data (the influence's)."""
        return self.influence.train

    @property
    def n(self) -> int:
        return self.influence.n

    @property
    def theta(self) -> Tensor:
        """The trained parameters ``(p,)``."""
        return self.influence.theta

    def gradient_sum(self) -> Tensor:
        """``sum_{z in S} g_z`` ``(p,)`` over the removed class (streamed in chunks; cached)."""
        if self._gradient_sum is None:
            total = self.influence.gradient_sum(self.forget_ids)
            if not torch.isfinite(total).all():
                raise NonFiniteError("the removed class's loss gradient is not finite; check its inputs")
            self._gradient_sum = total
        return self._gradient_sum

    def sampler_context(self, batch_size: int = 512) -> SamplerContext:
        """A :class:`SamplerContext` whose pool is the retained data (what ``H_R`` averages over)."""
        return SamplerContext.from_influence(
            self.influence, pool=self.retain_ids, labels=self.labels, batch_size=batch_size
        )

    def update(self, hessian_ids: Sequence[int] | Tensor | None = None) -> RemovalUpdate:
        """The influence update with ``H_R`` estimated on ``hessian_ids`` (default: all retained data)."""
        ids = self.retain_ids if hessian_ids is None else self.train.check_indices(hessian_ids)
        if len(ids) == 0:
            raise ConfigError("hessian_ids is empty: the Hessian needs at least one retained example")
        if (self.labels[ids] == self.forget_class).any():
            raise ConfigError(
                f"hessian_ids include examples of the removed class {self.forget_class}; H must be "
                "estimated on retained data (sample from ClassRemoval.sampler_context())"
            )
        g = self.gradient_sum()
        start = time.perf_counter()
        retained = self.influence.replace(hessian_indices=ids).fit()  # H_R
        direction = retained.inverse_hvp(g[None])[0] / (self.n - len(self.forget_ids))
        if not torch.isfinite(direction).all():  # also waits for the device, so the time is right
            raise NonFiniteError("the removal update is not finite; increase the estimator's damping")
        seconds = time.perf_counter() - start
        info = dict(retained.solver.info)
        if "iterations" in info:
            iterations: int | None = int(info["iterations"])
        elif isinstance(retained.estimator, LiSSA):
            iterations = retained.estimator.depth * retained.estimator.repeats
        else:
            iterations = None
        return RemovalUpdate(direction, ids, iterations, info, seconds)

    def sampled_update(
        self, sampler: Sampler, size: int, seed: int = 0, context: SamplerContext | None = None
    ) -> RemovalUpdate:
        """The update with ``H_R`` on ``size`` retained examples chosen by ``sampler`` (seeded)."""
        context = context if context is not None else self.sampler_context()
        return self.update(sampler.select(context, size, seed))

    def parameters(self, update: RemovalUpdate, scale: float = 1.0) -> Tensor:
        """New parameters ``theta + scale * direction`` ``(p,)``."""
        if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
            raise ConfigError(f"scale must be a finite number, got {scale!r}")
        return self.theta + scale * update.direction.to(self.theta)

    def model(self, update: RemovalUpdate, scale: float = 1.0) -> nn.Module:
        """A copy of the model with the updated parameters (the original is left untouched)."""
        return self.influence.model_at(self.parameters(update, scale))

    def metrics(self, data: Any, update: RemovalUpdate | None = None, scale: float = 1.0) -> ForgetMetrics:
        """:class:`ForgetMetrics` on ``data`` of the updated model (``update=None``: the original)."""
        model = self.influence.model_at(self.theta) if update is None else self.model(update, scale)
        task = self.influence.fn.task
        return forget_metrics(model, task, data, self.forget_class)  # on the model's own device

    def choose_scale(
        self, update: RemovalUpdate, validation: Any, scales: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0)
    ) -> ScaleSearch:
        """The factor in ``scales`` with the best F1 on ``validation`` (ties: the smallest factor).

        ``validation`` must be held out from both training and the final test set.
        """
        candidates = tuple(sorted(float(s) for s in scales))
        if not candidates or any(not (math.isfinite(s) and s > 0) for s in candidates):
            raise ConfigError(f"scales must be positive finite numbers, got {tuple(scales)}")
        results = tuple(self.metrics(validation, update, s) for s in candidates)
        best = max(range(len(candidates)), key=lambda i: (results[i].f1, -candidates[i]))
        return ScaleSearch(candidates[best], candidates, results)
