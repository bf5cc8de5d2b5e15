"""How a job is retrained for ``influencer evaluate``: the job's own recipe (``Job.retrain``, from
``Job.make_model`` when given), else L-BFGS to the optimum for a linear model (or head, warm-started,
as influence assumes) and, for a network, Adam from a fresh initialisation per seed.

The single-model setting of the LDS (:func:`single_model`) replays instead the one run that made the
model, with some examples' weights lowered: the job's own recipe from its start (same seed, order and
batches), or, for a linear model or head refitted to its optimum, that refit (the optimum of a
convex objective does not depend on where it starts, so the re-weighted optimum is one model too)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from influencer import Influence
from influencer.app.job.job import Job
from influencer.app.settings.explain import ExplainConfig
from influencer.errors import ConfigError
from influencer.retraining import AdamRetrainer, LBFGSRetrainer, Retrainer, StepwiseRetrainer
from influencer.uses.validation import Start

__all__ = ["is_linear", "log_replay", "recipe", "reinitialised", "single_model", "start_parameters"]

log = logging.getLogger("influencer.evaluate")


def is_linear(model: nn.Module) -> bool:
    """One ``nn.Linear`` holds every parameter: the objective is convex for the built-in tasks."""
    holders = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    return len(holders) == 1 and isinstance(holders[0], nn.Linear)


def reinitialised(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every layer's ``reset_parameters()`` called under ``seed``."""
    fresh = copy.deepcopy(model)
    holders = [m for m in fresh.modules() if any(True for _ in m.parameters(recurse=False))]
    missing = sorted({type(m).__name__ for m in holders if not hasattr(m, "reset_parameters")})
    if missing:
        raise ConfigError(
            f"cannot re-initialise the model to retrain it from scratch: {', '.join(missing)} has no "
            "reset_parameters(). Give the job a make_model (seed -> a fresh model) or a retrain recipe"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in holders:
            m.reset_parameters()
    return fresh


def recipe(job: Job, config: ExplainConfig) -> tuple[Retrainer, Start, str]:
    """``(retrainer, start, description)`` for retraining the job's model (see the module doc)."""
    if job.retrain is not None:
        start: Start = _fresh(job.make_model) if job.make_model is not None else None
        where = "from a fresh model per seed (the job's make_model)" if start else "warm-started"
        return job.retrain, start, f"the job's recipe, {where}"
    if is_linear(job.model) and job.make_model is None:
        return LBFGSRetrainer(), None, "L-BFGS to the optimum, warm-started (a linear model: convex)"
    epochs, lr = config.digits("epochs"), config.digits("lr")
    adam = AdamRetrainer(epochs=epochs, lr=lr, batch_size=config.digits("train_batch_size"))
    if job.make_model is not None:
        return (
            adam,
            _fresh(job.make_model),
            f"Adam, {epochs} epochs, from the job's make_model per seed",
        )
    reinitialised(job.model, 0)  # refuses a model it cannot re-initialise, before any work
    return (
        adam,
        lambda seed: reinitialised(job.model, seed),
        f"Adam, {epochs} epochs (lr {lr:g}), from a re-initialised copy per seed (set Job.retrain to choose)",
    )


def single_model(job: Job, retrainer: Retrainer, start: Start, head: str | None) -> tuple[Start, str]:
    """Where the single-model replay of ``job`` (as :func:`recipe` retrains it) starts, and how it
    is said; one line naming what is missing when the model was not made by one replayable run."""
    if not isinstance(retrainer, StepwiseRetrainer):  # to the optimum: one model, wherever it starts
        return start, f"{_described(retrainer)}, the left-out examples re-weighted (one optimum)"
    if job.retrain is None:
        raise ConfigError(
            "--setting single-model replays the run that trained the model, and this job does not say "
            "how it was trained: give the Job retrain=<its recipe, with its seed> and start=<the initial "
            "model> (or make_model), or use --setting seed-averaged"
        )
    if head is not None:
        raise ConfigError(
            f"--setting single-model with the head {head!r} would replay the network's recipe on the head "
            "alone: leave the head out (--params all), or use --setting seed-averaged"
        )
    if job.start is not None:
        begin: Start = job.start
    elif job.make_model is not None:
        begin = _fresh(job.make_model)
    else:
        raise ConfigError(
            "--setting single-model replays the run that trained the model: give the Job start=<the "
            "initial model> (or make_model, a seed -> model function)"
        )
    seed = retrainer.seed
    return begin, (
        f"the job's recipe replayed from its start (seed {seed}, the same order and batches), the "
        "left-out examples re-weighted"
    )


def start_parameters(inf: Influence, start: Start, seed: int) -> Tensor | None:
    """The chosen parameters ``(p,)`` a refit starts from (None: from the model)."""
    made = start(seed) if callable(start) and not isinstance(start, nn.Module) else start
    return inf.parameters_of(made) if isinstance(made, nn.Module) else made


def log_replay(inf: Influence, replay: Tensor) -> None:
    """Log how closely the single-model replay with every weight 1 reproduces the model."""
    theta = inf.theta.to(replay)
    gap = float((replay - theta).abs().max() / theta.abs().max().clamp_min(1.0))
    if gap <= 1e-3:
        log.info("single-model: the replay with every weight 1 reproduces the model (difference %.2g)", gap)
    else:
        log.warning(
            "single-model: the replay with every weight 1 differs from the model by %.2g (relative to its "
            "largest weight): the LDS measures changes of the replayed run, not of this model", gap,
        )  # fmt: skip


def _described(retrainer: Retrainer) -> str:
    if isinstance(retrainer, LBFGSRetrainer):
        return "L-BFGS to the optimum"
    return f"the job's recipe ({type(retrainer).__name__})"


def _fresh(make_model: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
    def start(seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return make_model(seed)

    return start
