"""The steps every command is made of, in order: the job (trained model, in the job cache), its
checks, the data influence runs on (a head's features, cached), the evaluation and choice of test
examples, and the :class:`~influencer.Influence` the settings describe, with a record of what ran.

    prepared = prepare(config, clock)               # job -> checks -> features
    evaluation, test_ids, choice = evaluate_and_choose(prepared.on, ..., config, device, clock)
    inf, ran = build_influence(config, prepared)    # the one builder of Influence from settings

``explain``, ``explain --store``, ``index``, ``query`` and ``evaluate`` are short sequences of these
(:mod:`influencer.app.commands`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from influencer import Influence
from influencer.app.job.cache import job_cache
from influencer.app.job.checks import check_job, influence_params
from influencer.app.job.digits import digits_job
from influencer.app.job.evaluation import choose_hessian_ids
from influencer.app.job.features import chosen_head, influence_job
from influencer.app.job.job import Job, load_job
from influencer.app.run.devices import resolve_device
from influencer.app.run.logs import Stopwatch
from influencer.app.settings.explain import ExplainConfig
from influencer.estimators import Estimator

log = logging.getLogger("influencer.explain")

__all__ = [
    "Prepared",
    "Ran",
    "StoreScorer",
    "build_influence",
    "choose_estimator_for",
    "prepare",
    "store_scorer",
]


@dataclasses.dataclass
class Prepared:
    """A job ready for influence: ``job`` as built (the report shows its examples) and ``on``, the
    job influence runs on (``job`` itself, or its head on the network's features)."""

    config: ExplainConfig
    job: Job
    on: Job
    device: torch.device
    head: str | None


def prepare(config: ExplainConfig, clock: Stopwatch, job: Job | None = None) -> Prepared:
    """Build the job (the built-in one trained once in the job cache, or ``--task``'s), check it, and
    compute (or read from the job cache) a head's features. ``job`` overrides ``config.task``."""
    device = resolve_device(config.device)
    with job_cache(config.cache_dir) as cache:
        with clock("build"):
            if job is None:
                job = digits_job(config, cache, device) if config.task is None else load_job(config.task)
            job.model.to(device).eval()
        log.info("job: %s; %d training and %d test examples", job.name, len(job.train), len(job.test))
        check_job(config, job, device)
        with clock("features"):
            on = influence_job(job, config, cache, device)
    return Prepared(config, job, on, device, chosen_head(config, job))


@dataclasses.dataclass(frozen=True)
class Chosen:
    """The inverse-Hessian method for a run: what the settings asked for, resolved."""

    estimator: Estimator
    curvature: str
    params: list[str] | None
    reason: str
    damping: dict[str, Any]  # {"kind": "absolute" | "relative" | "automatic" | "none", "value": ...}


def _with_damping(estimator: Estimator, damping: float | None, relative: float | None) -> Estimator:
    """``estimator`` with the given absolute and relative damping (a relative damping on a method
    without one of its own is added through the curvature's mean eigenvalue, estimated by probes)."""
    changes: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(estimator)}
    if damping is not None:
        changes["damping"] = float(damping)
        if "fallback_relative_damping" in fields:  # an explicit damping replaces the automatic one
            changes["fallback_relative_damping"] = None
    if relative is not None and "relative_damping" in fields:
        changes["relative_damping"] = float(relative)
        relative = None
    if "estimator" in fields and relative is not None:  # already a spectral wrapper: set its factor
        changes["relative"] = float(relative)
        relative = None
    estimator = dataclasses.replace(estimator, **changes) if changes else estimator
    if relative is not None:
        from influencer.estimators.auto import SpectralDamping

        estimator = SpectralDamping(estimator=estimator, relative=float(relative))
    return estimator


def _damping_record(estimator: Estimator, automatic: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"absolute": float(estimator.damping)}
    relative = getattr(estimator, "relative_damping", None) or getattr(estimator, "relative", None)
    fallback = getattr(estimator, "fallback_relative_damping", None)
    if relative:
        out["relative"] = float(relative)
    if fallback:
        out["relative_if_indefinite"] = float(fallback)
    out["kind"] = (
        "automatic" if automatic and (relative or fallback) else "relative" if relative
        else "absolute" if estimator.damping else "none"
    )  # fmt: skip
    return out


def choose_estimator_for(config: ExplainConfig, job: Job) -> Chosen:
    """The estimator, curvature and parameters the settings describe: the library's automatic
    choice for ``estimator="auto"`` (the same as ``Influence(model, task, train)`` makes), else the
    named estimator; ``--damping`` / ``--relative-damping`` applied to either."""
    params = influence_params(config, job)
    if config.estimator == "auto":
        from influencer.estimators.auto import choose_estimator

        choice = choose_estimator(job.model, job.task, job.train, params=params, curvature=config.curvature)
        given = config.damping is not None or config.relative_damping is not None
        estimator = _with_damping(choice.estimator, config.damping, config.relative_damping)
        reason = choice.reason + ("; damping as given" if given else "")
        return Chosen(
            estimator, choice.curvature, choice.params, reason, _damping_record(estimator, not given)
        )
    # the named estimator carries --damping already; a relative damping is added as for "auto"
    estimator = _with_damping(config.make_estimator(), None, config.relative_damping)
    curvature = config.curvature or "hessian"
    return Chosen(
        estimator, curvature, params, f"--estimator {config.estimator}", _damping_record(estimator, False)
    )


