"""Comparing models by their influential training data (Koh & Liang 2017, Sec. 5.1, Fig. 1).

An RBF-kernel SVM and a CNN (top layer refitted on frozen features) on two digit classes: for each
test image, the influence of every training image vs its Euclidean distance in pixel space, and
each model's most helpful training images.

    python experiments/compare_models.py                 # digits 1 vs 7, 30 test images
    python experiments/compare_models.py --classes 3 8 --n-test 50 --out out/compare_models
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from influencer.paper.comparison import DigitsComparisonConfig, digits_comparison, plot_comparison


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
