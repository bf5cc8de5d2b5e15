"""``influencer evaluate``: how faithful is influence on this job? Checked against real retraining.

Usage::

    influencer evaluate                                     # the built-in digits job: LOO and LDS
    influencer evaluate --method lds --subsets 50 --seeds 2
    influencer evaluate --task mypkg.jobs:build --estimator ekfac --curvature gauss_newton

Two checks (:mod:`influencer.uses.validation`), with the job's influence settings (the same flags as
``influencer explain``):

* **leave-one-out** (``loo``): for each chosen test example, the ``loo_k`` training examples with
  the largest scores are removed one at a time and the model retrained; the predicted and actual
  changes of the test loss are compared (Pearson, Spearman);
* **linear datamodeling score** (``lds``): ``subsets`` random subsets keeping ``alpha`` of the
  training data, a model retrained on each (``seeds`` seeds averaged), and per test example the
  Spearman correlation over the subsets between the actual change of the test loss and the sum of
  the left-out examples' scores; its mean over ``lds_tests`` test examples with a bootstrap interval.

The retraining recipe is the job's (:attr:`Job.retrain`, from :attr:`Job.make_model` when given),
else L-BFGS to the optimum for a linear model (warm-started, as influence assumes) and, for a
network, Adam for ``epochs`` epochs from a fresh initialisation. Refits are cached in
``<run>/retrained`` (keyed by everything they depend on), so a second evaluation, or one with another
estimator, retrains nothing again. Writes ``evaluation.json``, ``loo.png`` and ``lds.png`` into the
run directory.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from influencer import Influence
from influencer.app.job.cache import cache_root
from influencer.app.job.evaluation import choose_test_ids
from influencer.app.job.evaluation import evaluate as evaluate_model
from influencer.app.job.job import Job
from influencer.app.job.recipe import recipe
from influencer.app.run.devices import resolve_device
from influencer.app.run.gradient_store import refuse_store_as_run
from influencer.app.run.logs import Stopwatch, logged_stop, run_logging
from influencer.app.run.store import RunStore, jsonable
from influencer.app.settings.explain import ExplainConfig
from influencer.app.steps import Ran, build_influence, prepare
from influencer.errors import ConfigError
from influencer.plotting import plot_lds, plot_loo_many
from influencer.progress import duration_text
from influencer.retraining import Retrainer
from influencer.retraining_cache import CachedRetrainer
from influencer.stats import pearson, spearman
from influencer.uses.validation import LDSResult, LOOResult, Start, lds, leave_one_out

log = logging.getLogger("influencer.evaluate")

METHODS = ("loo", "lds")
SELECTIONS = ("magnitude", "helpful", "harmful", "random")
FILES = {"summary": "evaluation.json", "loo": "loo.png", "lds": "lds.png"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """What ``influencer evaluate`` checks, beside the influence settings of :class:`ExplainConfig`."""

    methods: tuple[str, ...] = METHODS
    loo_k: int = 20  # training examples removed one at a time, per chosen test example
    loo_select: str = "magnitude"  # which: largest |score|, most helpful, most harmful, random
    subsets: int = 20  # LDS: random subsets retrained on
    alpha: float = 0.5  # LDS: the fraction of the training data each subset keeps
    seeds: int = 1  # LDS: retraining seeds per subset, averaged
    lds_tests: int = 50  # LDS: test examples (a seeded random choice; all when fewer)
    level: float = 0.95  # LDS: confidence level of the interval of the mean

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        bad = [m for m in self.methods if m not in METHODS]
        if not self.methods or bad or len(set(self.methods)) != len(self.methods):
            raise ConfigError(
                f"methods must be one or both of {', '.join(METHODS)}, got {list(self.methods)}"
            )
        for name in ("loo_k", "seeds", "lds_tests"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.subsets, int) or self.subsets < 3:
            raise ConfigError(
                f"subsets must be an integer >= 3 (a rank correlation over subsets), got {self.subsets!r}"
            )
        if self.loo_select not in SELECTIONS:
            raise ConfigError(f"loo_select must be one of {', '.join(SELECTIONS)}, got {self.loo_select!r}")
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < 1):
            raise ConfigError(f"alpha (the fraction each subset keeps) must be in (0, 1), got {self.alpha!r}")
        if not (isinstance(self.level, (int, float)) and 0 < self.level < 1):
            raise ConfigError(f"level must be in (0, 1), got {self.level!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


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
    resolve_device(config.device)  # a device this machine lacks is refused before anything is written
    run_dir = Path(config.out)
    refuse_store_as_run(config.out)
    with RunStore(run_dir) as store, run_logging(run_dir, console) as warned:
        log.info(
            "influencer evaluate: run directory %s (%s)",
            run_dir,
            datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        with logged_stop(log):
            return _run(config, settings, job, store, warned)


def _run(
    config: ExplainConfig, settings: EvaluateConfig, job: Job | None, store: RunStore, warned: list[str]
) -> EvaluateResult:
    clock = Stopwatch(config.device)
    with clock("total"):
        # The same job, parameters (head), curvature and estimator as `influencer explain`.
        prepared = prepare(config, clock, job)
        on = prepared.on
        inf, ran = build_influence(config, prepared)
        retrainer, start, described = recipe(on, config)
        where = cache_root(config.cache_dir) / "retrained"
        log.info("retraining: %s; refits cached in %s", described, where)
        cached = CachedRetrainer(retrainer, where)
        with clock("fit"):
            inf.fit()
        ran.applied(getattr(inf.solver, "info", {}))

        loo_ids = np.zeros(0, dtype=np.int64)
        if "loo" in settings.methods:
            evaluation = evaluate_model(on, prepared.device, config)
            loo_ids = choose_test_ids(config, evaluation, len(on.test))
        lds_ids = (
            _lds_test_ids(len(on.test), settings.lds_tests, config.seed)
            if "lds" in settings.methods
            else (np.zeros(0, dtype=np.int64))
        )
        _announce(inf, cached, start, settings, len(loo_ids), clock)

        loo: list[LOOResult] = []
        if len(loo_ids):
            with clock("loo"):
                loo = _leave_one_out(inf, on, loo_ids, settings, cached)

        result: LDSResult | None = None
        if len(lds_ids):
            test = on.test.take(torch.from_numpy(lds_ids))
            with clock("lds"):
                scores = inf.scores(test)
                result = lds(
                    inf, test, scores=scores, subsets=settings.subsets, alpha=settings.alpha,
                    retrain=cached, start=start, seeds=range(settings.seeds), seed=config.seed,
                    level=settings.level,
                )  # fmt: skip
            log.info(
                "LDS over %d test examples: %.3f [%.3f, %.3f] (%.0f%% interval); "
                "%d subsets keeping %g, %d seed(s)",
                len(lds_ids), result.mean, *result.interval, 100 * settings.level, settings.subsets,
                settings.alpha, settings.seeds,
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
        name, inf, ran, config, settings, described, loo, loo_ids, result, lds_ids, clock.timings, warned
    )
    summary["files"] = {role: path.name for role, path in files.items()} | {"summary": FILES["summary"]}
    files["summary"] = store.write_json(FILES["summary"], summary)
    log.info("wrote %s", ", ".join(str(p) for p in files.values()))
    return EvaluateResult(store.root, loo, loo_ids, result, lds_ids, summary, files)


def _announce(
    inf: Influence,
    retrainer: Retrainer,
    start: Start,
    settings: EvaluateConfig,
    loo_tests: int,
    clock: Stopwatch,
) -> None:
    """Say how many retrainings the checks need and about how long they take, before they start.

    Retrainings like the ones the checks do are timed and extrapolated, each kind apart: a refit
    without one example from the full-data optimum (the first also pays once for what every refit
    from that start shares, e.g. a factorised Hessian), a refit on a random ``alpha`` of the data,
    or LDS's refit from a fresh model. They stay in the refit cache."""
    loo = loo_tests * settings.loo_k
    lds = settings.subsets * settings.seeds if "lds" in settings.methods else 0
    gen = torch.Generator().manual_seed(271828)  # a subset apart from LDS's own (drawn from --seed)
    with clock("retrain"):
        once, each = 0.0, {}
        if loo or start is None:
            full = retrainer.refit(inf)  # leave-one-out's baseline (LDS's warm start)
            once, _ = _timed(retrainer.refit, inf, torch.arange(inf.n - 1), full)
            if loo:
                each["leave-one-out"] = _timed(retrainer.refit, inf, torch.arange(1, inf.n), full)[0]
            if lds and start is None:
                kept = torch.randperm(inf.n, generator=gen)[: max(1, round(settings.alpha * inf.n))]
                each["LDS"] = _timed(retrainer.refit, inf, kept.sort().values, full)[0]
        if lds and start is not None:  # from a fresh model per seed: its first seed's full-data refit
            made = start(0) if callable(start) else start
            init = inf.parameters_of(made) if isinstance(made, nn.Module) else made
            each["LDS"] = _timed(retrainer.with_seed(0).refit, inf, None, init)[0]
    counts = {"leave-one-out": loo, "LDS": lds + (settings.seeds if lds else 0)}
    total = sum(counts.values())
    seconds = once + sum(counts[k] * t for k, t in each.items())
    parts = [f"{k} {counts[k]} x {t:.2f} s" for k, t in each.items()]
    log.info(
        "evaluate: about %d retrainings (%s%s; refits already cached are free), so about %s in all",
        total, ", ".join(parts), f"; once {once:.1f} s for what they share" if once > 1 else "",
        duration_text(seconds),
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
        "estimator": inf.estimator.settings(),
        "curvature": ran.curvature,
        "damping": ran.damping,
        "dtype": config.dtype,
        "retraining": described,
        "sign_convention": "score = predicted change of the test loss if the training example were removed; "
        "an LDS subset's predicted change is the sum of the scores of the examples it leaves out",
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
            "test_ids": lds_ids.tolist(),
            "correlations": result.correlations.tolist(),
        }
    out["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    out["settings"] = {**config.to_dict(), "evaluate": settings.to_dict()}
    out["ran"] = ran.to_dict()
    return jsonable(out)
