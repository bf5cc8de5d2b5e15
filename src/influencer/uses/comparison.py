"""Comparing models by the training data they rely on (Koh & Liang 2017, Sec. 5.1).

Two models trained on the same task can reach similar accuracy by very different means. Influence
shows which: for each test example, score every training example for each model and relate the
scores to the Euclidean distance between the training and test inputs. Koh & Liang found that an
RBF-kernel SVM relies on training images that are close in pixel space (its influence decays with
distance), while a network's helpful images can be far away in pixel space but share the class.

:func:`compare_models` computes, per model and averaged over test examples,

* the Spearman correlation between ``|influence|`` and distance (strongly negative = local model);
* where the top-``k`` helpful training examples lie: the fraction among the nearest
  ``near_fraction`` of the training set, and their mean distance percentile (0 = nearest);
* the fraction of the top-``k`` helpful examples that share the test example's label;
* the share of the total ``|influence|`` carried by the nearest ``near_fraction`` of the data;

and :class:`ModelComparison` keeps every score and distance for tables and figures
(``reproductions.comparison`` draws the paper's figure and builds its experiment on digits).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from influencer._kernel.errors import ConfigError, DataError
from influencer._kernel.stats import pearson, spearman
from influencer._kernel.task import classes_from_outputs
from influencer.influence import Influence


@dataclass(frozen=True)
class ModelStats:
    """How one model's influence relates to input-space distance, averaged over test examples."""

    spearman_abs_distance: float  # Spearman(|score|, distance) over the training set
    pearson_abs_distance: float  # Pearson(|score|, distance)
    top_near_fraction: float  # fraction of the top-k helpful among the nearest near_fraction of the data
    top_distance_percentile: (
        float  # mean distance percentile of the top-k helpful (0 = nearest, 1 = farthest)
    )
    top_same_label: float  # fraction of the top-k helpful with the test example's label
    near_mass: float  # share of sum |score| carried by the nearest near_fraction of the data
    half_mass_fraction: float  # smallest fraction of nearest training examples holding half of sum |score|
    accuracy: float  # the model's accuracy on the compared test examples

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class ModelComparison:
    """Scores of every training example on each test example, for several models.

    ``scores[name]`` and ``distances`` are ``(m, n)``; labels are in the common label space of
    ``y_train`` / ``y_test`` given to :func:`compare_models`.
    """

    names: tuple[str, ...]
    scores: Mapping[str, np.ndarray]  # name -> (m, n) removal scores, positive = helpful
    distances: np.ndarray  # (m, n) Euclidean distance between test and training inputs
    train_labels: np.ndarray  # (n,)
    test_labels: np.ndarray  # (m,)
    correct: Mapping[str, np.ndarray]  # name -> (m,) bool, the model classifies the test example right
    stats: Mapping[str, ModelStats]
    k: int
    near: int  # size of the "nearest" neighbourhood, round(near_fraction * n)

    def top_helpful(self, name: str, test_index: int) -> np.ndarray:
        """The ``k`` most helpful training ids ``(k,)`` of model ``name`` for one test example."""
        return np.argsort(-self.scores[name][test_index], kind="stable")[: self.k]

    def format_table(self) -> str:
        cols = [
            ("Spearman(|I|,d)", "spearman_abs_distance"),
            ("Pearson(|I|,d)", "pearson_abs_distance"),
            (f"top{self.k} in near", "top_near_fraction"),
            (f"top{self.k} d-pct", "top_distance_percentile"),
            (f"top{self.k} same", "top_same_label"),
            ("near |I| mass", "near_mass"),
            ("half-mass frac", "half_mass_fraction"),
            ("accuracy", "accuracy"),
        ]
        width = max(len(n) for n in self.names) + 2
        lines = [
            f"{len(self.test_labels)} test examples, {len(self.train_labels)} training examples, "
            f"'near' = nearest {self.near} ({self.near / len(self.train_labels):.0%})",
            " " * width + "".join(f"{c:>17}" for c, _ in cols),
        ]
        for name in self.names:
            st = self.stats[name].as_dict()
            lines.append(f"{name:<{width}}" + "".join(f"{st[key]:>17.3f}" for _, key in cols))
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "near": self.near,
            "n_test": len(self.test_labels),
            "models": {name: self.stats[name].as_dict() for name in self.names},
        }


def _flat(x: Tensor | np.ndarray) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    return t.detach().reshape(len(t), -1).to(torch.float64).cpu()


