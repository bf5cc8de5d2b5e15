"""A correctness report a user can run on their own model, task and data.

``check_influence`` verifies, on a small slice of the user's data, the three things influence
depends on: per-example gradients (vectorised vs a plain per-example autograd loop), invariance of
scores to batching, and the chosen estimator against an exact float64 solve (when the model is
small enough to form H).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from influencer._kernel.data import as_examples
from influencer._kernel.stats import pearson, spearman
from influencer._kernel.task import Task
from influencer.estimators import Estimator, Exact
from influencer.influence import Influence


@dataclass(frozen=True)
class CheckReport:
    """Outcome of :func:`check_influence`; ``ok`` is True when every check passed."""

    gradient_max_rel_error: float
    batching_max_rel_error: float
    estimator_pearson: float | None
    estimator_spearman: float | None
    notes: list[str] = field(default_factory=list)
    gradient_tol: float = 1e-6
    estimator_min_pearson: float = 0.9

    @property
    def ok(self) -> bool:
        good = max(self.gradient_max_rel_error, self.batching_max_rel_error) <= self.gradient_tol
        if self.estimator_pearson is not None:
            good = good and self.estimator_pearson >= self.estimator_min_pearson
        return good

    def __str__(self) -> str:
        lines = [
            f"per-example gradients vs loop: max rel. error {self.gradient_max_rel_error:.2e}",
            f"scores, batch size 1 vs default: max rel. error {self.batching_max_rel_error:.2e}",
        ]
        if self.estimator_pearson is not None:
            lines.append(
                f"estimator vs exact float64: Pearson {self.estimator_pearson:.4f}, "
                f"Spearman {self.estimator_spearman:.4f}"
            )
        lines += self.notes
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_influence(
    model: nn.Module,
    task: Task,
    train: Any,
    test: Any,
    estimator: Estimator,
    *,
    n_train: int = 64,
    n_test: int = 4,
    curvature: str = "hessian",
    params: Any = None,
    max_exact_params: int = 5000,
) -> CheckReport:
    """Run the checks on the first ``n_train`` training and ``n_test`` test examples."""
    train_ex, test_ex = as_examples(train), as_examples(test)
    tr = train_ex.take(torch.arange(min(n_train, len(train_ex))))
    te = test_ex.take(torch.arange(min(n_test, len(test_ex))))
    notes: list[str] = []

    def build(est: Estimator, batch: int, dtype: torch.dtype | None = None) -> Influence:
        return Influence(
            model,
            task,
            tr,
            estimator=est,
            curvature=curvature,
            params=params,
            batch_size=batch,
            hessian_batch_size=batch,
            dtype=dtype,
        ).fit()

    inf = build(estimator, 32)
    fn = inf.fn
    # Per-example gradients: vmap(grad) against a loop of single-example autograd calls.
    vmapped = torch.cat([g for _, g in inf.train_gradients()])
    looped = []
    for i in range(len(inf.train)):
        theta = inf.theta.clone().requires_grad_(True)
        one = fn.prepare(inf.train.take(torch.tensor([i])))
        value = fn.loss(theta, one).sum() + fn.regularizer(theta)
        looped.append(torch.autograd.grad(value, theta)[0])
    grad_err = _rel(vmapped, torch.stack(looped))

    scores = inf.scores(te)
    one_by_one = build(estimator, 1).scores(te)
    batch_err = _rel(one_by_one, scores)

    est_r = est_s = None
    if inf.p <= max_exact_params:
        exact = build(Exact(damping=estimator.damping), 32, torch.float64).scores(te)
        est_r = pearson(scores.flatten().cpu(), exact.flatten().cpu())
        est_s = spearman(scores.flatten().cpu(), exact.flatten().cpu())
    else:
        notes.append(f"estimator not compared with Exact: p={inf.p} > max_exact_params={max_exact_params}")
    tol = 1e-6 if inf.theta.dtype == torch.float64 else 1e-3
    return CheckReport(grad_err, batch_err, est_r, est_s, notes, gradient_tol=tol)
