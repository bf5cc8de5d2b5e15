"""Fixing mislabelled training data (Koh & Liang 2017, Sec. 5.4, Fig. 6).

10% of the training labels are flipped (each to a different random class). The training examples
are ranked by self-influence, by training loss and at random; checking the top 5%..30% of each
ranking fixes the flipped labels found there, and the model is retrained. Prints and plots the
fraction of flips found and the test accuracy after fixing, mean and std over seeds.

Models (both convex, trained to the optimum with L-BFGS in float64, self-influence exact):

* ``kernel`` (default): logistic regression on RBF features to 100 landmarks, on 300 digits;
  flexible enough to partly fit the wrong labels, the regime where training loss hides them;
* ``logistic``: plain multinomial logistic regression on the pixels (the paper's model class).

    python experiments/fix_mislabels.py                        # kernel model, 5 seeds
    python experiments/fix_mislabels.py --model logistic --n-train 0 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from influencer import ClassificationTask
from influencer.paper.datasets import load_dataset
from influencer.paper.mislabels import MislabelConfig, mislabel_models, simulate_fixing, subsample


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
