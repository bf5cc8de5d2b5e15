"""I_pert,loss on digits: checked against retraining, and which pixels carry a training image's influence.

A multinomial logistic regression on scikit-learn's 8x8 digits (pixels 0..16, scaled to [0, 1]) is
trained to the optimum. For one test image, I_pert is computed for every training image at once.

1. Validation: the training images with the largest ``||I_pert||_1`` are each moved by one grey
   level per pixel (legal images: on the 1/16 grid, inside [0, 1]), along sign(I_pert) and along
   random signs; the model is retrained to the optimum every time, and the actual change of the
   test loss is compared with the first-order prediction ``I_pert / n . delta``.
2. Attribution: for the most helpful training images, the per-pixel effect ``d test-loss / d x``
   and ``gradient x input`` of their scores.

    python experiments/perturbation_attribution.py --k 30 --test-index 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from influencer.paper.perturbation import digits_perturbation, plot_pixel_attribution


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--k", type=int, default=30, help="training images perturbed and retrained per check")
    parser.add_argument("--test-index", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="random-direction seeds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (small models run fastest on one)"
    )
    parser.add_argument("--out", type=Path, default=Path("out/perturbation_attribution"))
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    result = digits_perturbation(
        k=args.k,
        test_index=args.test_index,
        weight_decay=args.weight_decay,
        seeds=args.seeds,
        device=args.device,
    )
    data, t = result.data, result.test_index
    print(
        f"test image {t}: label {int(data.y_test[t])}, predicted {result.predicted_class}; "
        f"n = {result.influence.n} training images"
    )
    for name, check in result.checks.items():
        print(
            f"one grey level per pixel along {name:>13}: predicted vs retrained change of the test loss "
            f"over {args.k} images: Pearson {check.pearson:.4f}, Spearman {check.spearman:.4f}; "
            f"mean |actual| {abs(check.actual).mean():.2e}"
        )
        check.plot(args.out / f"check_{name}.png", title=f"I_pert vs retraining ({name} steps of 1/16)")

    ids, values = result.attribution.top(5)
    for c, i in enumerate(result.helpful_ids.tolist()):
        pixels = ", ".join(
            f"({p // 8},{p % 8}) {v:+.1e}"
            for p, v in zip(ids[0, c].tolist(), values[0, c].tolist(), strict=True)
        )
        print(
            f"helpful training image {i} (label {int(data.y_train[i])}, "
            f"score {float(result.helpful_scores[c]):+.2e}): "
            f"pixels (row,col) carrying most of its score: {pixels}"
        )
    plot_pixel_attribution(result, args.out / "attribution.png")
    (args.out / "results.json").write_text(
        json.dumps({"config": {**vars(args), "out": str(args.out)}, "checks": result.summary()}, indent=2)
    )
    print(f"saved {args.out}/check_*.png, attribution.png, results.json")


if __name__ == "__main__":
    main()
