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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influencer import top_k
from influencer.app.job.evaluation import evaluate_and_choose
from influencer.app.job.job import Job
from influencer.app.report.explanation import ExplainResult, Explanation, StoreScoring, log_top
from influencer.app.run.cached import optimality_of_norms, solver_text
from influencer.app.run.checkpoints import Checkpoints, checkpoints_or_store, open_checkpoints
from influencer.app.run.devices import resolve_device
from influencer.app.run.gradient_store import (
    open_store,
    read_job_settings,
    refuse_store_as_run,
    same_directory,
)
from influencer.app.run.logs import Stopwatch, opened_run
from influencer.app.run.outputs import finish
from influencer.app.run.store import RunStore, jsonable
from influencer.app.run.store_scoring import Subset, describe_store, projection_text
from influencer.app.settings.explain import ExplainConfig
from influencer.app.steps import Ran, prepare, store_scorer
from influencer.errors import ConfigError

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
    resolve_device(config.device)  # a device this machine lacks is refused before anything is written
    run_dir, root = Path(config.out), Path(config.store)
    if same_directory(run_dir, root):
        raise ConfigError(
            f"--out {run_dir} is the store itself: explain writes its run elsewhere (e.g. runs/explain)"
        )
    refuse_store_as_run(config.out)
    checkpoints = checkpoints_or_store(
        root, config.task, job is not None, preconditioner=config.preconditioner,
        relative_damping=config.relative_damping, damping=config.damping,
    )  # fmt: skip
    title, after = f"influencer explain: run directory {run_dir}", f"; scores from the gradient store {root}"
    with opened_run(run_dir, console, log, title, settings=config.to_json(), after=after) as (run, warned):
        if checkpoints is not None:
            return _run_checkpoints(config, job, checkpoints, run, warned)
        with open_store(root) as (store, record):
            return _run(config, job, store, record, run, warned)


def _run_checkpoints(
    config: ExplainConfig, job: Job | None, found: Checkpoints, run: RunStore, warned: list[str]
) -> ExplainResult:
    """The explain run scored from checkpoint stores, combined as the library combines them."""
    names = found.header["fingerprint"]["params"]
    config = config.replace(params=tuple(names))  # the stores' parameters, on the whole model
    log.info("checkpoint stores %s: %s", found.root, ", ".join(p.name for p in found.paths))
    clock = Stopwatch(config.device)
    with clock("total"):
        prepared = prepare(config, clock, job)
        on = prepared.on
        evaluation, test_ids, choice = evaluate_and_choose(on, len(on.test), config, prepared.device, clock)
        stores = open_checkpoints(found, prepared.job, prepared.device, config.batch_size)
        log.info("scores: %s", found.text())
        with clock("scores"):
            scores = stores.scores(Subset(prepared.job.test, test_ids)).double().cpu().numpy()
        inf = stores.indexes[0].influence
        projection = projection_text({**found.header, "num_parameters": found.header["p"]})
        scoring = StoreScoring(str(found.root), projection, f"nothing ({found.text()})", found.settings())
        ran = Ran(
            method=config.method, estimator={"estimator": "none"}, curvature=None, damping={"kind": "none"},
            parameters={"count": inf.p, "names": names[:50], "head": None}, reason=found.text(),
            dtype=config.dtype, device=str(inf.device), hessian=None, store=found.settings(),
        )  # fmt: skip
        top = top_k(torch.from_numpy(scores), config.top_k)
        ex = Explanation(
            config, prepared.job, inf, evaluation, test_ids, scores, top, {}, choice, None,
            scoring=scoring, ran=ran,
        )  # fmt: skip
        log_top(ex)
        return finish(ex, run, clock, warned)


def _run(
    config: ExplainConfig,
    job: Job | None,
    store: RunStore,
    record: dict[str, Any],
    run: RunStore,
    warned: list[str],
) -> ExplainResult:
    root = store.root
    settings = read_job_settings(root, record, config.task, job is not None)
    config = config.replace(**settings)  # the store's job (what the report and summary record)
    log.info("%s", describe_store(root, record))
    clock = Stopwatch(config.device)
    with clock("total"):
        prepared = prepare(config, clock, job)
        on = prepared.on
        evaluation, test_ids, choice = evaluate_and_choose(on, len(on.test), config, prepared.device, clock)
        scorer = store_scorer(config, prepared, root, record, clock)
        inf = scorer.influence
        with clock("scores"):
            test = Subset(on.test, test_ids)
            scores = scorer.index.scores(test, preconditioner=scorer.preconditioner).double().cpu().numpy()
        solver: dict[str, Any] = {}
        if scorer.solves:
            solver = jsonable(getattr(inf.solver, "info", {}), limit=20)
            log.info(
                "test directions: solved %d with %s %s",
                len(test_ids),
                inf.estimator.name,
                solver_text(solver),
            )
        scoring = StoreScoring(
            str(root), scorer.projection, scorer.directions, scorer.settings, scorer.solves
        )
        top = top_k(torch.from_numpy(scores), config.top_k)
        # the directions are projected (k), not parameter-space: no feature attributions (None)
        ex = Explanation(
            config, prepared.job, inf, evaluation, test_ids, scores, top, solver, choice, None,
            optimality=_optimality(record), scoring=scoring, ran=scorer.ran,
        )  # fmt: skip
        log_top(ex)
        return finish(ex, run, clock, warned)


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
