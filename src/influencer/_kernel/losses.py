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
