"""Remove a class from a trained classifier by one influence update; compare with retraining.

For each class c: theta_new = theta + s/(n - |S|) H_R^-1 sum_{z in S} grad L(z), with H_R (Gauss-Newton,
damped) estimated by CG or LiSSA on a sampled subset of the retained training data and the step
factor s chosen on a validation split carved from the training part. Reports test accuracy on the
removed class (a_f), on the rest (a_r) and F1 = 2 (1 - a_f) a_r / (1 - a_f + a_r) for the original
model, the influence update and retraining from scratch without the class (same recipe).

    python -m reproductions.unlearning  # digits MLP, every class, CPU
    python -m reproductions.unlearning --classes 3 8 --sampler random --fraction 0.02

:func:`compare_with_retraining` removes a class both ways and reports the test metrics of the
original, influence-updated and retrained models and the cost of each; :func:`prepare_removal`
builds the experiment's trained classifier (digits or MNIST-1D MLP, with a validation split for
the step size) and :func:`plot_removal` draws the per-class comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from influencer.datasets import load_digits, load_mnist1d
from influencer.errors import ConfigError
from influencer.estimators import CG, CurvatureKind, Estimator, LiSSA
from influencer.influence import Influence
from influencer.models import MLP
from influencer.plotting import pyplot, save_png
from influencer.retraining import AdamRetrainer
from influencer.samplers import SAMPLERS, Sampler, make_sampler
from influencer.tasks import ClassificationTask, Task
from influencer.training import train_minibatch
from influencer.uses.unlearning import ClassRemoval, ForgetMetrics, forget_metrics


@dataclasses.dataclass(frozen=True)
class TrainingRecipe:
    """How the model was trained (Adam minibatches), reused to retrain without the class."""

    epochs: int = 40
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise ConfigError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")

    def train(
        self, model: nn.Module, task: Task, train: Any, device: torch.device | str | None = None
    ) -> list[float]:
        """Train ``model`` in place; returns the mean loss per epoch."""
        return train_minibatch(
            model, task, train, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
            seed=self.seed, device=device,
        )  # fmt: skip

    def retrainer(self) -> AdamRetrainer:
        """The same recipe as a :class:`~influencer.retraining.Retrainer` (for refits on subsets)."""
        return AdamRetrainer(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed)


def retrain_without_class(
    removal: ClassRemoval, make_model: Callable[[], nn.Module], recipe: TrainingRecipe
) -> nn.Module:
    """A fresh ``make_model()`` trained by ``recipe`` on the retained data of ``removal`` only.

    Trains the influence's chosen parameters from ``make_model()``'s initialisation (any others
    keep the trained model's values) and returns a copy of the model carrying them.
    """
    influence = removal.influence
    start = influence.parameters_of(make_model())
    theta = recipe.retrainer().refit(influence, removal.retain_ids, start)
    return influence.model_at(theta)


@dataclasses.dataclass(frozen=True)
class RemovalComparison:
    """Test metrics of the original, influence-updated and retrained models, and their costs."""

    forget_class: int
    original: ForgetMetrics
    influence: ForgetMetrics
    retrained: ForgetMetrics
    scale: float
    hessian_size: int
    iterations: int | None
    influence_seconds: float  # sampling + gradient + H fit + solve + scale search
    retrain_seconds: float

    def rows(self) -> list[tuple[str, float, float, float]]:
        """``(model, a_f, a_r, F1)`` rows for printing."""
        return [
            (name, m.forget_accuracy, m.retain_accuracy, m.f1)
            for name, m in (
                ("original", self.original),
                ("influence", self.influence),
                ("retrained", self.retrained),
            )
        ]


def compare_with_retraining(
    influence: Influence,
    forget_class: int,
    validation: Any,
    test: Any,
    make_model: Callable[[], nn.Module],
    recipe: TrainingRecipe,
    *,
    sampler: Sampler,
    hessian_size: int,
    seed: int = 0,
    scales: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0),
    labels: Sequence[int] | Tensor | None = None,
) -> RemovalComparison:
    """Remove ``forget_class`` by the influence update and by retraining; report test metrics of both.

    ``influence`` is over the trained model (its curvature kind and estimator give ``H_R``). The
    step size is chosen on ``validation`` (pass ``scales=(1.0,)`` for the plain formula); the test
    set is only used to report. Retraining starts from a fresh ``make_model()`` and follows
    ``recipe`` on the retained examples.
    """
    start = time.perf_counter()
    removal = ClassRemoval(influence, forget_class, labels=labels)
    removal.gradient_sum()
    update = removal.sampled_update(sampler, min(hessian_size, len(removal.retain_ids)), seed)
    search = removal.choose_scale(update, validation, scales)
    influence_seconds = time.perf_counter() - start
    start = time.perf_counter()
    retrained = retrain_without_class(removal, make_model, recipe)
    retrain_seconds = time.perf_counter() - start
    return RemovalComparison(
        forget_class=int(forget_class),
        original=removal.metrics(test),
        influence=removal.metrics(test, update, search.scale),
        retrained=forget_metrics(retrained, influence.fn.task, test, forget_class),
        scale=search.scale,
        hessian_size=len(update.hessian_ids),
        iterations=update.iterations,
        influence_seconds=influence_seconds,
        retrain_seconds=retrain_seconds,
    )


# ---- the experiment's set-up and figure ---------------------------------------------------------


@dataclasses.dataclass
class RemovalSetup:
    """A trained classifier with train / validation / test splits and how to build and train it again."""

    model: nn.Module
    task: ClassificationTask
    train: tuple[Tensor, Tensor]
    validation: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    recipe: TrainingRecipe
    make_model: Callable[[], nn.Module]
    num_classes: int
    train_seconds: float

    def influence(
        self,
        estimator: Estimator,
        curvature: CurvatureKind = "gauss_newton",
        device: torch.device | str | None = None,
    ) -> Influence:
        """An :class:`Influence` of the trained model on its training split."""
        return Influence(
            self.model, self.task, self.train, estimator=estimator, curvature=curvature, device=device
        )


def prepare_removal(
    dataset: str,
    validation: int,
    seed: int,
    device: torch.device | str | None = None,
    weight_decay: float = 1e-3,
) -> RemovalSetup:
    """Load ``dataset`` (``digits`` or ``mnist1d``), hold out ``validation`` training examples, and
    train an MLP on the rest with the data set's recipe."""
    if dataset == "digits":
        split = load_digits(seed=seed)
        hidden, recipe = (64,), TrainingRecipe(epochs=40, lr=3e-3, batch_size=64, seed=seed)
    elif dataset == "mnist1d":
        split = load_mnist1d(num_samples=5000, seed=seed)
        hidden, recipe = (128, 128), TrainingRecipe(epochs=40, lr=2e-3, batch_size=64, seed=seed)
    else:
        raise ConfigError(f"dataset must be 'digits' or 'mnist1d', got {dataset!r}")
    perm = torch.randperm(len(split.y_train), generator=torch.Generator().manual_seed(seed))
    val, tr = perm[:validation], perm[validation:]
    features = split.x_train.shape[1]

    def make_model() -> nn.Module:
        return MLP(features, hidden, split.num_classes)

    task = ClassificationTask(weight_decay=weight_decay)
    torch.manual_seed(seed)
    model = make_model()
    start = time.perf_counter()
    recipe.train(model, task, (split.x_train[tr], split.y_train[tr]), device)
    return RemovalSetup(
        model, task, (split.x_train[tr], split.y_train[tr]), (split.x_train[val], split.y_train[val]),
        split.test, recipe, make_model, split.num_classes, time.perf_counter() - start,
    )  # fmt: skip


def make_estimator(name: str, damping: float, seed: int = 0) -> Estimator:
    """The experiments' estimators for ``H_R``: ``"cg"`` or ``"lissa"`` with ``damping``."""
    if name == "cg":
        return CG(damping=damping, tol=1e-4, max_iter=500)
    if name == "lissa":
        return LiSSA(damping=damping, depth=300, batch_size=64, seed=seed)
    raise ConfigError(f"estimator must be 'cg' or 'lissa', got {name!r}")


def plot_removal(results: Sequence[RemovalComparison], path: str | Path) -> Path:
    """Bars of a_f, a_r and F1 per removed class for the original, influence and retrained models."""
    plt = pyplot()

    classes = [r.forget_class for r in results]
    x = np.arange(len(classes))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=120)
    for ax, (label, get) in zip(
        axes,
        [("accuracy on removed class a_f", lambda m: m.forget_accuracy),
         ("accuracy on other classes a_r", lambda m: m.retain_accuracy),
         ("F1", lambda m: m.f1)],
        strict=True,
    ):  # fmt: skip
        for i, name in enumerate(["original", "influence", "retrained"]):
            ax.bar(x + (i - 1) * 0.27, [get(getattr(r, name)) for r in results], 0.27, label=name)
        ax.set_xticks(x, [str(c) for c in classes])
        ax.set_xlabel("removed class")
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist1d"])
    parser.add_argument(
        "--classes", type=int, nargs="*", default=None, help="classes to remove (default all)"
    )
    parser.add_argument("--sampler", default="logit", choices=sorted(SAMPLERS))
    parser.add_argument(
        "--fraction", type=float, default=0.05, help="Hessian subset, fraction of retained data"
    )
    parser.add_argument("--estimator", default="cg", choices=["cg", "lissa"])
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument(
        "--validation", type=int, default=200, help="training examples held out for the step size"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("out/class_removal"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    setup = prepare_removal(args.dataset, args.validation, args.seed, args.device)
    classes = args.classes if args.classes is not None else list(range(setup.num_classes))
    n_train = len(setup.train[1])
    sizes = f"{n_train} train, {len(setup.validation[1])} validation, {len(setup.test[1])} test"
    print(f"{args.dataset}: {sizes}; trained in {setup.train_seconds:.1f}s")
    print(f"sampler={args.sampler}, fraction={args.fraction}, {args.estimator}(damping={args.damping})")
    sampler = make_sampler(args.sampler)
    results: list[RemovalComparison] = []
    header = (
        f"{'class':>5} {'model':<10} {'a_f':>6} {'a_r':>6} {'F1':>6} {'|H|':>5} {'scale':>5} "
        f"{'iters':>5} {'seconds':>8}"
    )
    print(header)
    print("-" * len(header))
    for c in classes:
        retained = int((setup.train[1] != c).sum())
        size = max(1, round(args.fraction * retained))
        estimator = make_estimator(args.estimator, args.damping, args.seed)
        influence = setup.influence(estimator, device=args.device)
        r = compare_with_retraining(
            influence, c, setup.validation, setup.test, setup.make_model, setup.recipe,
            sampler=sampler, hessian_size=size, seed=args.seed, scales=args.scales,
        )  # fmt: skip
        results.append(r)
        for name, a_f, a_r, f1 in r.rows():
            extra = ""
            if name == "influence":
                iters = r.iterations or 0
                extra = f"{r.hessian_size:>5} {r.scale:>5.2g} {iters:>5} {r.influence_seconds:>8.2f}"
            elif name == "retrained":
                extra = f"{'':>5} {'':>5} {'':>5} {r.retrain_seconds:>8.2f}"
            print(f"{c:>5} {name:<10} {a_f:>6.3f} {a_r:>6.3f} {f1:>6.3f} {extra}")
    print("-" * len(header))
    for name in ("original", "influence", "retrained"):
        m = [getattr(r, name) for r in results]
        a_f, a_r = np.mean([x.forget_accuracy for x in m]), np.mean([x.retain_accuracy for x in m])
        print(f"{'mean':>5} {name:<10} {a_f:>6.3f} {a_r:>6.3f} {np.mean([x.f1 for x in m]):>6.3f}")
    infl = np.mean([r.influence_seconds for r in results])
    retr = np.mean([r.retrain_seconds for r in results])
    print(f"mean seconds: influence {infl:.2f} (gradients, sampling, H fit, solve, step search)")
    print(f"              retraining {retr:.2f} ({retr / infl:.1f}x the influence update)")
    plot_removal(results, args.out / "class_removal.png")
    print(f"plot: {args.out / 'class_removal.png'}")


if __name__ == "__main__":
    main()
