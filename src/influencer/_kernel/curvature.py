"""The curvature H of the training objective, as an operator on ``(k, p)`` blocks of vectors.

``H = (1/m) sum_{i in S} Hess(loss_i + Omega)(theta)`` over a set ``S`` of ``m`` training examples
(all of them, or a representative subset chosen by a sampler), or its generalised Gauss-Newton
approximation. H is never formed unless :meth:`Curvature.dense` is asked for.

Products are computed per batch of examples (:class:`~influencer._kernel.functional.ModelFunction`).
In the default ``hvp="reverse"`` mode each batch is linearised once (its gradient's autograd graph
is built) and every product is a batched backward pass through it. When the examples and those
graphs are small enough (:data:`_CACHE_BYTES` each) they are kept on the device for the
operator's lifetime, so iterative solvers (CG, Arnoldi, power iteration) pay the forward and
first backward pass once instead of once per iteration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from influencer._kernel.data import Examples, TensorExamples
from influencer._kernel.distributed import all_reduce_sum, shard
from influencer._kernel.errors import ConfigError, InfluencerError, NonFiniteError
from influencer._kernel.functional import HVPMode, Linearized, ModelFunction, check_hvp_mode, traceable
from influencer._kernel.progress import progress_bar

CurvatureKind = Literal["hessian", "gauss_newton"]
_CACHE_BYTES = 256 * 2**20  # keep Hessian batches (and, apart, their graphs) when they take less
# Working set of one batched backward pass: a graph's saved tensors and a parameter row per
# vector. Wider passes run out of cache (benchmarks/bench_products.py, the digits MLP: 1,000
# vectors over every example take 1.3 s 64 at a time, 2.2 s 256 at a time); narrower ones pay
# per-pass overhead (on a LiSSA minibatch of 32 examples, 16 at a time is 1.7-2.9x slower).
_VECTOR_BYTES = 32 * 2**20
# A GPU has no such cache to stay in, and wide passes keep it busy: there the budget only bounds
# memory (at most 64 vectors per pass, as before, unless their working set passes 1 GiB).
_VECTOR_BYTES_CUDA = 2**30
_FORWARD_VECTOR_BATCH = 64  # vectors per forward-over-reverse product (no graph to measure)


def pass_width(per_vector: int, device: torch.device) -> int:
    """Vectors per batched backward pass whose working set is ``per_vector`` bytes per vector."""
    if device.type == "cuda":
        return max(1, min(_FORWARD_VECTOR_BATCH, _VECTOR_BYTES_CUDA // per_vector))
    return max(1, _VECTOR_BYTES // per_vector)


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
        vector_batch: int | None = None,
        progress: bool | None = False,
        distributed: bool = False,
        hvp: HVPMode = "reverse",
    ) -> None:
        check_hvp_mode(hvp)
        if kind not in ("hessian", "gauss_newton"):
            raise ConfigError(f"curvature must be 'hessian' or 'gauss_newton', got {kind!r}")
        if batch_size < 1 or (vector_batch is not None and vector_batch < 1):
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
        self.hvp = hvp
        self._product = fn.hvp if kind == "hessian" else fn.ggn_vp
        self._cached: list | None = None
        self._linearized: list[Linearized] | None = None  # one per cached batch, when they fit
        self._keep_linearized = hvp == "reverse"
        self._resident: Any = None  # the whole (small) Hessian set as one prepared batch

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

    def _copy(self, fn: ModelFunction, theta: Tensor, vector_batch: int | None) -> Curvature:
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
            self.hvp,
        )

    def _batches(self):
        if self._cached is not None:
            return self._cached
        batches = (self.fn.prepare(b) for _, b in self.data.chunks(self.batch_size, self.local_indices))
        if self._fits(self.local_indices):
            self._cached = list(batches)
            return self._cached
        return batches

    def _apply(self, batch, vectors: Tensor, weight: float) -> Tensor:
        with traceable():
            return self._apply_unchecked(batch, vectors, weight)

    def _apply_unchecked(self, batch, vectors: Tensor, weight: float) -> Tensor:
        if self.hvp == "reverse":
            # One graph for the batch, reused by every block of vectors.
            graph = self.fn.linearize(self.theta, batch, weight, self.kind, measure=True)
            return self._chunked(graph, vectors)
        width = self._width(self._product)
        outs = [
            self._product(self.theta, batch, vectors[i : i + width], weight, mode=self.hvp)
            for i in range(0, vectors.shape[0], width)
        ]
        return torch.cat(outs)

    def _width(self, product: Callable[..., Tensor]) -> int:
        """Vectors per batched pass through ``product``: ``vector_batch``, or as many as keep the
        pass's working set (its graph and a parameter row per vector) within :data:`_VECTOR_BYTES`
        (on a GPU: 64, fewer where that passes :data:`_VECTOR_BYTES_CUDA`); 64 for a product with
        no measured graph (forward mode, the regulariser)."""
        if self.vector_batch is not None:
            return self.vector_batch
        if not isinstance(product, Linearized):
            return _FORWARD_VECTOR_BATCH
        return pass_width(product.nbytes + self.p * self.theta.element_size(), self.theta.device)

    def _chunked(self, product: Callable[[Tensor], Tensor], vectors: Tensor) -> Tensor:
        width = self._width(product)
        if vectors.shape[0] <= width:
            return product(vectors)
        return torch.cat([product(vectors[i : i + width]) for i in range(0, len(vectors), width)])

    def _products(self) -> Iterator[Callable[[Tensor], Tensor]]:
        """One linear map ``(k, p) -> (k, p)`` per batch of the local examples (weight ``1/n``)."""
        weight = 1.0 / self.n
        if self._linearized is not None:
            yield from self._linearized
            return
        batches = self._batches()
        if not (self._keep_linearized and self._cached is not None):
            for batch in batches:
                yield lambda v, batch=batch: self._apply(batch, v, weight)
            return
        # First pass over cached batches: linearise each, and keep them all if their graphs fit.
        kept: list[Linearized] | None = []
        total = 0
        for batch in batches:
            lin = self.fn.linearize(self.theta, batch, weight, self.kind, measure=True)
            total += lin.nbytes
            if kept is not None and total <= _CACHE_BYTES:
                kept.append(lin)
            else:
                kept = None  # too large to keep: later products rebuild them batch by batch
            yield lin
        self._linearized = kept
        self._keep_linearized = kept is not None

    def _add_regularizer(self, out: Tensor, v: Tensor) -> Tensor:
        """``out += Hess(Omega) @ v`` in place, ``(k, p)``: for L2 in one pass, else in blocks of
        vectors (each a vmapped forward-over-reverse product)."""
        fused = self.fn.task.regularizer_curvature() is not None
        width = max(1, len(v)) if fused else self._width(self.fn.regularizer_hvp)
        for i in range(0, v.shape[0], width):
            self.fn.regularizer_hvp(self.theta, v[i : i + width], out=out[i : i + width])
        return out

    def matvec(self, vectors: Tensor) -> Tensor:
        """``H @ v`` for each row of ``vectors`` ``(k, p)`` (or a single ``(p,)``), same shape."""
        single = vectors.ndim == 1
        v = vectors.reshape(-1, self.p).to(self.theta)
        out = torch.zeros_like(v)
        with traceable(), self._failures_explained():
            for product in self._products():
                out += self._chunked(product, v)
        if self.distributed:
            all_reduce_sum(out)
        self._add_regularizer(out, v)
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
            with self._failures_explained():
                out = self._apply(self._minibatch(pick), v, weight)
        else:
            # Every rank drew the same minibatch (same generator state); each takes a block of it.
            mine = shard(pick)
            out = torch.zeros_like(v)
            if len(mine):
                out += self._apply(self.fn.prepare(self.data.take(self.indices[mine])), v, weight)
            all_reduce_sum(out)
        return self._add_regularizer(out, v)

    @contextlib.contextmanager
    def _failures_explained(self) -> Iterator[None]:
        """On a failure of the model or task, look for the examples at fault (labels out of range,
        ...) batch by batch and raise the task's one-line error naming them; else re-raise."""
        try:
            yield
        except (RuntimeError, IndexError, ValueError) as exc:
            if isinstance(exc, InfluencerError):
                raise
            for ids, batch in self.data.chunks(self.batch_size, self.local_indices):
                self.fn.explain_failure(self.theta, self.fn.prepare(batch), ids)
            raise

    def _minibatch(self, pick: Tensor) -> Any:
        """The prepared batch of examples at positions ``pick`` of the Hessian set."""
        if self._resident is None and self._fits(self.indices):
            # Held once on the device: a minibatch is then one gather there, with no host copy.
            self._resident = self.fn.prepare(self.data.take(self.indices))
        if self._resident is None:
            return self.fn.prepare(self.data.take(self.indices[pick]))
        return tree_map(lambda x: x[pick.to(x.device)] if isinstance(x, Tensor) else x, self._resident)

    def _fits(self, indices: Tensor) -> bool:
        """Whether the examples at ``indices`` are tensors taking at most :data:`_CACHE_BYTES`."""
        if not isinstance(self.data, TensorExamples) or len(indices) == 0:
            return False
        first = self.data.take(indices[:1])
        per_example = sum(x.element_size() * x.numel() for x in tree_flatten(first)[0] if torch.is_tensor(x))
        return per_example * len(indices) <= _CACHE_BYTES

    def dense(self, dtype: torch.dtype | None = None, block: int = 256) -> Tensor:
        """The full symmetric ``(p, p)`` matrix, built from ``p`` products (small models only)."""
        same = dtype is None or dtype == self.dtype
        if self.hvp == "reverse":
            # Backward passes as wide as their working set allows (see _width).
            op = self if same else self._copy(self.fn.cast(dtype), self.theta.to(dtype), self.vector_batch)
        else:
            # forward mode: one vmapped product per block of columns, few wide products are fastest
            fn = self.fn if same else self.fn.cast(dtype)
            width = max(self._width(self._product), block)
            op = self._copy(fn, self.theta.to(fn.dtype), width)
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
        for _ in progress_bar(range(iters), "largest eigenvalue", self.progress):
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
