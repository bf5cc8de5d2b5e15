"""Remove a class from a trained classifier by one influence update; compare with retraining.

For each class c: theta_new = theta + s/(n - |S|) H_R^-1 sum_{z in S} grad L(z), with H_R (Gauss-Newton,
damped) estimated by CG or LiSSA on a sampled subset of the retained training data and the step
factor s chosen on a validation split carved from the training part. Reports test accuracy on the
removed class (a_f), on the rest (a_r) and F1 = 2 (1 - a_f) a_r / (1 - a_f + a_r) for the original
model, the influence update and retraining from scratch without the class (same recipe).

    python experiments/class_removal.py                      # digits MLP, every class, CPU
    python experiments/class_removal.py --classes 3 8 --sampler random --fraction 0.02
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influencer import CG, ClassificationTask, LiSSA
from influencer.estimators import Estimator
from influencer.models import MLP
from influencer.paper.datasets import load_digits, load_mnist1d
from influencer.paper.plotting import pyplot, save_png
from influencer.samplers import SAMPLERS, make_sampler
from influencer.uses.unlearning import RemovalComparison, TrainingRecipe, compare_with_retraining


@dataclass
class Setup:
    """A trained classifier with train / validation / test splits and how to build and train it again."""

    model: torch.nn.Module
    task: ClassificationTask
    train: tuple[torch.Tensor, torch.Tensor]
    validation: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    recipe: TrainingRecipe
    make_model: Any
    num_classes: int
    train_seconds: float


def prepare(dataset: str, validation: int, seed: int, device: str, weight_decay: float = 1e-3) -> Setup:
    """Load ``dataset``, hold out ``validation`` training examples, and train an MLP on the rest."""
    if dataset == "digits":
        split = load_digits(seed=seed)
        hidden, recipe = (64,), TrainingRecipe(epochs=40, lr=3e-3, batch_size=64, seed=seed)
    elif dataset == "mnist1d":
        split = load_mnist1d(num_samples=5000, seed=seed)
        hidden, recipe = (128, 128), TrainingRecipe(epochs=40, lr=2e-3, batch_size=64, seed=seed)
    else:
        raise SystemExit(f"unknown dataset {dataset!r}")
    perm = torch.randperm(len(split.y_train), generator=torch.Generator().manual_seed(seed))
    val, tr = perm[:validation], perm[validation:]
    features = split.x_train.shape[1]

    def make_model() -> torch.nn.Module:
        return MLP(features, hidden, split.num_classes)

    task = ClassificationTask(weight_decay=weight_decay)
    torch.manual_seed(seed)
    model = make_model()
    start = time.perf_counter()
    recipe.train(model, task, (split.x_train[tr], split.y_train[tr]), device)
    return Setup(
        model, task, (split.x_train[tr], split.y_train[tr]), (split.x_train[val], split.y_train[val]),
        split.test, recipe, make_model, split.num_classes, time.perf_counter() - start,
    )  # fmt: skip


def make_estimator(name: str, damping: float, seed: int = 0) -> Estimator:
    if name == "cg":
        return CG(damping=damping, tol=1e-4, max_iter=500)
    if name == "lissa":
        return LiSSA(damping=damping, depth=300, batch_size=64, seed=seed)
    raise SystemExit(f"unknown estimator {name!r}")


def plot(results: list[RemovalComparison], path: Path) -> None:
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
    save_png(fig, path)


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

    setup = prepare(args.dataset, args.validation, args.seed, args.device)
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
        r = compare_with_retraining(
            setup.model, setup.task, setup.train, setup.validation, setup.test, c, setup.make_model,
            setup.recipe, sampler=sampler, hessian_size=size, seed=args.seed,
            estimator=make_estimator(args.estimator, args.damping, args.seed), scales=args.scales,
            device=args.device,
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
    plot(results, args.out / "class_removal.png")
    print(f"plot: {args.out / 'class_removal.png'}")


if __name__ == "__main__":
    main()
