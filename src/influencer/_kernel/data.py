"""Examples: random access to a user's data in batches, whatever form it comes in.

Accepted forms (see :func:`as_examples`):

* a tuple/list of equal-length arrays or tensors, e.g. ``(X, y)`` -> batches ``(X[idx], y[idx])``;
* a dict of equal-length arrays or tensors -> batches ``{k: v[idx]}``;
* a single array or tensor -> batches ``X[idx]``;
* a ``torch.utils.data.TensorDataset`` (same fast path), any map-style ``Dataset`` (items are
  collated with ``default_collate``), or a ``DataLoader`` (its dataset, collate function and
  workers are used; its sampler is not: influence needs a fixed order).

NumPy floating arrays become tensors of ``torch.get_default_dtype()``; tensors keep their dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from influencer._kernel.errors import DataError

Batch = Any


def _as_tensor(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x
    arr = np.asarray(x)
    if arr.dtype == object:
        raise DataError("data arrays must be numeric; got an object array (ragged lists?)")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.to(torch.get_default_dtype()) if t.is_floating_point() else t


def to_device(batch: Batch, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
    """Move every tensor in ``batch`` to ``device``; cast floating tensors to ``dtype`` if given."""

    def move(x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x
        if dtype is not None and x.is_floating_point():
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)

    return tree_map(move, batch)


def batch_size_of(batch: Batch) -> int:
    """Leading dimension shared by every tensor of a batch."""
    leaves = [x for x in tree_flatten(batch)[0] if isinstance(x, Tensor)]
    if not leaves:
        raise DataError("a batch must contain at least one tensor")
    return int(leaves[0].shape[0])


class Examples:
    """Random access to ``n`` examples in batches. Subclasses implement ``__len__`` and ``take``."""

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, indices: Tensor) -> Batch:
        """The batch of examples at ``indices`` (1-D int64 tensor), leading dimension ``len(indices)``."""
        raise NotImplementedError

    def chunks(
        self, batch_size: int, indices: Tensor | Sequence[int] | None = None
    ) -> Iterator[tuple[Tensor, Batch]]:
        """Yield ``(idx, batch)`` over ``indices`` (default all) in order, ``batch_size`` at a time."""
        idx = self.check_indices(indices)
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            yield part, self.take(part)

    def check_indices(self, indices: Tensor | Sequence[int] | np.ndarray | None) -> Tensor:
        """Indices as a 1-D int64 tensor, checked to lie in ``[0, n)``."""
        n = len(self)
        if indices is None:
            return torch.arange(n)
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor) else indices)
        idx = idx.reshape(-1).to(torch.int64).cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise DataError(f"indices must lie in [0, {n}); got range [{int(idx.min())}, {int(idx.max())}]")
        return idx

    def example_spec(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Per-example shape and dtype of each tensor leaf, used to check that data sets match."""
        leaves = tree_flatten(self.take(torch.arange(1)))[0]
        return [(tuple(x.shape[1:]), x.dtype) for x in leaves if isinstance(x, Tensor)]


class TensorExamples(Examples):
    """Examples held as a pytree of tensors with a common leading dimension (vectorised indexing)."""

    def __init__(self, tree: Batch) -> None:
        self.tree = tree_map(_as_tensor, tree)
        leaves = [x for x in tree_flatten(self.tree)[0] if isinstance(x, Tensor)]
        if not leaves:
            raise DataError("data must contain at least one array or tensor")
        lengths = {int(x.shape[0]) if x.ndim else -1 for x in leaves}
        if -1 in lengths:
            raise DataError("every data array needs a leading example dimension; got a scalar")
        if len(lengths) != 1:
            raise DataError(
                f"data arrays must have the same number of examples; got lengths {sorted(lengths)}"
            )
        self.n = lengths.pop()
        if self.n == 0:
            raise DataError("data is empty: influence needs at least one example")

    def __len__(self) -> int:
        return self.n

    def take(self, indices: Tensor) -> Batch:
        return tree_map(lambda x: x[indices.to(x.device)] if isinstance(x, Tensor) else x, self.tree)


class DatasetExamples(Examples):
    """Examples from a map-style ``Dataset``; batches are collated items."""

    def __init__(
        self,
        dataset: Dataset,
        collate_fn: Callable[[list[Any]], Batch] | None = None,
        num_workers: int = 0,
    ) -> None:
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError as exc:
            raise DataError(
                "the dataset has no len(): influence needs a map-style Dataset with __len__ and "
                "__getitem__ (iterable-style datasets cannot be indexed)"
            ) from exc
        if n == 0:
            raise DataError("data is empty: influence needs at least one example")
        self.dataset = dataset
        self.collate_fn = collate_fn or default_collate
        self.num_workers = num_workers
        self.n = n

    def __len__(self) -> int:
        return self.n

    def take(self, indices: Tensor) -> Batch:
        return _plain(self.collate_fn([self.dataset[int(i)] for i in indices]))

    def chunks(
        self, batch_size: int, indices: Tensor | Sequence[int] | None = None
    ) -> Iterator[tuple[Tensor, Batch]]:
        idx = self.check_indices(indices)
        if self.num_workers == 0:
            yield from super().chunks(batch_size, idx)
            return
        # Workers load batches ahead while the model computes gradients.
        loader = DataLoader(
            Subset(self.dataset, idx.tolist()),
            batch_size=batch_size,
            shuffle=False,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
        )
        for start, batch in zip(range(0, len(idx), batch_size), loader, strict=True):
            yield idx[start : start + batch_size], _plain(batch)


def _plain(batch: Batch) -> Batch:
    """A collated mapping as a dict: a tokenizer's ``BatchEncoding`` (what Hugging Face's
    ``DataCollatorWithPadding`` returns) is one leaf to pytrees, its tensors out of their reach."""
    return dict(batch) if isinstance(batch, Mapping) and not isinstance(batch, dict) else batch


def as_examples(data: Any) -> Examples:
    """Wrap any supported form of data (see module docstring) as :class:`Examples`."""
    if isinstance(data, Examples):
        return data
    if isinstance(data, DataLoader):
        ds = data.dataset
        if isinstance(ds, TensorDataset):
            return TensorExamples(tuple(ds.tensors))
        return DatasetExamples(ds, data.collate_fn, data.num_workers)
    if isinstance(data, TensorDataset):
        return TensorExamples(tuple(data.tensors))
    if isinstance(data, Dataset):
        return DatasetExamples(data)
    if isinstance(data, (Tensor, np.ndarray)):
        return TensorExamples(data)
    if isinstance(data, (tuple, list, Mapping)):
        if len(data) == 0:
            raise DataError("data is empty: pass e.g. (inputs, labels) with at least one example")
        data = _plain(data)
        return TensorExamples(tuple(data) if isinstance(data, list) else data)
    raise DataError(
        f"cannot use {type(data).__name__} as data; pass (inputs, labels) arrays or tensors, "
        "a torch Dataset, or a DataLoader"
    )
