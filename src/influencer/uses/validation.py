"""Validate influence against real retraining.

**Leave-one-out** (Koh & Liang 2017, Fig. 2), :func:`leave_one_out`: for one test example, take the
``k`` training examples with the largest predicted effect, remove each one in turn, retrain from the
optimum (warm start), and compare the actual change of the test measurement with the predicted
score. Convex models are retrained to the optimum with L-BFGS in float64, so any disagreement is
the influence approximation's, not the optimiser's.

**Linear datamodeling score** (LDS; Park, Georgiev, Ilyas, Leclerc & Madry, "TRAK", ICML 2023),
:func:`lds`: draw ``M`` random subsets ``S_1..S_M`` of the training set, each keeping a fraction
``alpha`` of it; retrain on each with a recipe (:mod:`influencer.retraining`; several seeds per
subset may be averaged); and, for every test example, correlate (Spearman, over the ``M`` subsets)
the actual change ``f(S_k) - f(full)`` with the change the scores predict. With our sign convention
(a score is the predicted change of ``f`` when its example is removed) the prediction is additive
over the examples left out::

    predicted f(S) - f(full) = sum_{i not in S} score_i

(exact to first order in the removed fraction; to first order in the example weights it is
``n / |S|`` times that, a constant factor when every subset has the same size, which rank
correlation ignores). The LDS of an attribution method is the mean of the per-test correlations.
:func:`retrain_on_subsets` does the retraining once and :func:`linear_datamodeling_score`
evaluates any number of score matrices on it; a retraining cache directory
(:class:`~influencer.retraining_cache.CachedRetrainer`) keeps the refits across processes.
:func:`choose_damping` picks an estimator's damping by the LDS on (other) subsets.

:mod:`influencer.plotting` draws both results.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from influencer._kernel.errors import ConfigError, DataError
from influencer._kernel.progress import progress_bar
from influencer._kernel.stats import bootstrap_interval, pearson, spearman
from influencer.influence import Influence
from influencer.retraining import LBFGSRetrainer, Retrainer
from influencer.retraining_cache import CachedRetrainer


@dataclass(frozen=True)
class LOOResult:
    """Predicted vs actual change of the test measurement when each training id is removed."""

    train_ids: np.ndarray  # (k,)
    predicted: np.ndarray  # (k,) influence scores (removal convention, see influencer._kernel.scores)
    actual: np.ndarray  # (k,) f(theta_{-i}) - f(theta*) after retraining
    pearson: float
    spearman: float
    optimum_shift: float  # ||theta* - theta|| / ||theta||: how far the given model was from the optimum

    def summary(self) -> dict[str, Any]:
        return {
            "k": int(self.train_ids.size),
            "pearson": self.pearson,
            "spearman": self.spearman,
            "optimum_shift": self.optimum_shift,
        }


def leave_one_out(
    influence: Influence,
    test: Any,
    k: int = 50,
    *,
    select: Literal["magnitude", "helpful", "harmful", "random"] = "magnitude",
    retrain: Retrainer | None = None,
    float64: bool = True,
    seed: int = 0,
) -> LOOResult:
    """Compare influence scores with leave-one-out retraining on one test example.

    Args:
        influence: a fitted :class:`Influence`.
        test: one test example (any data form, with a single example).
        k: number of training examples to remove, one at a time.
        select: which ``k``: largest ``|score|``, most helpful, most harmful, or random.
        retrain: how to retrain (default :class:`~influencer.retraining.LBFGSRetrainer`: to the
            optimum, for convex models).
        float64: retrain and measure in double precision.
        seed: for ``select="random"``.
    """
    scores = influence.scores(test)
    if scores.shape[0] != 1:
        raise ConfigError(f"leave_one_out takes one test example, got {scores.shape[0]}")
    scores = scores[0].cpu()
    k = min(k, influence.n - 1)
    if select == "magnitude":
        ids = scores.abs().argsort(descending=True)[:k]
    elif select == "helpful":
        ids = scores.argsort(descending=True)[:k]
    elif select == "harmful":
        ids = scores.argsort()[:k]
    elif select == "random":
        ids = torch.randperm(influence.n, generator=torch.Generator().manual_seed(seed))[:k]
    else:
        raise ConfigError(f"select must be magnitude, helpful, harmful or random; got {select!r}")

    reference = influence.replace(dtype=torch.float64) if float64 else influence
    retrainer = retrain or LBFGSRetrainer()
    everyone = torch.arange(influence.n)

    def measure(theta: Tensor) -> float:
        return float(reference.measurements(test, theta)[0])

    theta_star = retrainer.refit(reference)
    shift = float((theta_star - reference.theta).norm() / reference.theta.norm().clamp_min(1e-30))
    if shift > 1e-2:
        warnings.warn(
            f"the model is {shift:.1%} away from the optimum of its objective; influence assumes a "
            "minimum, so train it to convergence for a meaningful comparison",
            RuntimeWarning,
            stacklevel=2,
        )
    base = measure(theta_star)
    actual = []
    for i in progress_bar(ids.tolist(), "leave-one-out retraining", influence.progress):
        theta_i = retrainer.refit(reference, everyone[everyone != i], theta_star)
        actual.append(measure(theta_i) - base)
    predicted = scores[ids].double().numpy()
    actual_arr = np.asarray(actual)
    return LOOResult(
        ids.numpy(),
        predicted,
        actual_arr,
        pearson(predicted, actual_arr),
        spearman(predicted, actual_arr),
        shift,
    )


# ---- linear datamodeling score -------------------------------------------------------------------

# A fresh initialisation per seed (an nn.Module of the influence's architecture, or its chosen
# parameters (p,)), a fixed start (p,), or None: warm-started from the full-data refit.
Start = Tensor | Callable[[int], nn.Module | Tensor] | None


@dataclass(frozen=True)
class SubsetRetraining:
    """Test measurements of models retrained on random subsets of the training data.

    ``kept[k]`` marks the training ids subset ``k`` keeps; ``measurements[k, s, j]`` is
    ``f(test_j)`` of the model retrained on subset ``k`` with seed ``seeds[s]``, and
    ``full[s, j]`` the same retrained on all the training data.
    """

    kept: np.ndarray  # (M, n) bool
    measurements: np.ndarray  # (M, S, m)
    full: np.ndarray  # (S, m)
    seeds: tuple[int, ...]
    alpha: float
    seed: int  # of the subset draw

    @property
    def actual(self) -> np.ndarray:
        """``f(S_k) - f(full)`` ``(M, m)``, each averaged over the seeds."""
        return self.measurements.mean(axis=1) - self.full.mean(axis=0)[None]

    def predicted(self, scores: Tensor | np.ndarray) -> np.ndarray:
        """``sum_{i not in S_k} score[j, i]`` ``(M, m)`` from removal scores ``(m, n)``."""
        s = scores.detach().double().cpu().numpy() if isinstance(scores, Tensor) else np.asarray(scores)
        m, n = self.full.shape[1], self.kept.shape[1]
        if s.shape != (m, n):
            raise DataError(
                f"scores must have shape (test examples, training examples) = ({m}, {n}) like the "
                f"retraining, got {tuple(s.shape)}"
            )
        if not np.isfinite(s).all():
            raise DataError("the scores contain NaN or infinite values; an LDS of them is meaningless")
        return (~self.kept).astype(np.float64) @ s.astype(np.float64).T


@dataclass(frozen=True)
class LDSResult:
    """Linear datamodeling score: per test example, Spearman over subsets of predicted vs actual.

    ``correlations[j]`` is NaN when test ``j``'s actual changes (or predictions) are all equal
    over the subsets; ``mean`` and ``interval`` (a percentile bootstrap over test examples at
    ``level``) leave those out.
    """

    correlations: np.ndarray  # (m,) Spearman per test example
    predicted: np.ndarray  # (M, m) sum of the left-out examples' scores
    actual: np.ndarray  # (M, m) f(S_k) - f(full), averaged over seeds
    kept: np.ndarray  # (M, n) bool
    seeds: tuple[int, ...]
    alpha: float
    subset_seed: int
    mean: float
    interval: tuple[float, float]
    level: float

    def summary(self) -> dict[str, Any]:
        finite = self.correlations[np.isfinite(self.correlations)]
        return {
            "lds": self.mean,
            "interval": list(self.interval),
            "level": self.level,
            "median": float(np.median(finite)) if finite.size else float("nan"),
            "min": float(finite.min()) if finite.size else float("nan"),
            "max": float(finite.max()) if finite.size else float("nan"),
            "test_examples": int(self.correlations.size),
            "undefined": int(self.correlations.size - finite.size),
            "subsets": int(self.kept.shape[0]),
            "alpha": self.alpha,
            "seeds": list(self.seeds),
            "subset_seed": self.subset_seed,
        }


def draw_subsets(n: int, subsets: int, alpha: float, seed: int = 0) -> np.ndarray:
    """``(subsets, n)`` bool masks, each keeping ``round(alpha * n)`` ids drawn without replacement."""
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ConfigError(
            f"alpha (the fraction of the training data each subset keeps) must be in (0, 1), got {alpha!r}"
        )
    if not isinstance(subsets, int) or subsets < 3:
        raise ConfigError(
            f"subsets must be an integer >= 3 (a rank correlation over subsets), got {subsets!r}"
        )
    size = min(max(round(alpha * n), 1), n - 1)
    gen = torch.Generator().manual_seed(seed)
    kept = np.zeros((subsets, n), dtype=bool)
    for k in range(subsets):
        kept[k, torch.randperm(n, generator=gen)[:size].numpy()] = True
    return kept


def _start_for(reference: Influence, start: Start, seed: int) -> Tensor | None:
    if start is None or isinstance(start, Tensor):
        return start
    made = start(seed)
    if isinstance(made, nn.Module):
        return reference.parameters_of(made)
    if isinstance(made, Tensor):
        return made
    raise ConfigError(
        f"start(seed) must return an nn.Module of the model's architecture or its parameters (p,), "
        f"got {type(made).__name__}"
    )


def retrain_on_subsets(
    influence: Influence,
    test: Any,
    *,
    subsets: int = 50,
    alpha: float = 0.5,
    retrain: Retrainer | None = None,
    start: Start = None,
    seeds: Sequence[int] = (0,),
    seed: int = 0,
    cache: str | Path | None = None,
    float64: bool = True,
) -> SubsetRetraining:
    """Retrain on ``subsets`` random subsets (each keeping ``alpha`` of the data) and measure ``test``.

    Args:
        influence: its model, task and training data define what is retrained (it need not be fitted).
        test: the test examples ``(m, ...)`` to measure, in any data form.
        subsets: ``M``, the number of random subsets.
        alpha: the fraction of the training data each subset keeps.
        retrain: the recipe (default :class:`~influencer.retraining.LBFGSRetrainer`: to the
            optimum, for convex models).
        start: where each refit starts: ``None`` warm-starts from the model refitted on all the
            data (with the same seed); a tensor ``(p,)`` is one fixed initialisation; a callable
            ``seed -> nn.Module | Tensor`` gives a fresh initialisation per seed, e.g.
            ``lambda s: (torch.manual_seed(s), make_model())[1]``, to retrain from scratch.
        seeds: the recipe's seeds (:meth:`~influencer.retraining.Retrainer.with_seed`, and the
            argument of ``start``); the measurements of the models of all seeds are averaged.
        seed: seeds the draw of the subsets.
        cache: a directory that keeps every refit (:class:`~influencer.retraining_cache.CachedRetrainer`),
            so a second evaluation, or one resumed after an interruption, retrains nothing again.
        float64: retrain and measure in double precision.
    """
    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be one or more distinct integers, got {list(seeds)}")
    retrainer = retrain or LBFGSRetrainer()
    if (
        len(seeds) > 1
        and not callable(start)
        and retrainer.with_seed(seeds[0]) == retrainer.with_seed(seeds[1])
    ):
        raise ConfigError(
            "several seeds would retrain the same model: this recipe is deterministic and every seed "
            "starts from the same point. Use one seed, or pass start=callable(seed) for fresh initialisations"
        )
    if cache is not None and not isinstance(retrainer, CachedRetrainer):
        retrainer = CachedRetrainer(retrainer, cache)
    kept = draw_subsets(influence.n, subsets, alpha, seed)
    reference = influence.replace(dtype=torch.float64) if float64 else influence
    everyone = torch.arange(influence.n)
    ex = reference.examples(test)
    m = len(ex)
    full = np.empty((len(seeds), m))
    measurements = np.empty((subsets, len(seeds), m))
    # Per seed: the full-data refit first (the baseline, and the warm start when start is None).
    jobs = [(s, k) for s in range(len(seeds)) for k in (-1, *range(subsets))]
    begin: Tensor | None = None
    for s, k in progress_bar(jobs, "retraining on subsets", influence.progress, unit="model"):
        recipe = retrainer.with_seed(seeds[s])
        if k < 0:
            init = _start_for(reference, start, seeds[s])
            theta_full = recipe.refit(reference, None, init)
            full[s] = reference.measurements(ex, theta_full).double().cpu().numpy()
            begin = theta_full if start is None else init
            continue
        theta = recipe.refit(reference, everyone[torch.from_numpy(kept[k])], begin)
        measurements[k, s] = reference.measurements(ex, theta).double().cpu().numpy()
    if not (np.isfinite(measurements).all() and np.isfinite(full).all()):
        raise DataError(
            "a retrained model gives NaN or infinite test measurements; check the recipe (lr, epochs)"
        )
    return SubsetRetraining(kept, measurements, full, seeds, float(alpha), seed)


def linear_datamodeling_score(
    scores: Tensor | np.ndarray, retraining: SubsetRetraining, *, level: float = 0.95
) -> LDSResult:
    """The LDS of removal scores ``(m, n)`` on a :func:`retrain_on_subsets` result (see the module doc)."""
    predicted = retraining.predicted(scores)  # (M, m)
    actual = retraining.actual  # (M, m)
    correlations = np.array([spearman(predicted[:, j], actual[:, j]) for j in range(actual.shape[1])])
    finite = correlations[np.isfinite(correlations)]
    mean = float(finite.mean()) if finite.size else float("nan")
    return LDSResult(
        correlations,
        predicted,
        actual,
        retraining.kept,
        retraining.seeds,
        retraining.alpha,
        retraining.seed,
        mean,
        bootstrap_interval(correlations, level),
        level,
    )


def lds(
    influence: Influence,
    test: Any,
    *,
    scores: Tensor | np.ndarray | None = None,
    subsets: int = 50,
    alpha: float = 0.5,
    retrain: Retrainer | None = None,
    start: Start = None,
    seeds: Sequence[int] = (0,),
    seed: int = 0,
    cache: str | Path | None = None,
    float64: bool = True,
    level: float = 0.95,
) -> LDSResult:
    """Linear datamodeling score of ``influence`` (or of other ``scores`` ``(m, n)``) on ``test``.

    ``scores`` defaults to ``influence.scores(test)`` (so ``influence`` must be fitted); pass
    another method's scores, e.g. an :class:`~influencer.ensemble.Ensemble`'s, to evaluate them on
    the same retraining. The other arguments are :func:`retrain_on_subsets`'s; ``level`` is the
    confidence level of the interval of the mean.
    """
    if scores is None:
        scores = influence.scores(test)
    retraining = retrain_on_subsets(
        influence, test, subsets=subsets, alpha=alpha, retrain=retrain, start=start, seeds=seeds,
        seed=seed, cache=cache, float64=float64,
    )  # fmt: skip
    return linear_datamodeling_score(scores, retraining, level=level)


# ---- damping chosen by the data ------------------------------------------------------------------


def curvature_scale(influence: Influence, probes: int = 16, seed: int = 0) -> float:
    """The mean eigenvalue ``trace(C) / p`` of the undamped curvature ``C`` (Hessian or Gauss-Newton
    of ``mean loss + Omega``), by Hutchinson's estimator with ``probes`` Rademacher vectors.

    A scale to set damping relative to: the same damping means little on a flat curvature and
    much on a sharp one.
    """
    if not isinstance(probes, int) or probes < 1:
        raise ConfigError(f"probes must be an integer >= 1, got {probes!r}")
    gen = torch.Generator().manual_seed(seed)
    v = (torch.randint(0, 2, (probes, influence.p), generator=gen) * 2 - 1).to(influence.theta)
    return float((v * influence.curvature_product(v)).sum(1).mean()) / influence.p


@dataclass(frozen=True)
class DampingChoice:
    """The damping with the highest LDS among ``candidates``, and the LDS of each."""

    damping: float
    candidates: tuple[float, ...]
    lds: tuple[float, ...]  # mean LDS per candidate
    scale: float | None  # the curvature scale the candidates are relative to (None: given as is)

    def summary(self) -> dict[str, Any]:
        return {
            "damping": self.damping,
            "candidates": list(self.candidates),
            "lds": list(self.lds),
            "curvature_scale": self.scale,
        }


def choose_damping(
    influence: Influence,
    test: Any,
    retraining: SubsetRetraining,
    candidates: Sequence[float] | None = None,
    *,
    relative: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
) -> DampingChoice:
    """Pick the estimator's damping by the LDS of its scores on ``retraining``.

    ``candidates`` are absolute dampings; by default they are ``relative`` multiples of the
    curvature's mean eigenvalue (:func:`curvature_scale`). Each candidate refits
    ``influence``'s estimator with that damping and scores ``test`` (the examples ``retraining``
    measured). Evaluate the chosen damping on *other* subsets than the ones it was chosen on
    (another ``seed`` of :func:`retrain_on_subsets`), or the LDS reported is optimistic.
    """
    estimator = influence.estimator
    if not any(f.name == "damping" for f in dataclasses.fields(estimator)) or estimator.name == "identity":
        raise ConfigError(f"the {estimator.name} estimator has no damping to choose")
    scale = None
    if candidates is None:
        scale = curvature_scale(influence)
        if not scale > 0:
            raise ConfigError(
                f"the curvature's mean eigenvalue is {scale:.3g}; give the candidates explicitly"
            )
        candidates = [r * scale for r in relative]
    values = tuple(float(c) for c in candidates)
    if not values or not all(math.isfinite(c) and c >= 0 for c in values):
        raise ConfigError(f"damping candidates must be finite numbers >= 0, got {list(values)}")
    scores = []
    for d in progress_bar(values, "damping candidates", influence.progress):
        fitted = influence.replace(estimator=dataclasses.replace(estimator, damping=d)).fit()
        scores.append(linear_datamodeling_score(fitted.scores(test), retraining).mean)
    best = int(np.nanargmax(scores))
    return DampingChoice(values[best], values, tuple(scores), scale)
