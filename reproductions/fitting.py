"""The convex model most reproductions start from: logistic regression at its optimum, in float64."""

from __future__ import annotations

from typing import Any

import torch

from influencer.estimators import Exact
from influencer.influence import Influence
from influencer.models import LogisticRegression
from influencer.tasks import ClassificationTask
from influencer.training import train_lbfgs


def fit_logistic(
    train: Any,
    num_classes: int,
    weight_decay: float,
    *,
    device: torch.device | str | None = None,
) -> tuple[LogisticRegression, Influence]:
    """Multinomial logistic regression trained to the optimum, with its exact, fitted :class:`Influence`.

    ``train`` is ``(x, y)`` with ``x`` ``(n, d)`` and labels ``(n,)`` in ``[0, num_classes)``. The
    objective ``mean cross-entropy + weight_decay/2 |theta|^2`` is strictly convex, so L-BFGS with
    Newton steps (from zero, in float64) reaches its unique optimum, where influence is exact to
    first order; the Hessian is solved exactly.
    """
    x, y = train
    task = ClassificationTask(weight_decay=weight_decay)
    model = LogisticRegression(x.shape[1], num_classes).to(device=device, dtype=torch.float64)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    train_lbfgs(model, task, (x, y), device=device, dtype=torch.float64)
    influence = Influence(model, task, (x, y), estimator=Exact(), device=device, dtype=torch.float64)
    return model, influence.fit()
