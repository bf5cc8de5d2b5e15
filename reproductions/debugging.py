"""Debugging a wrong prediction caused by a domain mismatch (Koh & Liang 2017, Sec. 5.3).

scikit-learn's diabetes study (442 patients; label: disease progression above the median), with
the subgroup "age < 30" as an indicator feature. All but ``--keep`` of the young low-progression
patients are removed from training, so the model learns that the young progress, and mispredicts
a young low-progression test patient. Influence then shows that the few young training patients
carry a share of the influence on that prediction far above their share of the data, and the
I_pert attribution of the most influential ones points at the age<30 feature.

    python -m reproductions.debugging --seeds 0 1 2 3 4

This is the paper's hospital case (a training set that has lost most of the healthy children
teaches the model that children are readmitted) on real data, the age bracket standing in for the
paper's age-bracket indicators. :func:`debug_domain_mismatch` runs it on any
:class:`~influencer.datasets.Split` with a 0/1 subgroup column, through
:func:`~influencer.uses.debugging.explain_prediction`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from influencer.datasets import Split, split_arrays
from influencer.errors import ConfigError, DataError
from influencer.plotting import pyplot, save_png
from influencer.retraining import LBFGSRetrainer
from influencer.uses.debugging import explain_prediction, influence_share
from influencer.uses.validation import leave_one_out
from reproductions.fitting import fit_logistic

_DIABETES_NAMES = (
    "age",
    "sex",
    "bmi",
    "blood pressure",
    "s1 total cholesterol",
    "s2 LDL",
    "s3 HDL",
    "s4 cholesterol/HDL",
    "s5 log triglycerides",
    "s6 blood sugar",
)


def load_diabetes_subgroup(
    age_below: float = 30.0, test_fraction: float = 0.25, seed: int = 0, dtype: torch.dtype | None = None
) -> Split:
    """scikit-learn's diabetes study as a binary task with an age-subgroup indicator.

    Label 1 ("high progression") when the one-year disease progression exceeds the median of the
    study (140.5). Features: the ten baseline measurements standardised on the training part, then
    a 0/1 column ``age<{age_below}`` (last), left unscaled so that 0 means "not in the subgroup".
    """
    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)
    x, target = np.asarray(d.data, dtype=np.float64), np.asarray(d.target)
    subgroup = (x[:, 0] < age_below).astype(np.float64)[:, None]
    features = np.concatenate([x, subgroup], axis=1)
    labels = (target > np.median(target)).astype(np.int64)
    scaled = np.arange(features.shape[1]) < x.shape[1]  # all but the 0/1 subgroup column
    return split_arrays(
        "diabetes",
        features,
        labels,
        test_fraction,
        seed,
        dtype,
        ("low progression", "high progression"),
        (*_DIABETES_NAMES, f"age<{age_below:g}"),
        standardize=scaled,
    )


def remove_subgroup_negatives(
    labels: Tensor, subgroup: Tensor, negative_label: int, keep: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Training ids kept and removed when all but ``keep`` (random) subgroup negatives are dropped."""
    negatives = torch.nonzero(subgroup & (labels == negative_label)).reshape(-1)
    if keep < 0 or keep >= len(negatives):
        raise ConfigError(
            f"keep must lie in [0, {len(negatives)}) (the subgroup has {len(negatives)} training examples "
            f"labelled {negative_label}), got {keep}"
        )
    order = torch.randperm(len(negatives), generator=torch.Generator().manual_seed(seed))
    removed = negatives[order[keep:]].sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[removed] = False
    return torch.nonzero(mask).reshape(-1), removed


