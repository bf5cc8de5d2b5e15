"""Tasks: how a model turns a batch into per-example losses (see :class:`Task`).

Built-in: :class:`ClassificationTask` (cross-entropy), :class:`RegressionTask` (half squared
error), :class:`SmoothHingeTask` (binary SVM with a smooth hinge). Write your own by overriding
``loss``, or ``outputs`` + ``output_loss`` (which also enables the Gauss-Newton curvature).
"""

from influencer._kernel.losses import hinge, smooth_hinge
from influencer._kernel.task import (
    Batch,
    ClassificationTask,
    RegressionTask,
    SmoothHingeTask,
    Task,
    classes_from_outputs,
    l2_penalty,
    predictions,
)

__all__ = [
    "Batch",
    "ClassificationTask",
    "RegressionTask",
    "SmoothHingeTask",
    "Task",
    "classes_from_outputs",
    "hinge",
    "l2_penalty",
    "predictions",
    "smooth_hinge",
]
