"""What one run found, with what it was found with: everything the outputs are made from."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from influencer.app.job.evaluation import Evaluation
from influencer.app.job.job import Job
from influencer.app.settings.explain import ExplainConfig
from influencer.influence import Influence
from influencer.scores import TopK

log = logging.getLogger("influencer.explain")

# A training example among the most harmful of at least this many explained test examples is a
# candidate to inspect.
MIN_RECURRENCE = 2


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A training example that is among the most harmful of several explained test examples."""

    train_id: int
    count: int  # how many explained test examples have it among their top-k most harmful
    test_ids: tuple[int, ...]  # which
    total_score: float  # the sum of its (negative) scores on them


@dataclasses.dataclass(frozen=True)
class StoreScoring:
    """How the scores were computed from a gradient store (``influencer explain --store``) instead
    of exact gradients: in words for the report, and as JSON-able settings for the summary."""

    store: str  # the store directory
    projection: str  # e.g. "kronecker projection to k = 2048 (32 x 32 per layer, 2 layers), float32"
    preconditioner: str  # e.g. "projected Fisher, block-diagonal per layer, relative damping 0.1"
    settings: dict[str, Any]  # {"store", "projector", "k", "preconditioner", ...}
    uses_estimator: bool = False  # the test directions were solved with the estimator (before projection)


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
    test_choice: str = ""  # how the test examples were chosen, in words
    directions: np.ndarray | None = None  # (m, p) s_test = H^-1 grad f(test) of each test example
    min_recurrence: int = MIN_RECURRENCE

    # how far the model is from a minimum: {"objective_gradient_norm", "mean_example_gradient_norm", "ratio"}
    optimality: dict[str, float] | None = None
    # set when the scores come from a gradient store (projected gradients) instead of exact ones
    scoring: StoreScoring | None = None
    # what the run computed with, resolved from the settings (influencer.app.steps.Ran)
    ran: Any = None

    def candidates(self) -> list[Candidate]:
        """Training examples among the top-k most harmful (negative scores only) of at least
        ``min_recurrence`` explained test examples: most often first, then most harmful in total."""
        return find_candidates(self.top, self.test_ids, self.min_recurrence)

    def title(self, j: int) -> str:
        """``"test #17 (label 3, predicted 5, wrong)"`` for the ``j``-th chosen test example."""
        tid = int(self.test_ids[j])
        return f"test #{tid} ({self.evaluation.describe(tid, self.job.classes, loss=False)})"


def find_candidates(top: TopK, test_ids: np.ndarray, min_recurrence: int = MIN_RECURRENCE) -> list[Candidate]:
    """Training examples among the most harmful (negative scores only) of at least
    ``min_recurrence`` rows of ``top`` (``(m, k)``, rows for ``test_ids`` ``(m,)``): most often
    first, then most harmful in total."""
    seen: dict[int, list[tuple[int, float]]] = {}
    ids, scores = top.harmful_ids.tolist(), top.harmful_scores.tolist()
    for j, (row, values) in enumerate(zip(ids, scores, strict=True)):
        for i, v in zip(row, values, strict=True):
            if v < 0:
                seen.setdefault(int(i), []).append((int(test_ids[j]), float(v)))
    found = [
        Candidate(i, len(hits), tuple(t for t, _ in hits), sum(v for _, v in hits))
        for i, hits in seen.items()
        if len(hits) >= min_recurrence
    ]
    return sorted(found, key=lambda c: (-c.count, c.total_score, c.train_id))


def candidates_json(candidates: list[Candidate]) -> list[dict[str, Any]]:
    """The candidates to inspect as JSON (``summary.json``, ``top_k.json``)."""
    return [
        {
            "train_id": c.train_id,
            "harmful_to": c.count,
            "test_ids": list(c.test_ids),
            "total_score": c.total_score,
        }
        for c in candidates
    ]


def names_text(names: list[str]) -> str:
    """Parameter names, the first five and a count when there are many."""
    return ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:5])}, ... ({len(names)} tensors)"


@dataclasses.dataclass
class ExplainResult:
    """What :func:`~influencer.app.commands.explain.explain` computed; the same is on disk in ``run_dir``."""

    config: ExplainConfig
    run_dir: Path
    test_ids: np.ndarray  # (m,)
    scores: np.ndarray  # (m, n_train)
    top: TopK  # each (m, k)
    accuracy: float | None
    summary: dict[str, Any]
    timings: dict[str, float]
    files: dict[str, Path]


def log_top(ex: Explanation) -> None:
    """Log each explained test example's most helpful and harmful training ids, then the candidates."""
    for j, tid in enumerate(ex.test_ids.tolist()):
        log.info("test #%d (%s):", tid, ex.evaluation.describe(tid, ex.job.classes))
        log.info("  Most helpful IDs: %s", ex.top.helpful_ids[j].tolist())
        log.info("    scores: %s", _fmt(ex.top.helpful_scores[j]))
        log.info("  Most harmful IDs: %s", ex.top.harmful_ids[j].tolist())
        log.info("    scores: %s", _fmt(ex.top.harmful_scores[j]))
    for c in ex.candidates():
        log.info(
            "candidate to inspect: training #%d is among the %d most harmful of %d test examples (%s)",
            c.train_id,
            ex.top.harmful_ids.shape[1],
            c.count,
            ", ".join(f"#{t}" for t in c.test_ids),
        )


def _fmt(values: Tensor) -> str:
    return "[" + ", ".join(f"{float(v):+.3e}" for v in values) + "]"
