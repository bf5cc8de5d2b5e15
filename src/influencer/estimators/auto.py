"""The default inverse-Hessian method, chosen from the model's size and layers.

:func:`choose_estimator` is what ``Influence(model, task, train)`` uses without ``estimator=``
(and what the command line uses by default), so both give the same answer for the same model:

* ``p <= EXACT_MAX_PARAMS``, the Gauss-Newton matrix and an L2 regulariser (weight decay > 0),
  which makes that matrix positive definite: undamped :class:`ExactOrCG`, block CG for a few test
  points and the dense matrix for many (the same answer, whichever is cheaper: CG was 20x faster
  than the dense build on an MLP with p = 2,410 and 10 test points, 4x slower with 1,000).
* otherwise ``p <= EXACT_MAX_PARAMS``: :class:`Exact` on the requested curvature (by default the
  Gauss-Newton matrix where the task has one, which equals the Hessian of a linear model with a
  convex loss; else the Hessian). A positive definite matrix (a convex model with weight decay,
  a network's Gauss-Newton matrix with weight decay) stays undamped: for a convex model the
  influence function of Koh & Liang. Otherwise (an indefinite Hessian asked for, a singular
  Gauss-Newton matrix) it is damped by the least amount that lifts its smallest eigenvalue to
  ``RELATIVE_DAMPING`` x its mean absolute eigenvalue.
* larger models with ``nn.Linear``/``nn.Conv2d``/``Conv1D`` layers: :class:`EKFAC` over those
  layers (the others, e.g. embeddings and layer norms, left out and named in the reason) with the
  Gauss-Newton curvature and ``RELATIVE_DAMPING`` x each layer's mean eigenvalue (Grosse et al.
  2023).
* otherwise: :class:`CG` on the Gauss-Newton curvature, damped by ``RELATIVE_DAMPING`` x its mean
  eigenvalue (estimated with random probes, :class:`SpectralDamping`).

The choice costs no pass over the data (one forward of one example picks EK-FAC's Fisher).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from influencer._kernel.curvature import Curvature, CurvatureKind
from influencer._kernel.data import as_examples
from influencer._kernel.errors import ConfigError
from influencer._kernel.functional import ModelFunction, select_parameters
from influencer._kernel.task import Task
from influencer.estimators.base import Estimator, Solver, prefixed, require_positive, unprefixed
from influencer.estimators.cg import CG
from influencer.estimators.ekfac import EKFAC
from influencer.estimators.exact import Exact
from influencer.estimators.exact_or_cg import ExactOrCG
from influencer.estimators.kronecker import supported_parameters

EXACT_MAX_PARAMS = 3000  # dense (p, p) float64: 72 MB and p HVPs at the limit
RELATIVE_DAMPING = 0.1
EXACT_FISHER_MAX_OUTPUTS = 64  # EK-FAC's exact Fisher costs one backward pass per output


@dataclasses.dataclass(frozen=True)
class Choice:
    """The default method for one model: pass its parts to :class:`~influencer.Influence`.

    ``params`` is ``None`` for every trainable parameter; ``reason`` says why, in one sentence.
    """

    estimator: Estimator
    curvature: CurvatureKind
    params: list[str] | None
    reason: str

    def settings(self) -> dict[str, Any]:
        """JSON-able: the estimator's settings, the curvature and the reason."""
        return {"estimator": self.estimator.settings(), "curvature": self.curvature, "reason": self.reason}


def choose_estimator(
    model: nn.Module,
    task: Task,
    train: Any = None,
    *,
    params: Sequence[str] | str | None = None,
    curvature: CurvatureKind | None = None,
) -> Choice:
    """The default inverse-Hessian method for ``model`` (see the module docstring for the rule).

    Args:
        model, task, train: as for :class:`~influencer.Influence`; ``train`` (optional) is read for
            one example, to count the model's outputs when EK-FAC is chosen.
        params: the parameters asked for (``None``: every trainable one; ``"supported"``: those
            the chosen method can model).
        curvature: the curvature asked for, or ``None`` to let the rule choose.
    """
    if curvature not in (None, "hessian", "gauss_newton"):
        raise ConfigError(f"curvature must be 'hessian', 'gauss_newton' or None, got {curvature!r}")
    explicit = params if not (params is None or (isinstance(params, str) and params == "supported")) else None
    names = select_parameters(model, explicit)
    named = dict(model.named_parameters())
    p = sum(named[n].numel() for n in names)
    gauss_newton = task.supports_gauss_newton
    if p <= EXACT_MAX_PARAMS:
        # The Gauss-Newton matrix where the task has one: positive semi-definite, so a network's is
        # damped only where it is singular, and equal to the Hessian for a linear model with a
        # convex loss (the paper's exact influence function); the Hessian otherwise.
        kind: CurvatureKind = curvature or ("gauss_newton" if gauss_newton else "hessian")
        matrix = "Hessian" if kind == "hessian" else "Gauss-Newton matrix"
        decay = task.regularizer_curvature()
        if kind == "gauss_newton" and decay is not None and decay > 0:
            return Choice(
                ExactOrCG(),
                kind,
                None if explicit is None else names,
                f"{p} parameters <= {EXACT_MAX_PARAMS}, Gauss-Newton matrix positive definite by weight "
                f"decay {decay:g}: undamped, by block CG for few test points and the dense matrix (Exact) "
                "for many, whichever needs fewer curvature products",
            )
        return Choice(
            Exact(fallback_relative_damping=RELATIVE_DAMPING),
            kind,
            None if explicit is None else names,
            f"{p} parameters <= {EXACT_MAX_PARAMS}: Exact on the dense {matrix}, "
            "undamped when it is positive definite (the exact influence function), else damped so that "
            f"its smallest eigenvalue is {RELATIVE_DAMPING:g} x its mean absolute eigenvalue",
        )
    layers, skipped = supported_parameters(model)
    covered = set(layers)
    if explicit is not None:
        layers = [n for n in names if n in covered]
        skipped = {n: "not in a supported layer" for n in names if n not in covered}
    if layers and not (explicit is not None and skipped) and curvature != "hessian":
        fisher = _fisher(model, task, train, layers)
        kept = sum(named[n].numel() for n in layers)
        over = (
            f"the {kept} parameters of its Linear/Conv layers; left out: {_listed(skipped, named)}"
            if skipped
            else f"all {kept} parameters (every one is in a Linear/Conv layer)"
        )
        return Choice(
            EKFAC(relative_damping=RELATIVE_DAMPING, fisher=fisher),
            "gauss_newton",
            layers,
            f"{p} parameters > {EXACT_MAX_PARAMS}: EK-FAC ({fisher} Fisher, Gauss-Newton curvature, "
            f"damping {RELATIVE_DAMPING:g} x each layer's mean eigenvalue) over {over}",
        )
    kind = curvature or ("gauss_newton" if gauss_newton else "hessian")
    matrix = "Hessian" if kind == "hessian" else "Gauss-Newton curvature"
    why = (
        "the Hessian was asked for"
        if curvature == "hessian"
        else "the chosen parameters are not all in Linear/Conv layers"
        if explicit is not None and skipped
        else "it has no Linear/Conv layer for EK-FAC"
    )
    return Choice(
        SpectralDamping(estimator=CG(on_unconverged="warn")),
        kind,
        None if explicit is None else names,
        f"{p} parameters > {EXACT_MAX_PARAMS} and {why}: CG on the {matrix}, "
        f"damped by {RELATIVE_DAMPING:g} x its mean eigenvalue",
    )


