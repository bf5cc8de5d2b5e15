"""Kronecker-structured (LoGra-style) projection of ``nn.Linear``/``nn.Conv2d`` layer gradients.

For a layer with inputs ``a_t`` ``(d_in,)`` and output gradients ``g_t`` ``(d_out,)`` at positions
``t`` (one for a dense input; every output pixel of a convolution), an example's gradient of the
layer's ``[W | b]`` is ``DW = sum_t g_t a_t^T`` ``(d_out, d_in)`` (see
:mod:`influencer.estimators.kronecker`). Projecting it by ``P_out ⊗ P_in`` never needs ``DW``::

    (P_out ⊗ P_in) vec(DW) = vec(P_out DW P_in^T) = vec(sum_t (P_out g_t) (P_in a_t)^T)

(``vec`` row-major, as flat parameters are stored), so a layer costs ``T (d_out k_out + d_in
k_in + k_out k_in)`` flops per example instead of forming ``d_out d_in`` gradient entries, and the
backward pass only needs the gradients of the layers' outputs, not of their weights. The layers'
projections are concatenated in the order of :func:`~influencer.estimators.kronecker.find_layers`,
``k = sum_l k_out,l k_in,l``.

``P_out`` ``(k_out, d_out)`` and ``P_in`` ``(k_in, d_in)`` have i.i.d. entries of variance
``1/k_out`` and ``1/k_in``, drawn from seeds derived from ``seed`` and the layer's name, so
``E[(P_out ⊗ P_in)^T (P_out ⊗ P_in)] = I`` and projected inner products are unbiased.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

from influencer._kernel.data import batch_size_of
from influencer._kernel.errors import ConfigError
from influencer._kernel.functional import ModelFunction
from influencer.estimators.kronecker import Layer, _Capture, check_layer_model, find_layers
from influencer.index.projectors import (
    GradientKind,
    Projection,
    Projector,
    _check_k,
    derive_seed,
    random_matrix,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KroneckerProjector(Projector):
    """``P_out ⊗ P_in`` per ``nn.Linear``/``nn.Conv2d`` layer (see the module docstring).

    Args:
        k_in: projected input dimension per layer (capped at the layer's ``d_in``, which counts the
            bias column; a convolution's ``d_in`` is ``channels x kernel area``).
        k_out: projected output dimension per layer (capped at ``d_out``).
        seed: seed of the random factors.
        distribution: ``"gaussian"`` or ``"rademacher"`` entries.
        dtype: storage dtype of the projected gradients.

    Every chosen parameter must belong to one of those layers (choose ``params=[...]`` accordingly,
    or use a dense :class:`~influencer.index.projectors.GaussianProjector`).
    """

    k_in: int = 32
    k_out: int = 32
    seed: int = 0
    distribution: str = "gaussian"
    kind = "kronecker"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_k("KroneckerProjector.k_in", self.k_in)
        _check_k("KroneckerProjector.k_out", self.k_out)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"KroneckerProjector.seed must be an integer, got {self.seed!r}")
        if self.distribution not in ("gaussian", "rademacher"):
            raise ConfigError(
                "KroneckerProjector.distribution must be 'gaussian' or 'rademacher', "
                f"got {self.distribution!r}"
            )

    def bind(self, fn: ModelFunction) -> KroneckerProjection:
        try:
            layers = find_layers(fn)
        except ConfigError as exc:
            raise ConfigError(
                f"KroneckerProjector: {exc}. A dense GaussianProjector works for any parameters"
            ) from None
        return KroneckerProjection(self, fn, layers)


class _OutputCapture(_Capture):
    """:class:`_Capture` that also keeps each layer call's output (to differentiate with respect to)."""

    def start(self, batch: int) -> None:
        super().start(batch)
        self.grads = [{} for _ in self.layers]
        self.outputs: list[tuple[int, int, Tensor, int]] = []  # (layer, call, output, version)

    def _forward(self, i: int):
        hook = super()._forward(i)

        def record(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            hook(module, inputs, output)
            self.outputs.append((i, len(self.acts[i]) - 1, output, output._version))

        return record


class KroneckerProjection(Projection):
    """A :class:`KroneckerProjector` bound to a model: per layer ``(P_out, P_in)`` and offsets."""

    def __init__(self, config: KroneckerProjector, fn: ModelFunction, layers: list[Layer]) -> None:
        self.layers = layers
        self.p = fn.p
        self.factors: list[tuple[Tensor, Tensor]] = []
        dims = []
        for layer in layers:
            k_out, k_in = min(config.k_out, layer.d_out), min(config.k_in, layer.d_in)
            seeds = [derive_seed(config.seed, layer.name, side) for side in ("out", "in")]
            p_out = random_matrix(k_out, layer.d_out, seeds[0], config.distribution)
            p_in = random_matrix(k_in, layer.d_in, seeds[1], config.distribution)
            self.factors.append(
                (
                    (p_out / math.sqrt(k_out)).to(fn.device, fn.dtype),
                    (p_in / math.sqrt(k_in)).to(fn.device, fn.dtype),
                )
            )
            dims.append(
                {"layer": layer.name, "d_out": layer.d_out, "d_in": layer.d_in, "k_out": k_out, "k_in": k_in}
            )
        sizes = [d["k_out"] * d["k_in"] for d in dims]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.k = self.offsets[-1]
        self.info = {"k": self.k, "layers": dims}
        self._verified = False  # the layer model is checked against autograd on the first batch
        self._reg: tuple[Tensor, Tensor] | None = None  # (theta, projected grad Omega)

    @property
    def blocks(self) -> list[tuple[str, int, int]]:
        return [(layer.name, self.offsets[i], self.offsets[i + 1]) for i, layer in enumerate(self.layers)]

    def project(self, grads: Tensor) -> Tensor:
        g = grads.reshape(-1, self.p)
        out = g.new_empty(g.shape[0], self.k)
        for i, (layer, (p_out, p_in)) in enumerate(zip(self.layers, self.factors, strict=True)):
            block = g[:, layer.index].view(-1, layer.d_out, layer.d_in)
            out[:, self.offsets[i] : self.offsets[i + 1]] = (p_out @ block @ p_in.T).flatten(1)
        return out

    def gradients(self, fn: ModelFunction, theta: Tensor, batch: Any, kind: GradientKind) -> Tensor:
        b = batch_size_of(batch)
        method = fn.task.loss if kind == "loss" else fn.task.measurement
        t = theta.detach().requires_grad_(True)
        with _OutputCapture(self.layers) as cap, torch.enable_grad():
            cap.start(b)
            values = functional_call(fn.bound, fn.state(t), (method, batch))  # (B,)
            for i, layer in enumerate(self.layers):
                if not cap.acts[i]:
                    raise ConfigError(
                        f"layer {layer.name!r} was not called by the model's forward (its weights may be "
                        "used functionally); leave it out of params=[...] or use a GaussianProjector"
                    )
            modified = any(out._version != v for _, _, out, v in cap.outputs)
            if not self._verified or modified:
                # Full backward: the tensor hooks see every output gradient even if a later op
                # edited an output in place; the first batch also checks the layer model.
                g_theta = torch.autograd.grad(values.sum(), t)[0]
                rows = cap.gradient_rows()
                if not self._verified:
                    check_layer_model(self.layers, cap.acts, rows, g_theta)
                    self._verified = True
            else:
                # Only the layers' output gradients: the weight-gradient products are skipped.
                outs = [out for _, _, out, _ in cap.outputs]
                grads = torch.autograd.grad(values.sum(), outs, allow_unused=True)
                for (i, call, _, _), g in zip(cap.outputs, grads, strict=True):
                    if g is not None:
                        cap.grads[i][call] = self.layers[i].output_grads(g, b)
                rows = cap.gradient_rows()
            projected = self._project_rows(cap.acts, rows, b, values.dtype)
        if kind == "loss":
            projected += self._regularizer(fn, theta)
        return projected

    def _project_rows(self, acts: list[list[Tensor]], rows: list[list[Tensor]], b: int, dtype) -> Tensor:
        out = torch.empty(b, self.k, dtype=dtype, device=self.factors[0][0].device)
        for i, (p_out, p_in) in enumerate(self.factors):
            total = None
            for a, g in zip(acts[i], rows[i], strict=True):  # (B, T, d_in), (B, T, d_out) per call
                pg, pa = g @ p_out.T, a @ p_in.T  # (B, T, k_out), (B, T, k_in)
                # (B, k_out, k_in) = sum_t (P_out g_t)(P_in a_t)^T; for one position an outer product,
                # which is cheaper than a batched matmul of 1-wide matrices
                y = pg[:, 0, :, None] * pa[:, 0, None, :] if pg.shape[1] == 1 else pg.mT @ pa
                total = y if total is None else total + y
            out[:, self.offsets[i] : self.offsets[i + 1]] = total.flatten(1)
        return out

    def _regularizer(self, fn: ModelFunction, theta: Tensor) -> Tensor:
        """``P grad Omega(theta)`` ``(k,)``: every example's objective term carries it."""
        if self._reg is None or self._reg[0] is not theta:
            self._reg = (theta, self.project(grad(fn.regularizer)(theta.detach())[None])[0])
        return self._reg[1]
