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

from influencer import ClassificationTask, Exact, Influence, top_k
from influencer._kernel.functional import ModelFunction
from influencer.data import as_examples
from influencer.models import LogisticRegression
from influencer.paper.datasets import load_digits
from influencer.paper.plotting import pyplot, save_png
from influencer.training import fit_lbfgs
from influencer.uses.perturbation import PerturbationInfluence, check_perturbation


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

    data = load_digits(dtype=torch.float64)
    task = ClassificationTask(weight_decay=args.weight_decay)
    torch.manual_seed(0)
    model = LogisticRegression(64, 10).double()
    fn = ModelFunction(model, task, device=args.device)
    fn.load_into(fit_lbfgs(fn, as_examples(data.train)))
    inf = Influence(model, task, data.train, estimator=Exact(), device=args.device).fit()
    pert = PerturbationInfluence(inf)
    t = args.test_index
    test = (data.x_test[t : t + 1], data.y_test[t : t + 1])
    with torch.no_grad():
        predicted_class = int(model(data.x_test[t : t + 1].to(args.device)).argmax())
    print(
        f"test image {t}: label {int(data.y_test[t])}, predicted {predicted_class}; "
        f"n = {inf.n} training images"
    )

    results = {}
    checks = [("sign", 0)] + [("random", s) for s in args.seeds]
    for direction, seed in checks:
        check = check_perturbation(
            pert, test, k=args.k, size=1 / 16, direction=direction, bounds=(0.0, 1.0), grid=1 / 16, seed=seed
        )
        name = f"{direction}" + (f"_seed{seed}" if direction == "random" else "")
        results[name] = check.summary()
        print(
            f"one grey level per pixel along {name:>13}: predicted vs retrained change of the test loss "
            f"over {args.k} images: Pearson {check.pearson:.4f}, Spearman {check.spearman:.4f}; "
            f"mean |actual| {abs(check.actual).mean():.2e}"
        )
        check.plot(args.out / f"check_{name}.png", title=f"I_pert vs retraining ({name} steps of 1/16)")

    scores = inf.scores(test)
    top = top_k(scores, 4)
    helpful = top.helpful_ids[0]
    attribution = pert.attribution(test, helpful)
    effects = -attribution.score_gradient[0]  # (4, 64): d test loss / d pixel
    gxi = attribution.gradient_x_input[0]
    ids, values = attribution.top(5)
    for c, i in enumerate(helpful.tolist()):
        pixels = ", ".join(
            f"({p // 8},{p % 8}) {v:+.1e}"
            for p, v in zip(ids[0, c].tolist(), values[0, c].tolist(), strict=True)
        )
        print(
            f"helpful training image {i} (label {int(data.y_train[i])}, score {float(scores[0, i]):+.2e}): "
            f"pixels (row,col) carrying most of its score: {pixels}"
        )
    plot_attribution(
        data.x_test[t], data.x_train[helpful], effects, gxi, helpful, args.out / "attribution.png"
    )
    (args.out / "results.json").write_text(
        json.dumps({"config": {**vars(args), "out": str(args.out)}, "checks": results}, indent=2)
    )
    print(f"saved {args.out}/check_*.png, attribution.png, results.json")


def plot_attribution(
    test_image: torch.Tensor,
    images: torch.Tensor,
    effects: torch.Tensor,
    gxi: torch.Tensor,
    ids: torch.Tensor,
    path: Path,
) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(len(ids), 4, figsize=(6.6, 1.75 * len(ids)), dpi=120, squeeze=False)
    for row, i, img, eff, g in zip(axes, ids.tolist(), images, effects, gxi, strict=True):
        panels = [
            (test_image.reshape(8, 8), "test image", "gray_r"),
            (img.reshape(8, 8), f"helpful train {i}", "gray_r"),
            (eff.reshape(8, 8), "d test loss / d pixel", "coolwarm"),
            (g.reshape(8, 8), "gradient x input", "coolwarm"),
        ]
        for ax, (arr, title, cmap) in zip(row, panels, strict=True):
            arr = arr.cpu().numpy()
            if cmap == "coolwarm":
                m = float(abs(arr).max()) or 1.0
                ax.imshow(arr, cmap=cmap, vmin=-m, vmax=m)
            else:
                ax.imshow(arr, cmap=cmap, vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    main()
