"""Refitting a model to the optimum of its objective on other training data, warm-started.

Every check of influence against reality needs the same thing: the parameters that training would
reach without some examples (leave-one-out, group removal, data models), with some inputs moved
(perturbation, poisoning) or with some labels changed (fixing mislabels). A :class:`Retrainer`
says how to get them::

    theta = retrainer.refit(influence, ids, start)     # (p,)

minimises ``J(theta) = mean_{i in ids} w_i (loss_i(theta) + Omega(theta))`` (data weights ``w``,
default all ones: ``refit(..., weights=w)``) over the influence's chosen
parameters (the others stay fixed) on ``influence.train`` (use :meth:`Influence.replace` for other
data or another precision), starting from ``start`` (default the influence's parameters; pass a
fresh initialisation, e.g. from :meth:`Influence.parameters_of`, to retrain from scratch).

* :class:`LBFGSRetrainer`: full-batch L-BFGS polished by Newton steps, to the optimum of a convex
  objective (linear, logistic, smooth-hinge SVM with L2): then any gap between influence and
  retraining is the influence approximation's, not the optimiser's.
* :class:`AdamRetrainer`, :class:`SGDRetrainer`: minibatch Adam or SGD for a fixed number of epochs
  (networks), with learning-rate schedules and weight decay. Both are stepwise recipes
  (:class:`StepwiseRetrainer`): fixed sequences of differentiable optimiser steps, which
  :class:`~influencer.unrolled.Unrolled` differentiates through.
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
from typing import Any, Literal

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
    def refit(
        self,
        influence: Influence,
        ids: Indices = None,
        start: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        """Parameters ``(p,)`` minimising the objective over training ``ids`` (default all).

        Starts from ``start`` ``(p,)`` (default ``influence.theta``); computes in the influence's
        device and dtype. ``weights`` ``(n,)``, by training id (default all ones), multiply each
        example's term ``loss_i + Omega``; a weight-0 example keeps its place in the data order.
        """

    def settings(self) -> dict[str, Any]:
        """JSON-able description of the recipe: its class and its settings (for cache keys)."""
        kind = f"{type(self).__module__}.{type(self).__qualname__}"
        if not dataclasses.is_dataclass(self):
            return {"class": kind, "repr": repr(self)}
        fields = {}
        for f in dataclasses.fields(self):
            # Settings added to a recipe later enter its key only when changed: old keys stay valid.
            if f.metadata.get("key_if_changed") and getattr(self, f.name) == f.default:
                continue
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

    A warm-started refit (``ids`` or data ``weights`` given) first takes cheap chord steps with a
    fixed inverse Hessian at ``start``: of the objective on all the training data of the first
    influence refitted from that start (``Exact`` up to ``exact_max_params`` parameters, else
    ``CG``), factorised once and reused for every refit from the same start, also on moved or
    relabelled data (it only preconditions: convergence is checked on the true gradient, and exact
    Newton-CG steps follow where the chord steps stall). A refit without either uses Newton-CG
    steps only.

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

    def refit(
        self,
        influence: Influence,
        ids: Indices = None,
        start: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        theta = self._start(influence, start)
        w = _weights(influence, weights)
        warm = ids is not None or w is not None  # near the start's optimum: chord steps first
        idx = influence.train.check_indices(ids)
        polish = self._inverse_hessian(influence, theta) if warm and self.newton_steps else None
        options = {"max_iter": self.max_iter, "grad_tol": self.grad_tol, "batch_size": self.batch_size}
        try:
            return fit_lbfgs(
                influence.fn, influence.train, idx, theta, newton_steps=self.newton_steps,
                inverse_hessian=polish, weights=w, **options,
            )  # fmt: skip
        except ConvergenceError:
            if self.newton_steps:
                raise
            return fit_lbfgs(influence.fn, influence.train, idx, theta, newton_steps=5, weights=w, **options)


Schedule = Literal["constant", "linear", "cosine"]
SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")
State = tuple[Tensor, ...]


class StepwiseRetrainer(Retrainer):
    """A recipe that is a fixed sequence of minibatch optimiser steps (SGD, Adam).

    Its run is a pure function of the start, the data weights and the seed: :meth:`plan` gives the
    training ids of every step (the data order), :meth:`initial_state` the optimiser state
    (parameters first), and :meth:`update` one step, written with differentiable tensor
    operations so that :class:`~influencer.unrolled.Unrolled` can differentiate through it. The
    objective of step ``t`` is ``(1/B_t) sum_{i in batch t} w_i (loss_i + Omega)``: a weight-0
    example keeps its slot (the other examples are visited at the same steps, in the same
    batches, divided by the same ``B_t``), so "the same run without these examples" is defined.
    """

    epochs: int
    lr: float
    batch_size: int
    seed: int
    weight_decay: float
    schedule: Schedule
    warmup: int

    def _check_common(self) -> None:
        _positive("epochs", self.epochs, integer=True)
        _positive("lr", self.lr)
        _positive("batch_size", self.batch_size, integer=True)
        _positive("seed", self.seed, integer=True, zero=True)
        _positive("weight_decay", self.weight_decay, zero=True)
        _positive("warmup", self.warmup, integer=True, zero=True)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    def with_seed(self, seed: int) -> StepwiseRetrainer:
        return dataclasses.replace(self, seed=seed)  # type: ignore[type-var]

    def plan(self, ids: Tensor) -> list[Tensor]:
        """The training ids of every step, in order: each epoch a fresh permutation of ``ids``
        (from a generator seeded with ``seed``) cut into batches of ``batch_size``."""
        gen = torch.Generator().manual_seed(self.seed)
        steps = []
        for _ in range(self.epochs):
            order = ids[torch.randperm(len(ids), generator=gen)]
            steps.extend(order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size))
        return steps

    def learning_rate(self, step: int, total: int) -> float:
        """The learning rate of ``step`` (0-based) of ``total``: linear warmup, then the schedule."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        done = (step - self.warmup) / max(total - self.warmup, 1)
        if self.schedule == "linear":
            return self.lr * (1.0 - done)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * done))
        return self.lr

    @abstractmethod
    def initial_state(self, theta: Tensor) -> State:
        """The optimiser state before the first step: ``(theta, *buffers)``, each ``(p,)``."""

    @abstractmethod
    def update(self, state: State, grad: Tensor, step: int, total: int) -> State:
        """The state after ``step`` (0-based, of ``total``) given the objective's gradient ``(p,)``.

        Pure and differentiable in ``state`` and ``grad`` (no in-place changes).
        """

    def refit(
        self,
        influence: Influence,
        ids: Indices = None,
        start: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        return self.run(influence, ids, start, weights)[0]

    def run(
        self,
        influence: Influence,
        ids: Indices = None,
        start: Tensor | None = None,
        weights: Tensor | None = None,
        keep: Sequence[int] = (),
        on_state: Callable[[int, State], None] | None = None,
    ) -> list[Tensor]:
        """The parameters ``(p,)`` after each number of steps in ``keep`` (0 ... total).

        ``on_state(t, state)`` is called with the optimiser state before every step ``t`` and
        after the last one (``t = total``); :class:`~influencer.unrolled.Unrolled` keeps its
        checkpoints this way, from the very computation that :meth:`refit` does.
        """
        fn, data = influence.fn, influence.train
        idx = data.check_indices(ids)
        w = _weights(influence, weights)
        plan = self.plan(idx)
        wanted = set(int(k) for k in keep)
        state = self.initial_state(self._start(influence, start))
        out: dict[int, Tensor] = {}
        steps = progress_bar(range(len(plan)), "training", influence.progress, total=len(plan), unit="step")
        for t in steps:
            if on_state is not None:
                on_state(t, state)
            if t in wanted:
                out[t] = state[0]
            g = step_gradient(fn, state[0], fn.prepare(data.take(plan[t])), w, plan[t])
            state = self.update(state, g, t, len(plan))
        if on_state is not None:
            on_state(len(plan), state)
        out[len(plan)] = state[0]
        return [out[k] for k in sorted(wanted)] if wanted else [state[0]]

    def steps_per_epoch(self, n: int) -> int:
        """Optimiser steps per epoch on ``n`` training examples."""
        return -(-n // self.batch_size)

    def trajectory(
        self,
        influence: Influence,
        ids: Indices = None,
        start: Tensor | None = None,
        epochs: Sequence[int] = (),
        weights: Tensor | None = None,
    ) -> list[Tensor]:
        """The parameters ``(p,)`` after each of ``epochs`` (1-based, increasing, at most
        ``self.epochs``) of the same run as :meth:`refit`: checkpoints along training, e.g. for
        :meth:`influencer.ensemble.Ensemble.from_checkpoints`."""
        wanted = [int(e) for e in epochs]
        if not wanted or wanted != sorted(set(wanted)) or wanted[0] < 1 or wanted[-1] > self.epochs:
            raise ConfigError(f"epochs must increase within 1..{self.epochs}, got {list(epochs)}")
        per = self.steps_per_epoch(len(influence.train.check_indices(ids)))
        return self.run(influence, ids, start, weights, [e * per for e in wanted])


def _weights(influence: Influence, weights: Tensor | None) -> Tensor | None:
    """Data weights ``(n,)`` by training id, checked, in the influence's dtype (None: all ones)."""
    if weights is None:
        return None
    w = torch.as_tensor(weights).detach()
    if w.shape != (influence.n,) or not w.is_floating_point() or not bool(torch.isfinite(w).all()):
        raise ConfigError(
            f"weights must be finite floats of shape ({influence.n},), one per training example, got "
            f"{tuple(w.shape)} {w.dtype}"
        )
    return w.to(influence.device, influence.theta.dtype)


def step_gradient(fn: Any, theta: Tensor, batch: Any, weights: Tensor | None, ids: Tensor) -> Tensor:
    """Gradient ``(p,)`` of one step's objective ``(1/B) sum_b w_b (loss_b + Omega)`` at ``theta``.

    ``weights`` ``(n,)`` by training id (None: all ones, computed without them).
    """
    w = None if weights is None else weights[ids.to(weights.device)]
    return torch.func.grad(lambda t: fn.objective(t, batch, 1.0 / len(ids), w))(theta)


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` with a zero derivative at 0 instead of infinity: a second moment
    that is exactly 0 belongs to a parameter no gradient has reached, which a cotangent cannot move."""
    positive = x > 0
    root = torch.sqrt(torch.where(positive, x, torch.ones_like(x)))
    return torch.where(positive, root, torch.zeros_like(x))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SGDRetrainer(StepwiseRetrainer):
    """``epochs`` passes of minibatch SGD (heavy-ball ``momentum`` as ``torch.optim.SGD``) on
    ``w``-weighted ``mean loss + Omega``; ``weight_decay`` adds ``weight_decay * theta`` to every
    gradient (on top of the task's regulariser), the learning rate follows ``schedule`` after
    ``warmup`` steps of linear warmup. Batches as :class:`AdamRetrainer`'s."""

    epochs: int = 30
    lr: float = 1e-2
    batch_size: int = 64
    momentum: float = 0.0
    seed: int = 0
    weight_decay: float = 0.0
    schedule: Schedule = "constant"
    warmup: int = 0

    def __post_init__(self) -> None:
        self._check_common()
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")

    def initial_state(self, theta: Tensor) -> State:
        return (theta,) if self.momentum == 0 else (theta, torch.zeros_like(theta))

    def update(self, state: State, grad: Tensor, step: int, total: int) -> State:
        lr = self.learning_rate(step, total)
        if self.weight_decay:
            grad = grad.add(state[0], alpha=self.weight_decay)
        if self.momentum == 0:
            return (state[0].add(grad, alpha=-lr),)
        buf = grad if step == 0 else state[1].mul(self.momentum).add(grad)
        return state[0].add(buf, alpha=-lr), buf


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamRetrainer(StepwiseRetrainer):
    """``epochs`` passes of minibatch Adam on ``w``-weighted ``mean loss + Omega`` (networks).

    Each epoch visits ``ids`` in a fresh random order from a generator seeded with ``seed``, so a
    refit is reproducible; the model runs in evaluation mode, as influence defines it. The update
    is ``torch.optim.Adam``'s (``betas``, ``eps``; ``weight_decay`` coupled, added to the
    gradient), computed by the same operations; the learning rate follows ``schedule``.
    """

    epochs: int = 30
    lr: float = 1e-2
    batch_size: int = 64
    seed: int = 0
    betas: tuple[float, float] = dataclasses.field(default=(0.9, 0.999), metadata={"key_if_changed": True})
    eps: float = dataclasses.field(default=1e-8, metadata={"key_if_changed": True})
    weight_decay: float = dataclasses.field(default=0.0, metadata={"key_if_changed": True})
    schedule: Schedule = dataclasses.field(default="constant", metadata={"key_if_changed": True})
    warmup: int = dataclasses.field(default=0, metadata={"key_if_changed": True})

    def __post_init__(self) -> None:
        self._check_common()
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        _positive("eps", self.eps)

    def initial_state(self, theta: Tensor) -> State:
        return theta, torch.zeros_like(theta), torch.zeros_like(theta)

    def update(self, state: State, grad: Tensor, step: int, total: int) -> State:
        theta, m, v = state
        beta1, beta2 = self.betas
        if self.weight_decay:
            grad = grad.add(theta, alpha=self.weight_decay)
        # The operations of torch.optim.Adam's single-tensor step, out of place: the same bits.
        m = torch.lerp(m, grad, 1 - beta1)
        v = torch.addcmul(v.mul(beta2), grad, grad, value=1 - beta2)
        count = step + 1
        step_size = self.learning_rate(step, total) / (1 - beta1**count)
        denom = (_safe_sqrt(v) / (1 - beta2**count) ** 0.5).add(self.eps)
        return torch.addcdiv(theta, m, denom, value=-step_size), m, v


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

    def refit(
        self,
        influence: Influence,
        ids: Indices = None,
        start: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        theta = self._start(influence, start)
        for step in self.steps:
            theta = step.refit(influence, ids, theta, weights)
        return theta
