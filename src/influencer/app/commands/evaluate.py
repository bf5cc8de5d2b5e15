"""``influencer evaluate``: how faithful are the scores on this job? Checked against real retraining.

Usage::

    influencer evaluate                                     # the built-in digits job: LOO and LDS
    influencer evaluate --check lds --subsets 50 --seeds 2
    influencer evaluate --task mypkg.jobs:build --estimator ekfac --curvature gauss_newton
    influencer evaluate --method unrolled --setting single-model --eps 0.001 --drop 0.1

The scores are those of ``influencer explain`` with the same flags: influence functions (the job's
influence settings), or with ``--method unrolled`` the exact derivative through the job's training
recipe (the same job, recipe and start). Two checks (:mod:`influencer.uses.validation`):

* **leave-one-out** (``loo``, influence only): for each chosen test example, the ``loo_k`` training
  examples with the largest scores are removed one at a time and the model retrained; the predicted
  and actual changes of the test loss are compared (Pearson, Spearman);
* **linear datamodeling score** (``lds``): ``subsets`` random subsets, each leaving out (or
  re-weighting) a fraction ``drop`` of the training data, and per test example the Spearman
  correlation over the subsets between the actual change of the test loss and the change the
  scores predict; its mean over ``lds_tests`` test examples with a bootstrap interval. Its ground
  truth (``setting``): ``seed-averaged`` retrains on each subset (``seeds`` seeds averaged);
  ``single-model`` replays the one run that made the model with the left-out examples' weights
  set to ``1 - eps`` (``eps = 1``: removed), the question the unrolled derivative answers.

The retraining recipe is the job's (:attr:`Job.retrain`, from :attr:`Job.make_model` when given),
else L-BFGS to the optimum for a linear model (warm-started, as influence assumes) and, for a
network, Adam for ``epochs`` epochs from a fresh initialisation; the single-model replay is
:func:`influencer.app.job.recipe.single_model`'s. Refits are cached in the job cache (keyed by
everything they depend on, data weights included), so a second evaluation, or one with another
estimator, retrains nothing again. Writes ``evaluation.json``, ``loo.png`` and ``lds.png`` into the
run directory.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influencer import Influence
from influencer.app.commands.unrolled import extrapolate, recipe_and_start, refuse_unrolled_settings, replayed
from influencer.app.job.cache import cache_root
from influencer.app.job.evaluation import choose_test_ids
from influencer.app.job.evaluation import evaluate as evaluate_model
from influencer.app.job.job import Job
from influencer.app.job.recipe import log_replay, recipe, single_model, start_parameters
from influencer.app.run.devices import resolve_device
from influencer.app.run.gradient_store import refuse_store_as_run
from influencer.app.run.logs import Stopwatch, opened_run
from influencer.app.run.store import RunStore, jsonable
from influencer.app.settings.evaluate import EvaluateConfig
from influencer.app.settings.explain import ExplainConfig
from influencer.app.steps import Ran, build_influence, prepare
from influencer.plotting import plot_lds, plot_loo_many
from influencer.progress import duration_text
from influencer.retraining import Retrainer, StepwiseRetrainer
from influencer.retraining_cache import CachedRetrainer
from influencer.stats import pearson, spearman
from influencer.uses.validation import LDSResult, LOOResult, Start, lds, leave_one_out

__all__ = ["EvaluateConfig", "EvaluateResult", "run_evaluation"]

log = logging.getLogger("influencer.evaluate")

FILES = {"summary": "evaluation.json", "loo": "loo.png", "lds": "lds.png"}


@dataclasses.dataclass
class EvaluateResult:
    """What :func:`run_evaluation` found; the same is in ``run_dir/evaluation.json``."""

    run_dir: Path
    loo: list[LOOResult]  # one per test id in loo_test_ids (empty when not run)
    loo_test_ids: np.ndarray  # (k,)
    lds: LDSResult | None
    lds_test_ids: np.ndarray  # (m,)
    summary: dict[str, Any]
    files: dict[str, Path]


# ---- the run -------------------------------------------------------------------------------------


def run_evaluation(
    config: ExplainConfig, settings: EvaluateConfig, job: Job | None = None, *, console: bool = True
) -> EvaluateResult:
    """Run the checks (see the module docstring); ``job`` overrides ``config.task``."""
    settings.checks_for(config.method)  # checks that do not apply are refused before anything runs
    if config.method == "unrolled":
        refuse_unrolled_settings(config)
    resolve_device(config.device)  # a device this machine lacks is refused before anything is written
    run_dir = Path(config.out)
    refuse_store_as_run(config.out)
    with opened_run(run_dir, console, log, f"influencer evaluate: run directory {run_dir}") as (
        store,
        warned,
    ):
        return _run(config, settings, job, store, warned)


@dataclasses.dataclass
class _Retraining:
    """How the checks retrain: the (cached) recipe, where it starts, in words, and the LDS's seeds."""

    retrainer: Retrainer
    start: Start
    described: str
    seeds: tuple[int, ...]
    stepwise: bool  # a replay of steps (nothing shared between refits), not a refit to the optimum


