"""A random-projection gradient store for influence at scale (TRAK / LoGra style).

Build once, query many times without ever forming the ``m x n`` score matrix::

    from influencer.index import GradientIndex, KroneckerProjector

    index = GradientIndex.build(inf, "runs/index", projector=KroneckerProjector(k_in=32, k_out=32))
    top = index.top_k(test, k=10)   # TopK, (m, 10); positive score = helpful

* :mod:`~influencer.index.projectors`: dense Gaussian / Rademacher projections (any parameters),
  ``IdentityProjector`` (exact gradients); :mod:`~influencer.index.kronecker`: the structured
  ``P_out ⊗ P_in`` projection of ``nn.Linear``/``nn.Conv2d`` layers, which never forms a gradient.
* :mod:`~influencer.index.gradient_index`: :class:`GradientIndex` (build, open, scores, top-k,
  self-influence), on the store of :mod:`~influencer.index.store`.
* :mod:`~influencer.index.preconditioners`: the projected Fisher (after projection), the
  influence's estimator, e.g. EK-FAC (before projection), or none.
* :mod:`~influencer.index.results`: checkpointed query results (:class:`QueryResult`).
* :mod:`~influencer.index.training`: :class:`TrainingStore`, stores collected during training from the
  training step's own backward pass; :mod:`~influencer.index.checkpoints`: :class:`CheckpointStores`,
  queries summed over checkpoints with their learning rates (TracIn); :mod:`~influencer.index.trainer`:
  the Hugging Face ``Trainer`` callback.
"""

from influencer.index.checkpoints import CheckpointStores
from influencer.index.gradient_index import GradientIndex
from influencer.index.kronecker import KroneckerProjector
from influencer.index.preconditioners import (
    EstimatorPreconditioner,
    NoPreconditioner,
    Preconditioner,
    ProjectedFisher,
)
from influencer.index.projectors import (
    GaussianProjector,
    IdentityProjector,
    Projection,
    Projector,
    RademacherProjector,
)
from influencer.index.registry import projector_from_settings
from influencer.index.results import QueryResult
from influencer.index.store import IndexStoreError
from influencer.index.training import TrainingStore, TrainingStoreSettings

__all__ = [
    "CheckpointStores",
    "EstimatorPreconditioner",
    "GaussianProjector",
    "GradientIndex",
    "IdentityProjector",
    "IndexStoreError",
    "KroneckerProjector",
    "NoPreconditioner",
    "Preconditioner",
    "ProjectedFisher",
    "Projection",
    "Projector",
    "QueryResult",
    "RademacherProjector",
    "TrainingStore",
    "TrainingStoreSettings",
    "projector_from_settings",
]
