"""Training-set poisoning with ``I_pert,loss`` (Koh & Liang 2017, Sec. 5.2).

The attacker wants a *target* test prediction to flip after the victim retrains on a training set
in which ``k`` images were altered imperceptibly. For a model whose trained part is convex (a
logistic regression on pixels, or the linear head over frozen features, retrained to the optimum),
influence predicts how the retrained model's target loss responds to each pixel of each training
image: ``effect = d f(target) / d x_i`` (:mod:`influencer.uses.perturbation`). The attack ascends it::

    x_i <- Proj(x_i + step * sign(effect_i))      for each poisoned image i
    retrain (warm-started L-BFGS to the optimum, float64); stop once the target flips;
    recompute H and s_test = H^-1 grad f(target) at the new optimum, and repeat

``Proj`` keeps each poisoned image valid: every value within ``max_change`` of the original
(L-inf bound), inside ``[lower, upper]`` and on the data's value grid (e.g. multiples of 1/16 for
the scikit-learn digits, whose pixels are integers 0..16; 1/255 for 8-bit images), so the
poisoned image is itself a legal image of the data set.

Which images to poison: by default those with the largest predicted gain of one full-bound step,
``sum_j |effect_ij| * room_ij`` (room = how far pixel j may move in the helpful direction), the
best the linearised attack can do with image ``i``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vjp

from influencer._kernel.curvature import Curvature
from influencer._kernel.data import Examples, as_examples
from influencer._kernel.errors import ConfigError, ConvergenceError, DataError
from influencer._kernel.functional import ModelFunction
from influencer._kernel.progress import progress_bar
from influencer._kernel.stats import pearson
from influencer._kernel.task import ClassificationTask, Task, classes_from_outputs
from influencer.estimators import Estimator, Exact, Solver
from influencer.models import SmallCNN
from influencer.paper.datasets import Split, load_digits
from influencer.paper.plotting import pyplot, save_png
from influencer.training import fit_lbfgs, objective_and_grad, train_minibatch
from influencer.uses.perturbation import (
    InputPath,
    PatchedExamples,
    check_input,
    get_input,
    mixed_gradients,
    replace_input,
)

_CHUNK = 256  # examples per forward pass when encoding, pulling back and scoring
_NEWTON_STEPS = 4
_GRAD_TOL = 1e-10  # retraining stops at max |grad J| <= this (relative to max(1, |J|)), as fit_lbfgs


@dataclass(frozen=True)
class PoisonConfig:
    """Settings of the attack. Input values are in the model's input units.

    Args:
        max_change: L-inf bound on each poisoned value's change (default 2/16: two grey levels of
            the 17-level digits).
        step: size of each sign step (default one grid level).
        grid: spacing of the valid value grid; poisoned values stay ``lower + integer * grid``.
            ``None`` allows any value (continuous inputs).
        lower, upper: valid value range.
        max_steps: sign steps (each followed by retraining) before giving up on a target.
        patience: give up early after this many consecutive steps that do not raise the target loss
            (the poisoned values sit at their bounds and the signs only oscillate).
        select: ``"gain"`` (largest predicted gain of a full-bound step) or ``"helpful"``
            (largest removal scores: the training images the target relies on most).
        estimator: inverse-Hessian method at each retrained optimum (default exact, float64).
        curvature: ``"hessian"`` or ``"gauss_newton"``.
    """

    max_change: float = 2 / 16
    step: float = 1 / 16
    grid: float | None = 1 / 16
    lower: float = 0.0
    upper: float = 1.0
    max_steps: int = 10
    patience: int = 2
    select: Literal["gain", "helpful"] = "gain"
    estimator: Estimator = dataclasses.field(default_factory=Exact)
    curvature: Literal["hessian", "gauss_newton"] = "hessian"

    def __post_init__(self) -> None:
        for name in ("max_change", "step"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"PoisonConfig.{name} must be a finite number > 0, got {value!r}")
        if self.grid is not None and not (math.isfinite(self.grid) and self.grid > 0):
            raise ConfigError(f"PoisonConfig.grid must be > 0 or None, got {self.grid!r}")
        if self.grid is not None and self.step < self.grid * (1 - 1e-9):
            raise ConfigError(
                f"PoisonConfig.step ({self.step:g}) is below one grid level ({self.grid:g}): projected "
                "back onto the grid, no value would ever move. Use step >= grid"
            )
        if self.grid is not None and self.max_change < self.grid * (1 - 1e-9):
            raise ConfigError(
                f"PoisonConfig.max_change ({self.max_change:g}) is below one grid level ({self.grid:g}), "
                "which allows no change at all"
            )
        if not (math.isfinite(self.lower) and math.isfinite(self.upper) and self.lower < self.upper):
            raise ConfigError(f"PoisonConfig needs finite lower < upper, got {self.lower}, {self.upper}")
        if not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ConfigError(f"PoisonConfig.max_steps must be an integer >= 1, got {self.max_steps!r}")
        if not (isinstance(self.patience, int) and self.patience >= 1):
            raise ConfigError(f"PoisonConfig.patience must be an integer >= 1, got {self.patience!r}")
        if self.select not in ("gain", "helpful"):
            raise ConfigError(f"PoisonConfig.select must be 'gain' or 'helpful', got {self.select!r}")
        if not isinstance(self.estimator, Estimator):
            raise ConfigError("PoisonConfig.estimator must be an influencer Estimator")
        if self.curvature not in ("hessian", "gauss_newton"):
            raise ConfigError(
                f"PoisonConfig.curvature must be 'hessian' or 'gauss_newton', got {self.curvature!r}"
            )

    def project(self, x: Tensor, original: Tensor) -> Tensor:
        """The nearest valid poisoned values toward ``original``: bound, range, then grid."""
        delta = (x - original).clamp(-self.max_change, self.max_change)
        if self.grid is not None:
            # Round the change toward zero so the bound holds; originals are on the grid already.
            delta = torch.trunc(delta / self.grid + torch.sign(delta) * 1e-6) * self.grid
        out = original + delta
        if self.grid is not None:
            hi = self.lower + math.floor((self.upper - self.lower) / self.grid + 1e-6) * self.grid
            return out.clamp(self.lower, hi)
        return out.clamp(self.lower, self.upper)

    def check_inputs(self, x: Tensor) -> None:
        """Raise :class:`DataError` unless ``x`` lies in range and on the grid."""
        if float(x.min()) < self.lower - 1e-9 or float(x.max()) > self.upper + 1e-9:
            raise DataError(
                f"training inputs span [{float(x.min()):g}, {float(x.max()):g}], outside the valid range "
                f"[{self.lower:g}, {self.upper:g}] of PoisonConfig: set lower/upper to the data's range"
            )
        if self.grid is not None:
            levels = (x - self.lower) / self.grid
            if float((levels - levels.round()).abs().max()) > 1e-6:
                raise DataError(
                    f"training inputs are not on the value grid lower + k * {self.grid:g}: set "
                    "PoisonConfig.grid to the data's quantisation step (e.g. 1/255), or grid=None"
                )


@dataclass(frozen=True)
class PoisonResult:
    """One attack on one target test example."""

    target: int  # test id
    label: int  # the target's true label
    poisoned_ids: np.ndarray  # (k,) training ids
    original: Tensor  # (k, *x) clean inputs
    poisoned: Tensor  # (k, *x) poisoned inputs: the flipping ones, else those of the highest target loss
    success: bool  # the retrained model's prediction of the target flipped
    steps: int  # sign steps taken (retrainings)
    prediction_before: int
    prediction_after: int  # after the last retraining (different from before iff success)
    losses: np.ndarray  # (steps + 1,) target loss after each retraining (index 0: clean)
    predicted_increase: np.ndarray  # (steps,) influence's linear prediction of each step's loss rise

    @property
    def change(self) -> Tensor:
        return self.poisoned - self.original

    @property
    def linf(self) -> float:
        return float(self.change.abs().max()) if self.change.numel() else 0.0

    @property
    def mean_abs_change(self) -> float:
        """Mean ``|change|`` over every value of the poisoned images."""
        return float(self.change.abs().mean())

    @property
    def changed_fraction(self) -> float:
        """Fraction of the poisoned images' values that changed."""
        return float((self.change != 0).double().mean())


