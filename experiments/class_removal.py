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
from pathlib import Path

import numpy as np
import torch

from influencer.paper.unlearning import (
    RemovalComparison,
    compare_with_retraining,
    make_estimator,
    plot_removal,
    prepare_removal,
)
from influencer.samplers import SAMPLERS, make_sampler


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

    setup = prepare_removal(args.dataset, args.validation, args.seed, args.device)
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
        estimator = make_estimator(args.estimator, args.damping, args.seed)
        influence = setup.influence(estimator, device=args.device)
        r = compare_with_retraining(
            influence, c, setup.validation, setup.test, setup.make_model, setup.recipe,
            sampler=sampler, hessian_size=size, seed=args.seed, scales=args.scales,
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
    plot_removal(results, args.out / "class_removal.png")
    print(f"plot: {args.out / 'class_removal.png'}")


if __name__ == "__main__":
    main()