@dataclass(frozen=True)
class MismatchDebugResult:
    """What influence says about one wrong prediction after the subgroup's negatives were removed.

    Training positions (``scores``, ``top_ids``, masks) index the mismatched training set;
    ``train_ids`` maps them to ids in the original training set. Scores follow
    :mod:`influencer._kernel.scores` (removal; positive = helpful for the test loss).
    """

    feature_names: tuple[str, ...]
    subgroup_feature: int
    negative_label: int
    train_ids: np.ndarray  # (n',) original ids of the mismatched training set
    removed_ids: np.ndarray  # (r,) original ids removed
    test_id: int
    test_label: int
    prediction: int  # by the model trained on the mismatched data
    prediction_before: int  # by the model trained on the full training set
    probability: float  # the mismatched model's probability of its (wrong) prediction
    scores: np.ndarray  # (n',)
    subgroup: np.ndarray  # (n',) bool
    kept_negatives: np.ndarray  # (n',) bool
    influence_share: float  # subgroup's share of sum |score|
    train_share: float  # subgroup's share of the training set
    kept_negative_influence_share: float
    kept_negative_train_share: float
    kept_negative_influence_share_before: float  # the same examples' share on the full-data model
    influence_share_before: float  # subgroup's share on the full-data model, same test point
    train_share_before: float
    top_ids: np.ndarray  # (k,) positions with the largest |score|
    attribution: np.ndarray  # (k, d) gradient x input of each top point's score
    subgroup_rank: np.ndarray  # (k,) rank of the subgroup feature in each top point's attribution
    aggregate_rank: int  # its rank in sum_k |attribution|
    loo_ids: np.ndarray  # (k,) the top points by |score| again (positions), in leave-one-out order
    loo_actual: np.ndarray  # (k,) actual test-loss change when each is removed and the model retrained
    loo_pearson: float  # Pearson(scores[loo_ids], loo_actual)
    wrong_test_ids: np.ndarray  # (w,) every subgroup negative the mismatched model gets wrong
    wrong_test_shares: np.ndarray  # (w,) the subgroup's influence share for each of them
    subgroup_test_negatives: int
    wrong_before: int
    accuracy_before: float
    accuracy_after: float

    def summary(self) -> dict[str, Any]:
        sub_scores = self.scores[self.subgroup]
        return {
            "test_id": self.test_id,
            "test_label": self.test_label,
            "prediction_before": self.prediction_before,
            "prediction_after": self.prediction,
            "probability_of_wrong_prediction": self.probability,
            "n_train": int(self.scores.size),
            "subgroup_train_members": int(self.subgroup.sum()),
            "kept_negatives": int(self.kept_negatives.sum()),
            "train_share": self.train_share,
            "influence_share": self.influence_share,
            "train_share_before": self.train_share_before,
            "influence_share_before": self.influence_share_before,
            "kept_negative_train_share": self.kept_negative_train_share,
            "kept_negative_influence_share": self.kept_negative_influence_share,
            "kept_negative_influence_share_before": self.kept_negative_influence_share_before,
            "concentration_before": self.influence_share_before / self.train_share_before,
            "concentration": self.influence_share / self.train_share,
            "top_k": int(self.top_ids.size),
            "top_k_in_subgroup": int(self.subgroup[self.top_ids].sum()),
            "kept_negatives_helpful": int((self.scores[self.kept_negatives] > 0).sum()),
            "subgroup_positives_harmful": int((sub_scores[~self.kept_negatives[self.subgroup]] < 0).sum()),
            "subgroup_feature": self.feature_names[self.subgroup_feature]
            if self.feature_names
            else self.subgroup_feature,
            "subgroup_feature_rank_per_top_point": self.subgroup_rank.tolist(),
            "subgroup_feature_aggregate_rank": self.aggregate_rank,
            "top_k_leave_one_out_pearson": self.loo_pearson,
            "subgroup_test_negatives": self.subgroup_test_negatives,
            "wrong_before": self.wrong_before,
            "wrong_after": int(self.wrong_test_ids.size),
            "influence_share_over_wrong_tests": {
                "mean": float(self.wrong_test_shares.mean()),
                "min": float(self.wrong_test_shares.min()),
            },
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
        }

    def plot(self, path: str | Path) -> Path:
        """Three panels: top scores by group, influence vs data shares, attribution of the top point."""
        plt = pyplot()

        fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=110)
        order = np.argsort(-np.abs(self.scores))[:30]
        colors = np.where(
            self.kept_negatives[order], "tab:green", np.where(self.subgroup[order], "tab:red", "tab:gray")
        )
        axes[0].bar(range(order.size), self.scores[order], color=colors)
        axes[0].axhline(0, color="black", lw=0.6)
        axes[0].set_xlabel("training points, by |influence|")
        axes[0].set_ylabel("score (removal: + helpful, - harmful)")
        axes[0].set_title("green: kept subgroup negatives, red: other subgroup", fontsize=9)

        groups = [
            "subgroup\n(full data)",
            "subgroup\n(mismatch)",
            "kept negatives\n(full data)",
            "kept negatives\n(mismatch)",
        ]
        data_share = [
            self.train_share_before,
            self.train_share,
            self.kept_negative_train_share * self.scores.size / (self.scores.size + self.removed_ids.size),
            self.kept_negative_train_share,
        ]
        infl_share = [
            self.influence_share_before,
            self.influence_share,
            self.kept_negative_influence_share_before,
            self.kept_negative_influence_share,
        ]
        pos = np.arange(len(groups))
        axes[1].bar(pos - 0.2, data_share, 0.4, label="share of training set")
        axes[1].bar(pos + 0.2, infl_share, 0.4, label="share of |influence|")
        axes[1].set_xticks(pos, groups, fontsize=8)
        axes[1].legend(fontsize=8)
        axes[1].set_title(
            f"test point {self.test_id}: true {self.test_label}, predicted {self.prediction}", fontsize=9
        )

        attr = self.attribution[0]
        names = list(self.feature_names) or [str(i) for i in range(attr.size)]
        bar_colors = ["tab:red" if i == self.subgroup_feature else "tab:blue" for i in range(attr.size)]
        axes[2].barh(range(attr.size), attr, color=bar_colors)
        axes[2].set_yticks(range(attr.size), names, fontsize=7)
        axes[2].invert_yaxis()
        axes[2].axvline(0, color="black", lw=0.6)
        axes[2].set_xlabel("gradient x input of the score")
        axes[2].set_title("features carrying the most influential point's score", fontsize=9)
        fig.tight_layout()
        return save_png(fig, path)


