"""Debugging a wrong prediction caused by a domain mismatch (Koh & Liang 2017, Sec. 5.3).

scikit-learn's diabetes study (442 patients; label: disease progression above the median), with
the subgroup "age < 30" as an indicator feature. All but ``--keep`` of the young low-progression
patients are removed from training, so the model learns that the young progress, and mispredicts
a young low-progression test patient. Influence then shows that the few young training patients
carry a share of the influence on that prediction far above their share of the data, and the
I_pert attribution of the most influential ones points at the age<30 feature.

    python experiments/debug_wrong_prediction.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from influencer.paper.debugging import MismatchDebugResult, debug_domain_mismatch, load_diabetes_subgroup


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="data split and kept ids"
    )
    parser.add_argument("--keep", type=int, default=3, help="young low-progression patients left in training")
    parser.add_argument("--age-below", type=float, default=30.0)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--top", type=int, default=10, help="most influential training points attributed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (small models run fastest on one)"
    )
    parser.add_argument("--out", type=Path, default=Path("out/debug_wrong_prediction"))
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    summaries = {}
    for seed in args.seeds:
        split = load_diabetes_subgroup(args.age_below, seed=seed)
        result = debug_domain_mismatch(
            split, keep=args.keep, weight_decay=args.weight_decay, top=args.top, seed=seed, device=args.device
        )
        s = result.summary()
        summaries[seed] = s
        result.plot(args.out / f"seed{seed}.png")
        names = split.feature_names
        print_seed(seed, s, result, split.classes, names, args.age_below)

    keys = [
        "train_share",
        "train_share_before",
        "influence_share",
        "influence_share_before",
        "kept_negative_train_share",
        "kept_negative_influence_share",
        "kept_negative_influence_share_before",
    ]
    mean = {k: float(np.mean([s[k] for s in summaries.values()])) for k in keys}
    ranks = [s["subgroup_feature_aggregate_rank"] for s in summaries.values()]
    top_ranks = [s["subgroup_feature_rank_per_top_point"][0] for s in summaries.values()]
    print(f"\nover {len(args.seeds)} seeds (means):")
    print(
        f"  subgroup: {mean['train_share']:.1%} of the data, {mean['influence_share']:.1%} of |influence| "
        f"(full data: {mean['train_share_before']:.1%} of the data, {mean['influence_share_before']:.1%})"
    )
    print(
        f"  kept negatives: {mean['kept_negative_train_share']:.1%} of the data, "
        f"{mean['kept_negative_influence_share']:.1%} of |influence| (full data: "
        f"{mean['kept_negative_influence_share_before']:.1%})"
    )
    print(
        f"  {summaries[args.seeds[0]]['subgroup_feature']} aggregate rank per seed: {ranks}; rank for the "
        f"most influential point: {top_ranks}"
    )
    (args.out / "results.json").write_text(
        json.dumps(
            {"config": {**vars(args), "out": str(args.out)}, "seeds": summaries, "mean": mean}, indent=2
        )
    )
    print(f"saved {args.out}/results.json and seed*.png")


def print_seed(
    seed: int, s: dict, result: MismatchDebugResult, classes: tuple, names: tuple, age: float
) -> None:
    best = int(result.top_ids[0])
    wrong = s["influence_share_over_wrong_tests"]
    drivers = ", ".join(names[i] for i in np.argsort(-np.abs(result.attribution[0]))[:3])
    print(
        f"\nseed {seed}: test patient {s['test_id']} (low progression, age<{age:g}) predicted "
        f"{classes[s['prediction_after']]!r} with p = {s['probability_of_wrong_prediction']:.2f}; "
        f"the full-data model predicted {classes[s['prediction_before']]!r}"
    )
    print(
        f"  subgroup in training: {s['subgroup_train_members']} of {s['n_train']} "
        f"({s['train_share']:.1%}), share of |influence| {s['influence_share']:.1%} "
        f"(full data: {s['train_share_before']:.1%} -> {s['influence_share_before']:.1%})"
    )
    print(
        f"  {s['kept_negatives']} kept low-progression young patients: "
        f"{s['kept_negative_train_share']:.1%} of the data, {s['kept_negative_influence_share']:.1%} "
        f"of |influence| (full data: {s['kept_negative_influence_share_before']:.1%}); "
        f"helpful: {s['kept_negatives_helpful']} of {s['kept_negatives']}"
    )
    print(
        f"  top {s['top_k']} by |influence|: {s['top_k_in_subgroup']} from the subgroup; the most "
        f"influential (train id {int(result.train_ids[best])}, score {result.scores[best]:+.4f}) is "
        f"carried most by: {drivers}"
    )
    print(
        f"  rank of {s['subgroup_feature']} among {len(names)} features: aggregate over the top "
        f"{s['top_k']} = {s['subgroup_feature_aggregate_rank']}, "
        f"per point = {s['subgroup_feature_rank_per_top_point']}"
    )
    print(
        f"  the top {s['top_k']} removed one at a time and retrained: predicted vs actual test-loss change "
        f"Pearson r = {s['top_k_leave_one_out_pearson']:.4f}"
    )
    print(
        f"  all {s['wrong_after']} wrongly predicted young low-progression test patients (full data: "
        f"{s['wrong_before']}): subgroup share of |influence| mean {wrong['mean']:.1%}, "
        f"min {wrong['min']:.1%}"
    )


if __name__ == "__main__":
    main()
