"""influencer: explain a PyTorch model's predictions by its training data (influence functions).

The public face: :class:`Influence`, :class:`Unrolled` (exact derivatives through the
training run), the built-in tasks, the inverse-Hessian estimators and
:func:`top_k`. Everything else lives in a subpackage whose name says what it is:

* :mod:`influencer.tasks` (also Hugging Face adapters), :mod:`influencer.data`,
  :mod:`influencer.errors`, :mod:`influencer.estimators`, :mod:`influencer.samplers`;
* :mod:`influencer.retraining`, :mod:`influencer.training`, :mod:`influencer.models`,
  :mod:`influencer.testing`;
* :mod:`influencer.uses`: the paper's uses as library methods, each taking an ``Influence``;
* :mod:`influencer.paper`: the reproductions (data sets, simulations, figures);
* :mod:`influencer.app`: the ``influencer`` command.

Sign convention (stated once in :mod:`influencer._kernel.scores`): a score is the predicted change
of the test measurement if the training example were removed; with the default measurement (the
test loss), positive = helpful, negative = harmful.
"""

from influencer._kernel.errors import InfluencerError
from influencer._kernel.scores import TopK, top_k
from influencer._kernel.task import ClassificationTask, RegressionTask, SmoothHingeTask, Task
from influencer.estimators import CG, EKFAC, KFAC, Arnoldi, BlockCG, Exact, Identity, LiSSA
from influencer.influence import Influence
from influencer.unrolled import Unrolled

__version__ = "0.1.0"

__all__ = [
    "CG",
    "EKFAC",
    "KFAC",
    "Arnoldi",
    "BlockCG",
    "ClassificationTask",
    "Exact",
    "Identity",
    "Influence",
    "InfluencerError",
    "LiSSA",
    "RegressionTask",
    "SmoothHingeTask",
    "Task",
    "TopK",
    "Unrolled",
    "top_k",
]
