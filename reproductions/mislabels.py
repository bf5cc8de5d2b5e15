"""Fixing mislabelled training data (Koh & Liang 2017, Sec. 5.4, Fig. 6).

10% of the training labels are flipped (each to a different random class). The training examples
are ranked by self-influence, by training loss and at random; checking the top 5%..30% of each
ranking fixes the flipped labels found there, and the model is retrained. Prints and plots the
fraction of flips found and the test accuracy after fixing, mean and std over seeds.

Models (both convex, trained to the optimum with L-BFGS in float64, self-influence exact):

* ``kernel`` (default): logistic regression on RBF features to 100 landmarks, on 300 digits;
  flexible enough to partly fit the wrong labels, the regime where training loss hides them;
* ``logistic``: plain multinomial logistic regression on the pixels (the paper's model class).

    python -m reproductions.mislabels  # kernel model, 5 seeds
    python -m reproductions.mislabels --model logistic --n-train 0 --seeds 5

:func:`simulate_fixing` runs it for the models of :func:`mislabel_models` (or any others).
Only the ranking (:func:`~influencer.uses.mislabels.rank_for_review`) needs influence; the
simulation is a benchmark of it. Every model is trained through one :class:`~influencer.retraining.Retrainer`
on the influence's data with the labels of the moment (``influence.replace(train=...)``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from influencer import ClassificationTask
from influencer._kernel.progress import progress_bar
from influencer.datasets import Split, load_dataset
from influencer.errors import ConfigError, DataError
from influencer.estimators import Estimator, Exact
from influencer.influence import Influence
from influencer.models import LogisticRegression
from influencer.models.kernels import RBFKernelModel
from influencer.plotting import pyplot, save_png
from influencer.retraining import LBFGSRetrainer, Retrainer
from influencer.tasks import Task, predictions
from influencer.uses.mislabels import STRATEGIES, Strategy, rank_for_review


def flip_labels(labels: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Flip ``round(fraction * n)`` labels chosen at random, each to a different random class.

    The classes are the distinct values in ``labels`` (so ``{0, 1}``, ``{-1, +1}`` and ``0..C-1``
    all work); with two classes a flip swaps them. Returns the noisy labels ``(n,)`` and the sorted
    flipped ids ``(k,)``.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"the flip fraction must be in (0, 1), got {fraction}")
    labels = torch.as_tensor(labels).reshape(-1)
    values = torch.unique(labels)  # sorted
    if len(values) < 2:
        raise DataError("labels have a single class, so none can be flipped to another one")
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    k = max(1, round(fraction * n))
    ids = torch.randperm(n, generator=gen)[:k].sort().values
    index = torch.searchsorted(values, labels[ids].cpu().contiguous())
    # Adding 1..C-1 modulo C lands uniformly on one of the other classes.
    shift = torch.randint(1, len(values), (k,), generator=gen)
    noisy = labels.clone()
    noisy[ids.to(labels.device)] = values[(index + shift) % len(values)].to(labels.device)
    return noisy, ids


def subsample(split: Split, n_train: int | None, seed: int = 0) -> Split:
    """``split`` with a random ``n_train`` of its training examples (all when ``None``); same test set."""
    if n_train is None:
        return split
    n = len(split.y_train)
    if not 1 <= n_train <= n:
        raise ConfigError(f"n_train must be in [1, {n}], got {n_train}")
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_train].sort().values
    return Split(
        f"{split.name}[{n_train}]",
        split.x_train[keep],
        split.y_train[keep],
        split.x_test,
        split.y_test,
        split.classes,
        split.feature_names,
    )


def accuracy(
    model: nn.Module, task: Task, data: tuple[Tensor, Tensor], device: torch.device | str | None = None
) -> float:
    """Fraction of examples whose predicted class (argmax, or sign for one score) equals the label.

    Computed on ``device`` (default the model's).
    """
    device = device if device is not None else next(model.parameters()).device
    x, y = data
    dtype = next(model.parameters()).dtype
    pred = predictions(task, model, (x.to(device, dtype), y.to(device)))
    return float((pred.cpu() == y.cpu()).double().mean())


def mislabel_models(
    kind: Literal["kernel", "logistic"],
    x: Tensor,
    num_classes: int,
    *,
    landmarks: int = 100,
    gamma: float | None = 0.5,
) -> Callable[[int], nn.Module]:
    """``make_model(seed)`` for :func:`simulate_fixing`: the experiment's convex models, in float64.

    ``"kernel"``: logistic regression on RBF features to ``landmarks`` training inputs of ``x``
    (``gamma=None``: the median heuristic), flexible enough to partly fit wrong labels;
    ``"logistic"``: plain multinomial logistic regression on the inputs (the paper's model class).
    """
    if kind not in ("kernel", "logistic"):
        raise ConfigError(f"kind must be 'kernel' or 'logistic', got {kind!r}")

    def make_model(seed: int) -> nn.Module:
        if kind == "logistic":
            return LogisticRegression(x.shape[1], num_classes).double()
        return RBFKernelModel.from_data(x, num_classes, landmarks=landmarks, gamma=gamma, seed=seed).double()

    return make_model


# ---- the simulation --------------------------------------------------------------------------


@dataclass(frozen=True)
class MislabelConfig:
    """Settings of :func:`simulate_fixing`.

    Args:
        flip_fraction: fraction of training labels flipped (the paper: 10%).
        check_fractions: fractions of the training set checked, in the order of each ranking.
        strategies: rankings to compare.
        seeds: one run per seed (which labels flip, the model's initialisation, the random order).
        estimator: inverse-Hessian method for self-influence (``Exact`` for small models).
        curvature: ``"hessian"`` or ``"gauss_newton"`` (networks).
    """

    flip_fraction: float = 0.1
    check_fractions: tuple[float, ...] = (0.05, 0.10, 0.15, 0.20, 0.25, 0.30)
    strategies: tuple[Strategy, ...] = STRATEGIES
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    estimator: Estimator = field(default_factory=Exact)
    curvature: Literal["hessian", "gauss_newton"] = "hessian"

    def __post_init__(self) -> None:
        if not 0.0 < self.flip_fraction < 1.0:
            raise ConfigError(f"flip_fraction must be in (0, 1), got {self.flip_fraction}")
        if not self.check_fractions or any(not 0.0 < f <= 1.0 for f in self.check_fractions):
            raise ConfigError(
                f"check_fractions must be non-empty, each in (0, 1]; got {self.check_fractions}"
            )
        if list(self.check_fractions) != sorted(set(self.check_fractions)):
            raise ConfigError(f"check_fractions must be increasing and distinct, got {self.check_fractions}")
        if not self.strategies or any(s not in STRATEGIES for s in self.strategies):
            raise ConfigError(f"strategies must be a non-empty subset of {STRATEGIES}, got {self.strategies}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be non-empty and distinct, got {self.seeds}")
        if self.curvature not in ("hessian", "gauss_newton"):
            raise ConfigError(f"curvature must be 'hessian' or 'gauss_newton', got {self.curvature!r}")
        if not isinstance(self.estimator, Estimator):
            raise ConfigError(
                f"estimator must be an influencer Estimator, got {type(self.estimator).__name__}"
            )


@dataclass(frozen=True)
class MislabelResult:
    """Outcome of :func:`simulate_fixing`; arrays are ``(strategies, seeds, fractions)``."""

    check_fractions: np.ndarray  # (F,)
    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    found: np.ndarray  # (S, R, F) fraction of the flipped labels found among the checked examples
    accuracy: np.ndarray  # (S, R, F) test accuracy after fixing those and retraining
    noisy_accuracy: np.ndarray  # (R,) test accuracy trained on the noisy labels
    clean_accuracy: np.ndarray  # (R,) test accuracy trained on the true labels
    flip_fraction: float

    def _row(self, strategy: str) -> int:
        if strategy not in self.strategies:
            raise ConfigError(f"no results for {strategy!r}; have {self.strategies}")
        return self.strategies.index(strategy)

    def mean_found(self, strategy: str) -> np.ndarray:
        """Fraction of flips found ``(F,)``, averaged over seeds."""
        return self.found[self._row(strategy)].mean(0)

    def mean_accuracy(self, strategy: str) -> np.ndarray:
        """Test accuracy after fixing ``(F,)``, averaged over seeds."""
        return self.accuracy[self._row(strategy)].mean(0)

    def summary(self) -> dict[str, Any]:
        """JSON-able means and standard deviations over seeds."""
        return {
            "flip_fraction": self.flip_fraction,
            "check_fractions": self.check_fractions.tolist(),
            "seeds": list(self.seeds),
            "noisy_accuracy": float(self.noisy_accuracy.mean()),
            "clean_accuracy": float(self.clean_accuracy.mean()),
            "strategies": {
                s: {
                    "found_mean": self.found[i].mean(0).tolist(),
                    "found_std": self.found[i].std(0).tolist(),
                    "accuracy_mean": self.accuracy[i].mean(0).tolist(),
                    "accuracy_std": self.accuracy[i].std(0).tolist(),
                    "accuracy_change_std": (self.accuracy[i] - self.noisy_accuracy[:, None]).std(0).tolist(),
                }
                for i, s in enumerate(self.strategies)
            },
        }

    def format_table(self) -> str:
        """Plain-text table: flips found and test accuracy (means and stds over seeds) per fraction."""
        head = f"{'checked':>8}  " + "  ".join(f"{s:>22}" for s in self.strategies)
        lines = [f"fraction of flipped labels found (mean +- std over {len(self.seeds)} seeds)", head]
        for what, arr in (("found", self.found), ("accuracy", self.accuracy)):
            spread = arr
            if what == "accuracy":
                spread = arr - self.noisy_accuracy[None, :, None]  # paired by seed
                lines += [
                    "",
                    f"test accuracy after fixing (mean +- std of the per-seed change; no fixing: "
                    f"{self.noisy_accuracy.mean():.4f}, clean labels: {self.clean_accuracy.mean():.4f})",
                    head,
                ]
            for j, f in enumerate(self.check_fractions):
                cells = "  ".join(
                    f"{arr[i, :, j].mean():>13.4f} +- {spread[i, :, j].std():.4f}"
                    for i in range(len(self.strategies))
                )
                lines.append(f"{f:>8.0%}  {cells}")
        return "\n".join(lines)

    def plot(self, path: str | Path, title: str = "Fixing mislabelled examples") -> Path:
        """Two panels vs fraction checked: flips found, and test accuracy after fixing (PNG)."""
        plt = pyplot()

        x = 100 * self.check_fractions
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120)
        labels = {"self_influence": "self-influence", "loss": "training loss", "random": "random"}
        for i, s in enumerate(self.strategies):
            for ax, arr in zip(axes, (self.found, self.accuracy), strict=True):
                # Accuracy varies between seeds more than fixing changes it, so its error bars are
                # the spread of the per-seed change from the unfixed model's accuracy (paired).
                paired = arr[i] - self.noisy_accuracy[:, None] if arr is self.accuracy else arr[i]
                ax.errorbar(
                    x, arr[i].mean(0), yerr=paired.std(0), marker="o", ms=4, capsize=3, label=labels.get(s, s)
                )
        perfect = np.minimum(1.0, self.check_fractions / self.flip_fraction)
        axes[0].plot(x, perfect, color="gray", ls="--", lw=1, label="perfect ranking")
        axes[0].set_ylabel("fraction of flipped labels found")
        axes[1].axhline(self.clean_accuracy.mean(), color="gray", ls="--", lw=1, label="clean labels")
        axes[1].axhline(self.noisy_accuracy.mean(), color="gray", ls=":", lw=1, label="no fixing")
        axes[1].set_ylabel("test accuracy after fixing (bars: std of change)")
        for ax in axes:
            ax.set_xlabel("training data checked (%)")
            ax.legend(fontsize=8)
        fig.suptitle(f"{title} ({self.flip_fraction:.0%} flipped, {len(self.seeds)} seeds)", fontsize=10)
        fig.tight_layout()
        return save_png(fig, path)


def simulate_fixing(
    make_model: Callable[[int], nn.Module],
    task: Task,
    split: Split,
    config: MislabelConfig | None = None,
    *,
    trainer: Retrainer | None = None,
    retrainer: Retrainer | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> MislabelResult:
    """Koh & Liang's mislabel experiment on ``split``, averaged over ``config.seeds``.

    Per seed: flip ``flip_fraction`` of the training labels; train ``make_model(seed)`` on them
    (and, from the same initialisation, a reference on the true labels); rank the training
    examples by each strategy; for each checked fraction, fix the flipped labels among the top of
    the ranking, retrain (warm start from the noisy model) and measure test accuracy. Rankings are
    nested, so checking more never finds fewer flips. Training, influence and retraining compute
    in ``dtype`` on ``device``.

    ``trainer`` trains the model influence is computed on; it defaults to L-BFGS to a gradient of
    1e-7 (convex models; parameters within ~1e-7 / lambda_min(H) of the optimum, far closer than
    the rankings can tell apart). ``retrainer`` trains the models whose test accuracy is measured
    (the reference on clean labels and each fixed one); it defaults to L-BFGS to a gradient of
    1e-6, which leaves predictions unchanged at a fraction of the cost. For networks pass
    :class:`~influencer.retraining.AdamRetrainer` (and a damped or Gauss-Newton ``config``).
    """
    config = config or MislabelConfig()
    trainer = trainer or LBFGSRetrainer(grad_tol=1e-7, newton_steps=0)
    retrainer = retrainer or LBFGSRetrainer(grad_tol=1e-6, newton_steps=0)
    x, y_true = split.train
    test = split.test
    n = len(y_true)
    fractions = np.asarray(config.check_fractions, dtype=np.float64)
    S, R, F = len(config.strategies), len(config.seeds), len(fractions)
    found = np.zeros((S, R, F))
    acc = np.zeros((S, R, F))
    noisy_acc = np.zeros(R)
    clean_acc = np.zeros(R)
    for r, seed in enumerate(progress_bar(config.seeds, "seeds", progress)):
        noisy, flipped = flip_labels(y_true, config.flip_fraction, seed)
        is_flipped = torch.zeros(n, dtype=torch.bool)
        is_flipped[flipped] = True
        torch.manual_seed(seed)
        initial = Influence(
            make_model(seed), task, (x, noisy), estimator=config.estimator, curvature=config.curvature,
            device=device, dtype=dtype,
        )  # fmt: skip

        def test_accuracy(data: Influence, theta: Tensor) -> float:
            return accuracy(data.model_at(theta), task, test)

        theta_noisy = trainer.refit(initial)
        clean = initial.replace(train=(x, y_true))
        noisy_acc[r] = test_accuracy(initial, theta_noisy)
        clean_acc[r] = test_accuracy(clean, retrainer.refit(clean))
        influence = initial.replace(theta=theta_noisy).fit()
        cache: dict[tuple[int, ...], float] = {(): noisy_acc[r]}
        for s, strategy in enumerate(config.strategies):
            order = rank_for_review(influence, strategy, seed)
            for j, frac in enumerate(fractions):
                checked = order[: math.ceil(frac * n)]
                fixed = checked[is_flipped[checked]].sort().values
                found[s, r, j] = len(fixed) / len(flipped)
                key = tuple(fixed.tolist())
                if key not in cache:  # the same fixes give the same retrained model
                    labels = noisy.clone()
                    labels[fixed] = y_true[fixed]
                    relabelled = initial.replace(train=(x, labels))
                    cache[key] = test_accuracy(relabelled, retrainer.refit(relabelled, start=theta_noisy))
                acc[s, r, j] = cache[key]
    return MislabelResult(
        fractions,
        tuple(config.strategies),
        tuple(config.seeds),
        found,
        acc,
        noisy_acc,
        clean_acc,
        config.flip_fraction,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="digits", help="digits, mnist1d, breast_cancer, wine or iris")
    ap.add_argument("--model", choices=("kernel", "logistic"), default="kernel")
    ap.add_argument("--n-train", type=int, default=300, help="training examples used (0: all)")
    ap.add_argument("--landmarks", type=int, default=100, help="RBF landmarks (kernel model)")
    ap.add_argument(
        "--gamma", type=float, default=0.5, help="RBF width (kernel model; <= 0: median heuristic)"
    )
    ap.add_argument("--weight-decay", type=float, default=1e-3)
    ap.add_argument("--flip", type=float, default=0.1, help="fraction of labels flipped")
    ap.add_argument("--fractions", type=float, nargs="+", default=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3))
    ap.add_argument("--seeds", type=int, default=5, help="number of seeds (runs) to average")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    ap.add_argument("--out", type=Path, default=Path("out/fix_mislabels"))
    args = ap.parse_args()

    split = load_dataset(args.data, dtype=torch.float64)
    split = subsample(split, args.n_train or None)
    gamma = args.gamma if args.gamma > 0 else None
    make_model = mislabel_models(
        args.model, split.x_train, split.num_classes, landmarks=args.landmarks, gamma=gamma
    )

    config = MislabelConfig(
        flip_fraction=args.flip, check_fractions=tuple(args.fractions), seeds=tuple(range(args.seeds))
    )
    task = ClassificationTask(weight_decay=args.weight_decay)
    start = time.time()
    result = simulate_fixing(make_model, task, split, config, device=args.device)
    print(
        f"{split.name}, {args.model} model, n = {len(split.y_train)}, {args.flip:.0%} flipped "
        f"({time.time() - start:.0f} s)"
    )
    print(result.format_table())
    args.out.mkdir(parents=True, exist_ok=True)
    png = result.plot(args.out / f"fix_mislabels_{args.model}.png", title=f"{split.name}, {args.model} model")
    (args.out / f"summary_{args.model}.json").write_text(json.dumps(result.summary(), indent=2))
    print(f"saved {png}")


if __name__ == "__main__":
    main()
