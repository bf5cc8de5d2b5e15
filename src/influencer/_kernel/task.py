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
from torch import Tensor, nn

from influencer._kernel.errors import DataError, TaskError
from influencer._kernel.losses import cross_entropy, cross_entropy_fisher, smooth_hinge
from influencer._kernel.modes import evaluating

Batch = Any  # a pytree (tensor, tuple, list or dict of tensors) with a leading batch dimension


class Task:
    """Base class for tasks. Override :meth:`loss`, or :meth:`outputs` and :meth:`output_loss`.

    Class attributes a task may set:

    * ``vectorize`` (default True): per-example gradients run the task on all examples of a chunk
      at once under ``torch.func.vmap``. False computes them one example at a time (same values,
      slower) for models whose forward cannot run under vmap.
    * ``variable_length`` (default False): examples are padded sequences whose length (and labels)
      may differ between data sets, so test data is not checked against the training data's shapes.
    """

    vectorize: bool = True
    variable_length: bool = False

    def outputs(self, model: nn.Module, batch: Batch) -> Tensor:
        """Model outputs for a batch, ``(B, ...)``. Default: ``model(batch[0])``."""
        return model(batch_entry(batch, 0, "inputs", self, "override outputs(model, batch)"))

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

    def positions(self, batch: Batch) -> Tensor | None:
        """Which positions ``(B, T)`` of a batch of padded sequences are real (True), not padding.

        K-FAC's and EK-FAC's input factor averages a layer's input rows over these positions only
        (for layers that run once per position), so a batch's scores do not depend on how far it is
        padded. Default None: every position of every layer counts.
        """
        return None

    def fisher_directions(
        self, outputs: Tensor, batch: Batch, samples: int | None, generator: torch.Generator
    ) -> Tensor | None:
        """Output directions ``(B, D, K)`` whose outer products give each example's output Hessian.

        ``D`` is the number of outputs per example (``outputs`` flattened after the batch
        dimension). ``samples=None``: ``sum_k c_k c_k^T`` is the Hessian of ``output_loss`` in the
        outputs (the exact expectation); ``samples=S``: ``K = S`` random directions with
        ``E[c c^T]`` equal to it, e.g. the loss's gradient at targets drawn from the model's own
        predictive distribution (the true Fisher), drawn with ``generator`` (CPU). K-FAC and
        EK-FAC backpropagate each column. Default None: they take a factor of each example's
        ``D x D`` output Hessian by automatic differentiation (and Gaussian combinations of its
        columns when sampling).
        """
        return None

    @property
    def supports_gauss_newton(self) -> bool:
        """True when the loss is split into outputs and a loss of the outputs."""
        return type(self).output_loss is not Task.output_loss and type(self).loss is Task.loss

    def settings(self) -> dict[str, Any]:
        """JSON-able description used in cache fingerprints. Override if the task has state."""
        return {"task": type(self).__qualname__}

    def check_batch(self, batch: Batch, ids: Tensor | None = None) -> None:
        """Refuse data this task cannot score (e.g. labels of the wrong kind), before the model runs.

        Called on every chunk outside ``vmap``; raises :class:`DataError` naming the examples by
        ``ids`` ``(B,)`` (default: their positions in the batch). Default: accepts everything.
        """

    def check_outputs(self, outputs: Tensor, batch: Batch, ids: Tensor | None = None) -> None:
        """Refuse model outputs ``(B, ...)`` that do not fit the batch's targets (e.g. a label beyond
        the number of classes); raises :class:`TaskError` or :class:`DataError`. Default: accepts all."""


def example_ids(ids: Tensor | None, mask: Tensor, limit: int = 5) -> list[int]:
    """The ids (default: positions) of the examples where ``mask`` ``(B,)`` is True, the first ``limit``."""
    where = torch.nonzero(mask.reshape(-1).cpu()).reshape(-1)[:limit]
    return (where if ids is None else ids.cpu()[where]).tolist()


def batch_entry(batch: Batch, key: int | str, what: str, task: Task, fix: str) -> Any:
    """``batch[key]``, or a :class:`TaskError` saying how the batch is laid out and how to fix it."""
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError) as exc:
        name = type(task).__name__
        if isinstance(batch, Mapping):
            layout = f"a dict with keys {', '.join(repr(k) for k in batch)}"
            if "input_ids" in batch:
                fix += (
                    "; for Hugging Face models use influencer.tasks.SequenceClassificationTask or "
                    "CausalLMTask"
                )
        elif isinstance(batch, (tuple, list)):
            layout = f"a {type(batch).__name__} of {len(batch)} entries"
        else:
            layout = f"a {type(batch).__name__}"
        raise TaskError(
            f"{name} reads the {what} from batch[{key!r}], but the batch is {layout}: {fix}"
        ) from exc


