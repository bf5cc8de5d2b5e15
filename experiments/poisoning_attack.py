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

from influencer.paper.poisoning import PoisonSummary, plot_poison_examples, plot_success_rates, poison_digits
from influencer.uses.poisoning import PoisonConfig


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
