"""Scores of training examples from per-layer pieces, without per-example gradients of length p.

When every chosen parameter belongs to an ``nn.Linear``/``nn.Conv2d`` layer (see
:mod:`influencer.layers`), an example's loss gradient in a layer is
``G_i = sum_t g_it a_it^T`` ``(d_out, d_in)`` from the layer's input rows ``a`` and output gradients
``g``, and its dot product with a test direction's block ``D`` ``(d_out, d_in)`` is

    <D, G_i> = sum_t g_it^T D a_it.

With one position per example (dense inputs) this is one matrix product of the activations with
all ``m`` blocks at once, ``(B, d_in) @ (d_in, m d_out)``, then a row-wise dot product with ``g``:
the same arithmetic as ``directions @ G^T`` but with no ``(B, p)`` per-example gradients to write,
read and check, and with one ordinary forward and backward pass per chunk instead of a vmapped
per-example one. With several positions (convolutions, sequences) the per-example layer gradients
are formed in bounded chunks and contracted with the blocks (what kronfluence does).

When the test directions are themselves example gradients (the gradient dot product), they are
kept in the same factored form, rows ``a'_js``, ``g'_js`` (:class:`LayerRows`), and

    <D_j, G_i> = sum_{s,t} (g'_js . g_it) (a'_js . a_it),

two products of ``m T' x B T`` inner products of length ``d_out`` and ``d_in`` instead of
``d_out d_in``: with one position per example, ``m B (d_out + d_in)`` multiplications instead of
``m B d_out d_in`` (the "ghost" dot product). A layer where that is not cheaper gets its dense
blocks instead.

K-FAC's directions take the same form: a test block ``G`` solved in the layer's eigenbasis is
``Q_S [(Q_S^T G Q_A) / (s a^T + damping)] Q_A^T``, and the inverse eigenvalues have a low numerical
rank, so each test row becomes a few dozen rank-one rows
(:meth:`~influencer.estimators.kronecker.KroneckerSolver.solve_rows`); the ``m`` directions are
never formed as ``(m, p)``. Layers where that does not pay are held as dense blocks
(``LayerRows.blocks``).

The layer model is verified on the first chunk (the layer gradients summed over the chunk must
equal autograd's gradient of the summed loss); if the loss reaches the parameters some other way,
:meth:`LayerScorer.__call__` returns None and callers fall back to per-example gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from influencer._kernel.data import batch_size_of
from influencer._kernel.errors import ConfigError
from influencer._kernel.functional import ModelFunction
from influencer._kernel.layers import Layer, ProbeCapture, check_layer_model

_CHUNK_ELEMENTS = 2**24  # elements of the largest intermediate held at once


@dataclass
class LayerRows:
    """``m`` examples' gradients (or directions) in layer form: per layer and call, input rows
    ``(m, T, d_in)`` and output-gradient rows ``(m, T, d_out)``; example ``j``'s block of a layer is
    ``sum g_jt a_jt^T``. ``blocks[i]``, where given, is layer ``i``'s dense ``(m, d_out, d_in)``
    block instead (its rows are then empty): a preconditioned direction that has no short
    factored form in that layer (see :meth:`KroneckerSolver.solve_rows`)."""

    acts: list[list[Tensor]]
    grads: list[list[Tensor]]
    m: int
    blocks: list[Tensor | None] | None = None

    def dense_block(self, i: int) -> Tensor | None:
        """Layer ``i``'s dense block if it is held as one, else None."""
        return None if self.blocks is None else self.blocks[i]

    def block(self, layer: Layer, i: int, like: Tensor) -> Tensor:
        """Layer ``i``'s blocks ``(m, d_out, d_in)`` (zero if the layer was never called)."""
        if (held := self.dense_block(i)) is not None:
            return held
        out = like.new_zeros(self.m, layer.d_out, layer.d_in)
        for g, a in zip(self.grads[i], self.acts[i], strict=True):
            out += torch.einsum("mto,mti->moi", g, a)
        return out

    def dot(self, layers: list[Layer], v: Tensor) -> Tensor:
        """``(m,)``: each example's gradient dotted with the flat vector ``v`` ``(p,)``."""
        out = v.new_zeros(self.m)
        for i, (layer, a_calls, g_calls) in enumerate(zip(layers, self.acts, self.grads, strict=True)):
            w = v[layer.index].view(layer.d_out, layer.d_in)
            if (held := self.dense_block(i)) is not None:
                out += held.reshape(self.m, -1) @ w.reshape(-1)
            for a, g in zip(a_calls, g_calls, strict=True):
                out += ((g @ w) * a).sum(dim=(1, 2))
        return out

    def dense(self, layers: list[Layer], like: Tensor) -> Tensor:
        """The gradients as rows ``(m, p)`` like the flat parameters ``like`` ``(p,)`` (zero outside
        the layers)."""
        out = like.new_zeros(self.m, like.shape[0])
        for i, layer in enumerate(layers):
            out[:, layer.index] = self.block(layer, i, like).reshape(self.m, -1)
        return out

    def finite(self) -> bool:
        """Whether every row is finite (a NaN or infinity makes a row's sum non-finite)."""
        held = [b for b in self.blocks or [] if b is not None]
        parts = [x for calls in (*self.acts, *self.grads) for x in calls] + held
        return all(bool(torch.isfinite(x.sum()).all()) for x in parts)

    @staticmethod
    def cat(parts: list[LayerRows]) -> LayerRows | None:
        """The rows of several chunks of examples, in order; None if a layer's number of calls differs
        between chunks. Chunks with fewer positions (sequences padded to each batch's length) get
        zero rows, which add nothing to any block."""
        first = parts[0]
        calls = [len(c) for c in first.acts]
        if any([len(c) for c in p.acts] != calls or p.blocks is not None for p in parts):
            return None

        def joined(rows: list[Tensor]) -> Tensor:
            t = max(x.shape[1] for x in rows)
            return torch.cat([F.pad(x, (0, 0, 0, t - x.shape[1])) if x.shape[1] < t else x for x in rows])

        return LayerRows(
            [[joined([p.acts[i][k] for p in parts]) for k in range(n)] for i, n in enumerate(calls)],
            [[joined([p.grads[i][k] for p in parts]) for k in range(n)] for i, n in enumerate(calls)],
            sum(p.m for p in parts),
        )


