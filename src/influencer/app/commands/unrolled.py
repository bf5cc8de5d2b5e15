"""``influencer explain --method unrolled``: scores from the exact derivative through the training run.

Influence functions assume training reached an optimum; :class:`influencer.Unrolled` differentiates
the test loss through every step of the job's own training recipe instead. It needs a job that
carries its recipe: ``Job.retrain`` a stepwise recipe (``AdamRetrainer``, ``SGDRetrainer``) and
``Job.start`` (the initial model) or ``Job.make_model``; the built-in digits job is trained that way
for this method (Adam from a seeded start, kept in the job cache). The replay is verified against
the model; a few real re-weighted replays then measure how far the derivative extrapolates (from a
0.1% re-weighting to removing 10% of the data), reported with the scores, in the report and in
``summary.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from influencer import Unrolled, top_k
from influencer.app.job.evaluation import evaluate_and_choose
from influencer.app.job.job import Job
from influencer.app.report.explanation import ExplainResult, Explanation, log_top
from influencer.app.run.devices import resolve_device
from influencer.app.run.gradient_store import refuse_store_as_run
from influencer.app.run.logs import Stopwatch, opened_run
from influencer.app.run.outputs import finish
from influencer.app.run.store import RunStore
from influencer.app.settings.explain import ExplainConfig
from influencer.app.steps import Ran, prepare
from influencer.errors import ConfigError
from influencer.retraining import StepwiseRetrainer

log = logging.getLogger("influencer.explain")

__all__ = ["explain_unrolled", "extrapolate", "recipe_and_start", "refuse_unrolled_settings", "replayed"]

# Re-weighting strengths of the extrapolation check: a tiny re-weighting, a tenth, full removal.
STRENGTHS = (1e-3, 0.1, 1.0)


def explain_unrolled(config: ExplainConfig, job: Job | None = None, *, console: bool = True) -> ExplainResult:
    """Run ``influencer explain --method unrolled`` (see the module docstring)."""
    refuse_unrolled_settings(config)
    resolve_device(config.device)  # a device this machine lacks is refused before anything is written
    run_dir = Path(config.out)
    refuse_store_as_run(config.out)
    title = f"influencer explain --method unrolled: run directory {run_dir}"
    with opened_run(run_dir, console, log, title) as (store, warned):
        return _run(config, job, store, warned)


def refuse_unrolled_settings(config: ExplainConfig) -> None:
    """One line for a setting that does not apply to the unrolled derivative."""
    given = [name for name in ("head", "params", "hessian_size") if getattr(config, name) is not None]
    if given or config.estimator != "auto" or config.store is not None:
        what = f"--{given[0].replace('_', '-')}" if given else "--store" if config.store else "--estimator"
        raise ConfigError(
            f"{what} does not apply with --method unrolled: it differentiates the whole training run "
            "(every parameter the recipe trains), with no curvature or store"
        )


def recipe_and_start(job: Job) -> tuple[StepwiseRetrainer, Any]:
    """The job's training recipe and initial model, or a one-line refusal naming what is missing."""
    if not isinstance(job.retrain, StepwiseRetrainer):
        raise ConfigError(
            "--method unrolled needs the job's training recipe: give the Job retrain=AdamRetrainer(...) "
            "or SGDRetrainer(...) (the recipe that trained the model, with its seed) and start=<the "
            "initial model>"
        )
    if job.start is not None:
        return job.retrain, job.start
    if job.make_model is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(job.retrain.seed)
            return job.retrain, job.make_model(job.retrain.seed)
    raise ConfigError(
        "--method unrolled needs the model the recipe started from: give the Job start=<the initial "
        "model> (or make_model, a seed -> model function)"
    )


def replayed(config: ExplainConfig, job: Job, device: torch.device, clock: Stopwatch) -> tuple[Unrolled, Ran]:
    """The :class:`Unrolled` of the job's recipe and start, fitted (its replay verified), and the
    record of what it runs. ``explain`` and ``evaluate`` with ``--method unrolled`` share it."""
    recipe, start = recipe_and_start(job)
    unrolled = Unrolled(
        job.model, job.task, job.train, recipe=recipe, start=start, device=device,
        dtype=config.torch_dtype, progress=config.progress,
    )  # fmt: skip
    with clock("replay"):
        unrolled.fit()
    log.info(
        "replayed the recipe (%d steps): it reproduces the model (largest difference %.2g)",
        unrolled.steps, unrolled.replay_difference,
    )  # fmt: skip
    inf = unrolled.influence
    ran = Ran(
        method="unrolled",
        estimator={"estimator": "unrolled", **_without_method(unrolled.summary())},
        curvature=None,
        damping={"kind": "none"},
        parameters={"count": inf.p, "names": inf.fn.names[:50], "head": None},
        reason="the exact derivative of the test loss through the recipe's steps (no optimum assumed)",
        dtype=config.dtype,
        device=str(inf.device),
        hessian=None,
    )
    return unrolled, ran


def _without_method(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "method"}


def extrapolate(unrolled: Unrolled, test: Any, scores: torch.Tensor, seed: int, clock: Stopwatch) -> None:
    """Measure how far the derivative extrapolates (:data:`STRENGTHS`, one subset), and log it; the
    result is in ``unrolled.summary()``."""
    with clock("extrapolation"), warnings.catch_warnings():
        warnings.simplefilter("always", RuntimeWarning)  # logged by run_logging, once each
        reach = unrolled.extrapolation(test, scores, strengths=STRENGTHS, subsets=1, seed=seed)
    log.info(
        "extrapolation: re-weighting 10%% of the examples by %s, the actual change is %s x the "
        "predicted one",
        ", ".join(f"{e:g}" for e in reach.strengths), ", ".join(f"{s:.2f}" for s in reach.slopes),
    )  # fmt: skip


def _run(config: ExplainConfig, job: Job | None, store: RunStore, warned: list[str]) -> ExplainResult:
    clock = Stopwatch(config.device)
    with clock("total"):
        prepared = prepare(config, clock, job)
        job = prepared.job
        recipe_and_start(job)  # a job without its recipe is refused before the evaluation
        evaluation, test_ids, choice = evaluate_and_choose(job, len(job.test), config, prepared.device, clock)
        unrolled, ran = replayed(config, job, prepared.device, clock)
        test = job.test.take(torch.as_tensor(test_ids))
        with clock("reverse"):
            scores = unrolled.scores(test)
        extrapolate(unrolled, test, scores, config.seed, clock)
        ran.estimator = {"estimator": "unrolled", **_without_method(unrolled.summary())}
        ex = Explanation(
            config, job, unrolled.influence, evaluation, test_ids, scores.double().cpu().numpy(),
            top_k(scores, config.top_k),
            dataclasses.asdict(unrolled.reverse_stats) if unrolled.reverse_stats else {}, choice, None,
            ran=ran,
        )  # fmt: skip
        log_top(ex)
        return finish(ex, store, clock, warned)
