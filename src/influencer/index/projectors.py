"""Random projections of per-example gradients: ``(B, p) -> (B, k)`` with ``E[P^T P] = I``.

A :class:`Projector` is a frozen, validated configuration (JSON-able through :meth:`settings`, so
a store records exactly which projection made it). ``bind(fn)`` checks it against a model and
returns a :class:`Projection`, which

* ``project(G)`` maps per-example gradients ``G`` ``(B, p)`` to ``(B, k)``;
* ``gradients(fn, theta, batch, kind)`` returns the projected per-example gradients of a batch
  directly (``kind="loss"``: of ``loss_i + Omega``, as stored for training examples;
  ``"measurement"``: of the test measurement). Structured projectors override it so that the
  ``p``-dimensional gradient is never formed (:mod:`influencer.index.kronecker`).

Every random projection here is unbiased for inner products: ``E[<Px, Py>] = <x, y>``, so scores
computed from projected gradients estimate the unprojected ones, with a variance that falls as
``1/k`` (for Gaussian entries ``Var = (|x|^2 |y|^2 + <x, y>^2) / k``).

The dense projections never hold a ``p x k`` matrix they cannot afford: the matrix is defined
block by block (``ROWS_PER_SEED`` parameters per block, each block drawn from its own seed derived
from ``seed``), so any block can be regenerated on demand, on any device, bit for bit. Blocks are
drawn on the CPU in float32, so the same seed gives the same projection on every machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from influencer._kernel.errors import ConfigError
from influencer._kernel.functional import ModelFunction

GradientKind = Literal["loss", "measurement"]
STORAGE_DTYPES = ("float16", "float32", "float64")
ROWS_PER_SEED = 8192  # parameters per independently seeded block of a dense projection
# A dense projection matrix up to this size is kept on the device; a larger one is regenerated block
# by block for every batch of gradients it projects (so use a large Influence batch_size then).
CACHE_BYTES = 2 << 30


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed determined by ``parts`` (JSON-able), independent of Python's hash salt."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_matrix(rows: int, cols: int, seed: int, distribution: str) -> Tensor:
    """``(rows, cols)`` float32 on the CPU with i.i.d. zero-mean, unit-variance entries."""
    gen = torch.Generator().manual_seed(seed)
    if distribution == "gaussian":
        return torch.randn(rows, cols, generator=gen, dtype=torch.float32)
    if distribution == "rademacher":
        return torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
    raise ConfigError(f"distribution must be 'gaussian' or 'rademacher', got {distribution!r}")


def check_k(name: str, k: Any) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ConfigError(f"{name} must be a positive integer (the projected dimension), got {k!r}")


class Projection(ABC):
    """A projector bound to a model with ``p`` chosen parameters; maps ``(B, p)`` to ``(B, k)``."""

    k: int
    p: int
    info: dict[str, Any]

    @abstractmethod
    def project(self, grads: Tensor) -> Tensor:
        """Projected rows ``(B, k)`` of per-example gradients ``grads`` ``(B, p)``."""

    # A data-dependent projection (e.g. a PCA basis) estimates itself from the training data once,
    # and the store keeps the result (``state``), so opening a store never re-estimates it.
    needs_fit: bool = False

    def fit(self, influence: Any) -> None:
        """Estimate a data-dependent basis from ``influence``'s training data (default: nothing)."""
        return None

    def state(self) -> Tensor:
        """The fitted basis as one float64 vector, to store (only when :attr:`needs_fit`)."""
        raise NotImplementedError(f"{type(self).__name__} has no fitted state")

    def load_state(self, state: Tensor) -> None:
        """Restore the basis from :meth:`state`'s vector."""
        raise NotImplementedError(f"{type(self).__name__} has no fitted state")

    @property
    def blocks(self) -> list[tuple[str, int, int]]:
        """``(name, start, stop)`` column ranges of the projected space, one per layer when the
        projection is layer-wise (default: one block, the whole space)."""
        return [("all", 0, self.k)]

    def gradients(
        self, fn: ModelFunction, theta: Tensor, batch: Any, kind: GradientKind, out: Tensor | None = None
    ) -> Tensor:
        """Projected per-example gradients ``(B, k)`` of a prepared batch (see the module docstring);
        with ``out`` (``(B, k)``, in their dtype) written there and returned."""
        g = fn.loss_grads(theta, batch) if kind == "loss" else fn.measurement_grads(theta, batch)
        rows = self.project(g)
        return rows if out is None else out.copy_(rows)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Projector(ABC):
    """Settings of a projection; ``dtype`` is how projected gradients are stored on disk."""

    dtype: str = "float32"
    kind: ClassVar[str] = "projector"

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError(
                f"{type(self).__name__}.dtype must be one of {STORAGE_DTYPES} (how projected gradients "
                f"are stored), got {self.dtype!r}"
            )

    def settings(self) -> dict[str, Any]:
        """JSON-able settings with ``kind``: enough to rebuild it (``registry.projector_from_settings``)."""
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @abstractmethod
    def bind(self, fn: ModelFunction) -> Projection:
        """Check the settings against the model's chosen parameters and prepare the projection."""


