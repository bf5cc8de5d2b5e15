"""Queries over the stores of several training checkpoints, summed with their learning rates (TracIn).

TracIn (Pruthi et al., 2020) scores a training example by the sum over checkpoints ``c`` of
``lr_c grad f(test; theta_c) . grad loss_i(theta_c)``. With the stores a
:class:`~influencer.index.training.TrainingStore` wrote (one per checkpoint, each with its
model state at ``theta_c`` and learning rate ``lr_c``)::

    stores = CheckpointStores.open("runs/store", model, task, train)
    s = stores.scores(test)            # (m, n) = sum_c lr_c * (projected scores at checkpoint c)
    top = stores.top_k(test, k=10)     # streamed over the chunks, never (m, n)

Each checkpoint's term is the score :meth:`GradientIndex.scores
<influencer.index.GradientIndex.scores>` gives on that store for the model at ``theta_c`` (default
preconditioner: none, the projected gradient dot product ``P grad f(test) . Pg_i / n``), so the
sum equals the one over post-hoc stores built at the same checkpoints with the same projector
(exactly when the stored rows are equal; see :mod:`influencer.index.training`). The test
gradients are computed at each checkpoint's parameters: ``m`` forward and backward passes per
checkpoint, then ``O(n k)`` per test example and checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from influencer._kernel.errors import ConfigError
from influencer._kernel.scores import TopK
from influencer.index.gradient_index import GradientIndex, check_score_dtype, low_precision_scores
from influencer.index.preconditioners import NoPreconditioner, Preconditioner
from influencer.index.store import IndexStoreError, StoreLayout
from influencer.index.topk import RunningTopK, concat_rows
from influencer.index.training import load_model_state
from influencer.influence import Influence


class CheckpointStores:
    """The stores of several checkpoints with their learning rates; scores are their weighted sum."""

    def __init__(self, indexes: list[GradientIndex], lrs: list[float]) -> None:
        if not indexes:
            raise ConfigError("CheckpointStores needs at least one store")
        first = indexes[0]
        for index in indexes[1:]:
            if (index.n, index.chunk) != (first.n, first.chunk):
                raise IndexStoreError(
                    f"the stores {first.path} and {index.path} hold different training sets or chunk sizes "
                    f"(n={first.n}/{index.n}, chunk={first.chunk}/{index.chunk}); collect them with one "
                    "TrainingStore"
                )
        self.indexes, self.lrs = indexes, [float(lr) for lr in lrs]

    @classmethod
    def open(
        cls, path: str | Path, model: nn.Module, task: Any, train: Any, **influence: Any
    ) -> CheckpointStores:
        """Every complete ``step-*`` store under ``path``, each opened for ``model`` at its parameters.

        ``model`` is copied per checkpoint (its own parameters are left alone); ``influence``:
        keyword arguments of :class:`~influencer.Influence` (e.g. ``batch_size``, ``params``).
        """
        root = Path(path)
        dirs = (
            sorted(d for d in root.glob("step-*") if (d / "manifest.json").exists()) if root.is_dir() else []
        )
        if not dirs:
            raise IndexStoreError(
                f"{root} holds no checkpoint stores (step-*/manifest.json); collect them with "
                "influencer.index.TrainingStore during training"
            )
        indexes, lrs = [], []
        for d in dirs:
            manifest = StoreLayout(d).read_manifest()
            assert manifest is not None
            training = manifest["header"].get("training")
            if not isinstance(training, dict):
                raise IndexStoreError(f"{d} was not collected during training (no 'training' in its header)")
            copied = copy.deepcopy(model)
            load_model_state(copied, d)
            inf = Influence(copied, task, train, **influence)
            indexes.append(GradientIndex.open(d, inf))
            lrs.append(training["lr"])
        return cls(indexes, lrs)

    @property
    def n(self) -> int:
        return self.indexes[0].n

    def scores(self, test: Any, preconditioner: Preconditioner | None = None) -> Tensor:
        """``sum_c lr_c scores_c`` ``(m, n)``; positive = helpful."""
        pre = NoPreconditioner() if preconditioner is None else preconditioner
        total = None
        for index, lr in zip(self.indexes, self.lrs, strict=True):
            s = lr * index.scores(test, preconditioner=pre)
            total = s if total is None else total + s
        assert total is not None
        return total

    def top_k(
        self,
        test: Any,
        k: int = 10,
        *,
        block: int = 256,
        preconditioner: Preconditioner | None = None,
        score_dtype: torch.dtype | None = None,
    ) -> TopK:
        """The ``k`` most helpful and harmful training examples of the summed scores, streamed by chunk.

        ``score_dtype``: the dtype of the score products (see :meth:`GradientIndex.top_k`).
        """
        score_dtype = check_score_dtype(score_dtype)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"k must be a positive integer (training examples per list), got {k!r}")
        if not isinstance(block, int) or isinstance(block, bool) or block < 1:
            raise ConfigError(f"block must be a positive integer (test examples per block), got {block!r}")
        pre = NoPreconditioner() if preconditioner is None else preconditioner
        kk, n, chunk = min(k, self.n), self.n, self.indexes[0].chunk
        ex = self.indexes[0].influence.examples(test)
        parts = []
        for start in range(0, len(ex), block):
            stop = min(start + block, len(ex))
            sub = ex.take(torch.arange(start, stop))
            directions = [
                lr * pre.directions(index, sub) for index, lr in zip(self.indexes, self.lrs, strict=True)
            ]
            running = RunningTopK(stop - start, kk, directions[0].dtype, directions[0].device)
            for first in range(0, n, chunk):
                ids = torch.arange(first, min(first + chunk, n))
                s = sum(
                    low_precision_scores(d, index.gradients(ids), n, score_dtype)
                    for d, index in zip(directions, self.indexes, strict=True)
                )
                running.add(s, ids)
            part = running.result()
            parts.append(TopK(*(getattr(part, f).cpu() for f in TopK.__dataclass_fields__)))
        return concat_rows(parts)
