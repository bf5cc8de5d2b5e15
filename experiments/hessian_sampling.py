"""Which training subset should the Hessian be estimated on? Samplers compared on class removal.

For each sampler (random, class-stratified, feature-based, logit-based) and Hessian subset size
(fractions of the retained data), over several seeds, the class-removal update is computed with
H_R estimated on the sampled subset, and the script reports:

* F1 (test; step size chosen on a validation split), its mean and variance over seeds, and the F1
  of the plain formula (scale 1);
* stability of the influence estimates across seeds: the variance of the predicted test-loss
  changes (score var) and of the parameter update (upd var), both relative to the reference that
  uses all retained data, and the error to that reference (upd mse);
* CG iterations, wall time (sampling; H fit + solve) and the peak memory H fit + solve adds
  (CPU: growth of the process's peak resident set; CUDA: torch.cuda.max_memory_allocated).

    python experiments/hessian_sampling.py                         # digits MLP, 10 seeds, CPU
    python experiments/hessian_sampling.py --seeds 20 --fractions 0.02 0.05 0.1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from influencer.paper.sampler_study import run_sampler_study
from influencer.paper.unlearning import make_estimator, prepare_removal
from influencer.samplers import SAMPLERS, make_sampler
from influencer.uses.unlearning import ClassRemoval


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist1d"])
    parser.add_argument("--forget-class", type=int, default=0)
    parser.add_argument("--samplers", nargs="+", default=["random", "class", "feature", "logit"],
                        choices=sorted(SAMPLERS))  # fmt: skip
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2],
                        help="Hessian subset sizes as fractions of the retained training data")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--estimator", default="cg", choices=["cg", "lissa"])
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--curvature", default="gauss_newton", choices=["gauss_newton", "hessian"])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="data split and training seed")
    parser.add_argument("--tolerance", type=float, default=0.002, help="F1 difference counted as equal")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("out/hessian_sampling"))
    args = parser.parse_args()
    if args.seeds < 2:
        raise SystemExit("--seeds must be at least 2 (variances across seeds)")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    setup = prepare_removal(args.dataset, args.validation, args.seed, args.device)
    influence = setup.influence(make_estimator(args.estimator, args.damping), args.curvature, args.device)
    removal = ClassRemoval(influence, args.forget_class)
    n_retained = len(removal.retain_ids)
    sizes = sorted({max(2, round(f * n_retained)) for f in args.fractions})
    print(f"{args.dataset}: {len(setup.train[1])} train ({n_retained} retained after removing class "
          f"{args.forget_class}), {influence.p} parameters, trained in {setup.train_seconds:.1f}s; "
          f"{args.curvature} H, {args.estimator}(damping={args.damping}); sizes {sizes}; "
          f"{args.seeds} seeds; device {args.device}")  # fmt: skip
    start = time.perf_counter()
    study = run_sampler_study(
        removal, [make_sampler(name) for name in args.samplers], sizes, list(range(args.seeds)),
        setup.validation, setup.test, scales=args.scales, measure_memory=not args.no_memory,
    )  # fmt: skip
    print(f"study: {time.perf_counter() - start:.1f}s; memory measured as {study.memory_kind}; "
          f"one-time feature/logit passes (s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in study.prepare_seconds.items()))  # fmt: skip
    print()
    print(study.table())
    baseline = "random" if "random" in args.samplers else args.samplers[0]
    for metric, label in (("score_var", "test-loss influence variance"), ("update_var", "update variance")):
        print(f"\n{label} relative to {baseline} at equal size (< 1 = more stable):")
        for name, ratios in study.variance_ratios(metric, baseline).items():
            print(f"  {name:<8} " + "  ".join(f"{n}: {r:.2f}" for n, r in ratios.items()))
    print(f"\nequal F1 (within {args.tolerance}) at a smaller size than {baseline}:")
    savings = study.equal_f1_savings(baseline, args.tolerance)
    if not savings:
        print("  none")
    for s in savings:
        print(f"  {s['sampler']:<8} size {s['size']:>4} (F1 {s['f1']:.4f}) vs {baseline} size "
              f"{s['baseline_size']:>4} (F1 {s['baseline_f1']:.4f}): time x{s['time_ratio']:.2f}, "
              f"peak memory x{s['memory_ratio']:.2f}")  # fmt: skip
    paths = study.plot(args.out)
    study.to_json(args.out / "study.json")
    print(f"\nplots: {', '.join(str(p) for p in paths)}; data: {args.out / 'study.json'}")


if __name__ == "__main__":
    main()
