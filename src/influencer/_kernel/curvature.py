"""The curvature H of the training objective, as an operator on ``(k, p)`` blocks of vectors.

``H = (1/m) sum_{i in S} Hess(loss_i + Omega)(theta)`` over a set ``S`` of ``m`` training examples
(all of them, or a representative subset chosen by a sampler), or its generalised Gauss-Newton
approximation. H is never formed unless :meth:`Curvature.dense` is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from influencer._kernel.data import Examples, TensorExamples
from influencer._kernel.distributed import all_reduce_sum, shard
from influencer._kernel.errors import ConfigError, NonFiniteError
from influencer._kernel.functional import ModelFunction
from influencer._kernel.progress import progress_bar

CurvatureKind = Literal["hessian", "gauss_newton"]
_CACHE_BYTES = 256 * 2**20  # keep Hessian batches on the device when they take less than this


class Curvature:
    """Average curvature of ``loss_i + Omega`` over ``indices`` of ``data`` at ``theta``."""

    def __init__(
        self,
        fn: ModelFunction,
        theta: Tensor,
        data: Examples,
        indices: Tensor | Sequence[int] | None = None,
        kind: CurvatureKind = "hessian",
        batch_size: int = 256,
        vector_batch: int = 64,
        progress: bool = False,
        distributed: bool = False,
    ) -> None:
        if kind not in ("hessian", "gauss_newton"):
            raise ConfigError(f"curvature must be 'hessian' or 'gauss_newton', got {kind!r}")
        if batch_size < 1 or vector_batch < 1:
            raise ConfigError("batch_size and vector_batch must be >= 1")
        self.fn = fn
        self.theta = theta.detach()
        self.data = data
        self.indices = data.check_indices(indices)
        if len(self.indices) == 0:
            raise ConfigError("the Hessian needs at least one training example; got an empty subset")
        self.kind = kind
        self.batch_size = batch_size
        self.vector_batch = vector_batch
        self.progress = progress
        self.distributed = distributed
        # Under torch.distributed each rank sums its block of the examples (see distributed.py).
        self.local_indices = shard(self.indices) if distributed else self.indices
        self._product = fn.hvp if kind == "hessian" else fn.ggn_vp
        self._cached: list | None = None

    @property
    def n(self) -> int:
        """Number of examples the curvature averages over."""
        return len(self.indices)

    @property
    def p(self) -> int:
        return self.fn.p

    @property
    def dtype(self) -> torch.dtype:
        return self.theta.dtype

    @property
    def device(self) -> torch.device:
        return self.theta.device

    def cast(self, dtype: torch.dtype) -> Curvature:
        """The same operator computed in ``dtype`` (float64 for exact references)."""
        return self._copy(self.fn.cast(dtype), self.theta.to(dtype), self.vector_batch)

    def _copy(self, fn: ModelFunction, theta: Tensor, vector_batch: int) -> Curvature:
        return Curvature(
            fn,
            theta,
            self.data,
            self.indices,
            self.kind,
            self.batch_size,
            vector_batch,
            self.progress,
            self.distributed,
        )

    def _batches(self):
        if self._cached is not None:
            return self._cached
        batches = (self.fn.prepare(b) for _, b in self.data.chunks(self.batch_size, self.local_indices))
        if not isinstance(self.data, TensorExamples) or len(self.local_indices) == 0:
            return batches
        first = self.data.take(self.local_indices[:1])
        per_example = sum(x.element_size() * x.numel() for x in tree_flatten(first)[0] if torch.is_tensor(x))
        if per_example * len(self.local_indices) <= _CACHE_BYTES:
            self._cached = list(batches)
            return self._cached
        return batches

    def _apply(self, batch, vectors: Tensor, weight: float) -> Tensor:
        outs = [
            self._product(self.theta, batch, vectors[i : i + self.vector_batch], weight)
            for i in range(0, vectors.shape[0], self.vector_batch)
        ]
        return torch.cat(outs)

    def _regularizer(self, v: Tensor) -> Tensor:
        parts = [
            self.fn.regularizer_hvp(self.theta, v[i : i + self.vector_batch])
            for i in range(0, v.shape[0], self.vector_batch)
        ]
        return torch.cat(parts)

    def matvec(self, vectors: Tensor) -> Tensor:
        """``H @ v`` for each row of ``vectors`` ``(k, p)`` (or a single ``(p,)``), same shape."""
        single = vectors.ndim == 1
        v = vectors.reshape(-1, self.p).to(self.theta)
        out = torch.zeros_like(v)
        for batch in self._batches():
            out += self._apply(batch, v, 1.0 / self.n)
        if self.distributed:
            all_reduce_sum(out)
        out += self._regularizer(v)
        if not torch.isfinite(out).all():
            raise NonFiniteError(
                "a Hessian-vector product is not finite: the loss or its second derivatives overflow "
                "at these parameters (check inputs for NaN, or use float64)"
            )
        return out[0] if single else out

    def sample_matvec(self, vectors: Tensor, generator: torch.Generator, batch_size: int) -> Tensor:
        """Unbiased stochastic ``H @ v`` from one random minibatch of the examples, ``(k, p)``."""
        pick = torch.randperm(self.n, generator=generator)[: min(batch_size, self.n)]
        weight = 1.0 / len(pick)
        v = vectors.to(self.theta)
        if not self.distributed:
            out = self._apply(self.fn.prepare(self.data.take(self.indices[pick])), v, weight)
        else:
            # Every rank drew the same minibatch (same generator state); each takes a block of it.
            mine = shard(pick)
            out = torch.zeros_like(v)
            if len(mine):
                out += self._apply(self.fn.prepare(self.data.take(self.indices[mine])), v, weight)
            all_reduce_sum(out)
        return out + self._regularizer(v)

    def dense(self, dtype: torch.dtype | None = None, block: int = 256) -> Tensor:
        """The full symmetric ``(p, p)`` matrix, built from ``p`` products (small models only)."""
        fn = self.fn if dtype is None or dtype == self.dtype else self.fn.cast(dtype)
        # one vmapped product per block of columns: few, wide products are fastest here
        op = self._copy(fn, self.theta.to(fn.dtype), max(self.vector_batch, block))
        eye = torch.eye(self.p, dtype=op.dtype, device=op.device)
        cols = [
            op.matvec(eye[i : i + block])
            for i in progress_bar(range(0, self.p, block), desc="dense Hessian", enabled=self.progress)
        ]
        h = torch.cat(cols)
        return 0.5 * (h + h.T)

    def largest_eigenvalue(self, iters: int = 30, seed: int = 0, rtol: float = 1e-3) -> float:
        """Estimate of the largest-magnitude eigenvalue by power iteration."""
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(self.p, generator=gen, dtype=self.dtype).to(self.device)
        v /= v.norm()
        lam = 0.0
        for _ in range(iters):
            hv = self.matvec(v)
            new = float(v @ hv)
            norm = hv.norm()
            if norm == 0:
                return 0.0
            v = hv / norm
            if abs(new - lam) <= rtol * abs(new):
                return new
            lam = new
        return lam
