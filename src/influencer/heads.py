"""Influence over a network's head on fixed features: the frozen part runs once over the data.

Influence over the parameters of one module, the *head* (a classifier on a pretrained network, the
last layer of a CNN), whose input does not depend on those parameters needs only the head's
inputs, the *features*: gradients and Hessian-vector products over the head's parameters are the
same whether the rest of the network is run every time or the features are read from memory.
:class:`Head` captures them once with a forward hook and gives a model, a task and data that
compute influence on them::

    head = Head(model, task, "classifier")
    train_f = head.features(train, dtype=torch.float64)   # one pass of the network over train
    inf = Influence(head.model, head.task, train_f, estimator=CG(damping=1e-3)).fit()
    scores = inf.scores(head.features(test, dtype=torch.float64))

gives the scores of ``Influence(model, task, train, params=["classifier"])`` (parameters keep their
names), but every gradient and Hessian-vector product is a pass of the head alone.

The head's output must be the task's output (nothing runs after it; checked on every batch), its
weights must not be shared with the rest of the network (tied embeddings), and the task must split
its loss into ``outputs`` and ``output_loss`` with the default measurement (the loss), as the
built-in and Hugging Face tasks do.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from influencer._kernel.data import Examples, as_examples
from influencer._kernel.errors import TaskError
from influencer._kernel.fingerprint import hash_json, task_fingerprint
from influencer._kernel.functional import ModelFunction
from influencer._kernel.progress import progress_bar
from influencer._kernel.task import Batch, DecayedTask, Task

__all__ = ["FeatureExamples", "Head", "HeadModel", "HeadTask", "original_batch"]

# Keys of a batch of FeatureExamples: the head's inputs and the example's own (original) batch.
FEATURES, BATCH = "features", "batch"


class HeadModel(nn.Module):
    """The head as a model of its own, on features ``(B, ...)``.

    The head sits at the same dotted path as in the network (``bert.pooler`` is registered as
    ``bert`` -> ``pooler``), so its parameters keep their names and are the network's tensors.
    """

    def __init__(self, name: str, head: nn.Module) -> None:
        super().__init__()
        parent: nn.Module = self
        *path, last = name.split(".")
        for part in path:
            child = nn.Module()
            parent.add_module(part, child)
            parent = child
        parent.add_module(last, head)
        self.head_name = name

    def forward(self, features: Tensor) -> Tensor:
        return self.get_submodule(self.head_name)(features)


class _Of:
    """Holds the wrapped task; its ``repr`` is the task's fingerprint, so a :class:`HeadTask`'s
    cache fingerprint changes exactly when the wrapped task's does."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def __repr__(self) -> str:
        return hash_json(task_fingerprint(self.task))


class HeadTask(Task):
    """A task on batches of :class:`FeatureExamples`: the head's outputs on the features, scored
    by the wrapped task's ``output_loss`` on the example's own batch (its labels)."""

    def __init__(self, task: Task, name: str) -> None:
        self.of = _Of(task)
        self.head = name
        self.variable_length = task.variable_length
        # The head is an ordinary module: per-example gradients can run under vmap even when the
        # wrapped task's network (e.g. its attention-mask code) cannot.
        self.vectorize = True

    @property
    def task(self) -> Task:
        return self.of.task

    def outputs(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch[FEATURES])

    def output_loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return self.task.output_loss(outputs, batch[BATCH])

    def regularizer(self, params: Mapping[str, Tensor]) -> Tensor | float:
        return self.task.regularizer(params)

    def regularizer_curvature(self) -> float | None:
        return self.task.regularizer_curvature()

    def settings(self) -> dict[str, Any]:
        return {"task": "HeadTask", "head": self.head, "of": self.task.settings()}


def original_batch(batch: Batch) -> Batch:
    """The example's own batch inside a batch of :class:`FeatureExamples` (else ``batch``)."""
    if isinstance(batch, Mapping) and set(batch) == {FEATURES, BATCH} and isinstance(batch[FEATURES], Tensor):
        return batch[BATCH]
    return batch


class FeatureExamples(Examples):
    """Features ``(n, ...)`` of the head beside the examples they were computed from.

    A batch is ``{"features": (B, ...), "batch": <the examples' own batch>}``; ``keep`` may slim
    the own batch to what the loss reads (e.g. only the labels).
    """

    def __init__(self, features: Tensor, data: Any, keep: Any = None) -> None:
        self.data = as_examples(data)
        if len(features) != len(self.data):
            raise TaskError(
                f"got features of {len(features)} examples for data of {len(self.data)}: compute them with "
                "Head.extract on the same data"
            )
        self.tensor = features
        self.keep = keep if keep is not None else (lambda b: b)

    def __len__(self) -> int:
        return len(self.data)

    def take(self, indices: Tensor) -> Batch:
        return {
            FEATURES: self.tensor[indices.to(self.tensor.device)],
            BATCH: self.keep(self.data.take(indices)),
        }

    def chunks(
        self, batch_size: int, indices: Tensor | Sequence[int] | None = None
    ) -> Iterator[tuple[Tensor, Batch]]:
        idx = self.check_indices(indices)
        for ids, batch in self.data.chunks(batch_size, idx):  # the data's own loader (workers) if any
            yield ids, {FEATURES: self.tensor[ids.to(self.tensor.device)], BATCH: self.keep(batch)}


