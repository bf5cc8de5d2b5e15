"""Tasks: how a model turns a batch into per-example losses (see :class:`Task`).

Built-in: :class:`ClassificationTask` (cross-entropy), :class:`RegressionTask` (half squared
error), :class:`SmoothHingeTask` (binary SVM with a smooth hinge). Write your own by overriding
``loss``, or ``outputs`` + ``output_loss`` (which also enables the Gauss-Newton curvature).

Hugging Face ``transformers`` models (dict batches of padded token ids): :class:`SequenceClassificationTask`,
:class:`CausalLMTask`, :func:`per_token_examples` and, for ``peft`` adapters, :func:`adapter_parameters`
(see :mod:`influencer.tasks.huggingface`; transformers itself is not imported).
"""

from influencer._kernel.losses import hinge, smooth_hinge
from influencer._kernel.task import (
    Batch,
    ClassificationTask,
    DecayedTask,
    RegressionTask,
    SmoothHingeTask,
    Task,
    classes_from_outputs,
    l2_penalty,
    predictions,
)
from influencer.tasks.huggingface import (
    CausalLMTask,
    HuggingFaceTask,
    SequenceClassificationTask,
    adapter_parameters,
    per_token_examples,
)

__all__ = [
    "Batch",
    "CausalLMTask",
    "ClassificationTask",
    "DecayedTask",
    "HuggingFaceTask",
    "RegressionTask",
    "SequenceClassificationTask",
    "SmoothHingeTask",
    "Task",
    "adapter_parameters",
    "classes_from_outputs",
    "hinge",
    "l2_penalty",
    "per_token_examples",
    "predictions",
    "smooth_hinge",
]
