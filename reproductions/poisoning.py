"""Training-set poisoning with I_pert (Koh & Liang 2017, Sec. 5.2) on two digit classes.

For each target test image (correctly predicted), poison the k training images with the largest
predicted gain: sign steps along I_pert, every pixel kept on the digits' 17-level grid and within
an L-inf bound of its original value, the victim retrained to the optimum after every step. Prints
the success rate for k = 1, 2, 5, 10 and the average pixel change, for a logistic regression on
pixels and for a linear head on frozen CNN features; saves the success-rate plot and examples.

    python -m reproductions.poisoning  # both models, 30 targets
    python -m reproductions.poisoning --models logistic --targets 50 --max-change 3

:func:`poison_digits` attacks a logistic regression on the pixels, or a linear head on frozen CNN
features (:func:`pretrained_features`, trained on the other eight digits), with
:class:`~influencer.uses.poisoning.PoisoningAttack`; :func:`success_rates` attacks many targets
with each budget of poisoned images and returns a :class:`PoisonSummary` (rates, pixel changes,
how well influence predicted each step). :func:`plot_success_rates` and
:func:`plot_poison_examples` draw the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from influencer._kernel.progress import progress_bar
from influencer._kernel.stats import pearson
from influencer.data import as_examples
from influencer.datasets import Split, load_digits
from influencer.errors import ConfigError
from influencer.estimators import CurvatureKind, Estimator, Exact
from influencer.influence import Influence
from influencer.models import SmallCNN
from influencer.plotting import pyplot, save_png
from influencer.tasks import ClassificationTask
from influencer.training import train_minibatch
from influencer.uses.poisoning import PoisonConfig, PoisoningAttack, PoisonResult


@dataclass(frozen=True)
class PoisonSummary:
    """Success rates over many targets, for each number of poisoned images."""

    budgets: tuple[int, ...]
    targets: np.ndarray  # (t,) test ids attacked (all correctly predicted before the attack)
    results: dict[int, list[PoisonResult]]  # budget -> one result per target
    config: PoisonConfig

    def success_rate(self, budget: int) -> float:
        return float(np.mean([r.success for r in self.results[budget]]))

    def summary(self) -> dict[str, Any]:
        rows = {}
        for b in self.budgets:
            rs = self.results[b]
            won = [r for r in rs if r.success]
            rows[b] = {
                "success_rate": self.success_rate(b),
                "mean_steps_successful": float(np.mean([r.steps for r in won])) if won else float("nan"),
                "mean_abs_change": float(np.mean([r.mean_abs_change for r in rs])),
                "changed_fraction": float(np.mean([r.changed_fraction for r in rs])),
                "max_linf": float(max(r.linf for r in rs)),
            }
        return {
            "targets": int(self.targets.size),
            "max_change": self.config.max_change,
            "by_budget": rows,
            **self.step_agreement(),
        }

    def step_agreement(self) -> dict[str, float]:
        """How well influence predicted each step's rise of the retrained target loss.

        ``first_step_pearson``: over all attacks, predicted vs actual rise of the first step (from
        the clean optimum). ``sign_agreement``: fraction of all steps whose actual rise has the
        predicted sign; later steps overshoot more, as whole grid levels are not infinitesimal.
        """
        first_pred, first_actual, agree = [], [], []
        for rs in self.results.values():
            for r in rs:
                rise = np.diff(r.losses)
                if rise.size:
                    first_pred.append(r.predicted_increase[0])
                    first_actual.append(rise[0])
                agree.extend((np.sign(rise) == np.sign(r.predicted_increase)).tolist())
        return {
            "first_step_pearson": pearson(first_pred, first_actual) if len(first_pred) >= 2 else float("nan"),
            "sign_agreement": float(np.mean(agree)) if agree else float("nan"),
        }

    def plot(self, path: str | Path, title: str = "Training-set poisoning") -> Path:
        """Success rate against the number of poisoned images, saved as PNG."""
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=120)
        rates = [self.success_rate(b) for b in self.budgets]
        ax.plot(self.budgets, rates, marker="o")
        ax.set_xscale("log")
        ax.set_xticks(self.budgets, [str(b) for b in self.budgets])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("poisoned training images")
        ax.set_ylabel("targets flipped")
        ax.set_title(
            f"{title}\n{self.targets.size} targets, L-inf bound {self.config.max_change:g}", fontsize=9
        )
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return save_png(fig, path)


def success_rates(
    attack: PoisoningAttack,
    test: Any,
    budgets: Sequence[int] = (1, 2, 5, 10),
    targets: Sequence[int] | Tensor | None = None,
    num_targets: int | None = None,
    seed: int = 0,
) -> PoisonSummary:
    """Attack every target with each budget of poisoned images.

    ``targets`` default: ``num_targets`` (default all) random test ids among those the clean model
    predicts correctly (a misprediction needs no attack).
    """
    if not budgets or any(int(b) < 1 for b in budgets):
        raise ConfigError(f"budgets must be positive numbers of images, got {budgets!r}")
    test_data = as_examples(test)
    if targets is None:
        pool = attack.correctly_predicted(test_data)
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
        chosen = pool[order[: num_targets or len(pool)]].sort().values
    else:
        chosen = test_data.check_indices(targets)
    results: dict[int, list[PoisonResult]] = {int(b): [] for b in budgets}
    jobs = [(int(b), int(t)) for b in budgets for t in chosen.tolist()]
    for b, t in progress_bar(jobs, "poisoning", attack.progress, unit="attack"):
        results[b].append(attack.attack(test_data, t, b))
    return PoisonSummary(tuple(int(b) for b in budgets), chosen.numpy(), results, attack.config)


def binary_digits(classes: tuple[int, int] = (3, 8), seed: int = 0) -> Split:
    """Two classes of scikit-learn's digits as ``(n, 1, 8, 8)`` float64 images, labels 0/1.

    Pixels are the data set's integers 0..16 divided by 16, so the value grid is 1/16.
    """
    if len(classes) != 2 or classes[0] == classes[1] or not all(0 <= c <= 9 for c in classes):
        raise ConfigError(f"classes must be two different digits, got {classes!r}")
    d = load_digits(images=True, seed=seed, dtype=torch.float64)

    def pick(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        mask = (y == classes[0]) | (y == classes[1])
        return x[mask], (y[mask] == classes[1]).long()

    x_train, y_train = pick(d.x_train, d.y_train)
    x_test, y_test = pick(d.x_test, d.y_test)
    return Split(
        f"digits {classes[0]} vs {classes[1]}",
        x_train,
        y_train,
        x_test,
        y_test,
        (str(classes[0]), str(classes[1])),
    )


def pretrained_features(
    classes: tuple[int, int],
    channels: int = 8,
    epochs: int = 20,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A :class:`SmallCNN`'s convolutional part trained on the *other* eight digits, then frozen.

    The transfer-learning set-up of the paper (ImageNet features for dogs vs fish): the features
    never saw the two classes attacked, and only a linear head on top is retrained by the victim.
    """
    d = load_digits(images=True, seed=seed, dtype=torch.float64)
    other = (d.y_train != classes[0]) & (d.y_train != classes[1])
    torch.manual_seed(seed)
    cnn = SmallCNN(10, channels).double()
    train_minibatch(
        cnn,
        ClassificationTask(weight_decay=1e-4),
        (d.x_train[other], d.y_train[other]),
        epochs=epochs,
        lr=3e-3,
        seed=seed,
        device=device,
    )
    return cnn.features.requires_grad_(False)