def _retraining(on: Job, config: ExplainConfig, settings: EvaluateConfig, head: str | None) -> _Retraining:
    retrainer, start, described = recipe(on, config)
    seeds = tuple(range(settings.seeds))
    if settings.setting == "single-model":  # with --method unrolled: the run Unrolled differentiates
        start, described = single_model(on, retrainer, start, head)
        seeds = (int(getattr(retrainer, "seed", 0)),)
    where = cache_root(config.cache_dir) / "retrained"
    log.info("retraining: %s; refits cached in %s", described, where)
    stepwise = isinstance(retrainer, StepwiseRetrainer)
    return _Retraining(CachedRetrainer(retrainer, where), start, described, seeds, stepwise)


def _run(
    config: ExplainConfig, settings: EvaluateConfig, job: Job | None, store: RunStore, warned: list[str]
) -> EvaluateResult:
    checks = settings.checks_for(config.method)
    clock = Stopwatch(config.device)
    unrolled = None
    with clock("total"):
        # The same job and scores as `influencer explain`: parameters (head), curvature and
        # estimator, or the unrolled derivative through the same recipe from the same start.
        prepared = prepare(config, clock, job)
        on = prepared.on
        if config.method == "unrolled":
            recipe_and_start(on)  # a job without its recipe is refused before any work
        retraining = _retraining(on, config, settings, prepared.head)
        inf: Influence | None = None
        if config.method != "unrolled":
            inf, ran = build_influence(config, prepared)
            with clock("fit"):
                inf.fit()
            ran.applied(getattr(inf.solver, "info", {}))

        loo_ids = np.zeros(0, dtype=np.int64)
        if "loo" in checks:
            evaluation = evaluate_model(on, prepared.device, config)
            loo_ids = choose_test_ids(config, evaluation, len(on.test))
        lds_ids = (
            _lds_test_ids(len(on.test), settings.lds_tests, config.seed)
            if "lds" in checks
            else (np.zeros(0, dtype=np.int64))
        )
        if inf is None:
            unrolled, ran = replayed(config, on, prepared.device, clock)
            inf = unrolled.influence
        _announce(inf, retraining, settings, checks, len(loo_ids), unrolled is not None, clock)

        loo: list[LOOResult] = []
        if len(loo_ids):
            with clock("loo"):
                loo = _leave_one_out(inf, on, loo_ids, settings, retraining.retrainer)

        result: LDSResult | None = None
        if len(lds_ids):
            test = on.test.take(torch.from_numpy(lds_ids))
            with clock("scores"):
                scores = inf.scores(test) if unrolled is None else unrolled.scores(test)
            if unrolled is not None:
                extrapolate(unrolled, test, scores, config.seed, clock)
            with clock("lds"):
                result = lds(
                    inf, test, scores=scores, subsets=settings.subsets, alpha=settings.keep,
                    retrain=retraining.retrainer, start=retraining.start, seeds=retraining.seeds,
                    seed=config.seed, level=settings.level, setting=settings.setting,  # type: ignore[arg-type]
                    eps=settings.strength,
                )  # fmt: skip
            log.info(
                "LDS over %d test examples: %.3f [%.3f, %.3f] (%.0f%% interval); %d subsets, each %s %g%% "
                "of the training data%s",
                len(lds_ids), result.mean, *result.interval, 100 * settings.level, settings.subsets,
                "leaving out" if settings.strength == 1 else "re-weighting", 100 * (1 - settings.keep),
                f", {settings.seeds} seed(s)" if settings.setting == "seed-averaged" else
                (f" to weight {1 - settings.strength:g}" if settings.strength < 1 else "")
                + " in the one training run (single-model)",
            )  # fmt: skip

        files: dict[str, Path] = {}
        name = prepared.job.name
        if loo:
            labels = [f"test #{i}" for i in loo_ids.tolist()]
            files["loo"] = plot_loo_many(
                loo, labels, store.path(FILES["loo"]), title=f"Leave-one-out: {name}"
            )
        if result is not None:
            files["lds"] = plot_lds(
                result, store.path(FILES["lds"]), test_labels=[f"#{i}" for i in lds_ids.tolist()]
            )
    summary = _summary(
        name, inf, ran, config, settings, checks, retraining.described, loo, loo_ids, result, lds_ids,
        clock.timings, warned,
    )  # fmt: skip
    if unrolled is not None:
        summary["unrolled"] = jsonable({k: v for k, v in unrolled.summary().items() if k != "method"})
    summary["files"] = {role: path.name for role, path in files.items()} | {"summary": FILES["summary"]}
    files["summary"] = store.write_json(FILES["summary"], summary)
    log.info("wrote %s", ", ".join(str(p) for p in files.values()))
    return EvaluateResult(store.root, loo, loo_ids, result, lds_ids, summary, files)


