"""The identity in place of the inverse Hessian: influence becomes a gradient dot product."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from influencer._kernel.curvature import Curvature
from influencer._kernel.errors import ConfigError
from influencer.estimators.base import Estimator, Solver


@dataclasses.dataclass(frozen=True, kw_only=True)
class Identity(Estimator):
    """``H^-1 ~ I``: scores are ``grad f(test) . grad loss(train) / n`` (TracIn at one checkpoint).

    Cheap and curvature-free; a baseline, not an influence function. ``damping`` must stay 0.
    """

    name = "identity"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.damping != 0:
            raise ConfigError("Identity ignores the Hessian, so damping has no meaning; leave it at 0")

    def fit(self, curvature: Curvature) -> Solver:
        return IdentitySolver()

    def load_solver(self, curvature: Curvature, state: dict[str, Tensor], info: dict) -> Solver:
        return IdentitySolver()


class IdentitySolver(Solver):
    identity = True

    def __init__(self) -> None:
        self.info = {}

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def solve(self, vectors: Tensor) -> Tensor:
        return vectors.clone()
