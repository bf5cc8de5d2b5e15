"""Reference influence computed without the library's own machinery (for tests and checks).

``ridge_reference`` is closed form. ``dense_reference_scores`` uses plain autograd: a per-example
loop for gradients and ``torch.autograd.functional.hessian`` for H, in float64, so it shares no code
path with :class:`influencer.Influence` beyond the Task itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from influencer._kernel.task import Task


@dataclass(frozen=True)
class RidgeReference:
    """Closed-form ridge regression ``J(w) = mean_i 0.5 (w.x_i - y_i)^2 + lam/2 ||w||^2``."""

    w: Tensor  # (d,) optimum
    hessian: Tensor  # (d, d) = X^T X / n + lam I
    train_grads: Tensor  # (n, d) g_i = x_i r_i + lam w
    test_grads: Tensor  # (m, d) grad of 0.5 r_test^2
    scores: Tensor  # (m, n) removal scores (1/n) grad f^T H^-1 g_i
    loo_change: Tensor  # (m, n) actual test-loss change after exact leave-one-out refits


def ridge_solution(x: Tensor, y: Tensor, lam: float) -> Tensor:
    n, d = x.shape
    return torch.linalg.solve(x.T @ x / n + lam * torch.eye(d, dtype=x.dtype), x.T @ y / n)


def ridge_reference(x: Tensor, y: Tensor, lam: float, x_test: Tensor, y_test: Tensor) -> RidgeReference:
    """Everything about ridge influence in closed form (float64), including exact LOO refits."""
    x, y, x_test, y_test = (t.double() for t in (x, y, x_test, y_test))
    n, d = x.shape
    w = ridge_solution(x, y, lam)
    h = x.T @ x / n + lam * torch.eye(d, dtype=x.dtype)
    g = x * (x @ w - y)[:, None] + lam * w
    gt = x_test * (x_test @ w - y_test)[:, None]
    scores = gt @ torch.linalg.solve(h, g.T) / n

    def test_loss(v: Tensor) -> Tensor:
        return 0.5 * (x_test @ v - y_test) ** 2

    base = test_loss(w)
    keep = ~torch.eye(n, dtype=torch.bool)
    refits = [ridge_solution(x[keep[i]], y[keep[i]], lam) for i in range(n)]
    loo = torch.stack([test_loss(v) - base for v in refits], dim=1)
    return RidgeReference(w, h, g, gt, scores, loo)


def dense_reference_scores(
    model: nn.Module, task: Task, train: tuple[Tensor, ...], test: tuple[Tensor, ...], damping: float = 0.0
) -> Tensor:
    """Removal scores ``(m, n)`` from a dense float64 Hessian and per-example gradient loops.

    Plain ``torch.autograd`` on a float64 copy of the module: one backward pass per example and
    one double-backward per Hessian row. Uses all parameters; small models only.
    """
    model = copy.deepcopy(model).double().eval()
    params = list(model.parameters())
    named = dict(model.named_parameters())
    train = tuple(t.double() if t.is_floating_point() else t for t in train)
    test = tuple(t.double() if t.is_floating_point() else t for t in test)
    n, m = train[0].shape[0], test[0].shape[0]

    def reg() -> Tensor:
        return torch.as_tensor(task.regularizer(named), dtype=torch.float64)

    def flat_grad(value: Tensor, create_graph: bool = False) -> Tensor:
        grads = torch.autograd.grad(value, params, create_graph=create_graph)
        return torch.cat([g.reshape(-1) for g in grads])

    objective = task.loss(model, train).mean() + reg()
    g = flat_grad(objective, create_graph=True)
    rows = [
        torch.cat([r.reshape(-1) for r in torch.autograd.grad(g[k], params, retain_graph=True)])
        for k in range(g.numel())
    ]
    hessian = torch.stack(rows)
    hessian = 0.5 * (hessian + hessian.T) + damping * torch.eye(g.numel(), dtype=torch.float64)

    train_grads = torch.stack(
        [flat_grad(task.loss(model, tuple(t[i : i + 1] for t in train)).sum() + reg()) for i in range(n)]
    )
    test_grads = torch.stack(
        [flat_grad(task.measurement(model, tuple(t[j : j + 1] for t in test)).sum()) for j in range(m)]
    )
    return test_grads @ torch.linalg.solve(hessian, train_grads.T) / n
