"""The paper's uses of influence as library methods; each takes a fitted :class:`~influencer.Influence`.

=====================================  ========================================================
question                               API
=====================================  ========================================================
Does influence predict retraining?     :func:`leave_one_out`, :func:`lds` (:mod:`.validation`)
Why is this prediction what it is?     :func:`explain_prediction`, :func:`influence_share`
Which features of a training point?    :class:`PerturbationInfluence` (I_pert), feature attribution
Which labels are wrong?                :func:`rank_for_review` (self-influence, loss, random)
Can a few training images flip it?     :class:`PoisoningAttack`
How do two models use their data?      :func:`compare_models`
What if a whole group is removed?      :func:`group_influence`, :func:`group_params`
Forget a class                         :class:`ClassRemoval`
=====================================  ========================================================
"""

from influencer.uses.comparison import ModelComparison, compare_models
from influencer.uses.debugging import PredictionExplanation, explain_prediction, influence_share
from influencer.uses.group import (
    GroupInfluence,
    GroupParams,
    group_influence,
    group_params,
    retrain_without_groups,
)
from influencer.uses.mislabels import rank_for_review, review_scores
from influencer.uses.perturbation import FeatureAttribution, PerturbationInfluence
from influencer.uses.poisoning import PoisonConfig, PoisoningAttack, PoisonResult
from influencer.uses.unlearning import ClassRemoval, ForgetMetrics, forget_metrics
from influencer.uses.validation import (
    DampingChoice,
    LDSResult,
    LOOResult,
    choose_damping,
    lds,
    leave_one_out,
    retrain_on_subsets,
)

__all__ = [
    "ClassRemoval",
    "DampingChoice",
    "FeatureAttribution",
    "ForgetMetrics",
    "GroupInfluence",
    "GroupParams",
    "LDSResult",
    "LOOResult",
    "ModelComparison",
    "PerturbationInfluence",
    "PoisonConfig",
    "PoisonResult",
    "PoisoningAttack",
    "PredictionExplanation",
    "choose_damping",
    "compare_models",
    "explain_prediction",
    "forget_metrics",
    "group_influence",
    "group_params",
    "influence_share",
    "lds",
    "leave_one_out",
    "rank_for_review",
    "retrain_on_subsets",
    "retrain_without_groups",
    "review_scores",
]
