"""Per-example losses that the built-in tasks use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def smooth_hinge(margin: Tensor, temperature: float) -> Tensor:
    """Smooth hinge ``t * log(1 + exp((1 - margin) / t))``, elementwise.

    Tends to the hinge ``max(0, 1 - margin)`` as ``t -> 0`` and is twice differentiable for
    ``t > 0``, which is what influence functions need (the hinge itself has a zero Hessian
    almost everywhere). ``margin = y * f(x)`` with labels ``y`` in {-1, +1}.
    """
    if temperature <= 0:
        raise ValueError(f"smooth_hinge temperature must be > 0, got {temperature}")
    # softplus is the numerically stable log(1 + exp(.)).
    return temperature * F.softplus((1.0 - margin) / temperature)


def hinge(margin: Tensor) -> Tensor:
    """The non-differentiable hinge ``max(0, 1 - margin)``, the limit of :func:`smooth_hinge`."""
    return torch.clamp(1.0 - margin, min=0.0)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int | None = None) -> Tensor:
    """Per-example cross-entropy ``(B,)`` of logits ``(B, C)``: ``F.cross_entropy(...,
    reduction="none")``, written as ``logsumexp(z) - z_y``.

    ``targets``: class indices ``(B,)`` (``ignore_index`` marks examples with zero loss) or class
    probabilities ``(B, C)``. Why not ``F.cross_entropy``: the backward of its ``log_softmax`` has
    no vmap batching rule, so a batch of Hessian-vector products through it (``vmap`` over
    cotangents, the inner step of CG, LiSSA, Arnoldi and the dense Hessian) runs as a Python loop
    over the vectors; ``logsumexp``'s derivatives batch (logistic regression on digits, 1,000
    vectors of a 32-example batch: 2x faster).
    """
    lse = torch.logsumexp(logits, dim=-1)
    if targets.is_floating_point():  # class probabilities: -sum_c y_c log softmax(z)_c
        return lse * targets.sum(-1) - (targets * logits).sum(-1)
    if ignore_index is None:
        return lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    losses = lse - logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, losses, torch.zeros_like(losses))


def cross_entropy_fisher(
    logits: Tensor, weight: Tensor, samples: int | None, generator: torch.Generator
) -> Tensor:
    """Output directions ``(..., C, K)`` for the curvature of ``weight * CE`` in the logits ``(..., C)``.

    The Hessian of the cross-entropy in the logits is ``diag(p) - p p^T`` with ``p = softmax``,
    whatever the label (a class index or class probabilities summing to 1): the Fisher of the
    model's own predictive distribution, ``E_{y ~ p}[(p - e_y)(p - e_y)^T]``.

    * ``samples=None``: its ``C`` columns ``sqrt(p_c) (e_c - p)``, whose outer products sum to it
      exactly (the expectation over all ``C`` labels).
    * ``samples=S``: ``S`` columns ``p - e_y``, the loss's gradient at labels ``y`` drawn from
      ``p`` with ``generator`` (CPU), whose outer products average to it.

    Every column is scaled by ``sqrt(weight)`` ``(...)``, a per-output weight of the loss (0 for
    an output left out of it).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)  # probabilities in at least float32
    p = torch.softmax(logits.detach().to(dtype), dim=-1)
    c = p.shape[-1]
    scale = weight.detach().to(dtype).clamp_min(0).sqrt()[..., None, None]
    if samples is None:
        eye = torch.eye(c, dtype=dtype, device=p.device)
        rows = (eye - p[..., None, :]) * p.sqrt()[..., :, None]  # [..., k, :] = sqrt(p_k) (e_k - p)
    else:
        u = torch.rand(*p.shape[:-1], samples, generator=generator, dtype=dtype).to(p.device)
        labels = (p.cumsum(-1)[..., None, :] < u[..., :, None]).sum(-1).clamp_max(c - 1)  # (..., S)
        rows = p[..., None, :] - F.one_hot(labels, c).to(dtype)  # (..., S, C)
    return (rows.transpose(-1, -2) * scale).to(logits.dtype)
