"""What ``influencer evaluate`` checks, beside the influence settings of
:class:`~influencer.app.settings.explain.ExplainConfig` (whose ``method`` chooses the scores checked:
influence functions or the unrolled derivative)."""

from __future__ import annotations

import dataclasses
from typing import Any

from influencer.errors import ConfigError

__all__ = ["CHECKS", "SELECTIONS", "SETTINGS", "EvaluateConfig"]

CHECKS = ("loo", "lds")
SELECTIONS = ("magnitude", "helpful", "harmful", "random")
# The LDS's ground truth: models retrained on each subset (averaged over seeds), or the one training
# run replayed with the left-out examples' weights set to 1 - eps (influencer.validation.lds).
SETTINGS = ("seed-averaged", "single-model")
KEEP = {"seed-averaged": 0.5, "single-model": 0.9}  # the default fraction each subset keeps


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """The checks and their sizes. ``checks=None``: leave-one-out and the LDS for influence, the LDS
    alone for ``--method unrolled`` (a derivative through one run has no optimum to leave one out of)."""

    checks: tuple[str, ...] | None = None
    loo_k: int = 20  # training examples removed one at a time, per chosen test example
    loo_select: str = "magnitude"  # which: largest |score|, most helpful, most harmful, random
    subsets: int = 20  # LDS: random subsets retrained on
    alpha: float | None = None  # LDS: the fraction each subset keeps (default: KEEP[setting])
    drop: float | None = None  # LDS: the fraction each subset leaves out or re-weights (1 - alpha)
    seeds: int = 1  # LDS: retraining seeds per subset, averaged (seed-averaged setting)
    lds_tests: int = 50  # LDS: test examples (a seeded random choice; all when fewer)
    level: float = 0.95  # LDS: confidence level of the interval of the mean
    setting: str = "seed-averaged"
    eps: float | None = None  # single-model: the left-out examples' weight is 1 - eps (default 1: removed)

    def __post_init__(self) -> None:
        if self.checks is not None:
            object.__setattr__(self, "checks", tuple(self.checks))
            bad = [m for m in self.checks if m not in CHECKS]
            if not self.checks or bad or len(set(self.checks)) != len(self.checks):
                raise ConfigError(
                    f"--check must be one or both of {', '.join(CHECKS)}, got {list(self.checks)}"
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
        for name, what in (("alpha", "keeps"), ("drop", "re-weights")):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < 1):
                raise ConfigError(
                    f"--{name} (the fraction each subset {what}) must be in (0, 1), got {value!r}"
                )
        if self.alpha is not None and self.drop is not None:
            raise ConfigError("give --alpha (the fraction each subset keeps) or --drop (1 - alpha), not both")
        if not (isinstance(self.level, (int, float)) and 0 < self.level < 1):
            raise ConfigError(f"level must be in (0, 1), got {self.level!r}")
        if self.setting not in SETTINGS:
            raise ConfigError(f"--setting must be one of {', '.join(SETTINGS)}, got {self.setting!r}")
        if self.eps is not None:
            if not (isinstance(self.eps, (int, float)) and 0 < self.eps <= 1):
                raise ConfigError(
                    "--eps (how far the left-out examples are down-weighted) must be in (0, 1], got "
                    f"{self.eps!r}"
                )
            if self.setting == "seed-averaged":
                raise ConfigError(
                    "--eps re-weights the one training run: use it with --setting single-model (the "
                    "seed-averaged setting retrains without the left-out examples)"
                )
        if self.setting == "single-model" and self.seeds != 1:
            raise ConfigError(
                "--seeds does not apply with --setting single-model: it replays the one training run "
                "(the recipe's own seed); average seeds with --setting seed-averaged"
            )

    @property
    def keep(self) -> float:
        """The fraction of the training data each LDS subset keeps at full weight."""
        if self.alpha is not None:
            return float(self.alpha)
        return 1.0 - self.drop if self.drop is not None else KEEP[self.setting]

    @property
    def strength(self) -> float:
        """``eps``: the left-out examples' weight is ``1 - eps`` (1 in the seed-averaged setting)."""
        return 1.0 if self.eps is None else float(self.eps)

    def checks_for(self, method: str) -> tuple[str, ...]:
        """The checks run for the scores of ``method``; one line for those that do not apply."""
        checks = self.checks or (("lds",) if method == "unrolled" else CHECKS)
        if method == "unrolled" and "loo" in checks:
            raise ConfigError(
                "--check loo does not apply with --method unrolled: it refits to the optimum without each "
                "example; check the derivative with --check lds (--setting single-model replays its run)"
            )
        given = [f for f, v in (("setting", self.setting != "seed-averaged"), ("eps", self.eps is not None),
                                ("drop", self.drop is not None)) if v]  # fmt: skip
        if "lds" not in checks and given:
            raise ConfigError(f"--{given[0]} applies to the LDS: add lds to --check")
        return checks

    def to_dict(self) -> dict[str, Any]:
        """The settings as they run: the LDS's ``alpha``, ``drop`` and ``eps`` resolved."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return out | {"alpha": self.keep, "drop": round(1.0 - self.keep, 12), "eps": self.strength}
