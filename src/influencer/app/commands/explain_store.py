"""``influencer explain --store DIR``: the explain run, scored from a gradient store.

Everything but the scores is the explain run of :mod:`~influencer.app.commands.explain`: the job (the
store's, :mod:`~influencer.app.run.gradient_store`), the checks, the evaluation, the choice of test
examples, the report with its pictures or texts and the candidates to inspect, the summary and
the run's files. The scores of the chosen test examples come from the store's projected training
gradients (:meth:`~influencer.index.GradientIndex.scores`) with the preconditioner the settings
name, instead of exact gradients and inverse-HVP solves; the report and ``summary.json``
(``scores_from_store``) say which projection and preconditioner made them.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influencer._kernel.errors import ConfigError
from influencer._kernel.scores import top_k
from influencer.app.run.cached import optimality_of_norms, solver_text
from influencer.app.job.checks import check_job
from influencer.app.settings.explain import ExplainConfig
from influencer.app.run.devices import resolve_device
from influencer.app.job.evaluation import evaluate_and_choose
from influencer.app.report.explanation import ExplainResult, Explanation, StoreScoring, log_top
from influencer.app.run.gradient_store import (
    Subset,
    build_job,
    describe_store,
    influence_job,
    make_influence,
    make_preconditioner,
    open_index,
    open_store,
    preconditioner_text,
    preconditioning,
    projection_text,
    read_job_settings,
    same_directory,
    scoring_settings,
    translate_store_errors,
)
from influencer.app.job.job import Job, chosen_head
from influencer.app.run.logs import Stopwatch, logged_stop, run_logging
from influencer.app.run.outputs import output_files, write_outputs
from influencer.app.report.build import build_report
from influencer.app.run.store import RunStore, jsonable
from influencer.app.report.summary import make_summary

log = logging.getLogger("influencer.explain")

__all__ = ["explain_with_store"]

# Settings that the store fixes (it was built for one job): refused with --store, not ignored.
_FIXED = ("params", "head", "train_size")


def explain_with_store(
    config: ExplainConfig, job: Job | None = None, *, console: bool = True
) -> ExplainResult:
    """Run ``influencer explain`` with ``config.store`` (see the module docstring)."""
    assert config.store is not None
    given = [name for name in _FIXED if getattr(config, name) is not None]
    if given:
        raise ConfigError(
            f"{given[0]} cannot be combined with store: the store fixes the job it was built for (its "
            "task, parameters, head, dtype and training); build another store with influencer index "
            f"--{given[0].replace('_', '-')} ..."
        )
    device = resolve_device(config.device)
    run_dir, root = Path(config.out), Path(config.store)
    if same_directory(run_dir, root):
        raise ConfigError(
            f"--out {run_dir} is the store itself: explain writes its run elsewhere (e.g. runs/explain)"
        )
    with RunStore(run_dir) as run, run_logging(run_dir, console) as warned:
        log.info(
            "influencer explain: run directory %s (%s); scores from the gradient store %s",
            run_dir,
            datetime.now(timezone.utc).isoformat(timespec="seconds"),
            root,
        )
        log.debug("settings: %s", config.to_json())
        with logged_stop(log), open_store(root) as (store, record), translate_store_errors(root):
            return _run(config, job, store, record, run, device, warned)


def _run(
    config: ExplainConfig,
    job: Job | None,
    store: RunStore,
    record: dict[str, Any],
    run: RunStore,
    device: torch.device,
    warned: list[str],
) -> ExplainResult:
    root = store.root
    settings = read_job_settings(root, record)
    if config.task is not None:
        settings["task"] = config.task
    config = config.replace(**settings)  # the store's job (what the report and summary record)
    log.info("%s", describe_store(root, record))
    clock = Stopwatch(device)
    with clock("total"):
        with clock("build"):
            job = build_job(config, store, device, job)
        log.info("job: %s; %d training and %d test examples", job.name, len(job.train), len(job.test))
        check_job(config, job, device)
        with clock("features"):
            on = influence_job(job, config, store, device)
        evaluation, test_ids, choice = evaluate_and_choose(on, len(job.test), config, device, clock)

        kind, damping = preconditioning(record, config.preconditioner, config.damping)
        use_estimator = kind == "ekfac"
        inf = make_influence(config, on, device, (kind, damping))
        index = open_index(root, inf, chosen_head(config, job))
        pre = make_preconditioner(kind, damping)
        if use_estimator:
            with clock("fit"):
                inf.fit()
        projection, directions = projection_text(record), preconditioner_text(pre, index, inf)
        log.info("scores: %s; test directions: %s", projection, directions)
        with clock("scores"):
            scores = index.scores(Subset(on.test, test_ids), preconditioner=pre).double().cpu().numpy()
        top = top_k(torch.from_numpy(scores), config.top_k)
        solver: dict[str, Any] = {}
        if use_estimator:
            solver = jsonable(getattr(inf.solver, "info", {}), limit=20)
            log.info(
                "test directions: solved %d with %s %s",
                len(test_ids),
                inf.estimator.name,
                solver_text(solver),
            )
        optimality = _optimality(record)
        scoring = StoreScoring(
            str(root), projection, directions, scoring_settings(root, record, pre, index), use_estimator
        )
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
            None,  # the directions are projected (k), not parameter-space: no feature attributions
            optimality=optimality,
            scoring=scoring,
        )
        log_top(ex)
        with clock("report"):
            report = build_report(ex, run.root)
    summary = make_summary(ex, clock.timings, output_files(report), warned)
    files = write_outputs(run, ex, report, summary)
    log.info("done in %.1f s", clock.timings["total"])
    return ExplainResult(
        config, run.root, test_ids, scores, top, evaluation.accuracy, summary, clock.timings, files
    )


def _optimality(record: dict[str, Any]) -> dict[str, float] | None:
    """How far the model is from a minimum, as measured on the store's gradients when it was built
    (warned again here, so the run's summary carries it)."""
    found = record.get("optimality")
    if not isinstance(found, dict):
        return None
    try:
        norm, mean = float(found["objective_gradient_norm"]), float(found["mean_example_gradient_norm"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (np.isfinite(norm) and np.isfinite(mean)):
        return None
    return optimality_of_norms(norm, mean)