@dataclasses.dataclass
class Ran:
    """What a run computed with, resolved from the settings: recorded in ``config.json``,
    ``summary.json``, the log and the report (so they say what ran, not what was asked)."""

    method: str
    estimator: dict[str, Any]  # the estimator's settings (name first)
    curvature: str | None
    damping: dict[str, Any]
    parameters: dict[str, Any]  # {"count", "names", "head"}
    reason: str
    dtype: str
    device: str
    hessian: dict[str, Any] | None
    store: dict[str, Any] | None = None  # scores from a gradient store: its projection, preconditioner

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def applied(self, solver_info: dict[str, Any]) -> None:
        """Record the damping a fit settled on (an automatic or spectral damping), once known."""
        value = solver_info.get("damping")
        known = (
            self.damping.get("absolute", 0.0) if self.damping.get("kind") in ("absolute", "none") else None
        )
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != known:
            self.damping["applied"] = float(value)

    def text(self) -> str:
        """One line for the log."""
        damping = self.damping
        parts = [f"{damping['kind']} damping"]
        if "applied" in damping:
            parts.append(f"{damping['applied']:.3g} applied")
        elif damping.get("absolute"):
            parts.append(f"{damping['absolute']:.3g}")
        if damping.get("relative"):
            parts.append(f"{damping['relative']:g} x the mean eigenvalue")
        estimator = self.estimator.get("estimator", "?")
        return (
            f"{self.method} over {self.parameters['count']} parameters"
            + (f" (the head {self.parameters['head']!r})" if self.parameters.get("head") else "")
            + f" with {estimator}, {self.curvature} curvature, {', '.join(parts)}, {self.dtype} on "
            f"{self.device}: {self.reason}"
        )


def build_influence(
    config: ExplainConfig,
    prepared: Prepared,
    estimator: Estimator | None = None,
    reason: str = "the gradient store's preconditioner",
) -> tuple[Influence, Ran]:
    """The (unfitted) :class:`Influence` the settings describe for ``prepared.on``, and what it runs.

    ``estimator`` overrides the settings' (a gradient store's EK-FAC preconditioner, or the
    curvature-free one a store's gradients need), for ``reason``."""
    job, device = prepared.on, prepared.device
    if estimator is None:
        chosen = choose_estimator_for(config, job)
    else:
        chosen = Chosen(
            estimator, config.curvature or "hessian", influence_params(config, job), reason,
            _damping_record(estimator, False),
        )  # fmt: skip
    inf = Influence(
        job.model,
        job.task,
        job.train,
        estimator=chosen.estimator,
        curvature=chosen.curvature,  # type: ignore[arg-type]
        params=chosen.params,
        batch_size=config.batch_size,
        hessian_batch_size=config.hessian_batch_size or job.hessian_batch_size or 512,
        hessian_indices=choose_hessian_ids(config, job, device) if estimator is None else None,
        device=device,
        dtype=config.torch_dtype,
        progress=config.progress,
    )
    names = inf.fn.names
    ran = Ran(
        method=config.method,
        estimator=chosen.estimator.settings(),
        curvature=chosen.curvature,
        damping=chosen.damping,
        parameters={"count": inf.p, "names": names if len(names) <= 50 else [*names[:50], "..."],
                    "head": prepared.head},
        reason=chosen.reason,
        dtype=config.dtype,
        device=str(inf.device),
        hessian=(
            {"examples": config.hessian_size, "of": inf.n, "sampler": config.hessian_sampler}
            if config.hessian_size else None
        ),
    )  # fmt: skip
    log.info("influence: %s", ran.text())
    return inf, ran


@dataclasses.dataclass
class StoreScorer:
    """What scores test examples from a gradient store: the :class:`Influence` of the store's job
    (fitted when the preconditioner is an estimator), the store's index and the preconditioner,
    with a record of what runs and how it is said in words."""

    influence: Influence
    ran: Ran
    index: Any  # influencer.index.GradientIndex
    preconditioner: Any  # influencer.index.Preconditioner
    projection: str  # the store's projection, in words
    directions: str  # how test directions are formed, in words
    settings: dict[str, Any]  # JSON-able, for summary.json / top_k.json

    @property
    def solves(self) -> bool:
        """Whether an estimator solves the test directions (EK-FAC before projection)."""
        from influencer.index import EstimatorPreconditioner

        return isinstance(self.preconditioner, EstimatorPreconditioner)


def store_scorer(
    config: ExplainConfig, prepared: Prepared, root: Any, record: dict[str, Any], clock: Stopwatch
) -> StoreScorer:
    """Open the store at ``root`` for ``prepared``'s job with the preconditioner the settings (or
    the store) name; a store built from other inputs is refused in words."""
    from influencer.app.run.gradient_store import open_index
    from influencer.app.run.store_scoring import (
        preconditioner_text,
        projection_text,
        scoring_settings,
        store_preconditioner,
    )

    pre, estimator, damping = store_preconditioner(record, config)
    inf, ran = build_influence(config, prepared, estimator)
    index = open_index(root, inf, prepared.head)
    scorer = StoreScorer(
        inf, ran, index, pre, projection_text(record), "", scoring_settings(root, record, pre, index)
    )
    if scorer.solves:
        with clock("fit"):
            inf.fit()
    scorer.directions = preconditioner_text(pre, index, inf)
    ran.damping, ran.store = damping, scorer.settings
    log.info("scores: %s; test directions: %s", scorer.projection, scorer.directions)
    return scorer