def poison_digits(
    model: Literal["logistic", "cnn_features"] = "logistic",
    *,
    classes: tuple[int, int] = (3, 8),
    budgets: Sequence[int] = (1, 2, 5, 10),
    num_targets: int = 20,
    weight_decay: float = 1e-3,
    config: PoisonConfig | None = None,
    estimator: Estimator | None = None,
    curvature: CurvatureKind = "hessian",
    channels: int = 8,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[PoisonSummary, Split]:
    """The poisoning experiment on two digit classes: success rate for each number of poisoned images.

    ``"logistic"``: logistic regression on the 64 pixels, retrained whole. ``"cnn_features"``: a
    linear head on frozen CNN features (:func:`pretrained_features`), retrained; ``I_pert`` goes
    back to the pixels through the frozen convolutions. Both are convex in what is retrained and
    are retrained to the optimum (float64) after every poisoning step; ``H^-1`` at each optimum
    comes from ``estimator`` (default :class:`~influencer.estimators.Exact`) on ``curvature``.
    """
    data = binary_digits(classes, seed)
    task = ClassificationTask(weight_decay=weight_decay)
    torch.manual_seed(seed)
    if model == "logistic":
        head: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double()
        features = None
    elif model == "cnn_features":
        features = pretrained_features(classes, channels, seed=seed, device=device)
        head = nn.Linear(channels * 16, 2).double()
    else:
        raise ConfigError(f"model must be 'logistic' or 'cnn_features', got {model!r}")
    estimator = estimator if estimator is not None else Exact()
    x, y = data.train
    inputs = None
    if features is not None:
        inputs = x
        with torch.no_grad():  # the features the head is trained on
            x = features(x.to(next(features.parameters()).device)).to(x.device)
    influence = Influence(
        head, task, (x, y), estimator=estimator, curvature=curvature, device=device, progress=progress
    )
    attack = PoisoningAttack(influence, features=features, inputs=inputs, config=config)
    summary = success_rates(attack, data.test, budgets=budgets, num_targets=num_targets, seed=seed)
    return summary, data


def plot_success_rates(
    rates: Mapping[str, Mapping[int, float]],
    path: str | Path,
    *,
    classes: Sequence[int] = (3, 8),
    targets: int,
    seeds: int,
    max_change: int,
) -> Path:
    """Success rate against the number of poisoned images, one line per model (``name -> {k: rate}``).

    ``max_change`` is the L-inf bound in grey levels (of 16), for the title.
    """
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4.8, 3.6), dpi=120)
    budgets = sorted({int(b) for r in rates.values() for b in r})
    for name, rate in rates.items():
        ax.plot(list(rate), list(rate.values()), marker="o", label=name.replace("_", " "))
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("poisoned training images")
    ax.set_ylabel("target predictions flipped")
    ax.set_title(
        f"digits {classes[0]} vs {classes[1]}, {targets} targets x {seeds} seeds, L-inf {max_change}/16",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def plot_poison_examples(summary: PoisonSummary, data: Split, path: str | Path, rows: int = 4) -> Path | None:
    """Target, clean training image, poisoned image and their difference, for successful attacks.

    Images are ``(1, H, W)`` in ``[0, 1]``; returns ``None`` (and draws nothing) without a success.
    """
    plt = pyplot()

    wins = [r for b in summary.budgets for r in summary.results[b] if r.success][:rows]
    if not wins:
        return None
    fig, axes = plt.subplots(len(wins), 4, figsize=(6.4, 1.7 * len(wins)), dpi=120, squeeze=False)
    for row, r in zip(axes, wins, strict=True):
        target = data.x_test[r.target, 0].numpy()
        first = int(r.poisoned_ids[0])
        images = [target, r.original[0, 0].numpy(), r.poisoned[0, 0].numpy()]
        titles = [
            f"target {r.target} ({data.classes[r.label]})",
            f"train {first} ({data.classes[int(data.y_train[first])]})",
            "poisoned",
        ]
        for ax, img, title in zip(row[:3], images, titles, strict=True):
            ax.imshow(img, cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
        diff = 16 * r.change[0, 0].numpy()
        row[3].imshow(
            diff, cmap="coolwarm", vmin=-summary.config.max_change * 16, vmax=summary.config.max_change * 16
        )
        row[3].set_title(f"change (levels), k={r.poisoned_ids.size}", fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return save_png(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=["logistic", "cnn_features"], choices=["logistic", "cnn_features"]
    )
    parser.add_argument("--classes", nargs=2, type=int, default=[3, 8])
    parser.add_argument("--targets", type=int, default=30, help="target test images per seed")
    parser.add_argument("--budgets", nargs="+", type=int, default=[1, 2, 5, 10])
    parser.add_argument("--max-change", type=int, default=2, help="L-inf bound in grey levels (of 16)")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--select", choices=["gain", "helpful"], default="gain")
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (small models run fastest on one)"
    )
    parser.add_argument("--out", type=Path, default=Path("out/poisoning_attack"))
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    torch.set_num_threads(args.threads)

    config = PoisonConfig(
        max_change=args.max_change / 16,
        step=1 / 16,
        grid=1 / 16,
        max_steps=args.max_steps,
        select=args.select,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": {**vars(args), "out": str(args.out)}, "runs": {}}
    runs: dict[str, list[PoisonSummary]] = {}
    examples = {}
    for name in args.models:
        for seed in args.seeds:
            start = time.time()
            summary, data = poison_digits(
                name,
                classes=tuple(args.classes),
                budgets=args.budgets,
                num_targets=args.targets,
                weight_decay=args.weight_decay,
                config=config,
                seed=seed,
                device=args.device,
            )
            runs.setdefault(name, []).append(summary)
            examples.setdefault(name, (summary, data))
            info = summary.summary()
            report["runs"][f"{name}/seed{seed}"] = info
            print(
                f"\n{name}, digits {args.classes[0]} vs {args.classes[1]}, seed {seed}: "
                f"{info['targets']} targets, L-inf bound {args.max_change}/16, {time.time() - start:.0f} s"
            )
            header = ("poisoned", "flipped", "steps", "mean |dx| (levels)", "pixels changed")
            print(f"{header[0]:>9} {header[1]:>8} {header[2]:>6} {header[3]:>19} {header[4]:>15}")
            for b, row in info["by_budget"].items():
                print(
                    f"{b:>9} {row['success_rate']:>8.0%} {row['mean_steps_successful']:>6.1f} "
                    f"{16 * row['mean_abs_change']:>19.2f} {row['changed_fraction']:>15.0%}"
                )
            print(
                f"first-step loss rise, predicted vs retrained: r = {info['first_step_pearson']:.3f}; "
                f"steps with the predicted sign: {info['sign_agreement']:.0%}"
            )

    overall = {
        name: {b: float(np.mean([s.success_rate(b) for s in summaries])) for b in args.budgets}
        for name, summaries in runs.items()
    }
    report["success_rate"] = overall
    print("\nsuccess rate over seeds:", json.dumps(overall))
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    plot_success_rates(
        overall, args.out / "success_rate.png", classes=args.classes, targets=args.targets,
        seeds=len(args.seeds), max_change=args.max_change,
    )  # fmt: skip
    for name, (summary, data) in examples.items():
        plot_poison_examples(summary, data, args.out / f"examples_{name}.png")
    print(f"saved {args.out}/results.json, success_rate.png, examples_*.png")


if __name__ == "__main__":
    main()
