"""``influencer query`` as a Python function: the most helpful and harmful training examples of
any number of test examples, streamed from a gradient store.

Usage::

    from influencer.app.settings.store import QueryConfig
    from influencer.app.commands.query import query_store
    run = query_store(QueryConfig(store="runs/index", all_test=True, top_k=10))
    run.top.helpful_ids      # (m, 10) training ids, most helpful first

The job is the store's (:mod:`~influencer.app.run.gradient_store`); test examples are chosen as
``influencer explain`` chooses them, or given, or all of them. Scores are never held as an
``m x n`` matrix: :meth:`~influencer.index.GradientIndex.top_k` streams the stored chunks into
running top-k lists, one block of test examples at a time, and keeps finished blocks in a
checkpoint (default ``<out>/checkpoint``), so the same command after an interruption resumes.
The run directory gets ``top_k.json``, the ``.npy`` arrays of :data:`FILES` and ``query.log``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influencer import TopK
from influencer.app.job.checks import check_finite_losses
from influencer.app.job.evaluation import (
    Evaluation,
    choose_test_ids,
    describe_test_choice,
    evaluate,
    label_text,
    log_accuracy,
)
from influencer.app.job.job import Job
from influencer.app.report.explanation import candidates_json, find_candidates
from influencer.app.report.summary import SIGN_CONVENTION
from influencer.app.run.checkpoints import Checkpoints, checkpoints_or_store, open_checkpoints
from influencer.app.run.devices import resolve_device
from influencer.app.run.gradient_store import (
    open_store,
    read_job_settings,
    refuse_store_as_run,
    same_directory,
)
from influencer.app.run.logs import Stopwatch, opened_run
from influencer.app.run.store import RunStore, array_bytes, jsonable
from influencer.app.run.store_scoring import Subset, describe_store, projection_text
from influencer.app.settings.store import QueryConfig
from influencer.app.steps import Prepared, prepare, store_scorer
from influencer.errors import ConfigError

log = logging.getLogger("influencer.query")

__all__ = ["FILES", "QueryRun", "query_store"]

LOG_FILE = "query.log"
# role -> file name, in the order written (the results last: they list the others' sha256)
FILES = {
    "test_ids": "test_ids.npy",
    "helpful_ids": "helpful_ids.npy",
    "helpful_scores": "helpful_scores.npy",
    "harmful_ids": "harmful_ids.npy",
    "harmful_scores": "harmful_scores.npy",
    "results": "top_k.json",
}
# Test examples whose lists are also printed on the console (all of them go to query.log).
CONSOLE_TESTS = 10


@dataclasses.dataclass
class QueryRun:
    """What :func:`query_store` found; the same is on disk in ``run_dir``."""

    config: QueryConfig
    run_dir: Path
    test_ids: np.ndarray  # (m,)
    top: TopK  # each (m, k)
    accuracy: float | None
    results: dict[str, Any]  # top_k.json
    timings: dict[str, float]
    files: dict[str, Path]


def query_store(config: QueryConfig, job: Job | None = None, *, console: bool = True) -> QueryRun:
    """Run the query (see the module docstring); ``job`` overrides the store's task."""
    resolve_device(config.device)  # a device this machine lacks is refused before anything is written
    out, root = Path(config.out), Path(config.store)
    if same_directory(out, root):
        raise ConfigError(
            f"--out {out} is the store itself: a query writes its results elsewhere (e.g. --out runs/query)"
        )
    refuse_store_as_run(config.out)
    checkpoints = checkpoints_or_store(
        root, config.task, job is not None, preconditioner=config.preconditioner,
        relative_damping=config.relative_damping, damping=config.damping, checkpoint=config.checkpoint,
    )  # fmt: skip
    title, settings = f"influencer query: run directory {out}", config.to_json()
    with opened_run(out, console, log, title, file_name=LOG_FILE, settings=settings) as (run, warned):
        if checkpoints is not None:
            return _query(config, job, checkpoints, {}, run, warned)
        with open_store(root) as (store, record):
            return _query(config, job, store, record, run, warned)


