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

The layer model is verified on the first chunk (the layer gradients summed over the chunk must
equal autograd's gradient of the summed loss); if the loss reaches the parameters some other way,
:meth:`LayerScorer.__call__` returns None and callers fall back to per-example gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from influencer._kernel.data import batch_size_of
from influencer._kernel.errors import ConfigError
from influencer._kernel.functional import ModelFunction
from influencer._kernel.layers import Layer, LayerCapture, check_layer_model

_CHUNK_ELEMENTS = 2**24  # elements of the largest intermediate held at once


class LayerScorer:
    """``D . grad loss_i`` for test directions ``D`` ``(m, p)`` and each example of a batch, layer by layer.

    ``layers`` must cover every chosen parameter of ``fn`` (as a fitted Kronecker solver's do).
    """

    def __init__(self, fn: ModelFunction, layers: list[Layer], directions: Tensor) -> None:
        self.fn = fn
        self.layers = layers
        self.m = directions.shape[0]
        # (m, d_out, d_in) per layer, gathered once for all chunks.
        self.blocks = [
            directions[:, layer.index].reshape(self.m, layer.d_out, layer.d_in) for layer in layers
        ]
        self.verified = False

    def __call__(self, theta: Tensor, batch: Any) -> tuple[Tensor, Tensor] | None:
        """``(scores, sums)`` for a prepared batch of ``B`` examples, or None (see module docstring).

        ``scores`` ``(m, B)``: ``D_j . grad loss_i`` (no regulariser, no 1/n). ``sums`` ``(B, q)``:
        per-example sums of the layer inputs and output gradients, finite exactly when the
        example's gradient rows are (for the caller's NaN/inf check).
        """
        acts, grads, total = self._rows(theta, batch)
        if not self.verified:
            try:
                check_layer_model(self.layers, acts, grads, total)
            except ConfigError:
                return None
            self.verified = True
        b = batch_size_of(batch)
        scores = total.new_zeros(self.m, b)
        sums = []
        for a_calls, g_calls, block in zip(acts, grads, self.blocks, strict=True):
            scores += _contract(a_calls, g_calls, block, b)
            sums += [x.sum(dim=(1, 2)) for x in (*a_calls, *g_calls)]
        return scores, torch.stack(sums, dim=1) if sums else total.new_zeros(b, 0)

    def _rows(self, theta: Tensor, batch: Any) -> tuple[list[list[Tensor]], list[list[Tensor]], Tensor]:
        """Per layer and call: input rows ``(B, T, d_in)``, output-gradient rows ``(B, T, d_out)``
        of the per-example losses; and the gradient ``(p,)`` of their sum."""
        fn = self.fn
        leaf = theta.detach().requires_grad_(True)
        with LayerCapture(self.layers) as cap, torch.enable_grad():
            cap.start(batch_size_of(batch))
            cap.grads = [{} for _ in self.layers]
            losses = functional_call(fn.bound, fn.state(leaf), (fn.task.loss, batch))
            (total,) = torch.autograd.grad(losses.sum(), leaf, materialize_grads=True)
            return cap.acts, cap.gradient_rows(), total


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
        per_example = sum(torch.einsum("bto,bti->boi", g[s : s + step], a[s : s + step]) for g, a in parts)
        out[:, s : s + step] = flat @ per_example.reshape(per_example.shape[0], -1).T
    return out
