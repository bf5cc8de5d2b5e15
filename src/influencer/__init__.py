"""influencer: explain a PyTorch model's predictions by its training data (influence functions).

Sign convention (see :mod:`influencer._kernel.scores`): a score is the predicted change of the test
measurement if the training example were removed; with the default measurement (the test loss),
positive = helpful, negative = harmful.
"""

from influencer._kernel.curvature import Curvature
from influencer._kernel.data import Examples, as_examples
from influencer._kernel.errors import (
    ConfigError,
    ConvergenceError,
    DataError,
    IndefiniteHessianError,
    InfluencerError,
    NonFiniteError,
    TaskError,
)
from influencer._kernel.functional import ModelFunction
from influencer._kernel.losses import hinge, smooth_hinge
from influencer._kernel.scores import TopK, top_k
from influencer._kernel.task import ClassificationTask, RegressionTask, SmoothHingeTask, Task
from influencer.ensemble import Ensemble
from influencer.estimators import CG, EKFAC, KFAC, Arnoldi, Estimator, Exact, Identity, LiSSA, Solver
from influencer.influence import Influence
from influencer.models.kernels import RBFKernelModel
from influencer.paper.perturbation import check_perturbation
from influencer.uses.comparison import compare_models
from influencer.uses.group import group_influence, group_params
from influencer.uses.mislabels import rank_for_review
from influencer.uses.perturbation import FeatureAttribution, PerturbationInfluence
from influencer.uses.poisoning import PoisonConfig, PoisoningAttack
from influencer.uses.unlearning import ClassRemoval
from influencer.uses.validation import lds, leave_one_out

__version__ = "0.1.0"

__all__ = [
    "CG",
    "EKFAC",
    "KFAC",
    "Arnoldi",
    "ClassRemoval",
    "ClassificationTask",
    "ConfigError",
    "ConvergenceError",
    "Curvature",
    "DataError",
    "Ensemble",
    "Estimator",
    "Exact",
    "Examples",
    "FeatureAttribution",
    "Identity",
    "IndefiniteHessianError",
    "Influence",
    "InfluencerError",
    "LiSSA",
    "ModelFunction",
    "NonFiniteError",
    "PerturbationInfluence",
    "PoisonConfig",
    "PoisoningAttack",
    "RBFKernelModel",
    "RegressionTask",
    "SmoothHingeTask",
    "Solver",
    "Task",
    "TaskError",
    "TopK",
    "as_examples",
    "check_perturbation",
    "compare_models",
    "group_influence",
    "group_params",
    "hinge",
    "lds",
    "leave_one_out",
    "rank_for_review",
    "smooth_hinge",
    "top_k",
]
