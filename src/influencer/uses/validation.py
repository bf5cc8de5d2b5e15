"""Validate influence against real leave-one-out retraining (Koh & Liang 2017, Fig. 2).

For one test example: take the ``k`` training examples with the largest predicted effect, remove
each one in turn, retrain from the optimum (warm start), and compare the actual change of the test
measurement with the predicted score. Convex models are retrained to the optimum with L-BFGS in
float64, so any disagreement is the influence approximation's, not the optimiser's.
:func:`influencer.paper.validation.plot_loo` draws the result.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from influencer._kernel.errors import ConfigError
from influencer._kernel.progress import progress_bar
from influencer._kernel.stats import pearson, spearman
from influencer.influence import Influence
from influencer.retraining import LBFGSRetrainer, Retrainer


@dataclass(frozen=True)
class LOOResult:
    """Predicted vs actual change of the test measurement when each training id is removed."""

    train_ids: np.ndarray  # (k,)
    predicted: np.ndarray  # (k,) influence scores (removal convention, see influencer._kernel.scores)
    actual: np.ndarray  # (k,) f(theta_{-i}) - f(theta*) after retraining
    pearson: float
    spearman: float
    optimum_shift: float  # ||theta* - theta|| / ||theta||: how far the given model was from the optimum

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
        retrain: how to retrain (default :class:`~influencer.retraining.LBFGSRetrainer`: to the
            optimum, for convex models).
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

    reference = influence.replace(dtype=torch.float64) if float64 else influence
    retrainer = retrain or LBFGSRetrainer()
    everyone = torch.arange(influence.n)

    def measure(theta: Tensor) -> float:
        return float(reference.measurements(test, theta)[0])

    theta_star = retrainer.refit(reference)
    shift = float((theta_star - reference.theta).norm() / reference.theta.norm().clamp_min(1e-30))
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
        theta_i = retrainer.refit(reference, everyone[everyone != i], theta_star)
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