@dataclass(frozen=True)
class PoisonSummary:
    """Success rates over many targets, for each number of poisoned images."""

    budgets: tuple[int, ...]
    targets: np.ndarray  # (t,) test ids attacked (all correctly predicted before the attack)
    results: dict[int, list[PoisonResult]]  # budget -> one result per target
    config: PoisonConfig

    def success_rate(self, budget: int) -> float:
        return float(np.mean([r.success for r in self.results[budget]]))

    def summary(self) -> dict[str, Any]:
        rows = {}
        for b in self.budgets:
            rs = self.results[b]
            won = [r for r in rs if r.success]
            rows[b] = {
                "success_rate": self.success_rate(b),
                "mean_steps_successful": float(np.mean([r.steps for r in won])) if won else float("nan"),
                "mean_abs_change": float(np.mean([r.mean_abs_change for r in rs])),
                "changed_fraction": float(np.mean([r.changed_fraction for r in rs])),
                "max_linf": float(max(r.linf for r in rs)),
            }
        return {
            "targets": int(self.targets.size),
            "max_change": self.config.max_change,
            "by_budget": rows,
            **self.step_agreement(),
        }

    def step_agreement(self) -> dict[str, float]:
        """How well influence predicted each step's rise of the retrained target loss.

        ``first_step_pearson``: over all attacks, predicted vs actual rise of the first step (from
        the clean optimum). ``sign_agreement``: fraction of all steps whose actual rise has the
        predicted sign; later steps overshoot more, as whole grid levels are not infinitesimal.
        """
        first_pred, first_actual, agree = [], [], []
        for rs in self.results.values():
            for r in rs:
                rise = np.diff(r.losses)
                if rise.size:
                    first_pred.append(r.predicted_increase[0])
                    first_actual.append(rise[0])
                agree.extend((np.sign(rise) == np.sign(r.predicted_increase)).tolist())
        return {
            "first_step_pearson": pearson(first_pred, first_actual) if len(first_pred) >= 2 else float("nan"),
            "sign_agreement": float(np.mean(agree)) if agree else float("nan"),
        }

    def plot(self, path: str | Path, title: str = "Training-set poisoning") -> Path:
        """Success rate against the number of poisoned images, saved as PNG."""
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=120)
        rates = [self.success_rate(b) for b in self.budgets]
        ax.plot(self.budgets, rates, marker="o")
        ax.set_xscale("log")
        ax.set_xticks(self.budgets, [str(b) for b in self.budgets])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("poisoned training images")
        ax.set_ylabel("targets flipped")
        ax.set_title(
            f"{title}\n{self.targets.size} targets, L-inf bound {self.config.max_change:g}", fontsize=9
        )
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return save_png(fig, path)


