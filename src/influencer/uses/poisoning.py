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

Usage::

    inf = Influence(model, task, train, estimator=Exact())      # what the victim retrains
    attack = PoisoningAttack(inf, config=PoisonConfig(max_change=2 / 16))
    result = attack.attack(test, target=17, k=5)                # result.success, result.poisoned

``reproductions.poisoning`` runs it over many targets and budgets on the digits.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vjp

from influencer._kernel.data import Examples, as_examples
from influencer._kernel.errors import ConfigError, DataError
from influencer._kernel.task import classes_from_outputs
from influencer.influence import Influence
from influencer.retraining import LBFGSRetrainer, Retrainer
from influencer.uses.perturbation import (
    InputPath,
    PatchedExamples,
    PerturbationInfluence,
    check_input,
    get_input,
    replace_input,
)

_CHUNK = 256  # examples per forward pass when encoding, pulling back and scoring


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
    """

    max_change: float = 2 / 16
    step: float = 1 / 16
    grid: float | None = 1 / 16
    lower: float = 0.0
    upper: float = 1.0
    max_steps: int = 10
    patience: int = 2
    select: Literal["gain", "helpful"] = "gain"

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

    ``influence`` describes what the victim retrains: its model, task, chosen ``params`` and clean
    training data; its curvature kind and estimator give ``H^-1`` at every retrained optimum
    (``Exact`` suits the small convex models of the attack). Everything is computed in float64 on
    the influence's device. Two set-ups, as in the paper:

    * ``features=None``: the influence's model reads the training inputs and its chosen
      parameters are retrained; other parameters stay frozen and ``I_pert`` is back-propagated
      through them.
    * ``features=extractor``: a frozen feature extractor (e.g. a trained CNN's convolutional part)
      maps the raw ``inputs`` ``(n, *x)`` to the features the influence's model (the head) is
      trained on, i.e. ``influence.train`` holds ``extractor(inputs)`` at ``input``. Features are
      computed once (only poisoned images are re-encoded) and ``I_pert`` with respect to the
      features is pulled back to the raw inputs through the extractor's vector-Jacobian product:
      the same gradient as the first set-up on the whole network with ``params=["head"]``, at a
      fraction of the cost.

    The victim's model is first refitted to the optimum of the clean data, from the influence's
    parameters; every attack starts from there.

    Args:
        influence: an :class:`~influencer.influence.Influence` of the retrained model on the clean
            training data (need not be fitted); batches hold the input at ``input`` (default
            ``batch[0]``) and the label at ``label`` (default ``batch[1]``).
        features: optional frozen feature extractor applied to ``inputs`` (never modified).
        inputs: the raw training inputs ``(n, *x)`` in training order; only with ``features``.
        config: bound, grid, steps and selection (:class:`PoisonConfig`).
        retrainer: how the victim refits to the optimum after each poisoning step (default
            :class:`~influencer.retraining.LBFGSRetrainer`, warm-started).
        progress: show a progress bar over attacks (default: the influence's setting).
    """

    def __init__(
        self,
        influence: Influence,
        *,
        features: nn.Module | None = None,
        inputs: Tensor | None = None,
        config: PoisonConfig | None = None,
        input: InputPath = 0,
        label: InputPath = 1,
        retrainer: Retrainer | None = None,
        progress: bool | None = None,
    ) -> None:
        if not isinstance(influence, Influence):
            raise ConfigError(f"influence must be an influencer.Influence, got {type(influence).__name__}")
        self.config = config or PoisonConfig()
        self.input = input
        self.label = label
        self.progress = influence.progress if progress is None else progress
        clean = influence.replace(dtype=torch.float64)
        clean.progress = False  # the attack's own bar covers its many refits and solves
        fn = clean.fn
        given = torch.cat([get_input(fn.prepare(b), input) for _, b in clean.train.chunks(_CHUNK)])
        self.features = None
        if features is None:
            if inputs is not None:
                raise ConfigError(
                    "inputs= goes with features=: without a feature extractor the poisoned inputs are "
                    "the influence's own training inputs"
                )
            self.clean_inputs = given  # (n, *x)
        else:
            if inputs is None:
                raise ConfigError(
                    "features= needs inputs=: the raw training inputs (n, *x) that the extractor maps to "
                    "the influence's training features"
                )
            # A private float64 copy: the user's extractor is neither cast nor moved.
            self.features = copy.deepcopy(features).to(fn.device, torch.float64).eval()
            self.features.requires_grad_(False)
            self.clean_inputs = torch.as_tensor(inputs).to(fn.device)
            if len(self.clean_inputs) != clean.n:
                raise DataError(
                    f"inputs has {len(self.clean_inputs)} examples but the influence has {clean.n} training "
                    "examples: pass the raw inputs of the same examples, in the same order"
                )
        check_input(self.clean_inputs, input)
        self.clean_inputs = self.clean_inputs.to(torch.float64)
        self.config.check_inputs(self.clean_inputs)
        if self.features is not None:
            codes = self.encode(self.clean_inputs)
            scale = float(codes.abs().max()) if codes.numel() else 0.0
            if codes.shape != given.shape or not torch.allclose(given, codes, rtol=1e-4, atol=1e-5 * scale):
                raise DataError(
                    "the influence's training inputs are not features(inputs): build the Influence on "
                    "(features(inputs), labels), with inputs in the same order"
                )
            clean = clean.replace(train=_Encoded(clean.train, codes, input))
        self.retrainer = retrainer if retrainer is not None else LBFGSRetrainer()
        if not isinstance(self.retrainer, Retrainer):
            raise ConfigError(
                f"retrainer must be an influencer Retrainer, got {type(self.retrainer).__name__}"
            )
        # The victim's model retrained on the clean data: the optimum every attack starts from.
        self.influence = clean.replace(theta=self.retrainer.refit(clean)).fit()
        self.n = self.influence.n

    @property
    def theta(self) -> Tensor:
        """The victim's parameters ``(p,)`` at the clean optimum (float64)."""
        return self.influence.theta

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
        batch = self.influence.fn.prepare(test.take(torch.tensor([target])))
        if self.features is None:
            return batch
        return replace_input(batch, self.input, self.encode(get_input(batch, self.input)))

    def _predict(self, victim: Influence, batch: Any) -> Tensor:
        """Class predictions ``(B,)`` as :func:`influencer._kernel.task.predictions` makes them."""
        with torch.no_grad():
            return classes_from_outputs(victim.fn.outputs(victim.theta, batch))

    def _effects(self, victim: Influence, s: Tensor, ids: Tensor, x: Tensor) -> Tensor:
        """``d f(target) / d x_i`` ``(len(ids), *x)`` for training ids ``ids`` whose inputs are ``x``.

        ``s`` ``(1, p)`` is ``H^-1 grad f(target)`` of the fitted ``victim``.
        """
        pert = PerturbationInfluence(victim, self.input, batch_size=_CHUNK)
        return self._pullback(x, pert.effects_from_directions(s, ids)[0])

    # ---- the attack ------------------------------------------------------------------------------

    def input_effects(self, test: Any, target: int, ids: Sequence[int] | Tensor | None = None) -> Tensor:
        """``d f(target) / d x_i`` ``(k, *x)`` on the clean data for training ids (default all)."""
        batch = self._prepare_test(as_examples(test), target)
        idx = self.influence.train.check_indices(ids)
        s = self.influence.test_directions(batch)
        return self._effects(self.influence, s, idx, self.clean_inputs[idx.to(self.clean_inputs.device)])

    def choose(self, target: Any, k: int) -> Tensor:
        """The ``k`` training ids to poison against ``target`` (a prepared one-example batch)."""
        if not 1 <= k <= self.n:
            raise ConfigError(f"the number of poisoned images must lie in [1, {self.n}], got {k}")
        s = self.influence.test_directions(target)
        if self.config.select == "helpful":
            gains = self.influence.scores_from_directions(s)[0]
        else:
            cfg, x = self.config, self.clean_inputs
            effect = self._effects(self.influence, s, torch.arange(self.n), x)
            up, down = (cfg.upper - x).clamp(max=cfg.max_change), (x - cfg.lower).clamp(max=cfg.max_change)
            gains = (effect.abs() * torch.where(effect > 0, up, down)).reshape(self.n, -1).sum(1)
        return gains.topk(k).indices.cpu()

    def correctly_predicted(self, test: Any) -> Tensor:
        """Test ids ``(m,)`` the clean victim predicts correctly (the targets worth attacking)."""
        fn = self.influence.fn
        correct = []
        for ids, b in as_examples(test).chunks(_CHUNK):
            b = fn.prepare(b)
            if self.features is not None:
                b = replace_input(b, self.input, self.encode(get_input(b, self.input)))
            ok = self._predict(self.influence, b) == get_input(b, self.label)
            correct.append(ids[ok.cpu()])
        return torch.cat(correct)

    def attack(
        self, test: Any, target: int, k: int, ids: Sequence[int] | Tensor | None = None
    ) -> PoisonResult:
        """Poison ``k`` training inputs (``ids``, else by ``config.select``) against test id ``target``."""
        cfg = self.config
        batch = self._prepare_test(as_examples(test), target)
        label = int(get_input(batch, self.label)[0])
        clean = self.influence
        before = int(self._predict(clean, batch)[0])
        chosen = self.choose(batch, k) if ids is None else clean.train.check_indices(ids)
        original = self.clean_inputs[chosen.to(self.clean_inputs.device)]
        x = original.clone()
        victim = clean  # fitted at the optimum of the current (poisoned) training data
        everyone = torch.arange(self.n)
        losses = [float(victim.measurements(batch)[0])]
        predicted: list[float] = []
        prediction, steps, stalled = before, 0, 0
        best = x  # the poisoned inputs that raised the retrained target loss most
        for steps in range(1, cfg.max_steps + 1):
            s = victim.test_directions(batch)
            effect = self._effects(victim, s, chosen, x)
            new = cfg.project(x + cfg.step * torch.sign(effect), original)
            if torch.equal(new, x):  # every value sits at its bound: no further progress possible
                steps -= 1
                break
            predicted.append(float((effect * (new - x)).sum()))
            x = new
            poisoned = clean.replace(train=PatchedExamples(clean.train, chosen, self.encode(x), self.input))
            theta = self.retrainer.refit(poisoned, everyone, victim.theta)
            victim = poisoned.replace(theta=theta).fit()
            losses.append(float(victim.measurements(batch)[0]))
            prediction = int(self._predict(victim, batch)[0])
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