# ---- exact (no projection) ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class IdentityProjector(Projector):
    """No projection (``k = p``): stores the exact gradients. For small models and references."""

    kind = "identity"

    def bind(self, fn: ModelFunction) -> Projection:
        return _IdentityProjection(fn.p)


class _IdentityProjection(Projection):
    def __init__(self, p: int) -> None:
        self.k = self.p = p
        self.info = {"k": p}

    def project(self, grads: Tensor) -> Tensor:
        return grads.reshape(-1, self.p)


# ---- dense random projections -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class _DenseProjector(Projector):
    k: int = 1024
    seed: int = 0
    distribution: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_k(f"{type(self).__name__}.k", self.k)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"{type(self).__name__}.seed must be an integer, got {self.seed!r}")

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "rows_per_seed": ROWS_PER_SEED}

    def bind(self, fn: ModelFunction) -> Projection:
        if self.k > fn.p:
            raise ConfigError(
                f"{type(self).__name__}.k={self.k} exceeds the number of chosen parameters p={fn.p}: "
                "a projection to more dimensions than p adds nothing; use IdentityProjector() to store "
                "the exact gradients, or a smaller k"
            )
        return DenseProjection(fn.p, self.k, self.seed, self.distribution, fn.device, fn.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GaussianProjector(_DenseProjector):
    """``P = R / sqrt(k)`` with ``R`` ``(k, p)`` i.i.d. standard normal (a Johnson-Lindenstrauss map).

    Works for any parameters. Costs ``2 p k`` flops per example, plus regenerating ``R`` block by
    block for each batch when it is larger than ``CACHE_BYTES`` (2 GiB): prefer
    :class:`~influencer.index.kronecker.KroneckerProjector` for ``nn.Linear``/``nn.Conv2d`` layers.
    """

    kind = "gaussian"
    distribution = "gaussian"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RademacherProjector(_DenseProjector):
    """``P = R / sqrt(k)`` with i.i.d. random signs (same cost as Gaussian; lower variance)."""

    kind = "rademacher"
    distribution = "rademacher"


class DenseProjection(Projection):
    """``G -> G R^T / sqrt(k)`` with ``R^T`` ``(p, k)`` generated in seeded row blocks."""

    def __init__(
        self, p: int, k: int, seed: int, distribution: str, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.p, self.k, self.seed, self.distribution = p, k, seed, distribution
        self.device, self.dtype = device, dtype
        self.seed_blocks = [(s, min(s + ROWS_PER_SEED, p)) for s in range(0, p, ROWS_PER_SEED)]
        self.scale = 1.0 / math.sqrt(k)
        self._cached: Tensor | None = None
        if p * k * torch.finfo(dtype).bits // 8 <= CACHE_BYTES:
            self._cached = torch.cat([self._block(j) for j in range(len(self.seed_blocks))])
        self.info = {"k": k}

    def _block(self, j: int) -> Tensor:
        start, stop = self.seed_blocks[j]
        seed = derive_seed(self.seed, self.distribution, j)
        r = random_matrix(stop - start, self.k, seed, self.distribution)
        return r.to(self.device, self.dtype)

    def matrix(self) -> Tensor:
        """The projection ``(k, p)`` (small problems and tests only)."""
        r = self._cached
        if r is None:
            r = torch.cat([self._block(j) for j in range(len(self.seed_blocks))])
        return r.T * self.scale

    def project(self, grads: Tensor) -> Tensor:
        g = grads.reshape(-1, self.p).to(self.dtype)
        if self._cached is not None:
            return (g @ self._cached) * self.scale
        out = g.new_zeros(g.shape[0], self.k)
        for j, (start, stop) in enumerate(self.seed_blocks):
            out += g[:, start:stop] @ self._block(j)
        return out * self.scale


# ---- registry -----------------------------------------------------------------------------------
