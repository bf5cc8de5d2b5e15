"""Debugging a domain mismatch: influence points at the few subgroup members and the subgroup feature."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from influencer.datasets import Split
from influencer.errors import ConfigError, DataError
from influencer.uses.debugging import explain_prediction, influence_share
from influencer.uses.perturbation import PerturbationInfluence
from reproductions.debugging import (
    MismatchDebugResult,
    debug_domain_mismatch,
    load_diabetes_subgroup,
    remove_subgroup_negatives,
)
from reproductions.fitting import fit_logistic

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def split() -> Split:
    return load_diabetes_subgroup(seed=0)


@pytest.fixture(scope="module")
def result(split: Split) -> MismatchDebugResult:
    return debug_domain_mismatch(split, keep=3, seed=0)


def test_data_has_a_real_age_subgroup(split: Split) -> None:
    assert split.feature_names[-1] == "age<30"
    column = torch.cat([split.x_train[:, -1], split.x_test[:, -1]])
    assert set(column.unique().tolist()) == {0.0, 1.0}
    assert 0.05 < float(column.mean()) < 0.15  # 44 of 442 patients are under 30
    assert split.x_train.shape == (332, 11) and split.x_test.shape == (110, 11)
    assert abs(float(split.x_train[:, :-1].mean())) < 1e-6  # standardised on the training part


def test_mismatch_causes_the_wrong_prediction(result: MismatchDebugResult) -> None:
    assert result.test_label == 0 and result.prediction == 1  # a low-progression young patient
    assert result.prediction_before == 0  # the full-data model got it right
    assert result.kept_negatives.sum() == 3
    assert result.subgroup.sum() == 17  # 14 high-progression young patients + 3 kept


def test_few_subgroup_members_dominate_the_influence(result: MismatchDebugResult) -> None:
    # 5% of the training set carries over a third of sum |score|; the 3 kept negatives (1%) a sixth.
    assert result.train_share == pytest.approx(17 / 312)
    assert result.influence_share > 6 * result.train_share
    assert result.kept_negative_influence_share > 10 * result.kept_negative_train_share
    # The mismatch multiplied the kept negatives' influence on this point.
    assert result.kept_negative_influence_share > 3 * result.kept_negative_influence_share_before
    # Signs: the kept negatives share the test label (helpful), the young positives oppose it.
    assert (result.scores[result.kept_negatives] > 0).all()
    positives = result.subgroup & ~result.kept_negatives
    assert (result.scores[positives] < 0).mean() > 0.8
    best = result.top_ids[0]
    assert result.kept_negatives[best] and result.scores[best] == result.scores.max()
    # The scores are right: removing each top point and retraining moves the test loss as predicted.
    assert set(result.loo_ids.tolist()) == set(result.top_ids.tolist())
    assert result.loo_pearson > 0.99
    assert (np.sign(result.loo_actual) == np.sign(result.scores[result.loo_ids])).all()
    # Every wrongly predicted subgroup negative shows the same concentration.
    assert (result.wrong_test_shares > 4 * result.train_share).all()


def test_attribution_points_at_the_subgroup_feature(result: MismatchDebugResult) -> None:
    assert result.aggregate_rank == 1
    assert result.subgroup_rank[0] == 1  # the most influential training point
    members = result.subgroup[result.top_ids]
    # Non-members have the indicator at its baseline 0, so it carries none of their score.
    assert (result.subgroup_rank[~members] == result.attribution.shape[1]).all()
    assert np.median(result.subgroup_rank[members]) <= 2


def test_summary_and_plot(result: MismatchDebugResult, tmp_path: Path) -> None:
    summary = result.summary()
    assert summary["subgroup_feature"] == "age<30"
    assert summary["kept_negatives_helpful"] == 3
    assert summary["concentration"] > summary["concentration_before"]
    png = result.plot(tmp_path / "debug.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_remove_subgroup_negatives_and_errors(split: Split) -> None:
    sub = split.x_train[:, -1] == 1
    kept, removed = remove_subgroup_negatives(split.y_train, sub, 0, keep=2, seed=1)
    negatives = int((sub & (split.y_train == 0)).sum())
    assert len(removed) == negatives - 2 and len(kept) + len(removed) == len(split.y_train)
    assert not set(kept.tolist()) & set(removed.tolist())
    assert int((sub[kept] & (split.y_train[kept] == 0)).sum()) == 2
    with pytest.raises(ConfigError, match="keep must lie"):
        remove_subgroup_negatives(split.y_train, sub, 0, keep=negatives)
    with pytest.raises(DataError, match="0/1 subgroup indicator"):
        debug_domain_mismatch(split, subgroup_feature=2)


def test_influence_share_by_hand() -> None:
    scores = torch.tensor([[1.0, -3.0, 0.0, 4.0], [2.0, 2.0, 0.0, 0.0]])
    expected = torch.tensor([7 / 8, 1 / 2])
    torch.testing.assert_close(influence_share(scores, [1, 3]), expected)
    torch.testing.assert_close(influence_share(scores, torch.tensor([False, True, False, True])), expected)
    assert float(influence_share(scores[0], torch.tensor([0]))) == pytest.approx(1 / 8)
    with pytest.raises(DataError, match="shape"):
        influence_share(scores, torch.tensor([True, False]))
    with pytest.raises(DataError, match=r"ids must lie in \[0, 4\)"):
        influence_share(scores, [4])
    with pytest.raises(DataError, match="every score"):
        influence_share(torch.zeros(1, 4), [0])


def test_explain_prediction_parts(split: Split) -> None:
    _, inf = fit_logistic(split.train, 2, 1e-3)
    test = (split.x_test[:1], split.y_test[:1])
    young = split.x_train[:, -1] == 1
    out = explain_prediction(inf, test, subgroups={"young": young}, top=5, feature_names=split.feature_names)
    scores = inf.scores(test)[0]
    torch.testing.assert_close(out.scores, scores)
    assert out.top_ids.tolist() == scores.abs().argsort(descending=True)[:5].tolist()
    share = out.subgroups["young"]
    assert share.size == int(young.sum()) and share.train_share == pytest.approx(float(young.double().mean()))
    assert share.influence_share == pytest.approx(float(scores.abs()[young].sum() / scores.abs().sum()))
    assert share.concentration == pytest.approx(share.influence_share / share.train_share)
    reference = PerturbationInfluence(inf).attribution(test, out.top_ids)
    torch.testing.assert_close(out.gradient_x_input, reference.gradient_x_input[0])
    totals = reference.gradient_x_input[0].abs().sum(0)  # (d,)
    order = totals.argsort(descending=True).tolist()
    assert [out.aggregate_rank(j) for j in order] == list(range(1, len(order) + 1))
    assert out.feature_rank(order[0]).tolist() == reference.rank(order[0])[0].tolist()
    with pytest.raises(ConfigError, match="one test example"):
        explain_prediction(inf, (split.x_test[:2], split.y_test[:2]))
