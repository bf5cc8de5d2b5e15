"""Comparing models by their influential training data (Koh & Liang 2017, Sec. 5.1, Fig. 1).

An RBF-kernel SVM and a CNN (top layer refitted on frozen features) on two digit classes: for each
test image, the influence of every training image vs its Euclidean distance in pixel space, and
each model's most helpful training images.

    python -m reproductions.comparison  # digits 1 vs 7, 30 test images
    python -m reproductions.comparison --classes 3 8 --n-test 50 --out out/compare_models

:func:`digits_comparison` builds the paper's experiment on two classes of scikit-learn's digits: an
RBF-kernel smooth-hinge SVM against a CNN whose top layer is refitted to the optimum on frozen
features, compared by :func:`~influencer.uses.comparison.compare_models`; :func:`plot_comparison`
draws the paper's figure (influence vs pixel distance, and each model's most helpful images).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from influencer.datasets import Split, load_digits
from influencer.errors import ConfigError
from influencer.estimators import Exact
from influencer.influence import Influence
from influencer.models import SmallCNN
from influencer.models.kernels import RBFKernelModel
from influencer.plotting import pyplot, save_png
from influencer.tasks import ClassificationTask, SmoothHingeTask
from influencer.training import train_lbfgs, train_minibatch
from influencer.uses.comparison import ModelComparison, compare_models


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


def plot_comparison(
    result: ModelComparison,
    path: str | Path,
    test_index: int = 0,
    images: tuple[Tensor | np.ndarray, Tensor | np.ndarray] | None = None,
    image_shape: tuple[int, int] | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """The paper's Fig. 1 for a :class:`~influencer.uses.comparison.ModelComparison`: influence vs
    distance per model (one test example), coloured by training label, and, given
    ``images=(x_train, x_test)``, the test image with each model's most helpful training images.
    Saved as PNG."""
    plt = pyplot()

    names = result.names
    show_images = images is not None
    rows = 1 + (len(names) if show_images else 0)
    cols = max(len(names), 1)
    fig = plt.figure(figsize=(max(4.6 * cols, 8.0), 3.6 + (1.3 * len(names) if show_images else 0)), dpi=120)
    grid = fig.add_gridspec(rows, 1, height_ratios=[3.2] + [1.2] * (rows - 1))
    top = grid[0].subgridspec(1, cols)
    labels = result.train_labels
    classes = np.unique(labels)
    label_name = {c: (class_names[int(c)] if class_names is not None else str(c)) for c in classes}
    d = result.distances[test_index]
    for j, name in enumerate(names):
        ax = fig.add_subplot(top[0, j])
        s = result.scores[name][test_index]
        for c, color in zip(classes, ("C0", "C3", "C2", "C1", "C4", "C5"), strict=False):
            m = labels == c
            ax.scatter(d[m], s[m], s=8, alpha=0.6, color=color, label=f"train label {label_name[c]}")
        best = result.top_helpful(name, test_index)
        ax.scatter(
            d[best],
            s[best],
            s=40,
            facecolors="none",
            edgecolors="k",
            lw=0.8,
            label=f"top {result.k} helpful",
        )
        ax.axhline(0, color="gray", lw=0.6)
        ax.set_xlabel("Euclidean distance to the test input")
        ax.set_ylabel("influence (removal score; + = helpful)")
        st = result.stats[name]
        ax.set_title(
            f"{name}: top-{result.k} helpful at distance percentile {st.top_distance_percentile:.2f};\n"
            f"half of sum |I| within the nearest {st.half_mass_fraction:.0%} (means over test examples)",
            fontsize=8,
        )
        ax.legend(fontsize=6, loc="best")
    if show_images:
        x_train = np.asarray(images[0]).reshape(len(labels), -1)
        x_test = np.asarray(images[1]).reshape(len(result.test_labels), -1)
        side = round(math.sqrt(x_train.shape[1]))
        shape = image_shape or (side, side)
        k = result.k
        for r, name in enumerate(names):
            sub = grid[1 + r].subgridspec(1, k + 1)
            ax = fig.add_subplot(sub[0, 0])
            ax.imshow(x_test[test_index].reshape(shape), cmap="gray_r")
            ax.set_title(f"{name}\ntest: {label_name[result.test_labels[test_index]]}", fontsize=7)
            ax.axis("off")
            for i, t in enumerate(result.top_helpful(name, test_index)):
                ax = fig.add_subplot(sub[0, i + 1])
                ax.imshow(x_train[t].reshape(shape), cmap="gray_r")
                ax.set_title(f"#{i + 1}: {label_name[labels[t]]}\nd={d[t]:.1f}", fontsize=6)
                ax.axis("off")
    fig.tight_layout()
    return save_png(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs=2, default=(1, 7), help="the two digit classes")
    ap.add_argument("--n-test", type=int, default=30, help="test images to average the statistics over")
    ap.add_argument("--k", type=int, default=10, help="top-k helpful training images examined")
    ap.add_argument(
        "--near-fraction", type=float, default=0.05, help="'near' = this nearest fraction of the data"
    )
    ap.add_argument("--gamma", type=float, default=1.0, help="RBF kernel width (<= 0: median heuristic)")
    ap.add_argument("--cnn-epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=None, help="alias of --seed (this experiment uses one seed)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    ap.add_argument("--out", type=Path, default=Path("out/compare_models"))
    args = ap.parse_args()

    seed = args.seeds if args.seeds is not None else args.seed
    cfg = DigitsComparisonConfig(
        classes=tuple(args.classes),
        n_test=args.n_test,
        k=args.k,
        near_fraction=args.near_fraction,
        gamma=args.gamma if args.gamma > 0 else None,
        cnn_epochs=args.cnn_epochs,
        seed=seed,
    )
    start = time.time()
    result, data = digits_comparison(cfg, device=args.device)
    print(
        f"digits {args.classes[0]} vs {args.classes[1]}: {len(data.y_train)} training images "
        f"({time.time() - start:.0f} s)"
    )
    print(result.format_table())
    # The paper's Fig. 1 shows one test image; show the first one both models classify correctly.
    both = np.logical_and(*(result.correct[name] for name in result.names))
    shown = int(np.argmax(both)) if both.any() else 0
    for name in result.names:
        top = result.top_helpful(name, shown)
        print(
            f"{name}: top-{cfg.k} helpful for test image {shown} "
            f"(label {data.classes[result.test_labels[shown]]}): "
            f"ids {top.tolist()}, labels {[data.classes[c] for c in result.train_labels[top]]}, "
            f"distances {np.round(result.distances[shown, top], 2).tolist()}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    m = len(result.test_labels)
    png = plot_comparison(
        result,
        args.out / "compare_models.png",
        shown,
        images=(data.x_train, data.x_test[:m]),
        class_names=data.classes,
    )
    (args.out / "summary.json").write_text(
        json.dumps({"shown_test_index": shown, **result.summary()}, indent=2)
    )
    print(f"saved {png} and {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