def _listed(skipped: dict[str, str], named: dict[str, nn.Parameter], shown: int = 6) -> str:
    total = sum(named[n].numel() for n in skipped)
    more = f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
    names = ", ".join(list(skipped)[:shown]) + more
    return f"{total} parameters in {names}"


def _fisher(model: nn.Module, task: Task, train: Any, layers: list[str]) -> str:
    """EK-FAC's Fisher: exact for few outputs, sampled for many, empirical for a task without outputs."""
    if not task.supports_gauss_newton:
        return "empirical"
    if train is None:
        return "exact"
    fn = ModelFunction(model, task, layers)
    data = as_examples(train)
    with torch.no_grad():
        outputs = fn.outputs(fn.theta0, fn.prepare(data.take(torch.arange(min(1, len(data))))))
    return "exact" if math.prod(outputs.shape[1:]) <= EXACT_FISHER_MAX_OUTPUTS else "sampled"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpectralDamping(Estimator):
    """``estimator`` with ``relative x`` the curvature's mean eigenvalue added to its damping.

    The mean eigenvalue ``trace(H) / p`` is estimated from ``probes`` random sign vectors (one
    pass over the curvature's examples: ``E[z^T H z] = trace(H)``). The damping used is
    ``solver.info["damping"]``.
    """

    estimator: Estimator = dataclasses.field(default_factory=CG)
    relative: float = RELATIVE_DAMPING
    probes: int = 16
    seed: int = 0
    name = "spectral_damping"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.estimator, Estimator):
            raise ConfigError(f"SpectralDamping.estimator must be an estimator, got {self.estimator!r}")
        require_positive("SpectralDamping.relative", self.relative)
        require_positive("SpectralDamping.probes", self.probes, integer=True)

    def settings(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "estimator"}
        return {"estimator": self.name, **out, "inner": self.estimator.settings()}

    def resolved(self, curvature: Curvature) -> Estimator:
        """The inner estimator with the damping for this curvature."""
        gen = torch.Generator().manual_seed(self.seed)
        z = torch.randint(0, 2, (self.probes, curvature.p), generator=gen).to(curvature.theta) * 2 - 1
        mean = float((z * curvature.matvec(z)).sum(1).mean()) / curvature.p
        return self.with_mean_eigenvalue(mean)

    def with_mean_eigenvalue(self, mean: float) -> Estimator:
        if not (math.isfinite(mean) and mean > 0):
            raise ConfigError(
                f"the curvature's mean eigenvalue is {mean:.3g}, so a damping relative to it is meaningless; "
                "pass an estimator with an absolute damping, e.g. CG(damping=1e-3)"
            )
        damping = self.damping + self.estimator.damping + self.relative * mean
        return dataclasses.replace(self.estimator, damping=damping)

    def fit(self, curvature: Curvature) -> Solver:
        inner = self.resolved(curvature)
        return ResolvedSolver(inner.fit(curvature), inner.damping)

    def load_solver(self, curvature: Curvature, state: dict[str, Tensor], info: dict[str, Any]) -> Solver:
        damping = float(state["damping"])
        inner = dataclasses.replace(self.estimator, damping=damping)
        return ResolvedSolver(inner.load_solver(curvature, unprefixed(state, "inner."), info), damping)


class ResolvedSolver(Solver):
    """A solver fitted with a damping found at fit time (``info["damping"]``)."""

    def __init__(self, inner: Solver, damping: float) -> None:
        self.inner, self.damping = inner, damping

    @property
    def info(self) -> dict[str, Any]:  # type: ignore[override]
        return {**self.inner.info, "damping": self.damping}

    def solve(self, vectors: Tensor) -> Tensor:
        return self.inner.solve(vectors)

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "damping": torch.tensor(self.damping, dtype=torch.float64),
            **prefixed(self.inner.state_dict(), "inner."),
        }