def _announce(
    inf: Influence,
    retraining: _Retraining,
    settings: EvaluateConfig,
    checks: tuple[str, ...],
    loo_tests: int,
    unrolled: bool,
    clock: Stopwatch,
) -> None:
    """Say how many retrainings the checks need and about how long they take, before they start.

    Retrainings like the ones the checks do are timed and extrapolated, each kind apart: a refit
    without one example from the full-data optimum (the first also pays once for what every refit
    from that start shares, e.g. a factorised Hessian), a refit on a random ``alpha`` of the data,
    LDS's refit from a fresh model, or the single-model replay re-weighted. They stay in the refit
    cache. The single-model replay with every weight 1 (the LDS's baseline) is compared with the
    model: the log says how closely the replay reproduces it."""
    retrainer, start = retraining.retrainer, retraining.start
    loo = loo_tests * settings.loo_k
    lds = settings.subsets * len(retraining.seeds) if "lds" in checks else 0
    single = settings.setting == "single-model"
    gen = torch.Generator().manual_seed(271828)  # a subset apart from LDS's own (drawn from --seed)
    dropped = torch.randperm(inf.n, generator=gen)[: max(1, round((1 - settings.keep) * inf.n))]
    with clock("retrain"):
        once, each = 0.0, {}
        if loo or (start is None and not single):
            full = retrainer.refit(inf)  # leave-one-out's baseline (LDS's warm start)
            once, _ = _timed(retrainer.refit, inf, torch.arange(inf.n - 1), full)
            if loo:
                each["leave-one-out"] = _timed(retrainer.refit, inf, torch.arange(1, inf.n), full)[0]
            if lds and start is None and not single:
                kept = torch.ones(inf.n, dtype=torch.bool)
                kept[dropped] = False
                each["LDS"] = _timed(retrainer.refit, inf, kept.nonzero().flatten(), full)[0]
        if lds and single:  # the replay, every weight 1 (LDS's baseline), and re-weighted ones
            init, eps = start_parameters(inf, start, retraining.seeds[0]), settings.strength
            ones = torch.ones(inf.n, dtype=torch.float64)
            log_replay(inf, retrainer.refit(inf, None, init, ones))
            # A refit to the optimum pays once for what the others share (a factorised Hessian):
            # a second re-weighted subset is timed apart from it. A stepwise replay shares nothing.
            subsets = [dropped] if retraining.stepwise else [dropped, torch.randperm(inf.n, generator=gen)]
            times = [
                _timed(retrainer.refit, inf, None, init, ones.index_fill(0, ids[: len(dropped)], 1 - eps))[0]
                for ids in subsets
            ]
            once, each["LDS"] = max(times[0] - times[-1], 0.0), times[-1]
        elif lds and start is not None:  # from a fresh model per seed: its first seed's full-data refit
            init = start_parameters(inf, start, 0)
            each["LDS"] = _timed(retrainer.with_seed(0).refit, inf, None, init)[0]
    counts = {"leave-one-out": loo, "LDS": lds + (len(retraining.seeds) if lds else 0)}
    if unrolled and "LDS" in each:  # Unrolled's extrapolation: three re-weighted replays
        counts["extrapolation"], each["extrapolation"] = 3, each["LDS"]
    total = sum(counts.values())
    seconds = once + sum(counts[k] * t for k, t in each.items())
    parts = [f"{k} {counts[k]} x {t:.2f} s" for k, t in each.items()]
    log.info(
        "evaluate: about %d retrainings (%s%s; refits already cached are free), so about %s in all%s",
        total, ", ".join(parts), f"; once {once:.1f} s for what they share" if once > 1 else "",
        duration_text(seconds),
        ", besides the unrolled derivative's reverse pass (a batched backward per step)" if unrolled else "",
    )  # fmt: skip


