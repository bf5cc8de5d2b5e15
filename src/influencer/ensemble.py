"""Influence averaged over several models of the same training data: an ensemble.

A network's influence depends on which of its many minima training reached: the same recipe from
another random initialisation gives other scores, and retraining without some examples moves the
model to yet another minimum. Averaging the scores of ``K`` independently trained models (as TRAK
does, Park et al. 2023), or of checkpoints along one training run (as TracIn does, Pruthi et al.
2020), estimates the *expected* effect of removing an example over that randomness, which is what
retraining measures on average::

    members = [Influence(model_k, task, train, estimator=EKFAC()) for model_k in models]
    ens = Ensemble(members).fit()
    s = ens.scores(test)                       # (m, n): the weighted mean of the members' scores

    ens = Ensemble.from_checkpoints(inf, [theta_1, theta_2, theta_3])   # other parameters (p,) each

Every member must be built on the same training data (the same ids); the scores keep the library's
sign convention and scale (:mod:`influencer._kernel.scores`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

from influencer._kernel.errors import ConfigError, DataError
from influencer._kernel.progress import progress_bar
from influencer.influence import Influence

Indices = Sequence[int] | Tensor | None


class Ensemble:
    """The weighted mean of several :class:`~influencer.influence.Influence` objects' results.

    Args:
        members: influence objects of models trained on the same training data (fitted or not).
        weights: one non-negative weight per member (default equal); normalised to sum to 1.
    """

    def __init__(self, members: Sequence[Influence], weights: Sequence[float] | None = None) -> None:
        members = list(members)
        if not members:
            raise ConfigError("an Ensemble needs at least one Influence member")
        bad = [type(m).__name__ for m in members if not isinstance(m, Influence)]
        if bad:
            raise ConfigError(
                f"Ensemble members must be Influence objects, got {', '.join(sorted(set(bad)))}"
            )
        first = members[0].settings()["gradients"]["train"]
        for k, member in enumerate(members[1:], 1):
            if member.settings()["gradients"]["train"] != first:
                raise DataError(
                    f"Ensemble member {k} has other training data than member 0 (n = {member.n} vs "
                    f"{members[0].n}, or other examples/order); every member must score the same training ids"
                )
        if weights is None:
            w = [1.0] * len(members)
        else:
            w = [float(x) for x in weights]
            if len(w) != len(members):
                raise ConfigError(f"Ensemble got {len(w)} weights for {len(members)} members")
            if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
                raise ConfigError(f"Ensemble weights must be finite, >= 0 and not all 0, got {w}")
        total = sum(w)
        self.members = members
        self.weights = tuple(x / total for x in w)
        self.progress = members[0].progress

    @classmethod
    def from_checkpoints(
        cls, influence: Influence, thetas: Sequence[Tensor] | Tensor, weights: Sequence[float] | None = None
    ) -> Ensemble:
        """Members at other parameters ``(p,)`` of ``influence``'s model (checkpoints, other seeds).

        ``thetas`` is a sequence of ``(p,)`` tensors or one ``(K, p)`` tensor, e.g. from
        :meth:`Influence.parameters_of` of independently trained copies of the model; each member
        keeps ``influence``'s estimator, curvature and settings.
        """
        rows = list(thetas.unbind(0)) if isinstance(thetas, Tensor) else list(thetas)
        return cls([influence.replace(theta=t) for t in rows], weights)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def n(self) -> int:
        """Number of training examples (the same for every member)."""
        return self.members[0].n

    def fit(self) -> Ensemble:
        """Fit every member that is not fitted yet."""
        for member in progress_bar(self.members, "ensemble members", self.progress and len(self) > 1):
            if member.curvature is None:
                member.fit()
        return self

    def settings(self) -> dict[str, Any]:
        """JSON-able: every member's :meth:`Influence.settings` and the weights (for cache keys)."""
        return {"members": [m.settings() for m in self.members], "weights": list(self.weights)}

    def _mean(self, results: Iterable[Tensor]) -> Tensor:
        out = None  # a running sum: one member's result in memory at a time
        for w, r in zip(self.weights, results, strict=True):
            r = r.to(self.members[0].theta)
            out = w * r if out is None else out.add_(r, alpha=w)
        assert out is not None
        return out

    def scores(self, test: Any, train_indices: Indices = None) -> Tensor:
        """Removal scores ``(m, c)``: the weighted mean of the members' (positive = helpful)."""
        return self._mean(m.scores(test, train_indices) for m in self._fitted())

    def self_influence(self, indices: Indices = None) -> Tensor:
        """Self-influence ``(c,)``: the weighted mean of the members'."""
        return self._mean(m.self_influence(indices) for m in self._fitted())

    def _fitted(self) -> list[Influence]:
        if any(m.curvature is None for m in self.members):
            raise ConfigError("call fit() on the Ensemble (or on every member) before computing influence")
        return self.members
