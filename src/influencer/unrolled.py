"""Unrolled attribution: exact derivatives of a test measurement through the training run.

Influence functions answer "what if this example were removed?" by assuming training reached an
exact optimum. :class:`Unrolled` drops that assumption: it differentiates the test measurement
``f(theta_T)`` through every step of the training run itself (the metagradient of MAGIC / REPLAY,
Ilyas & Engstrom 2025), with respect to each training example's data weight ``w_i``::

    unrolled = Unrolled(model, task, train, recipe=AdamRetrainer(epochs=30, lr=1e-3), start=init)
    unrolled.fit()                         # replays the recipe from start; refuses another model
    s = unrolled.scores(test)              # (m, n) = -d f(test) / d w_i, positive = helpful

Every step ``t`` of a :class:`~influencer.retraining.StepwiseRetrainer` maps the optimiser state
``s_t = (theta_t, *buffers)`` (Adam: both moments; SGD: the momentum) and the weights of its batch
to ``s_{t+1}``; the objective of the step is ``(1/B_t) sum_b w_b (loss_b + Omega)``. The reverse
pass carries a cotangent of the full state back from ``(grad f(theta_T), 0, ...)`` and collects, at
every step, the derivative with respect to the weights of that step's batch. The cotangents of a
block of test examples travel together (one batched backward pass per step, vmapped over the
cotangents), so one reverse pass serves ``test_batch`` test examples.

**Scores and sign.** ``score_ij = -d f(test_j) / d w_i`` at ``w = 1``: removing example ``i`` is
``dw_i = -1``, so the score is the first-order predicted change of ``f`` if ``i`` were removed from
the run (same order, same batches otherwise), the convention of :mod:`influencer._kernel.scores`.
For full-batch gradient descent run to the optimum of a convex objective it equals the influence
function ``(1/n) grad f^T H^-1 g_i`` of :class:`~influencer.Influence`.

**Memory.** Checkpoint and recompute in segments of ``K = ceil(sqrt(T))`` steps (``segment``):
:meth:`Unrolled.fit` keeps the state at every ``K``-th step of its replay; the reverse pass
recomputes one segment's ``K`` steps from its checkpoint with their autograd graphs kept, then
walks back through them, freeing each graph as it goes. At most ``ceil(T / K)`` checkpoints and
``K`` recomputed steps (a state and one step's graph each: the batch's activations and a few
``(p,)`` tensors) are held, about ``2 sqrt(T)``, never ``T``; plus the cotangents, ``test_batch``
times one state. Cost per block of test examples: the run's forward pass once more (with graphs)
and one batched backward pass per step.

**How far it extrapolates.** The derivative is exact for infinitesimal re-weightings; removing
whole examples is a finite step, as accurate as training is smooth in the weights.
:meth:`Unrolled.extrapolation` measures that with a few real re-weighted replays.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from influencer._kernel.errors import ConfigError, DataError
from influencer._kernel.progress import progress_bar
from influencer._kernel.scores import TopK, top_k
from influencer._kernel.stats import pearson
from influencer._kernel.task import Task
from influencer.estimators import Identity
from influencer.influence import Influence
from influencer.retraining import State, StepwiseRetrainer

# Slopes of the actual on the predicted change inside this band count as "within reach".
REACH_BAND = (0.5, 2.0)


@dataclass(frozen=True)
class ReverseStats:
    """The checkpointing of the last reverse pass: ``checkpoints`` states kept by :meth:`Unrolled.fit`
    (one per ``segment`` steps of ``steps``), and the most held at once during the pass, counting
    each recomputed step of the current segment (its state and autograd graph) as one."""

    steps: int
    segment: int
    checkpoints: int
    max_states_held: int


@dataclass(frozen=True)
class Extrapolation:
    """Actual against predicted change of the test measurements under real re-weighted replays.

    For each strength ``eps`` the same ``subsets`` random sets of ``fraction`` of the training
    examples are re-weighted to ``1 - eps`` (``eps = 1``: removed) and the run is replayed;
    ``slopes[k]`` is the least-squares slope (through 0) of the actual change on the predicted
    one, ``eps * sum_{i in S} score_i``, over every test example and subset, and
    ``correlations[k]`` their Pearson correlation. A slope near 1 with a high correlation means the
    scores predict that re-weighting; ``reach`` is the largest strength that does.
    """

    fraction: float
    strengths: tuple[float, ...]
    slopes: tuple[float, ...]
    correlations: tuple[float, ...]
    subsets: int
    predicted: np.ndarray  # (strengths, subsets, m)
    actual: np.ndarray  # (strengths, subsets, m)

    @property
    def reach(self) -> float | None:
        """The largest strength whose slope lies in ``REACH_BAND`` with correlation >= 0.5."""
        ok = [
            e for e, s, c in zip(self.strengths, self.slopes, self.correlations, strict=True)
            if REACH_BAND[0] <= s <= REACH_BAND[1] and c >= 0.5
        ]  # fmt: skip
        return max(ok) if ok else None

    @property
    def removals_in_reach(self) -> bool:
        """Whether full removal (strength 1, when measured) is predicted."""
        return self.reach is not None and self.reach >= 1.0

    def summary(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "subsets": self.subsets,
            "strengths": list(self.strengths),
            "slopes": list(self.slopes),
            "correlations": list(self.correlations),
            "reach": self.reach,
            "removals_in_reach": self.removals_in_reach,
        }


class Unrolled:
    """Exact metagradient attribution of ``model``, trained by ``recipe`` from ``start`` on ``train``.

    Args:
        model: the trained ``nn.Module`` (its weights are never modified).
        task: per-example loss, measurement and regulariser, as for :class:`~influencer.Influence`.
        train: the training data, in the order that defines training ids (and the recipe's batches).
        recipe: the :class:`~influencer.retraining.StepwiseRetrainer` (``AdamRetrainer``,
            ``SGDRetrainer``) that trained the model, with its seed.
        start: the initial model (an ``nn.Module`` of the same architecture) or its chosen
            parameters ``(p,)``.
        params, device, dtype: as for :class:`~influencer.Influence`.
        tolerance: :meth:`fit` refuses a model whose parameters differ from the replay's by more
            than ``tolerance * max(1, max |theta|)`` in any entry.
        segment: steps per checkpoint segment (default ``ceil(sqrt(T))`` for ``T`` steps).
        test_batch: test examples per reverse pass (their cotangents travel together).
        progress: progress bars for the replay and the reverse passes.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train: Any,
        *,
        recipe: StepwiseRetrainer,
        start: nn.Module | Tensor,
        params: Sequence[str] | str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        tolerance: float = 1e-4,
        segment: int | None = None,
        test_batch: int = 64,
        progress: bool = False,
    ) -> None:
        if not isinstance(recipe, StepwiseRetrainer):
            raise ConfigError(
                f"recipe must be a stepwise recipe (influencer.retraining.AdamRetrainer or SGDRetrainer), "
                f"got {type(recipe).__name__}: unrolling needs the run's individual steps"
            )
        if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
            raise ConfigError(f"tolerance must be a finite number > 0, got {tolerance!r}")
        if segment is not None and not (isinstance(segment, int) and segment >= 1):
            raise ConfigError(f"segment must be an integer >= 1 or None (sqrt of the steps), got {segment!r}")
        if not (isinstance(test_batch, int) and test_batch >= 1):
            raise ConfigError(f"test_batch must be an integer >= 1, got {test_batch!r}")
        # gradients and measurements only: no inverse-Hessian method is fitted or chosen
        self.influence = Influence(
            model, task, train, estimator=Identity(), params=params, device=device, dtype=dtype,
            progress=progress,
        )  # fmt: skip
        self.recipe = recipe
        self.start = self._flat_start(start)
        self.tolerance = float(tolerance)
        self.segment = segment
        self.test_batch = test_batch
        self.progress = progress
        self.replay_difference: float | None = None
        self.reverse_stats: ReverseStats | None = None
        self.extrapolation_result: Extrapolation | None = None
        self._plan: list[Tensor] = []
        self._checkpoints: dict[int, State] = {}
        self._final: Tensor | None = None
        self._k = 1

    def _flat_start(self, start: nn.Module | Tensor) -> Tensor:
        if isinstance(start, nn.Module):
            return self.influence.parameters_of(start)
        if not isinstance(start, Tensor) or start.shape != (self.p,):
            got = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
            raise ConfigError(
                f"start must be the initial model (an nn.Module of this architecture) or its chosen "
                f"parameters of shape ({self.p},), got {got}"
            )
        return start.detach().to(self.influence.device, self.influence.theta.dtype)

    @property
    def n(self) -> int:
        return self.influence.n

    @property
    def p(self) -> int:
        return self.influence.p

    @property
    def theta(self) -> Tensor:
        """The attributed model's chosen parameters ``(p,)``."""
        return self.influence.theta

    @property
    def steps(self) -> int:
        """``T``, the number of optimiser steps of the run (known after :meth:`fit`)."""
        return len(self._plan)

    def fit(self) -> Unrolled:
        """Replay the recipe from ``start``, keep its checkpoints, and verify it ends at the model.

        Raises :class:`~influencer.errors.ConfigError` with the measured difference when the replay
        does not reproduce the model's parameters (to ``tolerance``).
        """
        inf = self.influence
        inf.fn.check(inf.fn.prepare(inf.train.take(torch.arange(min(2, self.n)))), inf.theta)
        plan = self.recipe.plan(torch.arange(self.n))
        total = len(plan)
        k = self.segment or max(1, math.ceil(math.sqrt(total)))
        checkpoints: dict[int, State] = {}

        def keep(t: int, state: State) -> None:
            if t < total and t % k == 0:  # every update is out of place: no copy needed
                checkpoints[t] = tuple(x.detach() for x in state)

        final = self.recipe.run(inf, None, self.start, None, on_state=keep)[0]
        diff = float((final - inf.theta).abs().max()) if self.p else 0.0
        bound = self.tolerance * max(1.0, float(inf.theta.abs().max()))
        self.replay_difference = diff
        if not diff <= bound:
            raise ConfigError(
                f"the recipe does not reproduce the model: replaying {self.recipe!r} from start ends "
                f"max |theta_replay - theta_model| = {diff:.3g} away (tolerance {bound:.3g}); pass the "
                "start, data order and recipe (seed, epochs, lr, batch size) that trained the model, or "
                "train it with recipe.refit(...)"
            )
        self._plan, self._checkpoints, self._final, self._k = plan, checkpoints, final, k
        return self

    def summary(self) -> dict[str, Any]:
        """How the scores were computed, JSON-able (e.g. for a run's ``summary.json``): the method,
        the recipe, the replay check, the checkpointing and, once measured, the extrapolation."""
        measured = self.extrapolation_result
        return {
            "method": "unrolled",
            "recipe": self.recipe.settings(),
            "steps": self.steps,
            "segment": self._k if self._final is not None else None,
            "checkpoints": len(self._checkpoints),
            "replay_difference": self.replay_difference,
            "tolerance": self.tolerance,
            "extrapolation": None if measured is None else measured.summary(),
        }

    # ---- the reverse pass ----------------------------------------------------------------------

    def _require_fit(self) -> Tensor:
        if self._final is None:
            raise ConfigError("call fit() before computing unrolled scores")
        return self._final

    def _segment(self, s: int, end: int) -> list[tuple[State, tuple[Tensor, ...]]]:
        """Steps ``s .. end - 1`` recomputed from checkpoint ``s``, each with its autograd graph kept:
        ``(state after the step, (state before, batch weights ``(B,)``))`` as graph leaves.

        The forward pass that recomputes the states is the one the reverse pass differentiates,
        so each step's forward runs once per reverse pass.
        """
        fn, plan, total = self.influence.fn, self._plan, len(self._plan)
        state, graphs = self._checkpoints[s], []
        for t in range(s, end):
            ids = plan[t]
            batch = fn.prepare(self.influence.train.take(ids))
            leaves = tuple(x.detach().requires_grad_(True) for x in state)
            w = torch.ones(len(ids), dtype=leaves[0].dtype, device=leaves[0].device, requires_grad=True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(
                    fn.objective(leaves[0], batch, 1.0 / len(ids), w), leaves[0], create_graph=True
                )
                out = self.recipe.update(leaves, g, t, total)
            graphs.append((out, (*leaves, w)))
            state = tuple(x.detach() for x in out)
        return graphs

    @staticmethod
    def _pull(graph: tuple[State, tuple[Tensor, ...]], lam: State) -> tuple[State, Tensor]:
        """Cotangents ``(k, ...)`` of the state before a step and of its batch weights ``(k, B)``,
        from cotangents ``lam`` of the state after it: one batched backward pass (frees the graph)."""
        out, leaves = graph
        if lam[0].shape[0] == 1:  # one backward pass: cheaper than a batched one of size 1
            back = torch.autograd.grad(out, leaves, tuple(x[0] for x in lam), materialize_grads=True)
            back = tuple(x[None] for x in back)
        else:
            back = torch.autograd.grad(out, leaves, lam, is_grads_batched=True, materialize_grads=True)
        return tuple(back[:-1]), back[-1]

    def _reverse(self, batch: Any) -> Tensor:
        """``d f(test_j) / d w_i`` ``(k, n)`` for the ``k`` test examples of a prepared batch."""
        fn, final = self.influence.fn, self._require_fit()
        plan, k, total = self._plan, self._k, len(self._plan)
        cot = fn.measurement_grads(final, batch)  # (k, p)
        lam: State = (cot, *(torch.zeros_like(cot) for _ in self._checkpoints[0][1:]))
        dw = cot.new_zeros(cot.shape[0], self.n)  # (k, n)
        held = 0
        ticks = progress_bar(range(total), "reverse pass", self.progress, total=total, unit="step")
        for s in sorted(self._checkpoints, reverse=True):
            end = min(s + k, total)
            graphs = self._segment(s, end)
            held = max(held, len(self._checkpoints) + len(graphs))
            for t in range(end - 1, s - 1, -1):
                lam, back_w = self._pull(graphs.pop(), lam)
                dw.index_add_(1, plan[t].to(dw.device), back_w)
                next(ticks, None)
        self.reverse_stats = ReverseStats(total, k, len(self._checkpoints), held)
        return dw

    # ---- scores --------------------------------------------------------------------------------

    def scores(self, test: Any, train_indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """Removal scores ``(m, c)``: ``-d f(test_j) / d w_i`` for training ids (default all).

        Positive = helpful, negative = harmful (see :mod:`influencer._kernel.scores`); one reverse
        pass per ``test_batch`` test examples.
        """
        self._require_fit()
        ex = self.influence.examples(test)
        total = -(-len(ex) // self.test_batch)
        parts = []
        bar = self.progress and total > 1
        chunks = progress_bar(ex.chunks(self.test_batch), "test blocks", bar, total=total)
        for ids, batch in chunks:
            self.influence.fn.task.check_batch(batch, ids)
            parts.append(-self._reverse(self.influence.fn.prepare(batch)))
        out = torch.cat(parts) if parts else self.theta.new_zeros(0, self.n)
        if not bool(torch.isfinite(out).all()):
            raise DataError(
                "the unrolled scores are NaN or infinite: the run is unstable in its data weights "
                "(a loss spike or overflow); lower the learning rate or compute in float64"
            )
        return out if train_indices is None else out[:, self.influence.train.check_indices(train_indices)]

    def top_k(self, test: Any, k: int) -> TopK:
        """The ``k`` most helpful and harmful training ids for each test example."""
        return top_k(self.scores(test), k)

    # ---- how far the derivative extrapolates ---------------------------------------------------

    def extrapolation(
        self,
        test: Any,
        scores: Tensor | None = None,
        *,
        fraction: float = 0.1,
        strengths: Sequence[float] = (1e-3, 1e-1, 1.0),
        subsets: int = 2,
        seed: int = 0,
        warn: bool = True,
    ) -> Extrapolation:
        """Measure how far the scores extrapolate, with ``len(strengths) * subsets`` real replays.

        ``scores`` ``(m, n)`` default to :meth:`scores` of ``test``. Each replay re-weights a random
        ``fraction`` of the training examples to ``1 - eps``. Warns (``RuntimeWarning``) with what
        to change when full removal (``eps = 1``, if measured) is out of reach. The result is also
        kept as ``extrapolation_result``; its :meth:`~Extrapolation.summary` is JSON-able.
        """
        if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
            raise ConfigError(f"fraction must be in (0, 1), got {fraction!r}")
        eps = tuple(float(e) for e in strengths)
        if not eps or not all(0 < e <= 1 for e in eps) or list(eps) != sorted(set(eps)):
            raise ConfigError(f"strengths must increase within (0, 1], got {list(strengths)}")
        if not (isinstance(subsets, int) and subsets >= 1):
            raise ConfigError(f"subsets must be an integer >= 1, got {subsets!r}")
        self._require_fit()
        inf = self.influence
        s = (self.scores(test) if scores is None else scores).detach().to(torch.float64).cpu()
        base = inf.measurements(test, self._final).double().cpu()  # (m,)
        if s.shape != (base.shape[0], self.n):
            raise DataError(f"scores must have shape ({base.shape[0]}, {self.n}), got {tuple(s.shape)}")
        gen = torch.Generator().manual_seed(seed)
        size = min(max(round(fraction * self.n), 1), self.n)
        chosen = [torch.randperm(self.n, generator=gen)[:size] for _ in range(subsets)]
        predicted = np.empty((len(eps), subsets, base.shape[0]))
        actual = np.empty_like(predicted)
        jobs = [(a, b) for a in range(len(eps)) for b in range(subsets)]
        for a, b in progress_bar(jobs, "re-weighted replays", self.progress, unit="run"):
            w = torch.ones(self.n, dtype=self.theta.dtype)
            w[chosen[b]] = 1.0 - eps[a]
            theta = self.recipe.refit(inf, None, self.start, w)
            actual[a, b] = (inf.measurements(test, theta).double().cpu() - base).numpy()
            predicted[a, b] = (eps[a] * s[:, chosen[b]].sum(1)).numpy()
        slopes, correlations = [], []
        for a in range(len(eps)):
            x, y = predicted[a].reshape(-1), actual[a].reshape(-1)
            slopes.append(float((x * y).sum() / (x * x).sum()) if (x * x).sum() > 0 else float("nan"))
            correlations.append(pearson(x, y))
        result = Extrapolation(
            float(fraction), eps, tuple(slopes), tuple(correlations), subsets, predicted, actual
        )
        self.extrapolation_result = result
        low_ok = REACH_BAND[0] <= slopes[0] <= REACH_BAND[1] and correlations[0] >= 0.5
        if warn and not low_ok:
            warnings.warn(
                f"the unrolled scores do not predict even the smallest measured re-weighting "
                f"(eps = {eps[0]:g} of {fraction:.0%} of the data): the actual change is "
                f"{slopes[0]:.2f} x the predicted one (correlation {correlations[0]:.2f}). The run has "
                "kinks in its data weights; the usual one is Adam's first steps, which move each "
                "parameter by about the learning rate whatever the gradient's size: warm up the "
                "learning rate (e.g. AdamRetrainer(..., warmup=<one epoch of steps>)), or measure at a "
                "smaller eps",
                RuntimeWarning,
                stacklevel=2,
            )
        elif warn and eps[-1] == 1.0 and not result.removals_in_reach:
            reach = f"re-weightings up to eps = {result.reach:g}" if result.reach else "no measured strength"
            warnings.warn(
                f"the unrolled scores do not predict removing {fraction:.0%} of the training data: the "
                f"actual change is {slopes[-1]:.2f} x the predicted one (correlation "
                f"{correlations[-1]:.2f}); "
                f"they hold for {reach}. To attribute removals, train with a smoother recipe (smaller "
                "learning rate, fewer steps, larger batches), or check removals by retraining "
                "(influencer.validation.lds(..., setting='single-model'))",
                RuntimeWarning,
                stacklevel=2,
            )
        return result
