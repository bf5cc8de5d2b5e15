"""The sign and scale convention of influence scores, stated once for the whole library.

Training objective: ``J(theta) = (1/n) sum_i l_i(theta)`` with ``l_i = loss(z_i) + Omega``, minimised
at ``theta``; ``H`` is its Hessian (plus any damping) and ``g_i = grad l_i``.

**Score.** ``score(z_test, z_i)`` is the predicted change of the test measurement ``f(z_test)``
(the test loss by default) if training example ``z_i`` were *removed* and the model retrained::

    score = f(theta_{-i}) - f(theta)  ~=  (1/n) grad f(z_test)^T H^-1 g_i  =  -(1/n) I_up,loss

So, with the default measurement, **positive = helpful** (without ``z_i`` the test loss would go
up) and **negative = harmful** (without it the test loss would go down). Scores are in the units of
the measurement and can be compared directly with leave-one-out retraining.

The paper's quantities are also available unscaled, with the paper's signs:

* ``I_up,loss(z_i, z_test) = -grad f(z_test)^T H^-1 g_i  = -n * score``
* ``I_up,params(z_i) = -H^-1 g_i``  (d theta / d epsilon when ``z_i`` is up-weighted by epsilon)
* self-influence ``score(z_i, z_i) = (1/n) grad loss(z_i)^T H^-1 g_i``: how much a point's own loss
  relies on having trained on it. Without a regulariser ``g_i = grad loss(z_i)`` and it is a
  quadratic form, ``>= 0`` for a positive-definite H; with one, ``g_i = grad loss(z_i) + grad Omega``
  and a point the model already fits (a tiny loss gradient) can score slightly below zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from influencer._kernel.errors import NonFiniteError


def removal_scores(test_directions: Tensor, train_grads: Tensor, n: int) -> Tensor:
    """Scores ``(m, c)`` from ``H^-1 grad f(test)`` ``(m, p)`` and training gradients ``(c, p)``."""
    products = test_directions @ train_grads.T
    return products if n == 1 else products / n  # (dividing by 1 would be a pass that changes nothing)


def up_loss_from_scores(scores: Tensor, n: int) -> Tensor:
    """The paper's ``I_up,loss`` (unscaled, up-weighting sign) from removal scores."""
    return -n * scores


def check_finite_scores(scores: Tensor, ids: Tensor | None = None) -> None:
    """Refuse a score block ``(m, c)`` holding NaN or infinity, which a sort would rank first or last.

    The error names how many entries are bad and the first few as ``(test row, training id)``.
    """
    bad = ~torch.isfinite(scores)
    if not bool(bad.any()):
        return
    where = bad.nonzero()[:5].cpu()
    cols = where[:, 1] if ids is None else torch.as_tensor(ids).cpu()[where[:, 1]]
    pairs = ", ".join(f"({int(r)}, {int(c)})" for r, c in zip(where[:, 0], cols, strict=True))
    raise NonFiniteError(
        f"{int(bad.sum())} of {scores.numel()} scores are NaN or infinite (test row, training id: {pairs}"
        f"{', ...' if int(bad.sum()) > 5 else ''}), so they cannot be ranked: check those training and test "
        "gradients (a damaged gradient store, a NaN loss) and the solver's result"
    )


@dataclass(frozen=True)
class TopK:
    """Most helpful and most harmful training ids per test example, each ``(m, k)``.

    ``helpful_ids[j]`` are ordered from most helpful (largest positive score) down, and
    ``harmful_ids[j]`` from most harmful (most negative score) up. Fewer than ``k`` helpful
    (harmful) points exist when fewer scores are positive (negative): the lists are then padded
    with the next-ranked ids, whose scores show their true sign.
    """

    helpful_ids: Tensor
    helpful_scores: Tensor
    harmful_ids: Tensor
    harmful_scores: Tensor


def top_k(scores: Tensor, k: int, ids: Tensor | None = None) -> TopK:
    """Top ``k`` helpful and harmful training examples for each row of ``scores`` ``(m, n)``.

    ``ids`` ``(n,)`` maps score columns to training ids (default: column index). Scores holding NaN
    or infinity are refused (:class:`~influencer.errors.NonFiniteError`): a sort ranks NaN first.
    """
    scores = scores.reshape(-1, scores.shape[-1])
    k = min(k, scores.shape[1])
    if k < 1:
        raise ValueError("top_k needs k >= 1 and at least one training score")
    ids = torch.arange(scores.shape[1]) if ids is None else torch.as_tensor(ids)
    check_finite_scores(scores, ids)
    hv, hi = scores.topk(k, dim=1, largest=True)
    bv, bi = scores.topk(k, dim=1, largest=False)
    ids = ids.to(hi.device)
    return TopK(ids[hi], hv, ids[bi], bv)
