"""Symmetric rank-k updates: ``x^T x`` computing only the blocks on and above the diagonal.

torch offers no symmetric rank-k update (BLAS ``syrk``), and a Gram matrix as one ``x.T @ x``
computes every off-diagonal entry twice. Cutting the ``d`` columns into ``q`` pieces and forming
each product ``x_i^T x_j`` with ``i <= j`` once costs ``(q + 1) / (2 q)`` of the full product.
"""

from __future__ import annotations

from torch import Tensor

PIECE = 192  # columns per piece: large enough for an efficient matrix product
ALIGN = 32  # inner edges on multiples of this: blocks of odd widths run far slower (float64: 1.3x)


def pieces(d: int) -> list[int]:
    """Edges of the column pieces of a ``d``-column matrix (one piece when ``d`` is small)."""
    q = max(1, round(d / PIECE))
    inner = {round(d * i / q / ALIGN) * ALIGN for i in range(1, q)}  # the nearest aligned edges
    return [0, *sorted(e for e in inner if 0 < e < d), d]


def gram(x: Tensor) -> Tensor:
    """``x^T x`` ``(d, d)`` of rows ``x`` ``(r, d)``: the blocks on and above the diagonal, mirrored."""
    d = x.shape[1]
    if len(pieces(d)) == 2:  # one piece: nothing to save
        return x.T @ x
    out = x.new_empty(d, d)
    add_upper_gram(out, x, beta=0.0)  # beta 0: the empty tensor's values are ignored
    return mirror_upper(out)


def add_upper_gram(out: Tensor, x: Tensor, alpha: float = 1.0, beta: float = 1.0) -> None:
    """``out = beta out + alpha x^T x`` on the blocks on and above the diagonal of ``out`` ``(d, d)``
    (rows ``x`` ``(r, d)``); the blocks below are left as they are (see :func:`mirror_upper`)."""
    edges = pieces(x.shape[1])
    for i in range(len(edges) - 1):
        a, b = edges[i], edges[i + 1]
        for j in range(i, len(edges) - 1):
            c, e = edges[j], edges[j + 1]
            out[a:b, c:e].addmm_(x[:, a:b].T, x[:, c:e], alpha=alpha, beta=beta)


def mirror_upper(out: Tensor) -> Tensor:
    """Copy the blocks above the diagonal (as :func:`add_upper_gram` cut them) below it, in place."""
    edges = pieces(out.shape[0])
    for i in range(len(edges) - 1):
        a, b = edges[i], edges[i + 1]
        for j in range(i + 1, len(edges) - 1):
            c, e = edges[j], edges[j + 1]
            out[c:e, a:b] = out[a:b, c:e].T
    return out
