"""Refitting a model to the optimum of its objective on other training data, warm-started.

Every check of influence against reality needs the same thing: the parameters that training would
reach without some examples (leave-one-out, group removal, data models), with some inputs moved
(perturbation, poisoning) or with some labels changed (fixing mislabels). A :class:`Retrainer`
says how to get them::

    theta = retrainer.refit(influence, ids, start)     # (p,)

minimises ``J(theta) = mean_{i in ids} loss_i(theta) + Omega(theta)`` over the influence's chosen
parameters (the others stay fixed) on ``influence.train`` (use :meth:`Influence.replace` for other
data or another precision), starting from ``start`` (default the influence's parameters; pass a
fresh initialisation, e.g. from :meth:`Influence.parameters_of`, to retrain from scratch).

* :class:`LBFGSRetrainer`: full-batch L-BFGS polished by Newton steps, to the optimum of a convex
  objective (linear, logistic, smooth-hinge SVM with L2): then any gap between influence and
  retraining is the influence approximation's, not the optimiser's.
* :class:`AdamRetrainer`: minibatch Adam for a fixed number of epochs (networks).
* :class:`ChainedRetrainer`: one recipe after another, e.g. Adam from scratch, then L-BFGS to
  the nearest optimum (so the end point no longer depends on the minibatch order).

A retrainer's :meth:`~Retrainer.settings` describe it for cache keys, and
:meth:`~Retrainer.with_seed` gives the same recipe under another random seed (the minibatch order;
a deterministic recipe returns itself). :class:`~influencer.retraining_cache.CachedRetrainer` keeps
refits on disk.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from influencer._kernel.errors import ConfigError, ConvergenceError
from influencer._kernel.fingerprint import hash_tensors
from influencer._kernel.progress import progress_bar
from influencer.estimators import CG, Exact
from influencer.influence import Influence
from influencer.training import fit_lbfgs

Indices = Sequence[int] | Tensor | None


class Retrainer(ABC):
    """How to refit the model's chosen parameters on (a subset of) an influence's training data."""

    @abstractmethod
    def refit(self, influence: Influence, ids: Indices = None, start: Tensor | None = None) -> Tensor:
        """Parameters ``(p,)`` minimising the objective over training ``ids`` (default all).

        Starts from ``start`` ``(p,)`` (default ``influence.theta``); computes in the influence's
        device and dtype.
        """

    def settings(self) -> dict[str, Any]:
        """JSON-able description of the recipe: its class and its settings (for cache keys)."""
        kind = f"{type(self).__module__}.{type(self).__qualname__}"
        if not dataclasses.is_dataclass(self):
            return {"class": kind, "repr": repr(self)}
        fields = {}
        for f in dataclasses.fields(self):
            if f.init:
                value = getattr(self, f.name)
                fields[f.name] = value.settings() if isinstance(value, Retrainer) else value
        return {"class": kind, **fields}

    def with_seed(self, seed: int) -> Retrainer:
        """The same recipe with its randomness drawn from ``seed`` (a deterministic one: itself)."""
        return self

    @staticmethod
    def _start(influence: Influence, start: Tensor | None) -> Tensor:
        theta = influence.theta if start is None else start
        if theta.shape != (influence.p,):
            raise ConfigError(f"start must have shape ({influence.p},), got {tuple(theta.shape)}")
        return theta.detach().to(influence.device, influence.theta.dtype)


def _positive(name: str, value: float, integer: bool = False, zero: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        kind = "an integer" if integer else "a finite number"
        raise ConfigError(f"{name} must be {kind} {'>= 0' if zero else '> 0'}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LBFGSRetrainer(Retrainer):
    """To the optimum with full-batch L-BFGS, then Newton steps (see :func:`~influencer.training.fit_lbfgs`).

    A warm-started refit (``ids`` given) first takes cheap chord steps with a fixed inverse Hessian
    at ``start``: of the objective on all the training data of the first influence refitted from
    that start (``Exact`` up to ``exact_max_params`` parameters, else ``CG``), factorised once and
    reused for every refit from the same start, also on moved or relabelled data (it only
    preconditions: convergence is checked on the true gradient, and exact Newton-CG steps follow
    where the chord steps stall). A refit without ``ids`` uses Newton-CG steps only.

    Raises :class:`~influencer.errors.ConvergenceError` unless
    ``max |grad J| <= grad_tol * max(1, |J|)``. With ``newton_steps=0`` L-BFGS alone must
    reach ``grad_tol``; where it stalls, the fit is repeated with 5 Newton steps.
    """

    max_iter: int = 2000
    grad_tol: float = 1e-10
    newton_steps: int = 5
    exact_max_params: int = 5000
    batch_size: int = 4096
    # the last (influence, start) polish: one factorisation serves every refit from that start
    _polish: dict[str, Any] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _positive("max_iter", self.max_iter, integer=True)
        _positive("grad_tol", self.grad_tol)
        _positive("newton_steps", self.newton_steps, integer=True, zero=True)
        _positive("exact_max_params", self.exact_max_params, integer=True, zero=True)
        _positive("batch_size", self.batch_size, integer=True)

    def _inverse_hessian(self, influence: Influence, start: Tensor) -> Callable[[Tensor], Tensor]:
        key = f"{id(influence.fn)}:{hash_tensors(start)}"
        if self._polish.get("key") != key:
            estimator = Exact() if influence.p <= self.exact_max_params else CG(tol=1e-6)
            solver = influence.replace(theta=start, estimator=estimator, hessian_indices=None).fit().solver
            self._polish.clear()
            self._polish.update(key=key, solve=solver.solve)
        return self._polish["solve"]

    def refit(self, influence: Influence, ids: Indices = None, start: Tensor | None = None) -> Tensor:
        theta = self._start(influence, start)
        subset = ids is not None
        idx = influence.train.check_indices(ids)
        polish = self._inverse_hessian(influence, theta) if subset and self.newton_steps else None
        options = {"max_iter": self.max_iter, "grad_tol": self.grad_tol, "batch_size": self.batch_size}
        try:
            return fit_lbfgs(
                influence.fn, influence.train, idx, theta, newton_steps=self.newton_steps,
                inverse_hessian=polish, **options,
            )  # fmt: skip
        except ConvergenceError:
            if self.newton_steps:
                raise
            return fit_lbfgs(influence.fn, influence.train, idx, theta, newton_steps=5, **options)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamRetrainer(Retrainer):
    """``epochs`` passes of minibatch Adam on ``mean loss + Omega`` (networks).

    Each epoch visits ``ids`` in a fresh random order from a generator seeded with ``seed``, so a
    refit is reproducible; the model runs in evaluation mode, as influence defines it.
    """

    epochs: int = 30
    lr: float = 1e-2
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _positive("epochs", self.epochs, integer=True)
        _positive("lr", self.lr)
        _positive("batch_size", self.batch_size, integer=True)
        _positive("seed", self.seed, integer=True, zero=True)

    def with_seed(self, seed: int) -> AdamRetrainer:
        return dataclasses.replace(self, seed=seed)

    def refit(self, influence: Influence, ids: Indices = None, start: Tensor | None = None) -> Tensor:
        return self.trajectory(influence, ids, start, [self.epochs])[0]

    def trajectory(
        self,
        influence: Influence,
        ids: Indices = None,
        start: Tensor | None = None,
        epochs: Sequence[int] = (),
    ) -> list[Tensor]:
        """The parameters ``(p,)`` after each of ``epochs`` (1-based, increasing, at most
        ``self.epochs``) of the same run as :meth:`refit`: checkpoints along training, e.g. for
        :meth:`influencer.ensemble.Ensemble.from_checkpoints`."""
        wanted = [int(e) for e in epochs]
        if not wanted or wanted != sorted(set(wanted)) or wanted[0] < 1 or wanted[-1] > self.epochs:
            raise ConfigError(f"epochs must increase within 1..{self.epochs}, got {list(epochs)}")
        fn, data = influence.fn, influence.train
        idx = data.check_indices(ids)
        theta = self._start(influence, start).clone().requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for epoch in progress_bar(range(1, wanted[-1] + 1), "retraining", influence.progress, unit="epoch"):
            order = idx[torch.randperm(len(idx), generator=gen)]
            for chunk, batch in data.chunks(self.batch_size, order):
                objective = fn.objective(theta, fn.prepare(batch), 1.0 / len(chunk))  # mean loss + Omega
                opt.zero_grad()
                objective.backward()
                opt.step()
            if epoch in wanted:
                out.append(theta.detach().clone())
        return out


@dataclasses.dataclass(frozen=True)
class ChainedRetrainer(Retrainer):
    """Several recipes in turn, each starting where the previous one stopped.

    E.g. ``ChainedRetrainer((AdamRetrainer(epochs=60), LBFGSRetrainer(newton_steps=0)))``: a
    network trained from scratch with Adam, then brought to the nearest stationary point with
    L-BFGS, the recipe a model that influence is computed for is often trained with.
    """

    steps: tuple[Retrainer, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        if not self.steps or not all(isinstance(r, Retrainer) for r in self.steps):
            raise ConfigError(
                "ChainedRetrainer needs one or more Retrainer steps, e.g. (AdamRetrainer(), LBFGSRetrainer())"
            )

    def settings(self) -> dict[str, Any]:
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "steps": [r.settings() for r in self.steps],
        }

    def with_seed(self, seed: int) -> ChainedRetrainer:
        return ChainedRetrainer(tuple(r.with_seed(seed) for r in self.steps))

    def refit(self, influence: Influence, ids: Indices = None, start: Tensor | None = None) -> Tensor:
        theta = self._start(influence, start)
        for step in self.steps:
            theta = step.refit(influence, ids, theta)
        return theta