def _predict(fn: ModelFunction, theta: Tensor, batch: Any) -> Tensor:
    """Class predictions ``(B,)`` as :func:`influencer._kernel.task.predictions` makes them."""
    with torch.no_grad():
        return classes_from_outputs(fn.outputs(theta, batch))


class _Encoded(Examples):
    """``data`` with every input replaced by its precomputed features ``codes[i]``."""

    def __init__(self, data: Examples, codes: Tensor, input: InputPath) -> None:
        self.base, self.codes, self.input = data, codes, input

    def __len__(self) -> int:
        return len(self.base)

    def take(self, indices: Tensor) -> Any:
        return replace_input(self.base.take(indices), self.input, self.codes[indices.to(self.codes.device)])


class PoisoningAttack:
    """Poisoning attacks on a model whose trained part is retrained to the optimum by the victim.

    Two set-ups, as in the paper:

    * ``features=None``: ``model`` reads the inputs and its ``params`` (default all) are retrained;
      other parameters stay frozen and ``I_pert`` is back-propagated through them.
    * ``features=extractor``: a frozen feature extractor (e.g. a trained CNN's convolutional part)
      maps inputs to features and ``model`` is the head retrained on them. Features are computed
      once (only poisoned images are re-encoded) and ``I_pert`` with respect to the features is
      pulled back to the pixels through the extractor's vector-Jacobian product: the same
      gradient as the first set-up with ``params=["head"]``, at a fraction of the cost.

    Args:
        model: the trained model (or head); its weights are never modified.
        task: the training task (convex in the retrained parameters, e.g. with weight decay).
        train: the clean training data; batches hold the input at ``input`` (default ``batch[0]``)
            and the label at ``label`` (default ``batch[1]``).
        features: optional frozen feature extractor applied to the inputs before ``model``.
        params: parameters of ``model`` retrained by the victim (default all).
        config: bound, grid, steps and selection (:class:`PoisonConfig`).
        device: where to compute; all computation is in float64.
        progress: show progress bars.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train: Any,
        *,
        features: nn.Module | None = None,
        params: Sequence[str] | str | None = None,
        config: PoisonConfig | None = None,
        input: InputPath = 0,
        label: InputPath = 1,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> None:
        self.config = config or PoisonConfig()
        self.input = input
        self.label = label
        self.progress = progress
        self.fn = ModelFunction(model, task, params, device, torch.float64)
        self.features = None
        if features is not None:
            # A private float64 copy: the user's extractor is neither cast nor moved.
            self.features = copy.deepcopy(features).to(self.fn.device, torch.float64).eval()
            self.features.requires_grad_(False)
        self.data = as_examples(train)
        self.n = len(self.data)
        self.clean_inputs = torch.cat(
            [get_input(self.fn.prepare(b), input) for _, b in self.data.chunks(_CHUNK)]
        )  # (n, *x)
        check_input(self.clean_inputs, input)
        self.config.check_inputs(self.clean_inputs)
        self.train = (
            self.data if self.features is None else _Encoded(self.data, self.encode(self.clean_inputs), input)
        )
        # The victim's model retrained on the clean data: the optimum every attack starts from.
        self.theta = fit_lbfgs(self.fn, self.train, theta0=self.fn.theta0, grad_tol=_GRAD_TOL)
        self.solver = self._solver(self.train, self.theta)

    # ---- the victim's model ----------------------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """Inputs ``(k, *x)`` as the retrained model reads them (features, or the inputs themselves)."""
        if self.features is None:
            return x
        with torch.no_grad():
            return torch.cat([self.features(x[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)])

    def _pullback(self, x: Tensor, g: Tensor) -> Tensor:
        """Gradient ``(k, *x)`` with respect to inputs ``x`` from one ``g`` with respect to ``encode(x)``."""
        if self.features is None:
            return g
        parts = []
        for i in range(0, len(x), _CHUNK):
            _, pull = vjp(self.features, x[i : i + _CHUNK])
            parts.append(pull(g[i : i + _CHUNK])[0])
        return torch.cat(parts)

    def _prepare_test(self, test: Examples, target: int) -> Any:
        batch = self.fn.prepare(test.take(torch.tensor([target])))
        if self.features is None:
            return batch
        return replace_input(batch, self.input, self.encode(get_input(batch, self.input)))

    def _solver(self, data: Examples, theta: Tensor) -> Solver:
        return self.config.estimator.fit(Curvature(self.fn, theta, data, kind=self.config.curvature))

    def _retrain(self, data: Examples, theta: Tensor) -> tuple[Tensor, Solver]:
        """The victim's optimum on ``data``, warm-started at ``theta``, and its inverse Hessian.

        L-BFGS brings the gradient to 1e-7; the exact Hessian there, needed for the next influence
        step anyway, then polishes it to round-off in a Newton step or two (quadratic convergence).
        """
        everyone = torch.arange(self.n)
        try:
            t = fit_lbfgs(self.fn, data, theta0=theta, grad_tol=1e-7, newton_steps=0)
        except ConvergenceError:
            t = fit_lbfgs(self.fn, data, theta0=theta, grad_tol=_GRAD_TOL)
        solver = self._solver(data, t)
        for _ in range(_NEWTON_STEPS):
            value, g = objective_and_grad(self.fn, t, data, everyone, _CHUNK)
            if float(g.abs().max()) <= _GRAD_TOL * max(1.0, abs(value)):
                # H moves by O(|step|) <= 1e-7 / lambda_min between here and the solver's point.
                return t, solver
            t = (t - solver.solve(g[None])[0]).detach()
        t = fit_lbfgs(self.fn, data, theta0=t, grad_tol=_GRAD_TOL)
        return t, self._solver(data, t)

    def _direction(self, solver: Solver, theta: Tensor, target: Any) -> Tensor:
        return solver.solve(self.fn.measurement_grads(theta, target))  # (1, p)

    def _effects(self, data: Examples, theta: Tensor, s: Tensor, ids: Tensor, x: Tensor) -> Tensor:
        """``d f(target) / d x_i`` ``(len(ids), *x)`` for training ids ``ids`` whose inputs are ``x``."""
        parts = [
            mixed_gradients(self.fn, theta, self.fn.prepare(batch), s, self.input)[0]
            for _, batch in data.chunks(_CHUNK, ids)
        ]
        return self._pullback(x, -torch.cat(parts) / self.n)

    # ---- the attack ------------------------------------------------------------------------------

    def input_effects(self, test: Any, target: int, ids: Sequence[int] | Tensor | None = None) -> Tensor:
        """``d f(target) / d x_i`` ``(k, *x)`` on the clean data for training ids (default all)."""
        batch = self._prepare_test(as_examples(test), target)
        idx = self.data.check_indices(ids)
        s = self._direction(self.solver, self.theta, batch)
        return self._effects(
            self.train, self.theta, s, idx, self.clean_inputs[idx.to(self.clean_inputs.device)]
        )

    def choose(self, target: Any, k: int) -> Tensor:
        """The ``k`` training ids to poison against ``target`` (a prepared one-example batch)."""
        if not 1 <= k <= self.n:
            raise ConfigError(f"the number of poisoned images must lie in [1, {self.n}], got {k}")
        s = self._direction(self.solver, self.theta, target)
        if self.config.select == "helpful":
            grads = (self.fn.loss_grads(self.theta, self.fn.prepare(b)) for _, b in self.train.chunks(_CHUNK))
            gains = torch.cat([g @ s[0] for g in grads]) / self.n
        else:
            cfg, x = self.config, self.clean_inputs
            effect = self._effects(self.train, self.theta, s, torch.arange(self.n), x)
            up, down = (cfg.upper - x).clamp(max=cfg.max_change), (x - cfg.lower).clamp(max=cfg.max_change)
            gains = (effect.abs() * torch.where(effect > 0, up, down)).reshape(self.n, -1).sum(1)
        return gains.topk(k).indices.cpu()

    def attack(
        self, test: Any, target: int, k: int, ids: Sequence[int] | Tensor | None = None
    ) -> PoisonResult:
        """Poison ``k`` training inputs (``ids``, else by ``config.select``) against test id ``target``."""
        cfg = self.config
        batch = self._prepare_test(as_examples(test), target)
        label = int(get_input(batch, self.label)[0])
        before = int(_predict(self.fn, self.theta, batch)[0])
        chosen = self.choose(batch, k) if ids is None else self.data.check_indices(ids)
        original = self.clean_inputs[chosen.to(self.clean_inputs.device)]
        x = original.clone()
        theta, solver, data = self.theta, self.solver, self.train
        with torch.no_grad():
            losses = [float(self.fn.measurement(theta, batch)[0])]
        predicted: list[float] = []
        prediction, steps, stalled = before, 0, 0
        best = x  # the poisoned inputs that raised the retrained target loss most
        for steps in range(1, cfg.max_steps + 1):
            s = self._direction(solver, theta, batch)
            effect = self._effects(data, theta, s, chosen, x)
            new = cfg.project(x + cfg.step * torch.sign(effect), original)
            if torch.equal(new, x):  # every value sits at its bound: no further progress possible
                steps -= 1
                break
            predicted.append(float((effect * (new - x)).sum()))
            x = new
            data = PatchedExamples(self.train, chosen, self.encode(x), self.input)
            theta, solver = self._retrain(data, theta)
            with torch.no_grad():
                losses.append(float(self.fn.measurement(theta, batch)[0]))
            prediction = int(_predict(self.fn, theta, batch)[0])
            if prediction != before:
                best = x
                break
            # Sign steps of a whole grid level can overshoot and oscillate; keep the best and stop
            # after ``patience`` steps without a new best.
            if losses[-1] > max(losses[:-1]):
                best, stalled = x, 0
            else:
                stalled += 1
                if stalled >= cfg.patience:
                    break
        return PoisonResult(
            target=target,
            label=label,
            poisoned_ids=chosen.numpy(),
            original=original.cpu(),
            poisoned=best.cpu(),
            success=prediction != before,
            steps=steps,
            prediction_before=before,
            prediction_after=prediction,
            losses=np.asarray(losses),
            predicted_increase=np.asarray(predicted),
        )

    def success_rates(
        self,
        test: Any,
        budgets: Sequence[int] = (1, 2, 5, 10),
        targets: Sequence[int] | Tensor | None = None,
        num_targets: int | None = None,
        seed: int = 0,
    ) -> PoisonSummary:
        """Attack every target with each budget of poisoned images.

        ``targets`` default: ``num_targets`` (default all) random test ids among those the clean model
        predicts correctly (a misprediction needs no attack).
        """
        if not budgets or any(int(b) < 1 for b in budgets):
            raise ConfigError(f"budgets must be positive numbers of images, got {budgets!r}")
        test_data = as_examples(test)
        if targets is None:
            correct = []
            for ids, b in test_data.chunks(_CHUNK):
                b = self.fn.prepare(b)
                if self.features is not None:
                    b = replace_input(b, self.input, self.encode(get_input(b, self.input)))
                ok = _predict(self.fn, self.theta, b) == get_input(b, self.label)
                correct.append(ids[ok.cpu()])
            pool = torch.cat(correct)
            order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
            chosen = pool[order[: num_targets or len(pool)]].sort().values
        else:
            chosen = test_data.check_indices(targets)
        results: dict[int, list[PoisonResult]] = {int(b): [] for b in budgets}
        jobs = [(int(b), int(t)) for b in budgets for t in chosen.tolist()]
        for b, t in progress_bar(jobs, "poisoning", self.progress, unit="attack"):
            results[b].append(self.attack(test_data, t, b))
        return PoisonSummary(tuple(int(b) for b in budgets), chosen.numpy(), results, self.config)


def binary_digits(classes: tuple[int, int] = (3, 8), seed: int = 0) -> Split:
    """Two classes of scikit-learn's digits as ``(n, 1, 8, 8)`` float64 images, labels 0/1.

    Pixels are the data set's integers 0..16 divided by 16, so the value grid is 1/16.
    """
    if len(classes) != 2 or classes[0] == classes[1] or not all(0 <= c <= 9 for c in classes):
        raise ConfigError(f"classes must be two different digits, got {classes!r}")
    d = load_digits(images=True, seed=seed, dtype=torch.float64)

    def pick(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        mask = (y == classes[0]) | (y == classes[1])
        return x[mask], (y[mask] == classes[1]).long()

    x_train, y_train = pick(d.x_train, d.y_train)
    x_test, y_test = pick(d.x_test, d.y_test)
    return Split(
        f"digits {classes[0]} vs {classes[1]}",
        x_train,
        y_train,
        x_test,
        y_test,
        (str(classes[0]), str(classes[1])),
    )


def pretrained_features(
    classes: tuple[int, int],
    channels: int = 8,
    epochs: int = 20,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A :class:`SmallCNN`'s convolutional part trained on the *other* eight digits, then frozen.

    The transfer-learning set-up of the paper (ImageNet features for dogs vs fish): the features
    never saw the two classes attacked, and only a linear head on top is retrained by the victim.
    """
    d = load_digits(images=True, seed=seed, dtype=torch.float64)
    other = (d.y_train != classes[0]) & (d.y_train != classes[1])
    torch.manual_seed(seed)
    cnn = SmallCNN(10, channels).double()
    train_minibatch(
        cnn,
        ClassificationTask(weight_decay=1e-4),
        (d.x_train[other], d.y_train[other]),
        epochs=epochs,
        lr=3e-3,
        seed=seed,
        device=device,
    )
    return cnn.features.requires_grad_(False)


