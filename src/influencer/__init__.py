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
from influencer.influence import Influence
from influencer.losses import hinge, smooth_hinge
from influencer.scores import TopK, top_k
from influencer.task import ClassificationTask, RegressionTask, SmoothHingeTask, Task

__version__ = "0.1.0"

__all__ = [
    "CG",
    "EKFAC",
    "KFAC",
    "Arnoldi",
    "ClassificationTask",
    "ConfigError",
    "ConvergenceError",
    "Curvature",
    "DataError",
    "Estimator",
    "Exact",
    "Examples",
    "Identity",
    "IndefiniteHessianError",
    "Influence",
    "InfluencerError",
    "LiSSA",
    "ModelFunction",
    "NonFiniteError",
    "RegressionTask",
    "SmoothHingeTask",
    "Solver",
    "Task",
    "TaskError",
    "TopK",
    "as_examples",
    "hinge",
    "smooth_hinge",
    "top_k",
]
