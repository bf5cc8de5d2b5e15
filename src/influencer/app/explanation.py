"""What one run found, with what it was found with: everything the outputs are made from."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from influencer._kernel.scores import TopK
from influencer.app.config import ExplainConfig
from influencer.app.evaluation import Evaluation
from influencer.app.jobs import Job
from influencer.influence import Influence


@dataclasses.dataclass
class Explanation:
    """The chosen test examples, their scores against every training example and the top ones."""

    config: ExplainConfig
    job: Job
    influence: Influence
    evaluation: Evaluation
    test_ids: np.ndarray  # (m,)
    scores: np.ndarray  # (m, n_train), removal scores, positive = helpful
    top: TopK  # each (m, k)
    solver: dict[str, Any]  # the solver's info (iterations, residuals, ...), JSON-able
    # how far the model is from a minimum: {"objective_gradient_norm", "mean_example_gradient_norm", "ratio"}
    optimality: dict[str, float] | None = None

    def title(self, j: int) -> str:
        """``"test #17 (label 3, predicted 5, wrong)"`` for the ``j``-th chosen test example."""
        tid = int(self.test_ids[j])
        return f"test #{tid} ({self.evaluation.describe(tid, self.job.classes, loss=False)})"


def names_text(names: list[str]) -> str:
    """Parameter names, the first five and a count when there are many."""
    return ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:5])}, ... ({len(names)} tensors)"