def _timed(f: Any, *args: Any) -> tuple[float, Any]:
    begin = time.perf_counter()
    out = f(*args)
    return time.perf_counter() - begin, out


def _leave_one_out(
    inf: Influence, job: Job, test_ids: np.ndarray, settings: EvaluateConfig, retrainer: Retrainer
) -> list[LOOResult]:
    results = []
    for tid in test_ids.tolist():
        one = job.test.take(torch.tensor([tid]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            r = leave_one_out(inf, one, settings.loo_k, select=settings.loo_select, retrain=retrainer)
        for w in caught:  # leave_one_out's own warnings (e.g. "far from the optimum") go to the log
            if issubclass(w.category, RuntimeWarning):
                log.warning("leave-one-out: %s", w.message)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        log.info(
            "leave-one-out, test #%d: Pearson %.3f, Spearman %.3f over %d removals",
            tid, r.pearson, r.spearman, r.train_ids.size,
        )  # fmt: skip
        results.append(r)
    return results


def _lds_test_ids(n_test: int, k: int, seed: int) -> np.ndarray:
    if k >= n_test:
        return np.arange(n_test, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n_test, size=k, replace=False)).astype(np.int64)


def _summary(
    name: str,
    inf: Influence,
    ran: Ran,
    config: ExplainConfig,
    settings: EvaluateConfig,
    checks: tuple[str, ...],
    described: str,
    loo: list[LOOResult],
    loo_ids: np.ndarray,
    result: LDSResult | None,
    lds_ids: np.ndarray,
    timings: dict[str, float],
    warned: list[str],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "job": name,
        "n_train": inf.n,
        "num_parameters": inf.p,
        "method": config.method,
        "estimator": {"estimator": "unrolled"} if config.method == "unrolled" else inf.estimator.settings(),
        "curvature": ran.curvature,
        "damping": ran.damping,
        "dtype": config.dtype,
        "retraining": described,
        "sign_convention": "score = predicted change of the test loss if the training example were removed; "
        "an LDS subset's predicted change is eps times the sum of the scores of the examples it leaves out "
        "(eps = 1: removed)",
        "warnings": list(warned),
    }
    if loo:
        predicted = np.concatenate([r.predicted for r in loo])
        actual = np.concatenate([r.actual for r in loo])
        out["loo"] = {
            "k": settings.loo_k,
            "select": settings.loo_select,
            "pearson": pearson(predicted, actual),
            "spearman": spearman(predicted, actual),
            "tests": [
                {
                    "test_id": tid,
                    **r.summary(),
                    "train_ids": r.train_ids.tolist(),
                    "predicted": r.predicted.tolist(),
                    "actual": r.actual.tolist(),
                }
                for tid, r in zip(loo_ids.tolist(), loo, strict=True)
            ],
        }
    if result is not None:
        out["lds"] = {
            **result.summary(),
            "drop": round(1.0 - result.alpha, 12),
            "test_ids": lds_ids.tolist(),
            "correlations": result.correlations.tolist(),
        }
    out["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    out["settings"] = {**config.to_dict(), "evaluate": settings.to_dict() | {"checks": list(checks)}}
    out["ran"] = ran.to_dict()
    return jsonable(out)
