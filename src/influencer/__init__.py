"""influencer: explain a PyTorch model's predictions by its training data (influence functions).

Sign convention (see :mod:`influencer.scores`): a score is the predicted change of the test
measurement if the training example were removed; with the default measurement (the test loss),
positive = helpful, negative = harmful.
"""

from influencer.curvature import Curvature
from influencer.data import Examples, as_examples
from influencer.errors import (
    ConfigError,
    ConvergenceError,
    DataError,
    IndefiniteHessianError,
    InfluencerError,
    NonFiniteError,
    TaskError,
)
from influencer.estimators import CG, EKFAC, KFAC, Arnoldi, Estimator, Exact, Identity, LiSSA, Solver
from influencer.functional import ModelFunction
from influencer.group import group_influence, group_params
from influencer.influence import Influence
from influencer.kernels import RBFKernelModel
from influencer.losses import hinge, smooth_hinge
from influencer.mislabels import rank_for_review
from influencer.model_comparison import compare_models
from influencer.perturbation import FeatureAttribution, PerturbationInfluence, check_perturbation
from influencer.poisoning import PoisonConfig, PoisoningAttack
from influencer.scores import TopK, top_k
from influencer.task import ClassificationTask, RegressionTask, SmoothHingeTask, Task
from influencer.unlearning import ClassRemoval
from influencer.validation import leave_one_out

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
    "leave_one_out",
    "rank_for_review",
    "smooth_hinge",
    "top_k",
]
