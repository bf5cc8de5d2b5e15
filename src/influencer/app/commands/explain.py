"""The ``influencer explain`` job as a Python function: which training examples explain these predictions?

Usage::

    from influencer.app import ExplainConfig, explain
    result = explain(ExplainConfig(out="runs/digits", test_ids=(3, 17)))
    result.scores            # (n_test, n_train) removal scores, positive = helpful
    result.summary["tests"]  # per test example: label, prediction, top helpful/harmful ids and scores

This module only orchestrates: build the job (:mod:`~influencer.app.job.job`), evaluate the model and
choose the test examples (:mod:`~influencer.app.job.evaluation`), solve ``s_test = H^-1 grad f(test)``
for each and dot it with every training gradient, both through the run directory's cache
(:mod:`~influencer.app.run.cached`), then hand the results to the report
(:mod:`~influencer.app.report.build`), the summary (:mod:`~influencer.app.report.summary`) and the writer of
the run's files (:mod:`~influencer.app.run.outputs`).
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import torch

from influencer._kernel.scores import top_k
from influencer.app.run.cached import open_sections, scores_from_cache, test_directions
from influencer.app.job.checks import check_job, influence_params
from influencer.app.settings.explain import ExplainConfig
from influencer.app.run.devices import resolve_device
from influencer.app.job.evaluation import (
    choose_hessian_ids,
    evaluate_and_choose,
)
from influencer.app.report.explanation import ExplainResult, Explanation, log_top, names_text
from influencer.app.job.job import Job, digits_job, influence_job, load_job
from influencer.app.run.logs import Stopwatch, logged_stop, run_logging
from influencer.app.run.outputs import output_files, write_outputs
from influencer.app.report.build import build_report
from influencer.app.run.store import RunStore
from influencer.app.report.summary import make_summary
from influencer.influence import Influence

log = logging.getLogger("influencer.explain")

__all__ = ["ExplainResult", "explain", "resolve_device"]


def explain(config: ExplainConfig, job: Job | None = None, *, console: bool = True) -> ExplainResult:
    """Run the whole job (see the module docstring); ``job`` overrides ``config.task``.

    With ``config.store`` the scores come from that gradient store instead
    (:mod:`~influencer.app.commands.explain_store`).
    """
    if config.store is not None:
        from influencer.app.commands.explain_store import explain_with_store

        return explain_with_store(config, job, console=console)
    device = resolve_device(config.device)
    run_dir = Path(config.out)
    with RunStore(run_dir) as store, run_logging(run_dir, console) as warned:
        log.info(
            "influencer explain: run directory %s (%s)",
            run_dir,
            datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        log.debug("settings: %s", config.to_json())
        with logged_stop(log):
            return _run(config, job, store, device, warned)


def _run(
    config: ExplainConfig, job: Job | None, store: RunStore, device: torch.device, warned: list[str]
) -> ExplainResult:
    clock = Stopwatch(device)
    with clock("total"):
        with clock("build"):
            if job is None:
                job = digits_job(config, store, device) if config.task is None else load_job(config.task)
            job.model.to(device).eval()
        log.info("job: %s; %d training and %d test examples", job.name, len(job.train), len(job.test))
        check_job(config, job, device)

        with clock("features"):
            on = influence_job(job, config, store, device)  # `job`, or its head on cached features

        evaluation, test_ids, choice = evaluate_and_choose(on, len(job.test), config, device, clock)

        inf = _influence(config, on, device)
        with clock("directions"):
            directions_cache, gradients_cache = open_sections(store, inf, config.batch_size)
            directions = test_directions(inf, on.test, test_ids, directions_cache, config.progress, clock)
        with clock("gradients"):
            scores, optimality = scores_from_cache(inf, directions, gradients_cache, config.batch_size)

        top = top_k(torch.from_numpy(scores), config.top_k)
        solver = dict(directions_cache.meta.get("solver", {}))
        ex = Explanation(
            config,
            job,
            inf,
            evaluation,
            test_ids,
            scores,
            top,
            solver,
            choice,
            directions,
            optimality=optimality,
        )
        log_top(ex)
        with clock("report"):
            report = build_report(ex, store.root)
    summary = make_summary(ex, clock.timings, output_files(report), warned)
    files = write_outputs(store, ex, report, summary)
    log.info("done in %.1f s", clock.timings["total"])
    return ExplainResult(
        config, store.root, test_ids, scores, top, evaluation.accuracy, summary, clock.timings, files
    )


def _influence(config: ExplainConfig, job: Job, device: torch.device) -> Influence:
    """The (unfitted) :class:`Influence` the settings describe."""
    params = influence_params(config, job)
    estimator = config.make_estimator()
    inf = Influence(
        job.model,
        job.task,
        job.train,
        estimator=estimator,
        curvature=config.curvature,
        params=params,  # type: ignore[arg-type]
        batch_size=config.batch_size,
        hessian_batch_size=config.hessian_batch_size or job.hessian_batch_size or 512,
        hessian_indices=choose_hessian_ids(config, job, device),
        device=device,
        dtype=torch.float64 if config.dtype == "float64" else torch.float32,
        progress=config.progress,
    )
    log.info(
        "influence over %d parameters (%s) with %s, %s curvature, damping %g, %s",
        inf.p,
        names_text(inf.fn.names),
        estimator.name,
        config.curvature,
        estimator.damping,
        config.dtype,
    )
    return inf
