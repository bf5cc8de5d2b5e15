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

and :meth:`ModelComparison.plot` draws the paper's scatter (influence vs distance, coloured by
training label) and the most helpful training images of each model. :func:`digits_comparison`
builds the paper's experiment on two classes of scikit-learn's digits: an RBF-kernel smooth-hinge
SVM against a CNN whose top layer is refitted to the optimum on frozen features.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from influencer._kernel.errors import ConfigError, DataError
from influencer._kernel.stats import pearson, spearman
from influencer._kernel.task import ClassificationTask, SmoothHingeTask, classes_from_outputs
from influencer.estimators import Exact
from influencer.influence import Influence
from influencer.models import SmallCNN
from influencer.models.kernels import RBFKernelModel
from influencer.paper.datasets import Split, load_digits
from influencer.paper.plotting import pyplot, save_png
from influencer.training import train_lbfgs, train_minibatch


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

    def plot(
        self,
        path: str | Path,
        test_index: int = 0,
        images: tuple[Tensor | np.ndarray, Tensor | np.ndarray] | None = None,
        image_shape: tuple[int, int] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> Path:
        """Influence vs distance per model (one test example) and, given ``images=(x_train, x_test)``,
        the test image with each model's most helpful training images. Saved as PNG."""
        plt = pyplot()

        names = self.names
        show_images = images is not None
        rows = 1 + (len(names) if show_images else 0)
        cols = max(len(names), 1)
        fig = plt.figure(
            figsize=(max(4.6 * cols, 8.0), 3.6 + (1.3 * len(names) if show_images else 0)), dpi=120
        )
        grid = fig.add_gridspec(rows, 1, height_ratios=[3.2] + [1.2] * (rows - 1))
        top = grid[0].subgridspec(1, cols)
        labels = self.train_labels
        classes = np.unique(labels)
        label_name = {c: (class_names[int(c)] if class_names is not None else str(c)) for c in classes}
        d = self.distances[test_index]
        for j, name in enumerate(names):
            ax = fig.add_subplot(top[0, j])
            s = self.scores[name][test_index]
            for c, color in zip(classes, ("C0", "C3", "C2", "C1", "C4", "C5"), strict=False):
                m = labels == c
                ax.scatter(d[m], s[m], s=8, alpha=0.6, color=color, label=f"train label {label_name[c]}")
            best = self.top_helpful(name, test_index)
            ax.scatter(
                d[best],
                s[best],
                s=40,
                facecolors="none",
                edgecolors="k",
                lw=0.8,
                label=f"top {self.k} helpful",
            )
            ax.axhline(0, color="gray", lw=0.6)
            ax.set_xlabel("Euclidean distance to the test input")
            ax.set_ylabel("influence (removal score; + = helpful)")
            st = self.stats[name]
            ax.set_title(
                f"{name}: top-{self.k} helpful at distance percentile {st.top_distance_percentile:.2f};\n"
                f"half of sum |I| within the nearest {st.half_mass_fraction:.0%} (means over test examples)",
                fontsize=8,
            )
            ax.legend(fontsize=6, loc="best")
        if show_images:
            x_train = np.asarray(images[0]).reshape(len(labels), -1)
            x_test = np.asarray(images[1]).reshape(len(self.test_labels), -1)
            side = round(math.sqrt(x_train.shape[1]))
            shape = image_shape or (side, side)
            k = self.k
            for r, name in enumerate(names):
                sub = grid[1 + r].subgridspec(1, k + 1)
                ax = fig.add_subplot(sub[0, 0])
                ax.imshow(x_test[test_index].reshape(shape), cmap="gray_r")
                ax.set_title(f"{name}\ntest: {label_name[self.test_labels[test_index]]}", fontsize=7)
                ax.axis("off")
                for i, t in enumerate(self.top_helpful(name, test_index)):
                    ax = fig.add_subplot(sub[0, i + 1])
                    ax.imshow(x_train[t].reshape(shape), cmap="gray_r")
                    ax.set_title(f"#{i + 1}: {label_name[labels[t]]}\nd={d[t]:.1f}", fontsize=6)
                    ax.axis("off")
        fig.tight_layout()
        return save_png(fig, path)

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
        test_batch = inf.fn.prepare(inf.examples(tests[name]).take(torch.arange(m)))
        pred = _predicted_classes(inf, test_batch).cpu()
        correct[name] = (pred == test_batch[1].reshape(-1).cpu()).numpy()
        scores[name] = s
        stats[name] = _model_stats(s, dist, ytr, yte, k, near, correct[name])
    return ModelComparison(tuple(influences), scores, dist, ytr, yte, correct, stats, k, near)


def _predicted_classes(inf: Influence, batch: Any) -> Tensor:
    """Argmax of the logits, or the sign (-1/+1) of a single score, at the influence's theta."""
    with torch.no_grad():
        return classes_from_outputs(inf.fn.outputs(inf.theta, batch))


# ---- the paper's experiment on digits ----------------------------------------------------------


def two_class_digits(
    classes: tuple[int, int] = (1, 7), seed: int = 0, dtype: torch.dtype = torch.float64
) -> Split:
    """Two classes of scikit-learn's digits as images ``(n, 1, 8, 8)``, labels 0/1 (in ``classes`` order)."""
    if len(classes) != 2 or classes[0] == classes[1] or not all(0 <= c <= 9 for c in classes):
        raise ConfigError(f"classes must be two different digits 0-9, got {classes}")
    d = load_digits(seed=seed, images=True, dtype=dtype)

    def pick(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        keep = (y == classes[0]) | (y == classes[1])
        return x[keep], (y[keep] == classes[1]).long()

    xtr, ytr = pick(d.x_train, d.y_train)
    xte, yte = pick(d.x_test, d.y_test)
    return Split(f"digits-{classes[0]}v{classes[1]}", xtr, ytr, xte, yte, (str(classes[0]), str(classes[1])))


@dataclass(frozen=True)
class DigitsComparisonConfig:
    """Settings of :func:`digits_comparison` (defaults run in about a minute on a laptop CPU)."""

    classes: tuple[int, int] = (1, 7)
    n_test: int = 30
    k: int = 10
    near_fraction: float = 0.05
    svm_temperature: float = 0.1
    svm_weight_decay: float = 1e-3
    gamma: float | None = 1.0  # RBF width (pixels in [0, 1]); None = median heuristic (a wide kernel)
    cnn_channels: int = 8
    cnn_epochs: int = 30
    cnn_weight_decay: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_test < 1 or self.k < 1 or self.cnn_epochs < 1 or self.cnn_channels < 1:
            raise ConfigError("n_test, k, cnn_epochs and cnn_channels must be >= 1")
        if self.svm_temperature <= 0 or self.svm_weight_decay <= 0 or self.cnn_weight_decay <= 0:
            raise ConfigError(
                "svm_temperature and both weight decays must be > 0 (convex, invertible Hessians)"
            )


def digits_comparison(
    config: DigitsComparisonConfig | None = None, device: torch.device | str | None = None
) -> tuple[ModelComparison, Split]:
    """RBF-kernel SVM vs CNN on two digit classes; returns the comparison and the data split.

    * ``rbf_svm``: :class:`~influencer.models.kernels.RBFKernelModel` with centres at every training
      image and a smooth-hinge loss (labels -1/+1), trained to its optimum; influence over all its
      parameters, exactly.
    * ``cnn``: :class:`~influencer.models.SmallCNN` trained with Adam; its convolutional features
      are then frozen and the linear top layer refitted to the optimum of logistic regression
      (Koh & Liang's Inception setting); influence over the top layer, exactly. Its Influence is
      built on the top layer with the frozen features as inputs (the same scores as
      ``params=["head"]`` on the whole CNN, computed without the convolutions).
    """
    cfg = config or DigitsComparisonConfig()
    data = two_class_digits(cfg.classes, seed=cfg.seed)
    x, y = data.train
    m = min(cfg.n_test, len(data.y_test))
    x_test, y_test = data.x_test[:m], data.y_test[:m]
    signed = 2 * y - 1
    torch.manual_seed(cfg.seed)

    svm = RBFKernelModel.from_data(x, num_outputs=1, gamma=cfg.gamma).double().to(device)
    svm_task = SmoothHingeTask(temperature=cfg.svm_temperature, weight_decay=cfg.svm_weight_decay)
    train_lbfgs(svm, svm_task, (x.reshape(len(x), -1), signed), device=device)
    svm_inf = Influence(
        svm, svm_task, (x.reshape(len(x), -1), signed), estimator=Exact(), device=device
    ).fit()

    cnn = SmallCNN(
        num_classes=2, channels=cfg.cnn_channels
    )  # trained in float32: convolutions are slow in float64
    cnn_task = ClassificationTask(weight_decay=cfg.cnn_weight_decay)
    train_minibatch(
        cnn,
        cnn_task,
        (x.float(), y),
        epochs=cfg.cnn_epochs,
        lr=1e-2,
        batch_size=32,
        seed=cfg.seed,
        device=device,
    )
    # Freeze the features and refit the top layer to the optimum on them: a logistic regression on
    # the CNN's features, exactly what influence over params=["head"] of the whole CNN computes,
    # without running the convolutions in every gradient and Hessian-vector product.
    cnn = cnn.double()
    where = next(cnn.parameters()).device
    with torch.no_grad():
        features = cnn.features(x.to(where)).cpu()  # (n, channels * 16)
        features_test = cnn.features(x_test.to(where)).cpu()
    train_lbfgs(cnn.head, cnn_task, (features, y), device=device)
    cnn_inf = Influence(cnn.head, cnn_task, (features, y), estimator=Exact(), device=device).fit()

    tests = {"rbf_svm": (x_test.reshape(m, -1), 2 * y_test - 1), "cnn": (features_test, y_test)}
    result = compare_models(
        {"rbf_svm": svm_inf, "cnn": cnn_inf},
        tests,
        x,
        y,
        x_test,
        y_test,
        k=cfg.k,
        near_fraction=cfg.near_fraction,
    )
    return result, data
