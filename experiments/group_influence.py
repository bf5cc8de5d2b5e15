"""Group influence vs retraining for groups of growing size (Koh et al. 2019; Basu et al. 2020).

Logistic regression trained to the optimum in float64. Random and same-class groups of 1%..20% of
the training set are removed; the change of each test example's loss predicted by first-order
(sum of individual scores) and second-order (Basu, You & Feizi 2020) group influence is compared
with the actual change after retraining (L-BFGS, warm start), by Pearson and Spearman correlation
over the groups of each size, averaged over the test examples.

    python experiments/group_influence.py                       # breast_cancer, 10 groups per cell
    python experiments/group_influence.py --data digits --fractions 0.01 0.03 0.05 0.08
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from influencer.paper.group import group_experiment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="breast_cancer", help="breast_cancer, wine, iris, digits or mnist1d")
    ap.add_argument("--fractions", type=float, nargs="+", default=(0.01, 0.05, 0.1, 0.2))
    ap.add_argument("--groups", type=int, default=10, help="groups per kind and size")
    ap.add_argument("--n-test", type=int, default=5, help="test examples whose loss is measured")
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    ap.add_argument("--seeds", type=int, default=0, help="seed for drawing the groups")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    ap.add_argument("--out", type=Path, default=Path("out/group_influence"))
    args = ap.parse_args()

    start = time.time()
    result, influence = group_experiment(
        args.data,
        fractions=args.fractions,
        per_fraction=args.groups,
        n_test=args.n_test,
        weight_decay=args.weight_decay,
        seed=args.seeds,
        device=args.device,
    )
    print(
        f"{args.data}: n = {influence.n}, p = {influence.p}, {len(result.kinds)} groups, "
        f"{args.n_test} test examples "
        f"({time.time() - start:.0f} s)"
    )
    print(result.format_table())
    args.out.mkdir(parents=True, exist_ok=True)
    png = result.plot(args.out / "group_influence.png")
    summary = {"data": args.data, "n": influence.n, "p": influence.p, "rows": result.table()}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"saved {png} and {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
