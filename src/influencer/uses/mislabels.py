"""Finding mislabelled training data: which examples to check first.

Koh & Liang (2017, Sec. 5.4): a fraction of the training labels is wrong; a human can check (and
fix) only some of the examples. Which to check first? Rank them by

* ``self_influence``: the example's influence on its own loss, ``(1/n) grad loss_i^T H^-1 g_i``
  (>= 0; large = the model bends itself to fit this example, which a wrong label forces it to do);
* ``loss``: the training loss under the given label (large = the model disagrees with the label);
* ``random``: the order a reviewer without a model would use.

:func:`rank_for_review` ranks the training examples of an :class:`~influencer.influence.Influence`
(fitted, for self-influence). ``reproductions.mislabels.simulate_fixing`` reproduces the
paper's experiment (flip labels, rank, fix the top, retrain, measure test accuracy).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor

from influencer._kernel.errors import ConfigError
from influencer.influence import Influence

Strategy = Literal["self_influence", "loss", "random"]
STRATEGIES: tuple[Strategy, ...] = ("self_influence", "loss", "random")


def training_losses(influence: Influence) -> Tensor:
    """Per-example training loss ``(n,)`` (without the regulariser) at the trained parameters."""
    return influence.losses()


def review_scores(
    influence: Influence, strategy: Strategy, seed: int = 0, progress: bool | None = None
) -> Tensor:
    """Suspicion score ``(n,)`` of each training example; larger = check it earlier.

    Self-influence needs one inverse-HVP per training example (minutes on a large set): ``progress``
    shows a progress bar over the training chunks (default: the ``Influence``'s own setting).
    """
    if progress is not None and progress != influence.progress:
        influence = copy.copy(influence)  # the same fitted object, with its own progress setting
        influence.progress = progress
    if strategy == "self_influence":
        return influence.self_influence()
    if strategy == "loss":
        return training_losses(influence)
    if strategy == "random":
        return torch.rand(influence.n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")


def rank_for_review(
    influence: Influence, strategy: Strategy = "self_influence", seed: int = 0, progress: bool | None = None
) -> Tensor:
    """Training ids ``(n,)`` in the order to check them, most suspicious first (``progress``: see
    :func:`review_scores`)."""
    scores = review_scores(influence, strategy, seed, progress)
    if not torch.isfinite(scores).all():
        raise ConfigError(f"the {strategy} scores are not finite; check the model and the data")
    return torch.argsort(scores.cpu(), descending=True, stable=True)
