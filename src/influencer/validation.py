"""Faithfulness checks against real retraining, under one short name.

The same functions as :mod:`influencer.uses.validation` (where they are documented): leave-one-out
retraining (:func:`leave_one_out`), the linear datamodeling score over random subsets (:func:`lds`,
with :func:`retrain_on_subsets` and :func:`linear_datamodeling_score` to score several methods on
one set of refits), and damping chosen by that score (:func:`choose_damping`)::

    from influencer.validation import lds
    result = lds(inf, test, subsets=50, retrain=AdamRetrainer(), start=make_model, seeds=(0, 1))
    print(result.mean, result.interval)

    # the same run re-weighted: 10% of the examples down-weighted by 0.001 (eps=1: removed)
    lds(inf, test, scores=unrolled.scores(test), retrain=recipe, start=init, alpha=0.9,
        setting="single-model", eps=1e-3)
"""

from influencer.uses.validation import (
    DampingChoice,
    LDSResult,
    LOOResult,
    SubsetRetraining,
    choose_damping,
    curvature_scale,
    draw_subsets,
    lds,
    leave_one_out,
    linear_datamodeling_score,
    retrain_on_subsets,
)

__all__ = [
    "DampingChoice",
    "LDSResult",
    "LOOResult",
    "SubsetRetraining",
    "choose_damping",
    "curvature_scale",
    "draw_subsets",
    "lds",
    "leave_one_out",
    "linear_datamodeling_score",
    "retrain_on_subsets",
]
