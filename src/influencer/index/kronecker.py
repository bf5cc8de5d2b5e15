"""Kronecker-structured (LoGra-style) projection of ``nn.Linear``/``nn.Conv2d`` layer gradients.

For a layer with inputs ``a_t`` ``(d_in,)`` and output gradients ``g_t`` ``(d_out,)`` at positions
``t`` (one for a dense input; every output pixel of a convolution), an example's gradient of the
layer's ``[W | b]`` is ``DW = sum_t g_t a_t^T`` ``(d_out, d_in)`` (see
:mod:`influencer.estimators.kronecker`). Projecting it by ``P_out ⊗ P_in`` never needs ``DW``::

    (P_out ⊗ P_in) vec(DW) = vec(P_out DW P_in^T) = vec(sum_t (P_out g_t) (P_in a_t)^T)

(``vec`` row-major, as flat parameters are stored), so a layer costs ``T (d_out k_out + d_in
k_in + k_out k_in)`` flops per example instead of forming ``d_out d_in`` gradient entries, and the
backward pass only needs the gradients of the layers' outputs, not of their weights. The layers'
projections are concatenated in the order of :func:`~influencer.layers.find_layers`,
``k = sum_l k_out,l k_in,l``.

Two bases:

* ``basis="random"``: ``P_out`` ``(k_out, d_out)`` and ``P_in`` ``(k_in, d_in)`` have
  i.i.d. entries of variance ``1/k_out`` and ``1/k_in``, drawn from seeds derived from ``seed`` and
  the layer's name, so ``E[(P_out ⊗ P_in)^T (P_out ⊗ P_in)] = I`` and projected inner products are
  unbiased. Nothing is estimated from data.
* ``basis="pca"`` (default; LoGra's PCA initialisation): the rows of ``P_in`` and ``P_out`` are the top
  ``k_in`` / ``k_out`` eigenvectors of the layer's K-FAC factors ``A = E[a a^T]`` and ``S = E[g
  g^T]`` (empirical: output gradients of the training loss), estimated on ``pca_examples`` training
  examples drawn with ``seed``. ``P_out ⊗ P_in`` then keeps the directions that carry most of the
  layer's gradient energy (and of its K-FAC curvature), so a preconditioned score loses far less
  than with a random projection of the same ``k``: on the MNIST-1D MLP of
  ``benchmarks/bench_lds.py`` the projected-Fisher LDS at ``16 x 16`` rises from 0.50 to 0.54
  and at ``24 x 24`` from 0.54 to 0.57 (exact-gradient EK-FAC: 0.61). It costs one extra
  forward/backward pass over ``pca_examples`` examples and, per side and layer, a ``d x d``
  covariance and its leading eigenvectors (a subspace iteration,
  :func:`~influencer.index.linalg.top_eigenvectors`); inner products are no longer unbiased
  (directions outside the kept subspace are dropped, not spread). The basis is stored with the
  index, so opening a store never re-estimates it.

A side whose ``k`` reaches its dimension (``k_out >= d_out`` or ``k_in >= d_in``: a small layer, or
a convolution over few input channels) is not projected: its factor is the identity, so that side
is exact (a square random factor would only distort it) and costs no product. For a convolution's
inputs that means the patches themselves, copied out of the padded input without ``F.unfold``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from influencer._kernel.data import batch_size_of
from influencer._kernel.distributed import all_reduce_sum, shard
from influencer._kernel.errors import ConfigError
from influencer._kernel.functional import ModelFunction
from influencer._kernel.gram import gram
from influencer._kernel.layers import Layer, LayerCapture, check_layer_model, find_layers
from influencer.index.linalg import top_eigenvectors
from influencer.index.projectors import (
    GradientKind,
    Projection,
    Projector,
    check_k,
    derive_seed,
    random_matrix,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KroneckerProjector(Projector):
    """``P_out ⊗ P_in`` per ``nn.Linear``/``nn.Conv2d`` layer (see the module docstring).

    Args:
        k_in: projected input dimension per layer; a layer whose ``d_in`` (which counts the bias
            column; a convolution's is ``channels x kernel area``) is no larger keeps its inputs
            whole (identity factor).
        k_out: projected output dimension per layer (likewise: ``d_out <= k_out`` is kept whole).
        seed: seed of the random factors (``basis="pca"``: of the examples the basis is estimated on).
        distribution: ``"gaussian"`` or ``"rademacher"`` entries (``basis="random"``).
        basis: ``"pca"`` (top eigenvectors of each layer's K-FAC factors, estimated once from the
            training data: better scores at the same ``k``, see the module docstring) or
            ``"random"`` (unbiased inner products, data-free).
        pca_examples: training examples the PCA basis is estimated on (all of them if fewer).
        dtype: storage dtype of the projected gradients.

    Every chosen parameter must belong to one of those layers (choose ``params=[...]`` accordingly,
    or use a dense :class:`~influencer.index.projectors.GaussianProjector`).
    """

    k_in: int = 32
    k_out: int = 32
    seed: int = 0
    distribution: str = "gaussian"
    basis: str = "pca"
    pca_examples: int = 4096
    kind = "kronecker"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_k("KroneckerProjector.k_in", self.k_in)
        check_k("KroneckerProjector.k_out", self.k_out)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"KroneckerProjector.seed must be an integer, got {self.seed!r}")
        if self.distribution not in ("gaussian", "rademacher"):
            raise ConfigError(
                "KroneckerProjector.distribution must be 'gaussian' or 'rademacher', "
                f"got {self.distribution!r}"
            )
        if self.basis not in ("random", "pca"):
            raise ConfigError(f"KroneckerProjector.basis must be 'random' or 'pca', got {self.basis!r}")
        check_k("KroneckerProjector.pca_examples", self.pca_examples)

    def settings(self) -> dict[str, Any]:
        # a side with k >= d is the identity: recorded, so a store whose square sides were random
        # factors is refused on opening instead of being read with the wrong ones
        return {**super().settings(), "whole_sides": "identity"}

    def bind(self, fn: ModelFunction) -> KroneckerProjection:
        try:
            layers = find_layers(fn)
        except ConfigError as exc:
            raise ConfigError(
                f"KroneckerProjector: {exc}. A dense GaussianProjector works for any parameters"
            ) from None
        return KroneckerProjection(self, fn, layers)


class _OutputCapture(LayerCapture):
    """:class:`LayerCapture` that also keeps each layer call's output (to differentiate with respect to)."""

    def start(self, batch: int) -> None:
        super().start(batch)
        self.grads = [{} for _ in self.layers]
        self.outputs: list[tuple[int, int, Tensor, int]] = []  # (layer, call, output, version)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.outputs = []  # see _ProjectingCapture.__exit__

    def forward_hook(self, i: int):
        hook = super().forward_hook(i)

        def record(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            hook(module, inputs, output)
            self.outputs.append((i, len(self.acts[i]) - 1, output, output._version))

        return record


def input_projector(layer: Layer, p_in: Tensor | None) -> Callable[[Tensor, int], Tensor]:
    """``(layer input, B) -> P_in a_t``, rows ``(B, T, k_in)``, in one fused operation.

    ``F.linear`` with ``P_in``'s weight and bias columns, or for a convolution a convolution whose
    ``k_in`` kernels are ``P_in``'s rows: the same rows as ``layer.inputs(x, B) @ P_in^T`` up to
    rounding, without forming the activation rows (for a convolution, the unfolded patches) or
    copying them to append the bias column. ``P_in`` None (the identity): the rows themselves, as
    :meth:`Layer.inputs` gives them (see :func:`patch_rows`). An input the layer model cannot
    represent goes to ``layer.inputs``, which raises its error.
    """
    module = layer.module
    if p_in is None:
        if isinstance(module, nn.Conv2d) and layer.weight:
            return lambda x, b: patch_rows(layer, x, b)
        return layer.inputs
    if not layer.weight:
        return lambda x, b: layer.inputs(x, b) @ p_in.T
    d = layer.d_in - int(layer.bias)
    weight, bias = p_in[:, :d], (p_in[:, d] if layer.bias else None)
    if isinstance(module, nn.Conv2d):
        kernels = weight.reshape(p_in.shape[0], module.in_channels, *module.kernel_size)
        pad = module._reversed_padding_repeated_twice
        # zero padding inside the convolution (no padded copy of the input); other modes pad first
        zeros = module.padding_mode == "zeros"
        padding = module.padding if zeros else 0

        def conv(x: Tensor, b: int) -> Tensor:
            if x.ndim != 4 or x.shape[0] != b:
                return layer.inputs(x, b)
            x = x if zeros or not any(pad) else F.pad(x, pad, mode=module.padding_mode)
            y = F.conv2d(x, kernels, bias, module.stride, padding, module.dilation)  # (B, k_in, H', W')
            return y.flatten(2).transpose(1, 2)

        return conv

    def dense(x: Tensor, b: int) -> Tensor:
        if x.ndim < 2 or x.shape[0] != b:
            return layer.inputs(x, b)
        if x.ndim == 2:  # one position: the 2-D product (one fused operation), then its axis
            return F.linear(x, weight, bias)[:, None]
        return F.linear(x.reshape(b, -1, x.shape[-1]), weight, bias)

    return dense


def patch_rows(layer: Layer, x: Tensor, batch: int) -> Tensor:
    """A convolution's activation rows ``(B, T, d_in)``, equal to ``layer.inputs(x, B)``, as a
    transposed view of a contiguous ``(B, d_in, T)`` tensor (the layout :func:`call_product`
    multiplies by): the patches are one copy out of windows of the padded input (``F.unfold``
    takes several times as long on small images), the bias row is filled with ones.
    """
    m = layer.module
    if x.ndim != 4 or x.shape[0] != batch:
        return layer.inputs(x, batch)
    x = layer.padded(x.detach() if x.requires_grad else x)
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    # (B, C, H', W', span_h, span_w), then every dilation-th element of each span: (B, C, H', W', kh, kw)
    windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    b, c, h, w = windows.shape[:4]
    rows = x.new_empty(b, layer.d_in, h * w)
    rows[:, : c * kh * kw].view(b, c, kh, kw, h, w).copy_(windows.permute(0, 1, 4, 5, 2, 3))
    if layer.bias:
        rows[:, -1] = 1
    return rows.mT


def call_product(
    pa: Tensor, g: Tensor | None, p_out: Tensor | None, out: Tensor | None = None
) -> Tensor | None:
    """One layer call's ``sum_t (P_out g_t)(P_in a_t)^T``, ``(B, k_out, k_in)`` (None: no gradient).

    ``pa``: projected inputs ``P_in a`` ``(B, T, k_in)``; ``g``: output-gradient rows ``(B, T,
    d_out)`` (:meth:`Layer.output_grads`, a view for a convolution); ``p_out`` None: the identity
    (``k_out = d_out``, no output projection). With ``out`` (a ``(B, k_out,
    k_in)`` view of the rows) a single position's outer product is written there, with no copy.
    Over several positions the batched product is formed as ``(k_in, k_out)`` and returned
    transposed: the BLAS picks a far faster kernel for it when the sizes are small and odd (64
    positions, k_in 10, k_out 16: 30 us against 205 us), and as fast a one otherwise.
    """
    if g is None:
        return None
    if g.shape[1] == 1:  # one position: an outer product, cheaper than a batched matmul of 1-wide ones
        pg = g if p_out is None else g @ p_out.T  # (B, 1, k_out)
        return torch.mul(pg.mT, pa, out=out)
    # torch.bmm, which is what @ runs for these 3-D operands, without @'s views around it (between
    # a training step's kernels each operation costs more than such small products)
    if p_out is None:
        return torch.bmm(pa.mT, g).mT
    if g.shape[2] <= g.shape[1]:
        # no more output channels than positions (an early convolution): sum over the positions
        # before projecting, B k_in d_out (T + k_out) flops instead of B T k_out (d_out + k_in)
        return (torch.bmm(pa.mT, g) @ p_out.T).mT
    return torch.bmm(pa.mT, g @ p_out.T).mT


def sum_calls(products: Iterable[Tensor | None]) -> Tensor | None:
    """The sum of a layer's calls' :func:`call_product` in call order, ``(B, k_out, k_in)`` (None: no
    call had a gradient); the post-hoc and the training-time stores add them in this one order."""
    total = None
    for y in products:
        if y is not None:
            total = y if total is None else total + y
    return total


def write_layer(out: Tensor, products: list[Tensor | None]) -> None:
    """Write one layer's block ``out`` ``(B, k_out * k_in)`` (a column slice of the rows): the sum of
    its calls' :func:`call_product` in call order (zero if none had a gradient), in one copy."""
    total = sum_calls(products)
    if total is None:
        out.zero_()
    else:
        out.view(total.shape).copy_(total)


def project_layer(out: Tensor, pas: list[Tensor], grads: dict[int, Tensor], p_out: Tensor | None) -> None:
    """:func:`write_layer` of the products of a layer's calls (``pas[c]``, ``grads.get(c)``); a single
    call at a single position is written in place."""
    if len(pas) == 1 and 0 in grads and grads[0].shape[1] == 1:
        k_out = grads[0].shape[2] if p_out is None else p_out.shape[0]
        call_product(pas[0], grads[0], p_out, out=out.view(out.shape[0], k_out, -1))
    else:
        write_layer(out, [call_product(pa, grads.get(c), p_out) for c, pa in enumerate(pas)])


class _ProjectingCapture:
    """Forward hooks keeping each layer call's projected inputs ``P_in a`` and its output (and the
    activation rows too when ``rows``, to check the layer model); tensor hooks keep the output
    gradients' rows."""

    def __init__(
        self, layers: list[Layer], inputs: list[Callable[[Tensor, int], Tensor]], rows: bool
    ) -> None:
        self.layers, self.inputs, self.keep_rows = layers, inputs, rows
        self.handles: list[Any] = []

    def __enter__(self) -> _ProjectingCapture:
        self.handles = [
            layer.module.register_forward_hook(self._forward(i)) for i, layer in enumerate(self.layers)
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        # Each output's tensor hook (held by its grad_fn, in C++) holds this capture, which held the
        # output: a cycle Python's collector cannot see, which kept every batch's graph (its saved
        # activations, the parameters' copy) alive for good, 9 MB a batch of 512 at p = 1e6.
        self.outputs = []

    def start(self, batch: int) -> None:
        self.batch = batch
        self.projected: list[list[Tensor]] = [[] for _ in self.layers]
        self.acts: list[list[Tensor]] = [[] for _ in self.layers]
        self.grads: list[dict[int, Tensor]] = [{} for _ in self.layers]
        self.outputs: list[tuple[int, int, Tensor, int]] = []  # (layer, call, output, version)

    def _forward(self, i: int):
        layer, project = self.layers[i], self.inputs[i]

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            call = len(self.projected[i])
            with torch.no_grad():
                self.projected[i].append(project(inputs[0], self.batch))
            if self.keep_rows:
                self.acts[i].append(layer.inputs(inputs[0], self.batch))
            if not output.requires_grad:
                raise ConfigError(f"layer {layer.name!r} ran without autograd (torch.no_grad in the task?)")
            # registered now, it sees this output's gradient even if the model edits it in place later
            output.register_hook(lambda g: self.grads[i].__setitem__(call, layer.output_grads(g, self.batch)))
            self.outputs.append((i, call, output, output._version))

        return hook


class KroneckerProjection(Projection):
    """A :class:`KroneckerProjector` bound to a model: per layer ``(P_out, P_in)`` and offsets."""

    def __init__(self, config: KroneckerProjector, fn: ModelFunction, layers: list[Layer]) -> None:
        self.layers = layers
        self.p = fn.p
        self.config = config
        # per layer, whether each side (out, in) is kept whole: its factor is then the identity
        self.whole = [(config.k_out >= layer.d_out, config.k_in >= layer.d_in) for layer in layers]
        self.needs_fit = config.basis == "pca" and not all(all(w) for w in self.whole)
        self._fitted = not self.needs_fit
        self.factors: list[tuple[Tensor, Tensor]] = []
        dims = []
        for layer, whole in zip(layers, self.whole, strict=True):
            pair = []
            for side, k, d, keep in (
                ("out", config.k_out, layer.d_out, whole[0]),
                ("in", config.k_in, layer.d_in, whole[1]),
            ):
                if keep:
                    factor = torch.eye(d, dtype=torch.float64)
                else:
                    seed = derive_seed(config.seed, layer.name, side)
                    factor = random_matrix(k, d, seed, config.distribution) / math.sqrt(k)
                pair.append(factor.to(fn.device, fn.dtype))
            self.factors.append((pair[0], pair[1]))
            dims.append(
                {
                    "layer": layer.name,
                    "d_out": layer.d_out,
                    "d_in": layer.d_in,
                    "k_out": pair[0].shape[0],
                    "k_in": pair[1].shape[0],
                }
            )
        sizes = [d["k_out"] * d["k_in"] for d in dims]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.k = self.offsets[-1]
        self.info = {"k": self.k, "layers": dims}
        self._bind_inputs()
        self._verified = False  # the layer model is checked against autograd on the first batch
        self._reg: tuple[Tensor, Tensor] | None = None  # (theta, projected grad Omega)

    def _bind_inputs(self) -> None:
        """Each layer's input projector (:func:`input_projector`) for the current factors."""
        self.inputs = [
            input_projector(layer, None if whole[1] else p_in)
            for layer, whole, (_, p_in) in zip(self.layers, self.whole, self.factors, strict=True)
        ]

    def output_factor(self, i: int) -> Tensor | None:
        """Layer ``i``'s ``P_out``, or None where its outputs are kept whole (the identity)."""
        return None if self.whole[i][0] else self.factors[i][0]

    @property
    def blocks(self) -> list[tuple[str, int, int]]:
        return [(layer.name, self.offsets[i], self.offsets[i + 1]) for i, layer in enumerate(self.layers)]

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise ConfigError(
                "this KroneckerProjector(basis='pca') has no basis yet: it is estimated from the training "
                "data by GradientIndex.build (or projection.fit(influence)); use basis='random' for a "
                "data-free projection"
            )

    def project(self, grads: Tensor) -> Tensor:
        self._check_fitted()
        g = grads.reshape(-1, self.p)
        out = g.new_empty(g.shape[0], self.k)
        for i, (layer, (p_out, p_in)) in enumerate(zip(self.layers, self.factors, strict=True)):
            block = g[:, layer.index].view(-1, layer.d_out, layer.d_in)
            out[:, self.offsets[i] : self.offsets[i + 1]] = (p_out @ block @ p_in.T).flatten(1)
        return out

    def gradients(
        self, fn: ModelFunction, theta: Tensor, batch: Any, kind: GradientKind, out: Tensor | None = None
    ) -> Tensor:
        self._check_fitted()
        b = batch_size_of(batch)
        method = fn.task.loss if kind == "loss" else fn.task.measurement
        t = theta.detach().requires_grad_(True)
        with (
            _ProjectingCapture(self.layers, self.inputs, rows=not self._verified) as cap,
            torch.enable_grad(),
        ):
            cap.start(b)
            values = functional_call(fn.bound, fn.state(t), (method, batch))  # (B,)
            self._check_called(cap.projected)
            modified = any(out._version != v for _, _, out, v in cap.outputs)
            if not self._verified or modified:
                # Full backward: the tensor hooks see every output gradient even if a later op
                # edited an output in place; the first batch also checks the layer model.
                g_theta = torch.autograd.grad(values.sum(), t)[0]
                if not self._verified:
                    check_layer_model(self.layers, cap.acts, _gradient_rows(self.layers, cap), g_theta)
                    self._verified = True
            else:
                # Only the layers' output gradients: the weight-gradient products are skipped.
                outs = [out for _, _, out, _ in cap.outputs]
                grads = torch.autograd.grad(values.sum(), outs, allow_unused=True)
                for (i, call, _, _), g in zip(cap.outputs, grads, strict=True):
                    if g is not None:
                        cap.grads[i][call] = self.layers[i].output_grads(g, b)
        with torch.no_grad():
            if out is None:
                out = torch.empty(b, self.k, dtype=values.dtype, device=self.factors[0][0].device)
            for i in range(len(self.layers)):
                project_layer(
                    out[:, self.offsets[i] : self.offsets[i + 1]],
                    cap.projected[i],
                    cap.grads[i],
                    self.output_factor(i),
                )
        if kind == "loss":
            out += self.regularizer_row(fn, theta)
        return out

    def _check_called(self, calls: list[list[Tensor]]) -> None:
        for i, layer in enumerate(self.layers):
            if not calls[i]:
                raise ConfigError(
                    f"layer {layer.name!r} was not called by the model's forward (its weights may be "
                    "used functionally); leave it out of params=[...] or use a GaussianProjector"
                )

    def _layer_rows(
        self, fn: ModelFunction, theta: Tensor, batch: Any, kind: GradientKind
    ) -> tuple[list[list[Tensor]], list[list[Tensor]], torch.dtype]:
        """Per layer and call: input rows ``(B, T, d_in)`` and output-gradient rows ``(B, T, d_out)``."""
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
        return cap.acts, rows, values.dtype

    # ---- the PCA basis --------------------------------------------------------------------------

    def fit(self, influence: Any) -> None:
        """Top eigenvectors of each layer's ``A`` and ``S`` on ``pca_examples`` training examples.

        The sums are split over ``torch.distributed`` ranks and reduced, so every rank gets the
        same basis; eigenvector signs are fixed (largest entry positive) so it is reproducible.
        """
        if not self.needs_fit:
            return
        fn, n = influence.fn, influence.n
        count = min(self.config.pca_examples, n)
        gen = torch.Generator().manual_seed(derive_seed(self.config.seed, "pca-examples"))
        ids = torch.randperm(n, generator=gen)[:count].sort().values
        if influence.distributed:
            ids = shard(ids)
        f64 = dict(dtype=torch.float64, device=fn.device)
        # sides kept whole need no covariance (their factor stays the identity)
        A = [
            None if w[1] else torch.zeros(layer.d_in, layer.d_in, **f64)
            for layer, w in zip(self.layers, self.whole, strict=True)
        ]
        S = [
            None if w[0] else torch.zeros(layer.d_out, layer.d_out, **f64)
            for layer, w in zip(self.layers, self.whole, strict=True)
        ]
        for _, raw in influence.train.chunks(influence.batch_size, ids):
            acts, rows, _ = self._layer_rows(fn, influence.theta, fn.prepare(raw), "loss")
            for i in range(len(self.layers)):
                for a, g in zip(acts[i], rows[i], strict=True):
                    # each batch's product in the compute dtype (float32 halves the cost), summed in float64
                    if A[i] is not None:
                        A[i] += gram(a.detach().flatten(0, 1)).double()
                    if S[i] is not None:
                        S[i] += gram(g.flatten(0, 1)).double()
        if influence.distributed:
            for m in (*A, *S):
                if m is not None:
                    all_reduce_sum(m)
        # in the compute dtype (at least float32): only the leading subspace is kept
        work = torch.float64 if fn.dtype == torch.float64 else torch.float32
        factors = []
        for layer, (p_out, p_in), a, s_ in zip(self.layers, self.factors, A, S, strict=True):
            seeds = [derive_seed(self.config.seed, layer.name, side, "pca") for side in ("out", "in")]
            factors.append(
                (
                    p_out if s_ is None else top_eigenvectors(s_.to(work), p_out.shape[0], seeds[0]),
                    p_in if a is None else top_eigenvectors(a.to(work), p_in.shape[0], seeds[1]),
                )
            )
        self._set_factors(factors)

    def state(self) -> Tensor:
        return torch.cat([f.reshape(-1).to(torch.float64).cpu() for pair in self.factors for f in pair])

    def load_state(self, state: Tensor) -> None:
        sizes = [f.numel() for pair in self.factors for f in pair]
        if state.dim() != 1 or state.numel() != sum(sizes):
            raise ValueError(f"a stored Kronecker basis of {state.numel()} values, expected {sum(sizes)}")
        parts = iter(torch.split(state, sizes))
        self._set_factors([(next(parts).view_as(o), next(parts).view_as(i)) for o, i in self.factors])

    def _set_factors(self, factors: list[tuple[Tensor, Tensor]]) -> None:
        dtype, device = self.factors[0][0].dtype, self.factors[0][0].device
        self.factors = [(o.to(device, dtype), i.to(device, dtype)) for o, i in factors]
        self._bind_inputs()
        self._reg = None  # projected with the old basis
        self._fitted = True

    def regularizer_row(self, fn: ModelFunction, theta: Tensor) -> Tensor:
        """``P grad Omega(theta)`` ``(k,)``: every example's objective term carries it."""
        if self._reg is None or self._reg[0] is not theta:
            self._reg = (theta, self.project(fn.regularizer_grad(theta.detach())[None])[0])
        return self._reg[1]


def _gradient_rows(layers: list[Layer], cap: _ProjectingCapture) -> list[list[Tensor]]:
    """Per layer and call: output-gradient rows ``(B, T, d_out)`` (zero where there was none)."""
    return [
        [cap.grads[i].get(c, a.new_zeros(*a.shape[:2], layer.d_out)) for c, a in enumerate(cap.acts[i])]
        for i, layer in enumerate(layers)
    ]
