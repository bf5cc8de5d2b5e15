"""The Task protocol: how a user's model turns a batch into per-example losses.

A task is the only thing a user writes to plug a model into influencer. It says

* ``loss(model, batch)`` -> ``(B,)``: the *unreduced* training loss of each example;
* ``measurement(model, batch)`` -> ``(B,)``: what influence is measured on for test examples
  (default: the same loss);
* ``regularizer(params)`` -> scalar: an optional penalty Omega(theta) added once to the
  objective (default: none).

The training objective the library assumes is ``J(theta) = mean_i loss_i(theta) + Omega(theta)``,
and the library owns every reduction, sign and 1/n scale from there on (see :mod:`influencer._kernel.scores`).

Tasks that split ``loss`` into ``outputs(model, batch)`` and ``output_loss(outputs, batch)``
(the built-ins do) also support the Gauss-Newton curvature, which needs the loss as a function of
the model's outputs.

``model`` is the user's ``nn.Module``; the library calls the task under
``torch.func.functional_call`` so that the module's parameters are the ones being differentiated.
Tasks must therefore be pure: no in-place updates to parameters, no Python-side state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from influencer._kernel.losses import smooth_hinge

Batch = Any  # a pytree (tensor, tuple, list or dict of tensors) with a leading batch dimension


class Task:
    """Base class for tasks. Override :meth:`loss`, or :meth:`outputs` and :meth:`output_loss`."""

    def outputs(self, model: nn.Module, batch: Batch) -> Tensor:
        """Model outputs for a batch, ``(B, ...)``. Default: ``model(batch[0])``."""
        return model(batch[0])

    def output_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Per-example loss ``(B,)`` from outputs; needed by the default :meth:`loss`."""
        raise NotImplementedError(
            f"{type(self).__name__} must override loss(model, batch), or output_loss(outputs, batch)"
        )

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Per-example (unreduced) training loss, shape ``(B,)``."""
        return self.output_loss(self.outputs(model, batch), batch)

    def measurement(self, model: nn.Module, batch: Batch) -> Tensor:
        """Per-example quantity whose change influence predicts, ``(B,)``. Default: the loss."""
        return self.loss(model, batch)

    def regularizer(self, params: Mapping[str, Tensor]) -> Tensor | float:
        """Penalty Omega(theta) added once to the mean training loss. Default: 0."""
        return 0.0

    def regularizer_curvature(self) -> float | None:
        """``c`` when the Hessian of Omega is ``c * I`` (``Omega = c/2 ||theta||^2``), else None.

        Lets Hessian-vector products skip differentiating the penalty twice. Tasks that override
        :meth:`regularizer` with anything but that L2 form must leave this returning None.
        """
        return 0.0 if type(self).regularizer is Task.regularizer else None

    @property
    def supports_gauss_newton(self) -> bool:
        """True when the loss is split into outputs and a loss of the outputs."""
        return type(self).output_loss is not Task.output_loss and type(self).loss is Task.loss

    def settings(self) -> dict[str, Any]:
        """JSON-able description used in cache fingerprints. Override if the task has state."""
        return {"task": type(self).__qualname__}


def l2_penalty(params: Mapping[str, Tensor], weight_decay: float) -> Tensor | float:
    """``weight_decay / 2 * sum ||w||^2`` over all parameters (what SGD's weight_decay implies)."""
    if weight_decay == 0.0:
        return 0.0
    return 0.5 * weight_decay * sum((p * p).sum() for p in params.values())


class _Decayed(Task):
    """Shared weight decay handling for the built-in tasks."""

    def __init__(self, weight_decay: float = 0.0) -> None:
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.weight_decay = float(weight_decay)

    def regularizer(self, params: Mapping[str, Tensor]) -> Tensor | float:
        return l2_penalty(params, self.weight_decay)

    def regularizer_curvature(self) -> float | None:
        # Only when the subclass kept this L2 penalty.
        return self.weight_decay if type(self).regularizer is _Decayed.regularizer else None

    def settings(self) -> dict[str, Any]:
        return {"task": type(self).__qualname__, "weight_decay": self.weight_decay}


class ClassificationTask(_Decayed):
    """Cross-entropy on batches ``(inputs, integer_labels)``; outputs are logits ``(B, C)``."""

    def output_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(outputs, batch[1], reduction="none")


class RegressionTask(_Decayed):
    """Half squared error ``0.5 * ||f(x) - y||^2`` on batches ``(inputs, targets)``."""

    def output_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        target = batch[1].reshape(outputs.shape).to(outputs.dtype)
        return 0.5 * (outputs - target).pow(2).reshape(outputs.shape[0], -1).sum(dim=1)


class SmoothHingeTask(_Decayed):
    """Binary SVM loss: smooth hinge of margin ``y * f(x)``, labels ``y`` in {-1, +1}.

    Outputs are one score per example, ``(B,)`` or ``(B, 1)``. ``temperature`` t -> 0 recovers
    the hinge; influence needs t > 0 (try 0.01 to 0.1).
    """

    def __init__(self, temperature: float = 0.1, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        if not temperature > 0.0:
            raise ValueError(f"temperature must be > 0 for a differentiable loss, got {temperature}")
        self.temperature = float(temperature)

    def output_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        labels = batch[1].to(outputs.dtype)
        return smooth_hinge(outputs.reshape(labels.shape) * labels, self.temperature)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "temperature": self.temperature}


def classes_from_outputs(out: Tensor) -> Tensor:
    """Class predictions ``(B,)`` from outputs ``(B, C)``: argmax, or the sign (-1/+1) of one score."""
    if out.ndim == 1 or out.shape[-1] == 1:
        return torch.where(out.reshape(-1) >= 0, 1, -1)
    return out.argmax(dim=-1)


def predictions(task: Task, model: nn.Module, batch: Batch) -> Tensor:
    """Class predictions from the task's outputs: argmax for multi-class, sign for one score."""
    with torch.no_grad():
        return classes_from_outputs(task.outputs(model, batch))