def poison_digits(
    model: Literal["logistic", "cnn_features"] = "logistic",
    *,
    classes: tuple[int, int] = (3, 8),
    budgets: Sequence[int] = (1, 2, 5, 10),
    num_targets: int = 20,
    weight_decay: float = 1e-3,
    config: PoisonConfig | None = None,
    channels: int = 8,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[PoisonSummary, Split]:
    """The poisoning experiment on two digit classes: success rate for each number of poisoned images.

    ``"logistic"``: logistic regression on the 64 pixels, retrained whole. ``"cnn_features"``: a
    linear head on frozen CNN features (:func:`pretrained_features`), retrained; ``I_pert`` goes
    back to the pixels through the frozen convolutions. Both are convex in what is retrained and
    are retrained to the optimum (float64) after every poisoning step.
    """
    data = binary_digits(classes, seed)
    task = ClassificationTask(weight_decay=weight_decay)
    torch.manual_seed(seed)
    if model == "logistic":
        head: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double()
        features = None
    elif model == "cnn_features":
        features = pretrained_features(classes, channels, seed=seed, device=device)
        head = nn.Linear(channels * 16, 2).double()
    else:
        raise ConfigError(f"model must be 'logistic' or 'cnn_features', got {model!r}")
    attack = PoisoningAttack(
        head, task, data.train, features=features, config=config, device=device, progress=progress
    )
    summary = attack.success_rates(data.test, budgets=budgets, num_targets=num_targets, seed=seed)
    return summary, data