def capture_rows(
    fn: ModelFunction,
    layers: list[Layer],
    theta: Tensor,
    batch: Any,
    per_example: Callable[..., Tensor],
    verify: bool = True,
) -> LayerRows | None:
    """The layer rows of each example's gradient of ``per_example(model, batch)`` ``(B,)`` (the
    task's loss or measurement) from one forward and one backward pass.

    With ``verify``, the backward pass also gives the parameters' gradient of the sum, and None is
    returned unless the rows rebuild it (see the module docstring); without, autograd computes the
    layer outputs' gradients only, never the weights'.
    """
    leaf = theta.detach().requires_grad_(True)  # the layers' outputs need a graph either way
    b = batch_size_of(batch)
    with ProbeCapture(layers) as cap, torch.enable_grad():
        cap.start(b)
        values = functional_call(fn.bound, fn.state(leaf), (per_example, batch))
        grads, total = cap.backward(values, torch.ones_like(values), leaf if verify else None, retain=False)
    if verify:
        try:
            check_layer_model(layers, cap.acts, grads, torch.zeros_like(leaf) if total is None else total)
        except ConfigError:
            return None
    return LayerRows(cap.acts, grads, b)


class LayerScorer:
    """``D . grad loss_i`` for test directions ``D`` and each example of a batch, layer by layer.

    ``D`` is ``(m, p)``, or :class:`LayerRows` of ``m`` example gradients (the gradient dot product).
    ``layers`` must cover every chosen parameter of ``fn`` (as a fitted Kronecker solver's do).
    """

    def __init__(self, fn: ModelFunction, layers: list[Layer], directions: Tensor | LayerRows) -> None:
        self.fn = fn
        self.layers = layers
        self.rows = directions if isinstance(directions, LayerRows) else None
        self.m = directions.m if isinstance(directions, LayerRows) else directions.shape[0]
        # (m, d_out, d_in) per layer, gathered once for all chunks (for rows: formed where needed).
        self.blocks: list[Tensor | None] = [
            None
            if self.rows is not None
            else directions[:, layer.index].reshape(self.m, layer.d_out, layer.d_in)
            for layer in layers
        ]
        self.verified = False

    def __call__(self, theta: Tensor, batch: Any) -> tuple[Tensor, Tensor] | None:
        """``(scores, sums)`` for a prepared batch of ``B`` examples, or None (see module docstring).

        ``scores`` ``(m, B)``: ``D_j . grad loss_i`` (no regulariser, no 1/n). ``sums`` ``(B, q)``:
        per-example sums of the layer inputs and output gradients, finite exactly when the
        example's gradient rows are (for the caller's NaN/inf check).
        """
        rows = capture_rows(self.fn, self.layers, theta, batch, self.fn.task.loss, verify=not self.verified)
        if rows is None:
            return None
        self.verified = True
        acts, grads, b = rows.acts, rows.grads, rows.m
        parts: list[Tensor | None] = []  # fresh (m, B) contributions
        sums = []
        for i, (layer, a_calls, g_calls) in enumerate(zip(self.layers, acts, grads, strict=True)):
            sums += [x.sum(dim=(1, 2)) for x in (*a_calls, *g_calls)]
            held = self.rows.dense_block(i) if self.rows is not None else None
            if (
                self.rows is not None
                and held is None
                and _factored_cheaper(layer, a_calls, self.rows.acts[i])
            ):
                for ta, tg in zip(self.rows.acts[i], self.rows.grads[i], strict=True):
                    parts.append(_contract_rows(a_calls, g_calls, ta, tg, b))
                continue
            if self.blocks[i] is None:
                self.blocks[i] = self.rows.block(layer, i, theta)
            parts.append(_contract(a_calls, g_calls, self.blocks[i], b))
        scores = None  # the first contribution becomes the sum: no zeroed (m, B) block to add to
        for part in parts:
            if part is not None:
                scores = part if scores is None else scores.add_(part)
        scores = theta.new_zeros(self.m, b) if scores is None else scores
        return scores, torch.stack(sums, dim=1) if sums else theta.new_zeros(b, 0)


