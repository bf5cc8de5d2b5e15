"""Group influence vs retraining for groups of growing size (Koh et al. 2019; Basu et al. 2020).

Logistic regression trained to the optimum in float64. Random and same-class groups of 1%..20% of
the training set are removed; the change of each test example's loss predicted by first-order
(sum of individual scores) and second-order (Basu, You & Feizi 2020) group influence is compared
with the actual change after retraining (L-BFGS, warm start), by Pearson and Spearman correlation
over the groups of each size, averaged over the test examples.

    python -m reproductions.group  # breast_cancer, 10 groups per cell
    python -m reproductions.group --data digits --fractions 0.01 0.03 0.05 0.08

:func:`make_groups` draws random and same-class groups of given sizes; :func:`compare_group_influence`
predicts each group's effect on test losses to first and second order
(:func:`~influencer.uses.group.group_influence`) and measures it by retraining without the group
(:func:`~influencer.uses.group.retrain_without_groups`); :class:`GroupComparison` tabulates and
draws how well the two orders track retraining as groups grow. :func:`group_experiment` runs it
all for logistic regression on a bundled data set.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from influencer._kernel.stats import pearson, spearman
from influencer.datasets import load_dataset
from influencer.errors import ConfigError
from influencer.influence import Influence
from influencer.plotting import pyplot, save_png
from influencer.retraining import Retrainer
from influencer.uses.group import group_influence, retrain_without_groups
from reproductions.fitting import fit_logistic

GroupKind = Literal["random", "same_class"]


@dataclass(frozen=True)
class Group:
    """A set of training ids to remove, with how it was drawn."""

    ids: Tensor  # (size,)
    kind: str
    fraction: float  # requested size as a fraction of the training set
    label: int | None = None  # the shared class of a same-class group


def make_groups(
    labels: Tensor,
    fractions: Sequence[float],
    per_fraction: int,
    kinds: Sequence[GroupKind] = ("random", "same_class"),
    seed: int = 0,
) -> list[Group]:
    """``per_fraction`` groups of each kind and each size ``round(fraction * n)``.

    ``random``: uniformly without replacement. ``same_class``: all from one class, the class drawn
    at random among those with enough examples (Koh et al. 2019; Basu et al. 2020 call these
    coherent groups; their members push the model the same way, so removal effects are large).
    """
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    n = len(labels)
    if per_fraction < 1:
        raise ConfigError(f"per_fraction must be >= 1, got {per_fraction}")
    for k in kinds:
        if k not in ("random", "same_class"):
            raise ConfigError(f"group kind must be 'random' or 'same_class', got {k!r}")
    gen = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    groups = []
    for frac in fractions:
        if not 0.0 < frac < 1.0:
            raise ConfigError(f"group fractions must be in (0, 1), got {frac}")
        size = max(1, round(frac * n))
        for kind in kinds:
            eligible = classes[counts > size] if kind == "same_class" else classes
            if len(eligible) == 0:
                raise ConfigError(
                    f"no class has more than {size} examples ({frac:.0%} of {n}), so same-class groups "
                    f"of that size cannot be drawn; the largest class has {int(counts.max())}. Use "
                    "smaller fractions"
                )
            for _ in range(per_fraction):
                if kind == "random":
                    ids = torch.randperm(n, generator=gen)[:size]
                    groups.append(Group(ids.sort().values, kind, float(frac)))
                else:
                    c = eligible[torch.randint(len(eligible), (1,), generator=gen)].item()
                    members = torch.nonzero(labels == c).reshape(-1)
                    ids = members[torch.randperm(len(members), generator=gen)[:size]]
                    groups.append(Group(ids.sort().values, kind, float(frac), int(c)))
    return groups


# ---- predicted vs actual over groups of growing size -------------------------------------------


@dataclass(frozen=True)
class GroupComparison:
    """Predicted (first/second order) and actual test-measurement changes for many groups.

    Arrays are ``(k, m)`` for ``k`` groups and ``m`` test examples; ``kinds[j]`` and
    ``fractions[j]`` describe group ``j``. :meth:`table` reports, per kind and size, the Pearson
    and Spearman correlation of predicted with actual changes over the groups (averaged over test
    examples) and the relative error ``mean |predicted - actual| / mean |actual|``.
    """

    kinds: np.ndarray  # (k,) str
    fractions: np.ndarray  # (k,)
    sizes: np.ndarray  # (k,)
    first_order: np.ndarray  # (k, m)
    second_order: np.ndarray  # (k, m)
    actual: np.ndarray  # (k, m)

    @staticmethod
    def _corr(pred: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
        """Pearson and Spearman over groups, averaged over test examples."""
        ps = [pearson(pred[:, t], actual[:, t]) for t in range(actual.shape[1])]
        ss = [spearman(pred[:, t], actual[:, t]) for t in range(actual.shape[1])]
        return float(np.nanmean(ps)), float(np.nanmean(ss))

    @staticmethod
    def _rel_error(pred: np.ndarray, actual: np.ndarray) -> float:
        """``mean |pred - actual| / mean |actual|`` over groups and tests (robust to near-zero effects)."""
        scale = np.abs(actual).mean()
        return float(np.abs(pred - actual).mean() / scale) if scale > 0 else float("nan")

    def table(self) -> list[dict[str, Any]]:
        """One row per (kind, fraction) plus one per kind pooled over all sizes."""
        out = []
        for kind in dict.fromkeys(self.kinds.tolist()):
            cells = [(f, (self.kinds == kind) & (self.fractions == f)) for f in np.unique(self.fractions)]
            cells.append(("all", self.kinds == kind))
            for frac, mask in cells:
                if mask.sum() < 3:
                    continue
                row: dict[str, Any] = {"kind": kind, "fraction": frac, "groups": int(mask.sum())}
                for name, pred in (("first", self.first_order), ("second", self.second_order)):
                    r, rho = self._corr(pred[mask], self.actual[mask])
                    row[f"{name}_pearson"] = r
                    row[f"{name}_spearman"] = rho
                    row[f"{name}_rel_error"] = self._rel_error(pred[mask], self.actual[mask])
                out.append(row)
        return out

    def format_table(self) -> str:
        head = (
            f"{'kind':<11}{'size':>6}{'groups':>7}  {'Pearson 1st':>11}{'2nd':>7}  "
            f"{'Spearman 1st':>12}{'2nd':>7}  {'rel.err 1st':>11}{'2nd':>7}"
        )
        lines = [head]
        for r in self.table():
            size = "all" if r["fraction"] == "all" else f"{r['fraction']:.0%}"
            lines.append(
                f"{r['kind']:<11}{size:>6}{r['groups']:>7}"
                f"  {r['first_pearson']:>11.3f}{r['second_pearson']:>7.3f}"
                f"  {r['first_spearman']:>12.3f}{r['second_spearman']:>7.3f}"
                f"  {r['first_rel_error']:>11.3f}{r['second_rel_error']:>7.3f}"
            )
        return "\n".join(lines)

    def plot(self, path: str | Path, test_index: int = 0) -> Path:
        """Correlation vs group size per kind, and predicted-vs-actual scatters, saved as PNG."""
        plt = pyplot()

        kinds = list(dict.fromkeys(self.kinds.tolist()))
        rows = [r for r in self.table() if r["fraction"] != "all"]
        fig, axes = plt.subplots(1, 2 + len(kinds), figsize=(4.2 * (2 + len(kinds)), 4), dpi=120)
        for ax, metric, label in (
            (axes[0], "pearson", "Pearson r, predicted vs actual"),
            (axes[1], "rel_error", "mean |predicted - actual| / mean |actual|"),
        ):
            for kind, ls in zip(kinds, ("-", "--", ":"), strict=False):
                rs = [r for r in rows if r["kind"] == kind]
                x = [100 * r["fraction"] for r in rs]
                for order, marker, color in (("first", "o", "C0"), ("second", "s", "C3")):
                    ax.plot(
                        x,
                        [r[f"{order}_{metric}"] for r in rs],
                        ls,
                        marker=marker,
                        color=color,
                        label=f"{order} order, {kind}",
                    )
            ax.set_xlabel("group size (% of training set)")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        axes[0].set_title("Correlation with retraining (mean over test examples)", fontsize=9)
        axes[1].set_title("Relative error of the predicted change", fontsize=9)
        for ax, kind in zip(axes[2:], kinds, strict=True):
            mask = self.kinds == kind
            a = self.actual[mask, test_index]
            for pred, name, c in ((self.first_order, "1st", "C0"), (self.second_order, "2nd", "C3")):
                ax.scatter(a, pred[mask, test_index], s=10, alpha=0.7, color=c, label=f"{name} order")
            lo = float(
                min(
                    a.min(),
                    self.first_order[mask, test_index].min(),
                    self.second_order[mask, test_index].min(),
                )
            )
            hi = float(
                max(
                    a.max(),
                    self.first_order[mask, test_index].max(),
                    self.second_order[mask, test_index].max(),
                )
            )
            ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--")
            ax.set_xlabel("actual change in test loss (retrained)")
            ax.set_ylabel("predicted change")
            ax.set_title(f"{kind} groups (test example {test_index})", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return save_png(fig, path)


def compare_group_influence(
    influence: Influence,
    groups: Sequence[Group],
    test: Any,
    *,
    retrain: Retrainer | None = None,
) -> GroupComparison:
    """Predict (first and second order) and actually retrain for every group; see :class:`GroupComparison`."""
    pred = group_influence(influence, [g.ids for g in groups], test)
    actual = retrain_without_groups(influence, [g.ids for g in groups], test, retrain=retrain)
    return GroupComparison(
        np.array([g.kind for g in groups]),
        np.array([g.fraction for g in groups]),
        pred.sizes.numpy().astype(int),
        pred.first_order.detach().double().cpu().numpy(),
        pred.second_order.detach().double().cpu().numpy(),
        actual.detach().double().cpu().numpy(),
    )


def group_experiment(
    data: str = "breast_cancer",
    *,
    fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.2),
    per_fraction: int = 10,
    n_test: int = 5,
    weight_decay: float = 1e-2,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[GroupComparison, Influence]:
    """Logistic regression at its optimum (float64) on a bundled data set; ``per_fraction`` random
    and same-class groups of each size are removed and predicted vs retrained on the first
    ``n_test`` test examples. Returns the comparison and the model's :class:`Influence`."""
    split = load_dataset(data, dtype=torch.float64)
    _, influence = fit_logistic(split.train, split.num_classes, weight_decay, device=device)
    groups = make_groups(split.y_train, fractions, per_fraction, seed=seed)
    test = (split.x_test[:n_test], split.y_test[:n_test])
    return compare_group_influence(influence, groups, test), influence


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
