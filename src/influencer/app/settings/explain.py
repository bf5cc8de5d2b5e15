"""The settings of a run: one frozen, validated dataclass that every command resolves from defaults,
a TOML file and the flags given, in that order, and records as what ran.

A TOML file holds any subset of the fields of :class:`ExplainConfig`; estimator-specific options
go in an ``[estimator_options]`` table::

    estimator = "lissa"
    damping = 0.01
    test_ids = [3, 17, 42]

    [estimator_options]
    depth = 500

Unknown keys are refused with the list of valid ones, so a typo never silently falls back to a
default. ``damping`` is absolute everywhere (added to the curvature's diagonal); ``relative_damping``
is a multiple of the curvature's mean eigenvalue, everywhere.

``task = "package.module:function"`` imports that module and calls the function: a settings file that
names a task runs that code, so use only settings files and code you trust.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from influencer.app.settings.values import (
    CURVATURES,
    DIGITS_FLAGS,
    DTYPES,
    METHODS,
    PRECONDITIONERS,
    SAMPLER_NAMES,
    check_choice,
    check_damping,
    check_positive,
    check_types,
    did_you_mean,
    flag,
    from_dict,
    read_toml,
    to_dict,
)
from influencer.errors import ConfigError

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
_TASK_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
ON_UNCONVERGED = ("raise", "warn")

# The built-in digits job's training, when not set (a --task job trains its own model).
DIGITS_DEFAULTS = {
    "train_size": None,
    "epochs": 20,
    "lr": 1e-2,
    "train_batch_size": 64,
    # better conditioned than 1e-3: faster solves, and 96.7% vs 95.8% accuracy
    "weight_decay": 1e-2,
    "channels": 16,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExplainConfig:
    """Everything a command does with a job, in one place (see the module docstring).

    The defaults explain the built-in job (a small CNN on scikit-learn's digits, influence over its
    head); ``task`` names a function ``module:function`` returning the user's own job instead
    (see :mod:`influencer.app.job.job`).
    """

    # what to explain
    task: str | None = None  # "package.module:function"; None = the built-in digits CNN
    test_ids: tuple[int, ...] | None = None  # None: chosen automatically (wrong and right predictions)
    num_test: int = 6  # how many test examples to choose when test_ids is None
    top_k: int = 5  # helpful and harmful training examples shown per test example
    out: str = "runs/explain"  # run directory: cache of gradients and solves, scores, report, log
    # The job's cache (the built-in job's trained model, a head's features, retrained models),
    # shared by every command and run directory; None: $INFLUENCER_CACHE, else ~/.cache/influencer.
    cache_dir: str | None = None

    # How scores are computed: "influence" (influence functions) or "unrolled" (the exact
    # derivative through the job's training recipe).
    method: str = "influence"
    # The inverse-Hessian method. "auto" is the library's default (influencer.estimators.auto):
    # Exact for a small model (undamped when the Hessian is positive definite), EK-FAC with the
    # Gauss-Newton curvature over Linear/Conv layers otherwise, with a damping from the spectrum.
    estimator: str = "auto"
    damping: float | None = None  # absolute, added to the curvature's diagonal; None: the estimator's
    relative_damping: float | None = None  # times the curvature's mean eigenvalue; None: none
    estimator_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # An iterative solve (CG, LiSSA) that does not converge stops the run ("raise"), or is accepted
    # with a warning in the log and the summary ("warn"); None: the estimator's default ("raise").
    on_unconverged: str | None = None
    curvature: str | None = None  # "hessian" or "gauss_newton"; None: the estimator's choice (hessian)
    params: tuple[str, ...] | None = None  # None: the job's choice (the digits job: its head)
    # Influence over this module alone, on the network's features (its inputs) computed once and
    # cached: e.g. "classifier". None: the job's head, unless params is set.
    head: str | None = None
    dtype: str = "float64"
    device: str = "cpu"
    batch_size: int = 128  # examples per training-gradient chunk (one cached file each)
    hessian_batch_size: int | None = None  # examples per HVP batch; None: the job's choice, else 512
    # Estimate the curvature on a subset of this many training examples (None: all of them), drawn
    # by a sampler of influencer.samplers with `seed`: "random", or a representative one ("class",
    # "feature", "logit") that gives less variable scores than random at the same size.
    hessian_size: int | None = None
    hessian_sampler: str = "random"

    # Score with a gradient store built by `influencer index` (projected training gradients) instead
    # of exact gradients and solves. The job is then the store's; `preconditioner` says how test
    # directions are formed: "fisher", "ekfac" or "none"; None: the store's.
    store: str | None = None
    preconditioner: str | None = None

    # training of the built-in digits job (refused for a --task job); None: DIGITS_DEFAULTS
    train_size: int | None = None  # use only the first N training images
    epochs: int | None = None
    lr: float | None = None
    train_batch_size: int | None = None
    weight_decay: float | None = None
    channels: int | None = None
    seed: int = 0  # the digits job's seed; also seeds the choice of test examples

    progress: bool = True

    def __post_init__(self) -> None:
        # Normalise containers so that TOML lists, JSON lists and tuples give equal configs.
        object.__setattr__(self, "estimator_options", types.MappingProxyType(dict(self.estimator_options)))
        for name in ("test_ids", "params"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check_types(self)
        if self.task is not None and not _TASK_SPEC.match(self.task):
            raise ConfigError(
                f"task must look like 'package.module:function' (a function returning the task, model, "
                f"training and test data); got {self.task!r}"
            )
        if self.task is not None:
            given = [name for name in DIGITS_FLAGS if getattr(self, name) is not None]
            if given:
                raise ConfigError(
                    f"{flag(given[0])} sets the training of the built-in digits job; a --task job trains "
                    "its own model: leave it out (or give the job a retrain recipe)"
                )
        if self.test_ids is not None:
            if not self.test_ids:
                raise ConfigError("test_ids is empty: give at least one test index, or leave it unset")
            if min(self.test_ids) < 0:
                raise ConfigError(f"test_ids must be >= 0, got {list(self.test_ids)}")
            if len(set(self.test_ids)) != len(self.test_ids):
                raise ConfigError(f"test_ids has duplicates: {list(self.test_ids)}")
        if self.head is not None and not self.head.strip():
            raise ConfigError("head must name a module (e.g. 'classifier'), or be left unset")
        if self.params is not None and (not self.params or not all(self.params)):
            raise ConfigError("params must name at least one parameter or module (or 'all'), without blanks")
        check_positive(
            self, "num_test", "top_k", "batch_size", "hessian_batch_size", "hessian_size", "epochs",
            "train_batch_size", "channels",
        )  # fmt: skip
        if self.train_size is not None and self.train_size < 2:
            raise ConfigError(f"train_size must be >= 2 (or unset for all), got {self.train_size}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        check_choice("method", self.method, METHODS)
        check_choice("curvature", self.curvature, CURVATURES)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("preconditioner", self.preconditioner, PRECONDITIONERS)
        check_choice("on_unconverged", self.on_unconverged, ON_UNCONVERGED)
        check_choice("hessian_sampler", self.hessian_sampler, SAMPLER_NAMES)
        check_damping("damping", self.damping)
        check_damping("relative_damping", self.relative_damping)
        if not _DEVICE.match(self.device):
            raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps'; got {self.device!r}")
        for name in ("out", "cache_dir", "store"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ConfigError(f"{name} (a directory) must not be empty; leave it unset for the default")
        if self.estimator != "auto":
            self.make_estimator()  # the estimator's own validation reports bad option values
        elif self.estimator_options:
            raise ConfigError(
                f"-o {next(iter(self.estimator_options))}=... sets an option of a chosen estimator: give "
                "--estimator too (e.g. --estimator cg -o tol=1e-6)"
            )

    # ---- derived values --------------------------------------------------------------------------

    def make_estimator(self) -> Any:
        """The named estimator with its options and ``--damping`` (``auto`` is resolved per job, by
        :func:`influencer.app.steps.choose_estimator_for`)."""
        from influencer.app.settings.estimators import make_estimator

        if self.estimator == "auto":
            raise ConfigError(
                "estimator 'auto' is chosen per job: see influencer.app.steps.choose_estimator_for"
            )
        options = dict(self.estimator_options)
        if self.on_unconverged is not None:
            options.setdefault("on_unconverged", self.on_unconverged)
        return make_estimator(self.estimator, options, self.damping or 0.0)

    def digits(self, name: str) -> Any:
        """A training setting of the built-in digits job: the one given, else its default."""
        value = getattr(self, name)
        return DIGITS_DEFAULTS[name] if value is None else value

    def make_sampler(self) -> Any:
        """The sampler that chooses the curvature's examples when ``hessian_size`` is set."""
        from influencer.samplers import make_sampler

        return make_sampler(self.hessian_sampler)

    @property
    def torch_dtype(self) -> Any:
        import torch

        return torch.float64 if self.dtype == "float64" else torch.float32

    # ---- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``ExplainConfig.from_dict(c.to_dict()) == c``."""
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "settings") -> ExplainConfig:
        """Build from a dict, refusing unknown keys (``source`` names where they came from)."""
        return from_dict(cls, dict(values), source)

    @classmethod
    def from_json(cls, text: str) -> ExplainConfig:
        return cls.from_dict(json.loads(text), "JSON settings")

    @classmethod
    def from_toml(cls, path: str | Path) -> ExplainConfig:
        return cls.from_dict(read_toml(path), str(path))

    def replace(self, **changes: Any) -> ExplainConfig:
        """A copy with ``changes`` applied (validated again); unknown names are refused."""
        return type(self).from_dict({**self.to_dict(), **changes}, "overrides")


__all__ = ["DIGITS_DEFAULTS", "ExplainConfig", "did_you_mean"]
