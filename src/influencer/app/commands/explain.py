"""``influencer explain`` as a Python function: which training examples explain these predictions?

Usage::

    from influencer.app import ExplainConfig, explain
    result = explain(ExplainConfig(out="runs/digits", test_ids=(3, 17)))
    result.scores            # (n_test, n_train) removal scores, positive = helpful
    result.summary["tests"]  # per test example: label, prediction, top helpful/harmful ids and scores

The shared steps (:mod:`influencer.app.steps`): the job and its features, the evaluation and the
choice of test examples, the :class:`~influencer.Influence` of the settings; then
``s_test = H^-1 grad f(test)`` for each test example dotted with every training gradient, both
through the run directory's cache (:mod:`~influencer.app.run.cached`), and the outputs
(:mod:`~influencer.app.run.outputs`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from influencer import top_k
from influencer.app.job.evaluation import evaluate_and_choose
from influencer.app.job.job import Job
from influencer.app.report.explanation import ExplainResult, Explanation, log_top
from influencer.app.run.cached import open_sections, scores_from_cache, test_directions
from influencer.app.run.devices import resolve_device
from influencer.app.run.gradient_store import refuse_store_as_run
from influencer.app.run.logs import Stopwatch, opened_run
from influencer.app.run.outputs import finish
from influencer.app.run.store import RunStore
from influencer.app.settings.explain import ExplainConfig
from influencer.app.steps import build_influence, prepare

log = logging.getLogger("influencer.explain")

__all__ = ["ExplainResult", "explain"]


def explain(config: ExplainConfig, job: Job | None = None, *, console: bool = True) -> ExplainResult:
    """Run the whole job (see the module docstring); ``job`` overrides ``config.task``.

    With ``config.store`` the scores come from that gradient store instead
    (:mod:`~influencer.app.commands.explain_store`); with ``method="unrolled"`` from the exact
    derivative through the job's training run (:mod:`~influencer.app.commands.unrolled`).
    """
    if config.store is not None:
        from influencer.app.commands.explain_store import explain_with_store

        return explain_with_store(config, job, console=console)
    if config.method == "unrolled":
        from influencer.app.commands.unrolled import explain_unrolled

        return explain_unrolled(config, job, console=console)
    resolve_device(config.device)  # a device this machine lacks is refused before anything is written
    run_dir = Path(config.out)
    refuse_store_as_run(config.out)
    title = f"influencer explain: run directory {run_dir}"
    with opened_run(run_dir, console, log, title, settings=config.to_json()) as (store, warned):
        return _run(config, job, store, warned)


def _run(config: ExplainConfig, job: Job | None, store: RunStore, warned: list[str]) -> ExplainResult:
    clock = Stopwatch(config.device)
    with clock("total"):
        prepared = prepare(config, clock, job)
        on = prepared.on
        evaluation, test_ids, choice = evaluate_and_choose(on, len(on.test), config, prepared.device, clock)
        inf, ran = build_influence(config, prepared)
        with clock("directions"):
            directions_cache, gradients_cache = open_sections(store, inf, config.batch_size)
            directions = test_directions(inf, on.test, test_ids, directions_cache, config.progress, clock)
        with clock("gradients"):
            scores, optimality = scores_from_cache(inf, directions, gradients_cache, config.batch_size)
        # in key order, as a resumed run reads it back from the manifest: the same bytes either way
        solver = dict(sorted(directions_cache.meta.get("solver", {}).items()))
        ran.applied(solver)
        top = top_k(torch.from_numpy(scores), config.top_k)
        ex = Explanation(
            config, prepared.job, inf, evaluation, test_ids, scores, top, solver, choice, directions,
            optimality=optimality, ran=ran,
        )  # fmt: skip
        log_top(ex)
        return finish(ex, store, clock, warned)
