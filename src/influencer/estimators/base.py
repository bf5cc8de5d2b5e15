"""The interface every inverse-Hessian estimator shares.

An :class:`Estimator` is a frozen, validated configuration. ``fit(curvature)`` does the expensive
work once (a dense factorisation, a Krylov basis, a scale estimate) and returns a :class:`Solver`
whose ``solve(V)`` applies ``(H + damping * I)^-1`` to each row of ``V`` ``(k, p)``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor, nn

from influencer._kernel.curvature import Curvature
from influencer._kernel.errors import ConfigError, ConvergenceError
from influencer._kernel.functional import select_parameters


@dataclasses.dataclass(frozen=True, kw_only=True)
class Estimator(ABC):
    """Configuration of an inverse-Hessian method. ``damping`` lambda >= 0 adds ``lambda * I`` to H."""

    damping: float = 0.0
    name: ClassVar[str] = "estimator"

    def __post_init__(self) -> None:
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping >= 0):
            raise ConfigError(
                f"{type(self).__name__}: damping must be a finite number >= 0, got {self.damping!r}"
            )

    @abstractmethod
    def fit(self, curvature: Curvature) -> Solver:
        """Prepare to apply ``(H + damping I)^-1`` for the curvature ``H``."""

    def supported_parameters(self, model: nn.Module) -> list[str]:
        """Names of the trainable parameters this estimator can model (``params="supported"``).

        Default: every parameter that requires grad. Estimators limited to some layer types
        (K-FAC, EK-FAC) return those layers' parameters and warn about the rest.
        """
        return select_parameters(model, None)

    def settings(self) -> dict[str, Any]:
        """JSON-able settings, e.g. for cache fingerprints and reports."""
        return {"estimator": self.name, **dataclasses.asdict(self)}

    def load_solver(self, curvature: Curvature, state: dict[str, Tensor], info: dict[str, Any]) -> Solver:
        """The solver that ``fit(curvature)`` returned, rebuilt from its :meth:`Solver.state_dict`
        (and ``info``) without fitting again."""
        raise ConfigError(
            f"{type(self).__name__} cannot load a saved fit: implement load_solver() and the solver's "
            "state_dict(), or call fit()"
        )


class Solver(ABC):
    """A fitted estimator: applies the (approximate) damped inverse Hessian."""

    info: dict[str, Any]
    # ``solve`` returns its input (the gradient dot product): scoring may keep the test gradients in
    # their factored layer form instead of forming ``(m, p)`` directions.
    identity: bool = False

    @abstractmethod
    def solve(self, vectors: Tensor) -> Tensor:
        """``(H + damping I)^-1 v`` for each row of ``vectors`` ``(k, p)``; returns ``(k, p)``."""

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors ``fit`` computed, by name (empty when nothing was fitted), for saving; the
        estimator's :meth:`Estimator.load_solver` rebuilds the solver from them."""
        raise ConfigError(
            f"{type(self).__name__} cannot be saved: implement state_dict() and its estimator's load_solver()"
        )


def prefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """``state`` with ``prefix`` before every name (a nested solver's part of a state dict)."""
    return {f"{prefix}{k}": v for k, v in state.items()}


def unprefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``state`` under ``prefix``, without it."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def require_positive(name: str, value: float, minimum: float = 0.0, integer: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value > minimum`` (and an int when ``integer``)."""
    if integer and not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > minimum):
        raise ConfigError(f"{name} must be a finite number > {minimum}, got {value!r}")


ON_UNCONVERGED = ("raise", "warn")


def unconverged(estimator: str, on_unconverged: str, problem: str, fix: str) -> None:
    """Raise :class:`ConvergenceError` for an iterative solve that did not converge (the default),
    or warn when the user accepted approximate solves with ``on_unconverged="warn"``."""
    if on_unconverged == "raise":
        raise ConvergenceError(
            f"{problem}; {fix}, or pass {estimator}(..., on_unconverged='warn') (--on-unconverged warn) "
            "to accept the approximate solve"
        )
    warnings.warn(f"{problem}; the scores are approximate ({fix})", RuntimeWarning, stacklevel=4)


def check_on_unconverged(name: str, value: str) -> None:
    if value not in ON_UNCONVERGED:
        raise ConfigError(f"{name} must be one of {', '.join(ON_UNCONVERGED)}; got {value!r}")
