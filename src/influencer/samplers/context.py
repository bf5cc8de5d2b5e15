"""What a sampler may look at: the model, its task, the training data and the candidate pool.

Features and logits are computed once per context, streamed over the pool in chunks under
``torch.no_grad`` on the context's device, and cached, so drawing many subsets (seeds, sizes)
pays for one forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from influencer._kernel.data import Examples, as_examples
from influencer._kernel.errors import ConfigError, DataError, TaskError
from influencer._kernel.functional import ModelFunction
from influencer._kernel.task import Task


class SamplerContext:
    """Candidates ``pool`` (training ids, default all) of ``train`` for a ``model`` and ``task``.

    Args:
        model: the trained model (not modified).
        task: its :class:`~influencer.tasks.Task`.
        train: training data in any form :func:`~influencer.data.as_examples` accepts.
        pool: training ids a subset may be drawn from (e.g. the retained data when a class is
            removed); default all.
        labels: class label per *training* example ``(n,)``; default the integer tensor at
            position 1 of each batch (``(inputs, labels)`` data).
        device: where forward passes run; default the model's.
        batch_size: examples per forward chunk.
        fn: an existing :class:`~influencer._kernel.functional.ModelFunction` to share (its device and
            dtype are used); see :meth:`from_influence`.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train: Any,
        *,
        pool: Sequence[int] | Tensor | None = None,
        labels: Sequence[int] | Tensor | None = None,
        device: torch.device | str | None = None,
        batch_size: int = 512,
        fn: ModelFunction | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.fn = fn if fn is not None else ModelFunction(model, task, device=device)
        self.train: Examples = as_examples(train)
        self.pool = torch.unique(self.train.check_indices(pool))  # sorted, distinct
        if len(self.pool) == 0:
            raise DataError("the sampling pool is empty: pass at least one candidate training id")
        self.batch_size = batch_size
        self._labels = None if labels is None else self._check_labels(labels)
        self._cache: dict[Any, Any] = {}

    @classmethod
    def from_influence(cls, influence: Any, pool: Sequence[int] | Tensor | None = None, **kwargs: Any):
        """A context sharing an :class:`~influencer.Influence`'s model function and training data."""
        fn = influence.fn
        return cls(fn.model, fn.task, influence.train, pool=pool, fn=fn, **kwargs)

    @property
    def n_pool(self) -> int:
        return len(self.pool)

    @property
    def device(self) -> torch.device:
        return self.fn.device

    def _check_labels(self, labels: Sequence[int] | Tensor) -> Tensor:
        y = torch.as_tensor(labels).reshape(-1).cpu()
        if len(y) != len(self.train):
            raise DataError(
                f"labels must have one entry per training example ({len(self.train)}), got {len(y)}"
            )
        if y.is_floating_point():
            raise DataError("labels must be integers (class ids)")
        return y.to(torch.int64)

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` cached under ``key`` for this context (e.g. a clustering reused across seeds)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def _chunks(self):
        for ids, batch in self.train.chunks(self.batch_size, self.pool):
            yield ids, self.fn.prepare(batch)

    def labels(self) -> Tensor:
        """Class label of each candidate, ``(n_pool,)`` int64."""
        if self._labels is None:
            parts = []
            for _, batch in self.train.chunks(self.batch_size * 8):
                y = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
                if not isinstance(y, Tensor) or y.is_floating_point() or y.ndim != 1:
                    raise DataError(
                        "cannot read class labels from the data (expected (inputs, integer labels) "
                        "batches); pass labels=... to the SamplerContext"
                    )
                parts.append(y.cpu())
            self._labels = torch.cat(parts).to(torch.int64)
        return self._labels[self.pool]

    def logits(self) -> Tensor:
        """The task's outputs for each candidate, ``(n_pool, C)`` (one column for a single score)."""
        if "logits" not in self._cache:
            parts = []
            with torch.no_grad():
                for _, batch in self._chunks():
                    out = self.fn.outputs(self.fn.theta0, batch)
                    parts.append(out.reshape(out.shape[0], -1))
            self._cache["logits"] = torch.cat(parts)
        return self._cache["logits"]

    def features(self, layer: str | None = None, capture: str = "input") -> Tensor:
        """Activations at a named submodule for each candidate, flattened to ``(n_pool, d)``.

        ``capture="input"`` takes what the module receives, ``"output"`` what it returns.
        ``layer=None`` means the input of the last module that holds parameters (for a
        classifier, the penultimate representation the head sees). ``layer=""`` is the raw input.
        """
        if capture not in ("input", "output"):
            raise ConfigError(f"capture must be 'input' or 'output', got {capture!r}")
        model = self.fn.model
        modules = dict(model.named_modules())
        if layer is None:
            with_params = [n for n, m in modules.items() if n and list(m.parameters(recurse=False))]
            if not with_params:
                raise ConfigError("the model has no submodule with parameters; name a layer explicitly")
            layer, capture = with_params[-1], "input"
        if layer not in modules:
            named = ", ".join(repr(n) for n in modules if n) or "(none)"
            raise ConfigError(f"no submodule named {layer!r}; the model has {named}")
        key = ("features", layer, capture)
        if key not in self._cache:
            self._cache[key] = self._capture(modules[layer], layer, capture)
        return self._cache[key]

    def _capture(self, module: nn.Module, layer: str, capture: str) -> Tensor:
        seen: list[Tensor] = []

        def hook(_module: nn.Module, args: tuple, output: Any) -> None:
            value = args[0] if capture == "input" else output
            if not isinstance(value, Tensor):
                raise TaskError(f"the {capture} of layer {layer!r} is not a tensor; choose another layer")
            seen.append(value.detach())

        parts = []
        handle = module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                for ids, batch in self._chunks():
                    seen.clear()
                    self.fn.loss(self.fn.theta0, batch)  # any task's loss runs the model's forward
                    if not seen:
                        raise TaskError(f"layer {layer!r} is not used by the model's forward pass")
                    value = seen[0]
                    if value.shape[0] != len(ids):
                        raise TaskError(
                            f"layer {layer!r} gives {value.shape[0]} rows for a batch of {len(ids)}: "
                            "choose a layer whose activations have a leading example dimension"
                        )
                    parts.append(value.reshape(len(ids), -1))
        finally:
            handle.remove()
        return torch.cat(parts)
