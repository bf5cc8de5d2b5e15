"""Explaining one prediction by its training data (Koh & Liang 2017, Sec. 5.3).

When a prediction is wrong, influence asks two questions of the training set:

* **who**: which training points carry the influence on it, and whether some subgroup carries a
  share of ``sum_i |score_i|`` far above its share of the data (the paper's hospital case: a few
  training children teach the model that children are readmitted). :func:`influence_share`;
* **why**: which input features of the most influential points carry their scores: ``gradient x
  input`` of each score, from ``I_pert`` (:class:`~influencer.uses.perturbation.FeatureAttribution`).

:func:`explain_prediction` answers both for one test example. Scores follow
:mod:`influencer._kernel.scores` (removal; with the test loss as measurement, positive = helpful).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from influencer._kernel.errors import ConfigError, DataError
from influencer.influence import Influence
from influencer.uses.perturbation import FeatureAttribution, InputPath, PerturbationInfluence


def _members_mask(members: Sequence[int] | Tensor, n: int) -> Tensor:
    m = torch.as_tensor(members).cpu()
    if m.dtype == torch.bool:
        if m.shape != (n,):
            raise DataError(f"a membership mask must have shape ({n},) like the scores, got {tuple(m.shape)}")
        return m
    ids = m.reshape(-1).long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise DataError(f"member ids must lie in [0, {n}), got {int(ids.min())}..{int(ids.max())}")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[ids] = True
    return mask


def influence_share(scores: Tensor, members: Sequence[int] | Tensor) -> Tensor:
    """Share of ``sum_i |score_i|`` carried by ``members``, per test example.

    Args:
        scores: ``(m, n)`` (or ``(n,)``) removal scores of ``n`` training examples.
        members: a ``(n,)`` boolean mask or the training ids of the subgroup.

    Returns ``(m,)`` (or a scalar) in ``[0, 1]``; compare it with the subgroup's share of the data.
    """
    magnitude = scores.abs()
    mask = _members_mask(members, scores.shape[-1]).to(scores.device)
    total = magnitude.sum(-1)
    if bool((total == 0).any()):
        raise DataError("every score of some test example is 0, so no share of its influence exists")
    return magnitude[..., mask].sum(-1) / total


@dataclass(frozen=True)
class SubgroupShare:
    """A subgroup's share of the training set and of the influence on one prediction."""

    size: int
    train_share: float  # size / n
    influence_share: float  # share of sum_i |score_i|

    @property
    def concentration(self) -> float:
        """``influence_share / train_share``: 1 = as influential as its size, >> 1 = dominant."""
        return self.influence_share / self.train_share


@dataclass(frozen=True)
class PredictionExplanation:
    """Who and what carries one test prediction (see :func:`explain_prediction`)."""

    scores: Tensor  # (n,) removal scores of every training example
    top_ids: Tensor  # (k,) training ids with the largest |score|, largest first
    attribution: FeatureAttribution  # of the top points' scores to their features, (1, k, *x)
    subgroups: Mapping[str, SubgroupShare]

    @property
    def gradient_x_input(self) -> Tensor:
        """``(k, *x)``: each feature's share of each top point's score."""
        return self.attribution.gradient_x_input[0]

    @property
    def feature_totals(self) -> Tensor:
        """``sum_k |gradient x input|`` ``(*x)``: how much each feature carries over the top points."""
        return self.gradient_x_input.abs().sum(0)

    def feature_rank(self, feature: int) -> Tensor:
        """1-based rank ``(k,)`` of flat feature ``feature`` in each top point's attribution."""
        return self.attribution.rank(feature)[0]

    def aggregate_rank(self, feature: int) -> int:
        """1-based rank of flat feature ``feature`` in :attr:`feature_totals` (1 = carries the most)."""
        totals = self.feature_totals.reshape(-1)
        if not 0 <= feature < totals.numel():
            raise ConfigError(f"feature must lie in [0, {totals.numel()}), got {feature}")
        return int((totals > totals[feature]).sum()) + 1

    def summary(self) -> dict[str, Any]:
        return {
            "top_ids": self.top_ids.tolist(),
            "subgroups": {
                name: {**share.__dict__, "concentration": share.concentration}
                for name, share in self.subgroups.items()
            },
        }


def explain_prediction(
    influence: Influence,
    test: Any,
    *,
    subgroups: Mapping[str, Sequence[int] | Tensor] | None = None,
    top: int = 10,
    input: InputPath = 0,
    baseline: Tensor | float = 0.0,
    feature_names: Sequence[str] = (),
) -> PredictionExplanation:
    """Scores of every training example on one test example, each subgroup's share of them, and
    the attribution of the ``top`` most influential points' scores to their input features.

    Args:
        influence: a fitted :class:`Influence`.
        test: one test example (any data form, with a single example).
        subgroups: name -> ``(n,)`` boolean mask or training ids (e.g. a demographic, a source).
        top: number of training points (largest ``|score|``) whose features are attributed.
        input, baseline, feature_names: as for
            :meth:`~influencer.uses.perturbation.PerturbationInfluence.attribution` (``baseline``
            0: for standardised features, the average example; a 0/1 indicator then carries no
            share of a non-member's score).
    """
    directions = influence.test_directions(test)  # (1, p)
    if directions.shape[0] != 1:
        raise ConfigError(f"explain_prediction takes one test example, got {directions.shape[0]}")
    if top < 1:
        raise ConfigError(f"top must be >= 1, got {top}")
    scores = influence.scores_from_directions(directions)[0].cpu()  # (n,)
    top_ids = scores.abs().topk(min(top, len(scores))).indices
    attribution = PerturbationInfluence(influence, input=input).attribution_from_directions(
        directions, top_ids, baseline, feature_names
    )
    shares = {}
    for name, members in (subgroups or {}).items():
        mask = _members_mask(members, len(scores))
        shares[name] = SubgroupShare(
            int(mask.sum()), float(mask.double().mean()), float(influence_share(scores, mask))
        )
    return PredictionExplanation(scores, top_ids, attribution, shares)
