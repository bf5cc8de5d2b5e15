"""influencer: explain a PyTorch model's predictions by its training data (influence functions).

The public face: :class:`Influence`, :class:`Unrolled` (exact derivatives through the training
run), the built-in tasks, the inverse-Hessian estimators, :func:`choose_estimator` (the default one)
and :func:`top_k`. Everything else lives in a subpackage whose name says what it is:

* :mod:`influencer.tasks` (also Hugging Face adapters), :mod:`influencer.data`,
  :mod:`influencer.errors`, :mod:`influencer.estimators`, :mod:`influencer.samplers`,
  :mod:`influencer.layers`;
* :mod:`influencer.retraining`, :mod:`influencer.training`, :mod:`influencer.models`,
  :mod:`influencer.testing`;
* :mod:`influencer.uses`: the paper's uses as library methods, each taking an ``Influence``;
* :mod:`influencer.datasets`: the bundled real data sets; :mod:`influencer.plotting`: the figures;
* :mod:`influencer.app`: the ``influencer`` command.

Sign convention (stated once in :mod:`influencer._kernel.scores`): a score is the predicted change
of the test measurement if the training example were removed; with the default measurement (the
test loss), positive = helpful, negative = harmful.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names, imported on first use: `import influencer` (and the command line's --help) does not
# pay for torch until something needs it.
_LAZY = {
    "InfluencerError": "influencer._kernel.errors",
    "TopK": "influencer._kernel.scores",
    "top_k": "influencer._kernel.scores",
    "ClassificationTask": "influencer._kernel.task",
    "RegressionTask": "influencer._kernel.task",
    "SmoothHingeTask": "influencer._kernel.task",
    "Task": "influencer._kernel.task",
    "CG": "influencer.estimators",
    "EKFAC": "influencer.estimators",
    "KFAC": "influencer.estimators",
    "Arnoldi": "influencer.estimators",
    "BlockCG": "influencer.estimators",
    "Exact": "influencer.estimators",
    "ExactOrCG": "influencer.estimators",
    "Identity": "influencer.estimators",
    "LiSSA": "influencer.estimators",
    "Influence": "influencer.influence",
    "Choice": "influencer.estimators.auto",
    "choose_estimator": "influencer.estimators.auto",
    "Unrolled": "influencer.unrolled",
}

if TYPE_CHECKING:
    from influencer._kernel.errors import InfluencerError
    from influencer._kernel.scores import TopK, top_k
    from influencer._kernel.task import ClassificationTask, RegressionTask, SmoothHingeTask, Task
    from influencer.estimators import CG, EKFAC, KFAC, Arnoldi, BlockCG, Exact, ExactOrCG, Identity, LiSSA
    from influencer.estimators.auto import Choice, choose_estimator
    from influencer.influence import Influence
    from influencer.unrolled import Unrolled


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'influencer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "CG",
    "EKFAC",
    "KFAC",
    "Arnoldi",
    "BlockCG",
    "Choice",
    "ClassificationTask",
    "Exact",
    "ExactOrCG",
    "Identity",
    "Influence",
    "InfluencerError",
    "LiSSA",
    "RegressionTask",
    "SmoothHingeTask",
    "Task",
    "TopK",
    "Unrolled",
    "choose_estimator",
    "top_k",
]