def l2_penalty(params: Mapping[str, Tensor], weight_decay: float) -> Tensor | float:
    """``weight_decay / 2 * sum ||w||^2`` over all parameters (what SGD's weight_decay implies)."""
    if weight_decay == 0.0:
        return 0.0
    return 0.5 * weight_decay * sum((p * p).sum() for p in params.values())


class DecayedTask(Task):
    """Shared weight decay and batch layout of the built-in tasks.

    A batch is ``(inputs, targets)`` by default; ``input_key`` and ``label_key`` name the entries
    of other layouts, e.g. ``input_key="image", label_key="label"`` for dict batches.
    """

    def __init__(
        self, weight_decay: float = 0.0, *, input_key: int | str = 0, label_key: int | str = 1
    ) -> None:
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        for name, key in (("input_key", input_key), ("label_key", label_key)):
            if not isinstance(key, (int, str)) or isinstance(key, bool):
                raise TaskError(f"{name} must be an int (tuple position) or a str (dict key), got {key!r}")
        self.weight_decay = float(weight_decay)
        self.input_key = input_key
        self.label_key = label_key

    def _fix(self) -> str:
        return f"pass {type(self).__name__}(input_key=..., label_key=...) naming the entries"

    def inputs(self, batch: Batch) -> Any:
        """What the model is called on: ``batch[input_key]``."""
        return batch_entry(batch, self.input_key, "inputs", self, self._fix())

    def targets(self, batch: Batch) -> Tensor:
        """Labels or regression targets: ``batch[label_key]``."""
        return batch_entry(batch, self.label_key, "labels", self, self._fix())

    def outputs(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(self.inputs(batch))

    def regularizer(self, params: Mapping[str, Tensor]) -> Tensor | float:
        return l2_penalty(params, self.weight_decay)

    def regularizer_curvature(self) -> float | None:
        # Only when the subclass kept this L2 penalty.
        return self.weight_decay if type(self).regularizer is DecayedTask.regularizer else None

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": type(self).__qualname__, "weight_decay": self.weight_decay}
        if (self.input_key, self.label_key) != (0, 1):  # the default layout keeps older fingerprints
            out.update(input_key=self.input_key, label_key=self.label_key)
        return out


class ClassificationTask(DecayedTask):
    """Cross-entropy on batches ``(inputs, integer_labels)``; outputs are logits ``(B, C)``.

    Labels are class indices ``0..C-1``; anything else is refused before the model runs.
    ``ignore_index`` opts into a label (e.g. ``-100``) that marks examples left out of the loss:
    their loss and gradient are zero, so their influence is too. Labels may also be class
    probabilities ``(B, C)`` (soft labels). For dict batches name the entries:
    ``ClassificationTask(input_key="x", label_key="y")``.
    """

    def __init__(
        self,
        weight_decay: float = 0.0,
        *,
        input_key: int | str = 0,
        label_key: int | str = 1,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(weight_decay, input_key=input_key, label_key=label_key)
        if ignore_index is not None and (not isinstance(ignore_index, int) or isinstance(ignore_index, bool)):
            raise TaskError(f"ignore_index must be an int label (e.g. -100) or None, got {ignore_index!r}")
        self.ignore_index = ignore_index

    def output_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return cross_entropy(outputs, self.targets(batch), self.ignore_index)

    def fisher_directions(
        self, outputs: Tensor, batch: Batch, samples: int | None, generator: torch.Generator
    ) -> Tensor | None:
        """Exact: ``sqrt(p_c) (e_c - p)`` for every class ``c``; sampled: ``p - e_y`` for labels
        ``y`` drawn from the model's ``p`` (see :func:`~influencer._kernel.losses.cross_entropy_fisher`)."""
        if outputs.ndim != 2:
            return None
        y = self.targets(batch)
        if y.is_floating_point():
            weight = y.sum(dim=1)  # soft labels: the Hessian scales with their total
        elif self.ignore_index is not None:
            weight = (y != self.ignore_index).to(outputs.dtype)
        else:
            weight = torch.ones(outputs.shape[0], dtype=outputs.dtype, device=outputs.device)
        return cross_entropy_fisher(outputs, weight.to(outputs.device), samples, generator)

    def check_batch(self, batch: Batch, ids: Tensor | None = None) -> None:
        y = self.targets(batch)
        if not isinstance(y, Tensor):
            raise DataError(f"{type(self).__name__} needs labels as a tensor, got {type(y).__name__}")
        if y.is_floating_point() and y.ndim == 2:
            return  # class probabilities; their shape is checked against the outputs
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise DataError(
                f"{type(self).__name__} needs integer class labels (0..C-1), got {y.dtype} labels of "
                f"shape {tuple(y.shape)}; convert them with labels.long() (or use RegressionTask for "
                "real-valued targets)"
            )
        if y.ndim != 1:
            raise DataError(
                f"{type(self).__name__} needs one class label per example, shape (B,), got labels of "
                f"shape {tuple(y.shape)}"
            )
        negative = (y < 0) & (y != self.ignore_index) if self.ignore_index is not None else y < 0
        if negative.any():
            bad = example_ids(ids, negative)
            value = int(y[negative][0])
            fix = (
                f"to leave examples out of the loss pass {type(self).__name__}(ignore_index={value})"
                if self.ignore_index is None
                else "labels are class indices 0..C-1"
            )
            raise DataError(
                f"label {value} of example(s) {bad} is negative: {type(self).__name__} takes class "
                f"indices 0..C-1; {fix}"
            )

    def check_outputs(self, outputs: Tensor, batch: Batch, ids: Tensor | None = None) -> None:
        y = self.targets(batch)
        if outputs.ndim != 2 or outputs.shape[1] < 2:
            raise TaskError(
                f"{type(self).__name__} needs logits of shape (B, C) with C >= 2 classes, but the model "
                f"returned shape {tuple(outputs.shape)}; reshape the model's output (for one score per "
                "example use SmoothHingeTask, for real values RegressionTask)"
            )
        if y.is_floating_point():
            if tuple(y.shape) != tuple(outputs.shape):
                raise DataError(
                    f"class-probability labels must have the logits' shape {tuple(outputs.shape)}, got "
                    f"{tuple(y.shape)}"
                )
            return
        c = outputs.shape[1]
        beyond = (y >= c) & (y != self.ignore_index) if self.ignore_index is not None else y >= c
        if beyond.any():
            raise DataError(
                f"label {int(y[beyond.to(y.device)][0])} of example(s) {example_ids(ids, beyond)} is out of "
                f"range: the model has {c} outputs, so labels must be 0..{c - 1}"
            )

    def settings(self) -> dict[str, Any]:
        out = super().settings()
        if self.ignore_index is not None:  # unset keeps older fingerprints
            out["ignore_index"] = self.ignore_index
        return out


class RegressionTask(DecayedTask):
    """Half squared error ``0.5 * ||f(x) - y||^2`` on batches ``(inputs, targets)`` (see ``input_key``)."""

    def output_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        target = self.targets(batch).reshape(outputs.shape).to(outputs.dtype)
        return 0.5 * (outputs - target).pow(2).reshape(outputs.shape[0], -1).sum(dim=1)

    def check_outputs(self, outputs: Tensor, batch: Batch, ids: Tensor | None = None) -> None:
        y = self.targets(batch)
        if not isinstance(y, Tensor) or y.numel() != outputs.numel():
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise TaskError(
                f"{type(self).__name__} compares outputs with targets value by value, but the model "
                f"returned shape {tuple(outputs.shape)} for targets of shape {shape}"
            )


class SmoothHingeTask(DecayedTask):
    """Binary SVM loss: smooth hinge of margin ``y * f(x)``, labels ``y`` in {-1, +1}.

    Outputs are one score per example, ``(B,)`` or ``(B, 1)``. ``temperature`` t -> 0 recovers
    the hinge; influence needs t > 0 (try 0.01 to 0.1).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        weight_decay: float = 0.0,
        *,
        input_key: int | str = 0,
        label_key: int | str = 1,
    ) -> None:
        super().__init__(weight_decay, input_key=input_key, label_key=label_key)
        if not temperature > 0.0:
            raise ValueError(f"temperature must be > 0 for a differentiable loss, got {temperature}")
        self.temperature = float(temperature)

    def output_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        labels = self.targets(batch).to(outputs.dtype)
        return smooth_hinge(outputs.reshape(labels.shape) * labels, self.temperature)

    def check_batch(self, batch: Batch, ids: Tensor | None = None) -> None:
        y = self.targets(batch)
        bad = (y != 1) & (y != -1)
        if bad.any():
            raise DataError(
                f"{type(self).__name__} needs labels -1 or +1; example(s) {example_ids(ids, bad)} have "
                f"{y[bad].reshape(-1)[0].item()!r}"
            )

    def check_outputs(self, outputs: Tensor, batch: Batch, ids: Tensor | None = None) -> None:
        if outputs.numel() != outputs.shape[0]:
            raise TaskError(
                f"{type(self).__name__} needs one score per example, (B,) or (B, 1); the model "
                f"returned shape {tuple(outputs.shape)}"
            )

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "temperature": self.temperature}


def classes_from_outputs(out: Tensor) -> Tensor:
    """Class predictions ``(B,)`` from outputs ``(B, C)``: argmax, or the sign (-1/+1) of one score."""
    if out.ndim == 1 or out.shape[-1] == 1:
        return torch.where(out.reshape(-1) >= 0, 1, -1)
    return out.argmax(dim=-1)


def predictions(task: Task, model: nn.Module, batch: Batch) -> Tensor:
    """Class predictions from the task's outputs: argmax for multi-class, sign for one score.

    The model runs in eval mode; its own train/eval mode is restored afterwards.
    """
    with torch.no_grad(), evaluating(model):
        return classes_from_outputs(task.outputs(model, batch))