def _predict(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Predicted classes ``(m,)`` and class probabilities ``(m, c)`` of a logistic model."""
    with torch.no_grad():
        prob = torch.softmax(model(x.to(model.weight)), dim=1).cpu()
    return prob.argmax(1), prob


def debug_domain_mismatch(
    split: Split,
    subgroup_feature: int = -1,
    *,
    negative_label: int = 0,
    keep: int = 3,
    weight_decay: float = 1e-3,
    test_id: int | None = None,
    top: int = 10,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> MismatchDebugResult:
    """Create a domain mismatch, find a wrong subgroup prediction, and explain it with influence.

    Args:
        split: train/test data with a 0/1 subgroup column (e.g. :func:`load_diabetes_subgroup`).
        subgroup_feature: index of that column (default: the last).
        negative_label: the label whose subgroup examples are removed from training.
        keep: subgroup examples with ``negative_label`` left in the training set.
        weight_decay: L2 penalty of the logistic regression (trained to the optimum in float64).
        test_id: the test example to explain; default the wrongly predicted subgroup negative that
            the full-data model gets right, with the highest loss.
        top: number of most influential training points whose features are attributed.
        seed: which subgroup negatives are kept.
        device: where to compute.
    """
    d = split.x_train.shape[1]
    f = subgroup_feature % d
    x_tr, y_tr = split.x_train.double(), split.y_train
    x_te, y_te = split.x_test.double(), split.y_test
    column = torch.cat([x_tr[:, f], x_te[:, f]])
    if not bool(((column == 0) | (column == 1)).all()):
        raise DataError(f"feature {f} must be a 0/1 subgroup indicator; it has other values")
    sub_tr, sub_te = x_tr[:, f] == 1, x_te[:, f] == 1
    kept, removed = remove_subgroup_negatives(y_tr, sub_tr, negative_label, keep, seed)
    x_mis, y_mis = x_tr[kept], y_tr[kept]
    classes = max(split.num_classes, int(y_tr.max()) + 1)
    full, full_inf = fit_logistic((x_tr, y_tr), classes, weight_decay, device=device)
    # The mismatched model is the full one retrained without the removed subgroup negatives.
    theta = LBFGSRetrainer().refit(full_inf, kept)
    mismatched = full_inf.model_at(theta)
    pred_before, _ = _predict(full, x_te)
    pred_after, prob_after = _predict(mismatched, x_te)

    negatives = sub_te & (y_te == negative_label)
    wrong = negatives & (pred_after != y_te)
    if not wrong.any():
        raise ConfigError(
            "the mismatch flipped no subgroup test prediction: keep fewer subgroup negatives, lower "
            "weight_decay, or choose a subgroup with more examples"
        )
    wrong_ids = torch.nonzero(wrong).reshape(-1)
    if test_id is None:
        preferred = wrong & (pred_before == y_te)
        pool = torch.nonzero(preferred if preferred.any() else wrong).reshape(-1)
        losses = -torch.log(prob_after[pool, y_te[pool]])
        test_id = int(pool[losses.argmax()])
    if not 0 <= test_id < len(y_te):
        raise ConfigError(f"test_id must lie in [0, {len(y_te)}), got {test_id}")

    inf = full_inf.replace(theta=theta, train=(x_mis, y_mis)).fit()
    sub_mis = x_mis[:, f] == 1
    kept_neg = sub_mis & (y_mis == negative_label)
    wrong_scores = inf.scores((x_te[wrong_ids], y_te[wrong_ids])).cpu()  # (w, n')
    test = (x_te[test_id : test_id + 1], y_te[test_id : test_id + 1])
    explained = explain_prediction(
        inf,
        test,
        subgroups={"subgroup": sub_mis, "kept_negatives": kept_neg},
        top=top,
        feature_names=split.feature_names,
    )
    scores = explained.scores  # (n',)
    before = full_inf.scores(test)[0].cpu()
    subgroup, kept_negatives = explained.subgroups["subgroup"], explained.subgroups["kept_negatives"]
    # Removing each top point and retraining: the scores being trusted are checked, not assumed.
    loo = leave_one_out(inf, test, k=len(explained.top_ids), select="magnitude")
    return MismatchDebugResult(
        feature_names=tuple(split.feature_names),
        subgroup_feature=f,
        negative_label=negative_label,
        train_ids=kept.numpy(),
        removed_ids=removed.numpy(),
        test_id=test_id,
        test_label=int(y_te[test_id]),
        prediction=int(pred_after[test_id]),
        prediction_before=int(pred_before[test_id]),
        probability=float(prob_after[test_id].max()),
        scores=scores.numpy(),
        subgroup=sub_mis.numpy(),
        kept_negatives=kept_neg.numpy(),
        influence_share=subgroup.influence_share,
        train_share=subgroup.train_share,
        kept_negative_influence_share=kept_negatives.influence_share,
        kept_negative_train_share=kept_negatives.train_share,
        kept_negative_influence_share_before=float(influence_share(before, kept[kept_neg])),
        influence_share_before=float(influence_share(before, sub_tr)),
        train_share_before=float(sub_tr.double().mean()),
        top_ids=explained.top_ids.numpy(),
        attribution=explained.gradient_x_input.cpu().numpy(),
        subgroup_rank=explained.feature_rank(f).cpu().numpy(),
        aggregate_rank=explained.aggregate_rank(f),
        loo_ids=loo.train_ids,
        loo_actual=loo.actual,
        loo_pearson=loo.pearson,
        wrong_test_ids=wrong_ids.numpy(),
        wrong_test_shares=influence_share(wrong_scores, sub_mis).double().numpy(),
        subgroup_test_negatives=int(negatives.sum()),
        wrong_before=int((negatives & (pred_before != y_te)).sum()),
        accuracy_before=float((pred_before == y_te).double().mean()),
        accuracy_after=float((pred_after == y_te).double().mean()),
    )


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
