"""Fingerprints: sha256 digests of what a computed result depends on (weights, data, settings).

Caches key their entries by these, so a changed input is recomputed rather than served stale.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from influencer._kernel.data import Examples, TensorExamples
from influencer._kernel.task import Task


def _update_tensor(h: Any, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
    # Viewing as bytes works for every dtype (bfloat16 included) and copies nothing.
    h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")


def hash_tensors(tree: Any) -> str:
    """sha256 over the structure, dtypes, shapes and bytes of every tensor/array leaf of ``tree``."""
    h = hashlib.sha256()
    leaves, spec = tree_flatten(tree)
    h.update(str(spec).encode())
    for x in leaves:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if isinstance(x, Tensor):
            _update_tensor(h, x)
        else:
            h.update(repr(x).encode())
    return h.hexdigest()


def hash_module(model: torch.nn.Module) -> str:
    """sha256 of a module's weights and buffers (names, dtypes, shapes and values)."""
    return hash_tensors(dict(model.state_dict()))


def hash_examples(data: Examples, batch_size: int = 1024) -> str:
    """sha256 of every example's tensors, in order (a dataset is read once, chunk by chunk)."""
    if isinstance(data, TensorExamples):
        return hash_tensors(data.tree)
    h = hashlib.sha256()
    for _, batch in data.chunks(batch_size):
        h.update(hash_tensors(batch).encode())
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """sha256 of a JSON-able object in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def source_digest(cls: type) -> str | None:
    """sha256 of a class's source code, or None when Python cannot show it (built-ins, REPL)."""
    try:
        return hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()
    except (OSError, TypeError):
        return None


def _classes(obj: Any) -> dict[str, str | None]:
    """``{qualified name: source digest}`` of ``type(obj)`` and its bases outside torch and builtins."""
    out = {}
    for cls in type(obj).__mro__:
        if cls.__module__.split(".")[0] in ("builtins", "torch", "abc", "typing"):
            continue
        out[f"{cls.__module__}.{cls.__qualname__}"] = source_digest(cls)
    return out


def model_fingerprint(model: torch.nn.Module, state: dict[str, Tensor]) -> dict[str, Any]:
    """What defines a model's function: every module's class (and its source) and the state used.

    ``state`` maps names to the tensors the computation uses (parameters and buffers).
    A ``None`` source digest means the class's code could not be read, so a change to it would go
    unnoticed; callers that cache results should say so.
    """
    classes: dict[str, str | None] = {}
    for module in model.modules():
        classes.update(_classes(module))
    return {"classes": classes, "state": hash_tensors(state)}


def task_fingerprint(task: Task) -> dict[str, Any]:
    """The task's own :meth:`~influencer.tasks.Task.settings`, its class source and its attributes.

    Attributes are included so that a hyperparameter held on the task changes the fingerprint even
    when ``settings()`` is not overridden; tensors and arrays are hashed, other values ``repr``-ed.
    """
    attributes = {}
    for name, value in sorted(vars(task).items()):
        if isinstance(value, (Tensor, np.ndarray)):
            attributes[name] = hash_tensors(value)
        elif isinstance(value, (bool, int, float, str, type(None))):
            attributes[name] = value
        else:
            attributes[name] = f"{type(value).__qualname__}:{value!r}"
    return {"settings": task.settings(), "classes": _classes(task), "attributes": attributes}
