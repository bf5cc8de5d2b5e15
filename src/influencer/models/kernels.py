"""Kernel models as ordinary ``nn.Module``s: a linear model over RBF features, trained convexly.

:class:`RBFKernelModel` computes ``f(x) = W k(x) + b`` with ``k(x)_j = exp(-gamma ||x - c_j||^2)``
for fixed centres ``c_j`` (the training points, as in an RBF-kernel SVM, or a subset of landmarks).
The centres are a buffer and only the linear head is a parameter, so with any convex loss
(:class:`~influencer.tasks.SmoothHingeTask` for an SVM, :class:`~influencer.tasks.ClassificationTask`
for kernel logistic regression) plus weight decay the objective is strictly convex in the parameters
influence is computed over, and :func:`~influencer.training.train_lbfgs` reaches its unique optimum.

Influence then works as for any other model::

    model = RBFKernelModel.from_data(x_train, num_outputs=1).double()
    task = SmoothHingeTask(temperature=0.1, weight_decay=1e-3)
    train_lbfgs(model, task, (x_train, y_signed))
    inf = Influence(model, task, (x_train, y_signed), estimator=Exact()).fit()
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from influencer._kernel.errors import ConfigError, DataError


def squared_distances(x: Tensor, centers: Tensor) -> Tensor:
    """``||x_i - c_j||^2`` ``(n, m)`` for flat ``x`` ``(n, d)`` and ``centers`` ``(m, d)``."""
    # The expanded form is one matmul; clamping removes tiny negatives from cancellation.
    d2 = (x * x).sum(1, keepdim=True) + (centers * centers).sum(1)[None, :] - 2.0 * x @ centers.T
    return d2.clamp_min(0.0)


def median_gamma(x: Tensor, max_points: int = 2000, seed: int = 0) -> float:
    """The median heuristic ``gamma = 1 / median ||x_i - x_j||^2`` over (up to) ``max_points`` points."""
    x = x.reshape(len(x), -1)
    if len(x) < 2:
        raise DataError("the median heuristic needs at least two points")
    if len(x) > max_points:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_points]]
    d2 = squared_distances(x, x)
    off = d2[~torch.eye(len(x), dtype=torch.bool, device=x.device)]
    med = float(off.median())
    if not med > 0:
        raise DataError("all points coincide, so no kernel width can be chosen from the data; pass gamma")
    return 1.0 / med


class RBFKernelModel(nn.Module):
    """``f(x) = W k(x) + b`` over Gaussian-kernel features to fixed centres.

    Args:
        centers: ``(m, ...)`` kernel centres; inputs are flattened to ``(B, d)`` to match them.
        num_outputs: width of ``W``: 1 for a binary SVM score, ``C`` for ``C``-class logits.
        gamma: kernel width in ``exp(-gamma ||x - c||^2)``.
        bias: learn an offset ``b``.

    The forward pass returns ``(B, num_outputs)``. Parameters live in ``self.head``; the centres
    are a buffer (moved and cast with the module, never trained).
    """

    def __init__(self, centers: Tensor, num_outputs: int, gamma: float, bias: bool = True) -> None:
        super().__init__()
        if centers.ndim < 2 or len(centers) == 0:
            raise DataError(
                f"centers must be (m, d) or (m, ...) with m >= 1, got shape {tuple(centers.shape)}"
            )
        if not (isinstance(gamma, (int, float)) and gamma > 0 and gamma < float("inf")):
            raise ConfigError(f"gamma must be a finite number > 0, got {gamma!r}")
        if num_outputs < 1:
            raise ConfigError(f"num_outputs must be >= 1, got {num_outputs}")
        flat = centers.detach().reshape(len(centers), -1)
        self.register_buffer("centers", flat.clone())
        self.gamma = float(gamma)
        self.head = nn.Linear(len(flat), num_outputs, bias=bias, dtype=flat.dtype)
        nn.init.zeros_(self.head.weight)  # convex: any start reaches the same optimum
        if bias:
            nn.init.zeros_(self.head.bias)

    @classmethod
    def from_data(
        cls,
        x_train: Tensor,
        num_outputs: int,
        *,
        landmarks: int | None = None,
        gamma: float | None = None,
        bias: bool = True,
        seed: int = 0,
    ) -> RBFKernelModel:
        """Centres at the training points (``landmarks=None``) or at ``landmarks`` random ones.

        ``gamma`` defaults to the median heuristic on ``x_train``.
        """
        x = x_train.reshape(len(x_train), -1)
        if landmarks is not None:
            if not 1 <= landmarks <= len(x):
                raise ConfigError(
                    f"landmarks must be in [1, {len(x)}] (the training set size), got {landmarks}"
                )
            pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:landmarks]
            centers = x[pick.to(x.device)]
        else:
            centers = x
        g = median_gamma(x, seed=seed) if gamma is None else gamma
        return cls(centers, num_outputs, g, bias)

    def features(self, x: Tensor) -> Tensor:
        """Kernel features ``k(x)`` ``(B, m)``."""
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.centers.shape[1]:
            raise DataError(
                f"inputs have {flat.shape[1]} features per example but the kernel centres have "
                f"{self.centers.shape[1]}: pass inputs shaped like the data the model was built from"
            )
        return torch.exp(-self.gamma * squared_distances(flat.to(self.centers.dtype), self.centers))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def extra_repr(self) -> str:
        return f"centers={tuple(self.centers.shape)}, gamma={self.gamma:.4g}"
