"""Training-set poisoning with I_pert (Koh & Liang 2017, Sec. 5.2) on two digit classes.

For each target test image (correctly predicted), poison the k training images with the largest
predicted gain: sign steps along I_pert, every pixel kept on the digits' 17-level grid and within
an L-inf bound of its original value, the victim retrained to the optimum after every step. Prints
the success rate for k = 1, 2, 5, 10 and the average pixel change, for a logistic regression on
pixels and for a linear head on frozen CNN features; saves the success-rate plot and examples.

    python experiments/poisoning_attack.py                      # both models, 30 targets
    python experiments/poisoning_attack.py --models logistic --targets 50 --max-change 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from influencer.paper.datasets import Split
from influencer.paper.plotting import pyplot, save_png
from influencer.uses.poisoning import PoisonConfig, PoisonSummary, poison_digits


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
    plot_rates(overall, args, args.out / "success_rate.png")
    for name, (summary, data) in examples.items():
        plot_examples(summary, data, args.out / f"examples_{name}.png")
    print(f"saved {args.out}/results.json, success_rate.png, examples_*.png")


def plot_rates(overall: dict, args: argparse.Namespace, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4.8, 3.6), dpi=120)
    for name, rates in overall.items():
        ax.plot(list(rates), list(rates.values()), marker="o", label=name.replace("_", " "))
    ax.set_xscale("log")
    ax.set_xticks(args.budgets, [str(b) for b in args.budgets])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("poisoned training images")
    ax.set_ylabel("target predictions flipped")
    ax.set_title(
        f"digits {args.classes[0]} vs {args.classes[1]}, {args.targets} targets x "
        f"{len(args.seeds)} seeds, L-inf {args.max_change}/16",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def plot_examples(summary: PoisonSummary, data: Split, path: Path, rows: int = 4) -> None:
    """Target, clean training image, poisoned image and their difference, for successful attacks."""
    plt = pyplot()

    wins = [r for b in summary.budgets for r in summary.results[b] if r.success][:rows]
    if not wins:
        return
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
    save_png(fig, path)


if __name__ == "__main__":
    main()