def sum_of(parts: Any) -> Tensor:
    """The sum of an iterable of tensors, without the copy that ``sum`` makes when adding to 0."""
    it = iter(parts)
    out = next(it)
    for x in it:
        out = out + x
    return out


def _positions(calls: list[Tensor]) -> int:
    return sum(x.shape[1] for x in calls)


def _factored_cheaper(layer: Layer, a_calls: list[Tensor], test_calls: list[Tensor]) -> bool:
    """Whether inner products of rows beat dense blocks for this layer: ``T T' (d_out + d_in)``
    multiplications per (test, training) pair against ``d_out d_in``."""
    pairs = _positions(a_calls) * _positions(test_calls)
    return pairs * (layer.d_out + layer.d_in) <= layer.d_out * layer.d_in


def _contract_rows(
    a_calls: list[Tensor], g_calls: list[Tensor], ta: Tensor, tg: Tensor, b: int
) -> Tensor | None:
    """``(m, B)``: ``<sum_s g'_s a'_s^T, sum_t g_t a_t^T>`` = ``sum_{s,t} (g'_s . g_t)(a'_s . a_t)``
    for test rows ``(m, T', .)`` of one call and training rows ``(B, T, .)`` of one layer (None when
    the layer has no training calls)."""
    m, t_test = ta.shape[:2]
    x_a, x_g = ta.reshape(m * t_test, -1), tg.reshape(m * t_test, -1)  # (m T', d)
    out = None
    for a, g in zip(a_calls, g_calls, strict=True):
        t = a.shape[1]
        step = max(1, _CHUNK_ELEMENTS // max(1, m * t_test * t))  # examples per (m T', step T) product
        part = ta.new_empty(m, b) if step < b else None  # the whole product is the part otherwise
        for s in range(0, b, step):
            ya, yg = a[s : s + step].reshape(-1, a.shape[2]), g[s : s + step].reshape(-1, g.shape[2])
            prod = (x_g @ yg.T).mul_(x_a @ ya.T)  # (m T', c T)
            prod = prod.view(m, t_test, -1, t).sum(dim=(1, 3)) if t_test * t > 1 else prod
            if part is None:
                part = prod
            else:
                part[:, s : s + step] = prod
        out = part if out is None else out.add_(part)
    return out


def _contract(a_calls: list[Tensor], g_calls: list[Tensor], block: Tensor, b: int) -> Tensor:
    """``(m, B)``: ``<block_j, sum_{calls, t} g_t a_t^T>`` for rows ``(B, T, .)`` of one layer."""
    m, d_out, d_in = block.shape
    out = block.new_zeros(m, b)
    # With more directions than the layer's smaller side, forming the per-example gradients
    # (B d_out d_in, once) and one product with all blocks is cheaper than a per-direction
    # contraction, whose batched matrix-vector products run far below matrix-product speed.
    if all(a.shape[1] == 1 for a in a_calls) and m <= min(d_out, d_in):
        # One position per call: contract the larger side with all blocks in one product.
        wide = d_in >= d_out
        flat = block.reshape(m * d_out, d_in) if wide else block.transpose(1, 2).reshape(m * d_in, d_out)
        inner = d_out if wide else d_in
        step = max(1, _CHUNK_ELEMENTS // max(1, b * inner))  # blocks per product: bounds (B, step, inner)
        for a, g in zip(a_calls, g_calls, strict=True):
            x, y = (a[:, 0], g[:, 0]) if wide else (g[:, 0], a[:, 0])  # contract x first, then y
            for j in range(0, m, step):
                q = (x @ flat[j * inner : (j + step) * inner].T).view(b, -1, inner)  # (B, s, inner)
                out[j : j + step] += torch.bmm(q, y[:, :, None])[:, :, 0].T
        return out
    step = max(1, _CHUNK_ELEMENTS // (d_out * d_in))  # examples per chunk of (step, d_out, d_in) gradients
    flat = block.reshape(m, d_out * d_in)
    for s in range(0, b, step):
        parts = zip(g_calls, a_calls, strict=True)
        per_example = sum_of(torch.einsum("bto,bti->boi", g[s : s + step], a[s : s + step]) for g, a in parts)
        out[:, s : s + step] = flat @ per_example.reshape(per_example.shape[0], -1).T
    return out