def _query(
    config: QueryConfig,
    job: Job | None,
    store: RunStore | Checkpoints,
    record: dict[str, Any],
    run: RunStore,
    warned: list[str],
) -> QueryRun:
    root = store.root
    clock = Stopwatch(config.device)
    if isinstance(store, Checkpoints):  # no record of the job: the user's own --task
        job_config = config.job_config({})
        log.info("checkpoint stores %s: %s", root, ", ".join(p.name for p in store.paths))
    else:
        job_config = config.job_config(read_job_settings(root, record, config.task, job is not None))
        log.info("%s", describe_store(root, record))
    with clock("total"):
        prepared = prepare(job_config, clock, job)
        on, n_test = prepared.on, len(prepared.job.test)
        with clock("evaluate"):
            evaluation = evaluate(on, prepared.device, job_config)
        log_accuracy(evaluation, n_test)
        if config.all_test:
            test_ids = np.arange(n_test, dtype=np.int64)
            choice = f"all {n_test}"
        else:
            test_ids = choose_test_ids(job_config, evaluation, n_test)
            choice = describe_test_choice(job_config, evaluation, test_ids)
        _check_finite(evaluation.losses, test_ids)
        log.info("querying test examples: %s", choice if len(test_ids) <= 20 else choice.split(":")[0])

        if isinstance(store, Checkpoints):
            return _query_checkpoints(
                config, prepared, store, evaluation, test_ids, choice, run, clock, warned
            )
        scorer = store_scorer(job_config, prepared, root, record, clock)
        inf, index, pre = scorer.influence, scorer.index, scorer.preconditioner

        test = on.test if config.all_test else Subset(on.test, test_ids)
        checkpoint = Path(config.checkpoint) if config.checkpoint is not None else run.root / "checkpoint"
        blocks = -(-len(test_ids) // config.block)
        computed: list[int] = []
        with clock("top_k"):
            top = index.top_k(
                test,
                config.top_k,
                block=config.block,
                preconditioner=pre,
                checkpoint=checkpoint,
                # the run's own checkpoint holds only its last query: another one replaces it
                overwrite=config.overwrite or config.checkpoint is None,
                progress=config.progress,
                on_block=computed.append,
                score_dtype=config.score_torch_dtype,
            )
        if len(computed) < blocks:
            log.info(
                "test blocks: %d of %d reused from the checkpoint %s",
                blocks - len(computed),
                blocks,
                checkpoint,
            )
    job = prepared.job
    _log_top(evaluation, job, test_ids, top)
    results = _results(
        config, job, inf.n, inf.p, evaluation, test_ids, top, choice, scorer.settings, record, warned
    )
    results["projection"] = scorer.projection
    results["preconditioner"] = scorer.directions
    results["timings_s"] = {k: round(v, 4) for k, v in clock.timings.items()}
    files = _write(run, test_ids, top, results)
    log.info("done in %.1f s", clock.timings["total"])
    return QueryRun(config, run.root, test_ids, top, evaluation.accuracy, results, clock.timings, files)


def _query_checkpoints(
    config: QueryConfig,
    prepared: Prepared,
    found: Checkpoints,
    evaluation: Evaluation,
    test_ids: np.ndarray,
    choice: str,
    run: RunStore,
    clock: Stopwatch,
    warned: list[str],
) -> QueryRun:
    """The query's top-k lists from checkpoint stores, combined as the library combines them."""
    job = prepared.job  # the whole model, at each checkpoint's state: its own inputs, not a head's features
    stores = open_checkpoints(found, job, prepared.device, config.batch_size)
    log.info("scores: %s", found.text())
    test = job.test if config.all_test else Subset(job.test, test_ids)
    with clock("top_k"):
        top = stores.top_k(test, config.top_k, block=config.block, score_dtype=config.score_torch_dtype)
    inf = stores.indexes[0].influence
    _log_top(evaluation, job, test_ids, top)
    record = {"parameters": found.header["fingerprint"]["params"]}
    results = _results(
        config, job, inf.n, inf.p, evaluation, test_ids, top, choice, found.settings(), record, warned
    )
    results["projection"] = projection_text({**found.header, "num_parameters": found.header["p"]})
    results["preconditioner"] = found.text()
    results["timings_s"] = {k: round(v, 4) for k, v in clock.timings.items()}
    files = _write(run, test_ids, top, results)
    return QueryRun(config, run.root, test_ids, top, evaluation.accuracy, results, clock.timings, files)


def _check_finite(losses: np.ndarray, test_ids: np.ndarray) -> None:
    """Refuse a NaN or infinite loss among the chosen test examples (by test id)."""
    chosen = np.zeros_like(losses)
    chosen[test_ids] = losses[test_ids]
    check_finite_losses(chosen)


def _log_top(evaluation: Evaluation, job: Job, test_ids: np.ndarray, top: TopK) -> None:
    for j, tid in enumerate(test_ids.tolist()):
        extra = {"file_only": True} if j >= CONSOLE_TESTS else {}
        log.info("test #%d (%s):", tid, evaluation.describe(tid, job.classes), extra=extra)
        log.info("  Most helpful IDs: %s", top.helpful_ids[j].tolist(), extra=extra)
        log.info("    scores: %s", _fmt(top.helpful_scores[j]), extra=extra)
        log.info("  Most harmful IDs: %s", top.harmful_ids[j].tolist(), extra=extra)
        log.info("    scores: %s", _fmt(top.harmful_scores[j]), extra=extra)
    if len(test_ids) > CONSOLE_TESTS:
        log.info("... and %d more test examples (in query.log and top_k.json)", len(test_ids) - CONSOLE_TESTS)
    found = find_candidates(top, test_ids)
    for c in found[:CONSOLE_TESTS]:
        log.info(
            "candidate to inspect: training #%d is among the %d most harmful of %d test examples (%s)",
            c.train_id,
            top.harmful_ids.shape[1],
            c.count,
            ", ".join(f"#{t}" for t in c.test_ids[:10]) + (", ..." if len(c.test_ids) > 10 else ""),
        )
    if len(found) > CONSOLE_TESTS:
        log.info("... and %d more candidates to inspect (in top_k.json)", len(found) - CONSOLE_TESTS)


def _fmt(values: torch.Tensor) -> str:
    return "[" + ", ".join(f"{float(v):+.3e}" for v in values) + "]"


def _results(
    config: QueryConfig,
    job: Job,
    n: int,
    p: int,
    evaluation: Evaluation,
    test_ids: np.ndarray,
    top: TopK,
    choice: str,
    scoring: dict[str, Any],
    record: dict[str, Any],
    warned: list[str],
) -> dict[str, Any]:
    """``top_k.json`` (without its files and checksums)."""

    def label(v: Any) -> Any:
        return v.item() if isinstance(v, np.generic) else v

    ev = evaluation
    lists = {
        name: getattr(top, name).tolist()
        for name in ("helpful_ids", "helpful_scores", "harmful_ids", "harmful_scores")
    }
    tests = []
    for j, tid in enumerate(test_ids.tolist()):
        entry: dict[str, Any] = {"test_id": tid}
        if ev.labels is not None:
            entry["label"] = label(ev.labels[tid])
        if ev.predictions is not None:
            entry["prediction"] = label(ev.predictions[tid])
        if job.classes is not None and ev.classification and ev.predictions is not None:
            entry["label_name"] = label_text(ev.labels[tid], job.classes) if ev.labels is not None else None
            entry["prediction_name"] = label_text(ev.predictions[tid], job.classes)
        entry["correct"] = ev.correct(tid)
        entry["test_loss"] = float(ev.losses[tid])
        entry.update({name: values[j] for name, values in lists.items()})
        tests.append(entry)
    k = top.harmful_ids.shape[1]
    return jsonable(
        {
            "job": job.name,
            "store": str(scoring["store"]),
            "sign_convention": SIGN_CONVENTION,
            "n_train": n,
            "n_test": len(job.test),
            "test_accuracy": ev.accuracy,
            "num_parameters": p,
            "parameters": record.get("parameters"),
            "scores_from_store": scoring,
            "top_k": k,
            "test_selection": choice,
            "warnings": list(warned),
            "tests": tests,
            "candidates_to_inspect": candidates_json(find_candidates(top, test_ids)),
            "candidates_rule": (
                f"training examples among the {k} most harmful (negative scores) of at least 2 queried "
                "test examples"
            ),
            "settings": config.to_dict(),
        }
    )


def _write(run: RunStore, test_ids: np.ndarray, top: TopK, results: dict[str, Any]) -> dict[str, Path]:
    """The run's outputs as one set (:meth:`RunStore.commit_outputs`): the arrays, then top_k.json."""
    contents = {
        "test_ids": array_bytes(np.asarray(test_ids, dtype=np.int64)),
        **{
            name: array_bytes(getattr(top, name).cpu().numpy())
            for name in FILES
            if name not in ("test_ids", "results")
        },
    }
    results = {
        **results,
        "files": {role: FILES[role] for role in FILES},
        "sha256": {FILES[role]: hashlib.sha256(data).hexdigest() for role, data in contents.items()},
    }
    contents["results"] = (json.dumps(results, indent=2, allow_nan=False) + "\n").encode("utf-8")
    paths = run.commit_outputs({FILES[role]: data for role, data in contents.items()}, last=FILES["results"])
    log.info("wrote %s", ", ".join(str(paths[FILES[role]]) for role in FILES))
    return {role: paths[FILES[role]] for role in FILES}
