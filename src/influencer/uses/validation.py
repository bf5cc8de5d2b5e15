"""Validate influence against real leave-one-out retraining (Koh & Liang 2017, Fig. 2).

For one test example: take the ``k`` training examples with the largest predicted effect, remove
each one in turn, retrain from the optimum (warm start), and compare the actual change of the test
measurement with the predicted score. Convex models are retrained to the optimum with L-BFGS in
float64, so any disagreement is the influence approximation's, not the optimiser's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from influencer._kernel.curvature import Curvature
from influencer._kernel.data import Examples
from influencer._kernel.errors import ConfigError
from influencer._kernel.functional import ModelFunction
from influencer._kernel.progress import progress_bar
from influencer._kernel.stats import pearson, spearman
from influencer.estimators import CG, Exact
from influencer.influence import Influence
from influencer.paper.plotting import predicted_vs_actual
from influencer.training import fit_lbfgs

# (function, training data, ids to train on, starting parameters) -> retrained parameters
Retrainer = Callable[[ModelFunction, Examples, Tensor, Tensor], Tensor]


def lbfgs_retrainer(
    max_iter: int = 2000, grad_tol: float = 1e-10, exact_max_params: int = 5000, newton_steps: int = 5
) -> Retrainer:
    """Retrain to the optimum with full-batch L-BFGS (for convex objectives).

    The first call (on all the data) also factorises the Hessian at that optimum; later calls,
    which drop a few points, polish L-BFGS's answer with up to ``newton_steps`` Newton steps
    preconditioned by it, then as many exact Newton-CG steps (see :func:`fit_lbfgs`).
    """
    polish: list[Callable[[Tensor], Tensor]] = []

    def retrain(fn: ModelFunction, data: Examples, ids: Tensor, theta: Tensor) -> Tensor:
        out = fit_lbfgs(
            fn,
            data,
            ids,
            theta,
            max_iter=max_iter,
            grad_tol=grad_tol,
            newton_steps=newton_steps,
            inverse_hessian=polish[0] if polish else None,
        )
        if not polish:
            curvature = Curvature(fn, out, data, ids)
            estimator = Exact() if fn.p <= exact_max_params else CG(tol=1e-6)
            polish.append(estimator.fit(curvature).solve)
        return out

    return retrain


@dataclass(frozen=True)
class LOOResult:
    """Predicted vs actual change of the test measurement when each training id is removed."""

    train_ids: np.ndarray  # (k,)
    predicted: np.ndarray  # (k,) influence scores (removal convention, see influencer._kernel.scores)
    actual: np.ndarray  # (k,) f(theta_{-i}) - f(theta*) after retraining
    pearson: float
    spearman: float
    optimum_shift: float  # ||theta* - theta|| / ||theta||: how far the given model was from the optimum

    def plot(self, path: str | Path, title: str = "Leave-one-out retraining") -> Path:
        """Scatter of actual vs predicted with the identity line, saved as PNG."""
        return predicted_vs_actual(
            path,
            self.predicted,
            self.actual,
            title=title,
            ylabel="predicted change (influence)",
            pearson=self.pearson,
            spearman=self.spearman,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "k": int(self.train_ids.size),
            "pearson": self.pearson,
            "spearman": self.spearman,
            "optimum_shift": self.optimum_shift,
        }


def leave_one_out(
    influence: Influence,
    test: Any,
    k: int = 50,
    *,
    select: Literal["magnitude", "helpful", "harmful", "random"] = "magnitude",
    retrain: Retrainer | None = None,
    float64: bool = True,
    seed: int = 0,
) -> LOOResult:
    """Compare influence scores with leave-one-out retraining on one test example.

    Args:
        influence: a fitted :class:`Influence`.
        test: one test example (any data form, with a single example).
        k: number of training examples to remove, one at a time.
        select: which ``k``: largest ``|score|``, most helpful, most harmful, or random.
        retrain: how to retrain (default: L-BFGS to the optimum, for convex models).
        float64: retrain and measure in double precision.
        seed: for ``select="random"``.
    """
    scores = influence.scores(test)
    if scores.shape[0] != 1:
        raise ConfigError(f"leave_one_out takes one test example, got {scores.shape[0]}")
    scores = scores[0].cpu()
    k = min(k, influence.n - 1)
    if select == "magnitude":
        ids = scores.abs().argsort(descending=True)[:k]
    elif select == "helpful":
        ids = scores.argsort(descending=True)[:k]
    elif select == "harmful":
        ids = scores.argsort()[:k]
    elif select == "random":
        ids = torch.randperm(influence.n, generator=torch.Generator().manual_seed(seed))[:k]
    else:
        raise ConfigError(f"select must be magnitude, helpful, harmful or random; got {select!r}")

    fn = influence.fn.cast(torch.float64) if float64 else influence.fn
    retrain = retrain or lbfgs_retrainer()
    test_batch = fn.prepare(influence.examples(test).take(torch.arange(1)))
    everyone = torch.arange(influence.n)

    def measure(theta: Tensor) -> float:
        with torch.no_grad():
            return float(fn.measurement(theta, test_batch)[0])

    theta_star = retrain(fn, influence.train, everyone, fn.theta0)
    shift = float((theta_star - fn.theta0).norm() / fn.theta0.norm().clamp_min(1e-30))
    if shift > 1e-2:
        warnings.warn(
            f"the model is {shift:.1%} away from the optimum of its objective; influence assumes a "
            "minimum, so train it to convergence for a meaningful comparison",
            RuntimeWarning,
            stacklevel=2,
        )
    base = measure(theta_star)
    actual = []
    for i in progress_bar(ids.tolist(), "leave-one-out retraining", influence.progress):
        theta_i = retrain(fn, influence.train, everyone[everyone != i], theta_star)
        actual.append(measure(theta_i) - base)
    predicted = scores[ids].double().numpy()
    actual_arr = np.asarray(actual)
    return LOOResult(
        ids.numpy(),
        predicted,
        actual_arr,
        pearson(predicted, actual_arr),
        spearman(predicted, actual_arr),
        shift,
    )