def _model_stats(
    scores: np.ndarray,
    dist: np.ndarray,
    y_train: np.ndarray,
    y_test: np.ndarray,
    k: int,
    near: int,
    correct: np.ndarray,
) -> ModelStats:
    sp, pe, near_frac, pct, same, mass, half = [], [], [], [], [], [], []
    n = scores.shape[1]
    for t in range(scores.shape[0]):
        s, d = scores[t], dist[t]
        a = np.abs(s)
        sp.append(spearman(a, d))
        pe.append(pearson(a, d))
        order = np.argsort(d, kind="stable")
        rank = np.empty(n)
        rank[order] = np.arange(n) / max(n - 1, 1)
        nearest = order[:near]
        top = np.argsort(-s, kind="stable")[:k]
        near_frac.append(np.isin(top, nearest).mean())
        pct.append(rank[top].mean())
        same.append((y_train[top] == y_test[t]).mean())
        total = a.sum()
        mass.append(a[nearest].sum() / total if total > 0 else float("nan"))
        cumulative = np.cumsum(a[order])
        half.append((np.searchsorted(cumulative, 0.5 * total) + 1) / n if total > 0 else float("nan"))
    return ModelStats(
        float(np.nanmean(sp)),
        float(np.nanmean(pe)),
        float(np.mean(near_frac)),
        float(np.mean(pct)),
        float(np.mean(same)),
        float(np.nanmean(mass)),
        float(np.nanmean(half)),
        float(np.mean(correct)),
    )


def compare_models(
    influences: Mapping[str, Influence],
    tests: Mapping[str, Any],
    x_train: Tensor | np.ndarray,
    y_train: Tensor | np.ndarray,
    x_test: Tensor | np.ndarray,
    y_test: Tensor | np.ndarray,
    *,
    k: int = 10,
    near_fraction: float = 0.05,
) -> ModelComparison:
    """Influence of every training example on each test example for each model, vs distance.

    Args:
        influences: fitted :class:`Influence` per model name, all over the same ``n`` training
            examples in the same order (each in its own input format, e.g. images or flat).
        tests: per model name, the same ``m`` test examples in that model's format (a batch
            ``(inputs, labels)`` its task accepts).
        x_train, x_test: ``(n, ...)`` / ``(m, ...)`` inputs in the space distances are measured in
            (flattened; e.g. pixels).
        y_train, y_test: ``(n,)`` / ``(m,)`` labels in one common encoding (for colours and the
            same-label statistic).
        k: number of top helpful examples to examine.
        near_fraction: the "nearest neighbours" are the nearest ``round(near_fraction * n)``.
    """
    if not influences:
        raise ConfigError("pass at least one model's Influence")
    if set(tests) != set(influences):
        raise ConfigError(
            f"tests must have one entry per model: models {sorted(influences)}, tests {sorted(tests)}"
        )
    xtr, xte = _flat(x_train), _flat(x_test)
    ytr = np.asarray(torch.as_tensor(y_train).cpu()).reshape(-1)
    yte = np.asarray(torch.as_tensor(y_test).cpu()).reshape(-1)
    n, m = len(xtr), len(xte)
    if len(ytr) != n or len(yte) != m:
        raise DataError(
            f"got {n} training inputs with {len(ytr)} labels and {m} test inputs with {len(yte)} labels"
        )
    if xtr.shape[1] != xte.shape[1]:
        raise DataError(f"training inputs have {xtr.shape[1]} features but test inputs {xte.shape[1]}")
    for name, inf in influences.items():
        if inf.n != n:
            raise DataError(
                f"model {name!r} has {inf.n} training examples but x_train has {n}; use the same data"
            )
    if not 0.0 < near_fraction < 1.0:
        raise ConfigError(f"near_fraction must be in (0, 1), got {near_fraction}")
    if k < 1 or k > n:
        raise ConfigError(f"k must be in [1, {n}], got {k}")
    near = max(1, round(near_fraction * n))
    dist = torch.cdist(xte, xtr).numpy()  # (m, n)
    scores, correct, stats = {}, {}, {}
    for name, inf in influences.items():
        s = inf.scores(tests[name]).detach().double().cpu().numpy()  # (m, n)
        if s.shape != (m, n):
            raise DataError(f"model {name!r}: tests gave scores of shape {s.shape}, expected ({m}, {n})")
        labels = inf.examples(tests[name]).take(torch.arange(m))[1]
        pred = classes_from_outputs(inf.outputs(tests[name])).cpu()
        correct[name] = (pred == labels.reshape(-1).cpu()).numpy()
        scores[name] = s
        stats[name] = _model_stats(s, dist, ytr, yte, k, near, correct[name])
    return ModelComparison(tuple(influences), scores, dist, ytr, yte, correct, stats, k, near)
