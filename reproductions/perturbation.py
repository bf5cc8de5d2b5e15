"""I_pert,loss on digits: checked against retraining, and which pixels carry a training image's influence.

A multinomial logistic regression on scikit-learn's 8x8 digits (pixels 0..16, scaled to [0, 1]) is
trained to the optimum. For one test image, I_pert is computed for every training image at once.

1. Validation: the training images with the largest ``||I_pert||_1`` are each moved by one grey
   level per pixel (legal images: on the 1/16 grid, inside [0, 1]), along sign(I_pert) and along
   random signs; the model is retrained to the optimum every time, and the actual change of the
   test loss is compared with the first-order prediction ``I_pert / n . delta``.
2. Attribution: for the most helpful training images, the per-pixel effect ``d test-loss / d x``
   and ``gradient x input`` of their scores.

    python -m reproductions.perturbation --k 30 --test-index 0

:func:`check_perturbation` moves single training inputs, retrains the model to the optimum and
compares the actual change of a test measurement with the first-order prediction of
:class:`~influencer.uses.perturbation.PerturbationInfluence`. :func:`digits_perturbation` is the
paper-style experiment on scikit-learn's 8x8 digits (logistic regression at its optimum): the
check along sign and random pixel steps of one grey level, and the attribution of the most helpful
training images' scores to their pixels, drawn by :func:`plot_pixel_attribution`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from influencer import top_k
from influencer._kernel.progress import progress_bar
from influencer._kernel.stats import pearson, spearman
from influencer.datasets import Split, load_digits
from influencer.errors import ConfigError, DataError
from influencer.influence import Influence
from influencer.plotting import predicted_vs_actual, pyplot, save_png
from influencer.retraining import LBFGSRetrainer
from influencer.uses.perturbation import FeatureAttribution, PatchedExamples, PerturbationInfluence
from reproductions.fitting import fit_logistic


@dataclass(frozen=True)
class PerturbationCheck:
    """Predicted vs actual change of a test measurement when single training inputs are perturbed."""

    train_ids: np.ndarray  # (k,)
    predicted: np.ndarray  # (k,) effect . delta (first order, see this module's docstring)
    actual: np.ndarray  # (k,) f(theta*(x_i + delta)) - f(theta*) after retraining to the optimum
    delta_norm: np.ndarray  # (k,) L-inf size of each perturbation actually applied
    pearson: float
    spearman: float

    def summary(self) -> dict[str, Any]:
        return {"k": int(self.train_ids.size), "pearson": self.pearson, "spearman": self.spearman}

    def plot(self, path: str | Path, title: str = "Perturbing one training input") -> Path:
        """Scatter of actual vs predicted with the identity line, saved as PNG."""
        return predicted_vs_actual(
            path,
            self.predicted,
            self.actual,
            title=title,
            ylabel="predicted change (I_pert / n . delta)",
            pearson=self.pearson,
            spearman=self.spearman,
        )


def check_perturbation(
    pert: PerturbationInfluence,
    test: Any,
    train_indices: Sequence[int] | Tensor | None = None,
    *,
    k: int = 30,
    size: float = 1e-2,
    direction: Literal["sign", "random"] = "sign",
    bounds: tuple[float, float] | None = None,
    grid: float | None = None,
    seed: int = 0,
) -> PerturbationCheck:
    """Perturb training inputs one at a time, retrain to the optimum, compare with ``I_pert``.

    For one test example: each training input (``train_indices``, default the ``k`` with the
    largest ``||effect||_1``) moves by ``delta = size * sign(effect)`` (``"sign"``: the steepest
    L-inf ascent of the test loss) or by random signs, kept within ``bounds`` and on ``grid`` if
    given (e.g. ``(0, 1)`` and ``1/16`` for legal digit images). The model is retrained with
    L-BFGS in float64 (convex models), so any gap is the first-order approximation's.
    """
    inf = pert.influence
    effects = pert.effects(test)
    if effects.shape[0] != 1:
        raise ConfigError(f"check_perturbation takes one test example, got {effects.shape[0]}")
    effects = effects[0]  # (n, *x)
    if train_indices is None:
        ids = effects.reshape(inf.n, -1).abs().sum(1).topk(min(k, inf.n)).indices.cpu()
    else:
        ids = inf.train.check_indices(train_indices)
    if direction == "sign":
        signs = torch.sign(effects[ids.to(effects.device)])
    elif direction == "random":
        gen = torch.Generator().manual_seed(seed)
        shape = (len(ids), *effects.shape[1:])
        signs = (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(effects)
    else:
        raise ConfigError(f"direction must be 'sign' or 'random', got {direction!r}")
    x = pert.inputs(ids)
    moved = x + size * signs
    if bounds is not None:
        if float(x.min()) < bounds[0] or float(x.max()) > bounds[1]:
            raise DataError(
                f"training inputs span [{float(x.min()):g}, {float(x.max()):g}], outside bounds={bounds}: "
                "pass the data's valid range, or bounds=None"
            )
        moved = moved.clamp(*bounds)
    if grid is not None:
        moved = x + torch.trunc((moved - x) / grid + 1e-6 * torch.sign(moved - x)) * grid
    deltas = moved - x

    reference = inf.replace(dtype=torch.float64)
    retrainer = LBFGSRetrainer()
    theta_star = retrainer.refit(reference)

    def measure(theta: Tensor) -> float:
        return float(reference.measurements(test, theta)[0])

    base = measure(theta_star)
    everyone = torch.arange(inf.n)
    actual = []
    for c in progress_bar(range(len(ids)), "perturb and retrain", inf.progress):
        moved_data = reference.replace(
            train=PatchedExamples(inf.train, ids[c : c + 1], moved[c : c + 1], pert.input)
        )
        actual.append(measure(retrainer.refit(moved_data, everyone, theta_star)) - base)
    predicted = (effects[ids.to(effects.device)] * deltas).reshape(len(ids), -1).sum(1).double().cpu().numpy()
    actual_arr = np.asarray(actual)
    return PerturbationCheck(
        ids.numpy(),
        predicted,
        actual_arr,
        deltas.reshape(len(ids), -1).abs().amax(1).double().cpu().numpy(),
        pearson(predicted, actual_arr),
        spearman(predicted, actual_arr),
    )


# ---- the experiment on digits ------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsPerturbation:
    """I_pert on digits for one test image: checks against retraining and pixel attributions."""

    data: Split
    influence: Influence
    test_index: int
    predicted_class: int  # the model's prediction for the test image
    checks: dict[str, PerturbationCheck]  # "sign", "random_seed0", ...
    helpful_ids: Tensor  # (h,) the most helpful training images
    helpful_scores: Tensor  # (h,) their removal scores
    attribution: FeatureAttribution  # of their scores to their pixels, (1, h, 64)

    def summary(self) -> dict[str, Any]:
        return {name: check.summary() for name, check in self.checks.items()}


def digits_perturbation(
    *,
    k: int = 30,
    test_index: int = 0,
    weight_decay: float = 1e-3,
    seeds: Sequence[int] = (0, 1, 2),
    helpful: int = 4,
    device: torch.device | str | None = None,
) -> DigitsPerturbation:
    """Logistic regression on the 8x8 digits (pixels in [0, 1]) at its optimum; for one test image:

    * :func:`check_perturbation` on the ``k`` training images with the largest ``||I_pert||_1``,
      each moved by one grey level per pixel (1/16, on the grid, inside [0, 1]) along
      ``sign(I_pert)`` and along random signs (one check per seed in ``seeds``);
    * the attribution (``d test-loss / d pixel`` and gradient x input) of the ``helpful`` most
      helpful training images' scores.
    """
    data = load_digits(dtype=torch.float64)
    model, inf = fit_logistic(data.train, data.num_classes, weight_decay, device=device)
    pert = PerturbationInfluence(inf)
    t = test_index
    if not 0 <= t < len(data.y_test):
        raise ConfigError(f"test_index must lie in [0, {len(data.y_test)}), got {t}")
    test = (data.x_test[t : t + 1], data.y_test[t : t + 1])
    with torch.no_grad():
        predicted = int(model(test[0].to(model.weight)).argmax())

    checks = {}
    for direction, seed in [("sign", 0)] + [("random", s) for s in seeds]:
        name = direction if direction == "sign" else f"random_seed{seed}"
        checks[name] = check_perturbation(
            pert, test, k=k, size=1 / 16, direction=direction, bounds=(0.0, 1.0), grid=1 / 16, seed=seed
        )
    scores = inf.scores(test)  # (1, n)
    top = top_k(scores, helpful)
    ids = top.helpful_ids[0]
    return DigitsPerturbation(
        data, inf, t, predicted, checks, ids, scores[0, ids], pert.attribution(test, ids)
    )


def plot_pixel_attribution(result: DigitsPerturbation, path: str | Path) -> Path:
    """One row per helpful training image: the test image, the training image, ``d test-loss /
    d pixel`` (= ``-grad_x score``) and gradient x input of its score, saved as PNG."""
    plt = pyplot()
    ids = result.helpful_ids.tolist()
    test_image = result.data.x_test[result.test_index]
    images = result.data.x_train[result.helpful_ids.cpu()]
    effects = -result.attribution.score_gradient[0]  # (h, 64)
    gxi = result.attribution.gradient_x_input[0]
    fig, axes = plt.subplots(len(ids), 4, figsize=(6.6, 1.75 * len(ids)), dpi=120, squeeze=False)
    for row, i, img, eff, g in zip(axes, ids, images, effects, gxi, strict=True):
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
    return save_png(fig, path)


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