class Head:
    """A network's head as its own model, with the network's features as its data.

    Args:
        model: the whole trained network.
        task: the task it was trained with (``outputs`` + ``output_loss``, default measurement).
        name: the head module's dotted name, e.g. ``"classifier"``, ``"fc"``, ``"head"``. Its
            single positional input is the feature; its output must be the task's output.
    """

    def __init__(self, model: nn.Module, task: Task, name: str) -> None:
        modules = dict(model.named_modules())
        if name not in modules or not name:
            close = difflib.get_close_matches(name, [m for m in modules if m], n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            last = [m for m in modules if m and "." not in m]
            raise TaskError(
                f"the model has no module named {name!r}{hint}; its top-level modules are "
                f"{', '.join(last) or '(none)'}: name the module whose input is the features"
            )
        head = modules[name]
        own = {id(p) for p in head.parameters()}
        if not own:
            raise TaskError(f"module {name!r} has no parameters to compute influence over")
        shared = [
            n
            for n, p in model.named_parameters(remove_duplicate=False)
            if id(p) in own and not n.startswith(name + ".")
        ]
        if shared:
            raise TaskError(
                f"the head {name!r} shares weights with the rest of the network ({', '.join(shared[:3])}: "
                "tied weights), so its input depends on its own parameters: compute influence on the whole "
                f"network instead, Influence(model, task, train, params=[{name!r}])"
            )
        if not task.supports_gauss_newton or type(task).measurement is not Task.measurement:
            raise TaskError(
                f"influence over a head on fixed features needs a task that splits its loss into "
                f"outputs(model, batch) and output_loss(outputs, batch) and keeps the default measurement; "
                f"{type(task).__name__} does not: compute influence on the whole network with "
                f"params=[{name!r}] instead"
            )
        self.network = model
        self.name = name
        self.module = head
        self.model = HeadModel(name, head)
        self.task = HeadTask(task, name)
        self.inner = task

    def keep(self, batch: Batch) -> Batch:
        """What the loss reads of an example's own batch: for the built-in tasks only the labels
        (the inputs become an empty ``(B, 0)`` placeholder), else the whole batch."""
        task = self.inner
        builtin = isinstance(task, DecayedTask) and type(task).output_loss.__module__ == Task.__module__
        if not builtin:
            return batch
        key = task.input_key
        try:
            x = batch[key]
        except (KeyError, IndexError, TypeError):
            return batch
        if not isinstance(x, Tensor):
            return batch
        empty = x.reshape(len(x), -1)[:, :0]
        if isinstance(batch, Mapping):
            return {**batch, key: empty}
        if isinstance(batch, (tuple, list)):
            return type(batch)(empty if i == key else v for i, v in enumerate(batch))
        return batch

    def extract(
        self,
        data: Any,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 128,
        progress: bool = False,
    ) -> Tensor:
        """The head's input for every example ``(n, ...)``, on the CPU in ``dtype`` (default: the
        model's), from one pass of the network over ``data`` in eval mode, computed in ``dtype``.

        Raises :class:`TaskError` when the task's outputs are not the head's outputs.
        """
        examples = as_examples(data)
        fn = ModelFunction(self.network, self.inner, [self.name], device, dtype)
        seen: list[Tensor] = []
        made: list[Any] = []

        def take_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if len(args) != 1 or kwargs or not isinstance(args[0], Tensor):
                raise TaskError(
                    f"the head {self.name!r} must be called with one tensor (its features); it got "
                    f"{len(args)} positional and {len(kwargs)} keyword arguments"
                )
            seen.append(args[0].detach())

        def take_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            made.append(output)

        hooks = [
            self.module.register_forward_pre_hook(take_input, with_kwargs=True),
            self.module.register_forward_hook(take_output, with_kwargs=True),
        ]
        parts = []
        total = -(-len(examples) // batch_size)
        try:
            with torch.no_grad():
                chunks = progress_bar(
                    examples.chunks(batch_size), "features", progress, total=total, unit="batch"
                )
                for _, batch in chunks:
                    seen.clear()
                    made.clear()
                    out = fn.outputs(fn.theta0, fn.prepare(batch))
                    if len(seen) != 1:
                        raise TaskError(
                            f"the head {self.name!r} ran {len(seen)} times in one forward pass; it must run "
                            "exactly once, on the features"
                        )
                    self._check_output(out, made[0])
                    parts.append(seen[0].cpu())
        finally:
            for hook in hooks:
                hook.remove()
        return torch.cat(parts)

    def _check_output(self, out: Tensor, head_out: Any) -> None:
        same = (
            isinstance(head_out, Tensor)
            and head_out.shape == out.shape
            and (head_out is out or torch.allclose(head_out, out, rtol=1e-6, atol=0.0))
        )
        if not same:
            shape = tuple(head_out.shape) if isinstance(head_out, Tensor) else type(head_out).__name__
            raise TaskError(
                f"the task's outputs {tuple(out.shape)} are not the outputs of the head {self.name!r} "
                f"({shape}): something runs after it. Name the network's last module as the head, or "
                f"compute influence on the whole network with params=[{self.name!r}]"
            )

    def examples(self, features: Tensor, data: Any) -> FeatureExamples:
        """``data`` with its precomputed ``features`` ``(n, ...)`` (e.g. from a cache)."""
        return FeatureExamples(features, data, self.keep)

    def features(self, data: Any, **options: Any) -> FeatureExamples:
        """``data`` with its features, computed by :meth:`extract` (``options`` go there)."""
        return self.examples(self.extract(data, **options), data)
