"""Settings of ``influencer explain``: one frozen, validated dataclass, loadable from TOML.

A TOML file holds any subset of the fields of :class:`ExplainConfig`; estimator-specific options
go in an ``[estimator_options]`` table::

    estimator = "lissa"
    damping = 0.01
    test_ids = [3, 17, 42]

    [estimator_options]
    depth = 500
    batch_size = 64

Command-line flags override file values (see :mod:`influencer.app.commands.cli`). Unknown keys are refused with
the list of valid ones, so a typo never silently falls back to a default.

``task = "package.module:function"`` imports that module and calls the function: a settings file that
names a task runs that code, so use only settings files and code you trust.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import json
import pkgutil
import re
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from influencer._kernel.errors import ConfigError
from influencer._kernel.extras import require
from influencer.estimators import Estimator
from influencer.estimators.base import ON_UNCONVERGED
from influencer.samplers import SAMPLERS, Sampler, make_sampler

# Added to the curvature: small next to the head Hessian's eigenvalues that matter, it keeps
# the solve well posed when weight decay is zero or the Hessian is nearly singular.
DEFAULT_DAMPING = 1e-3
CURVATURES = ("hessian", "gauss_newton")
# How a gradient store's scores are preconditioned (influencer.index.preconditioners): the projected
# Fisher (after projection), EK-FAC (before projection), or none (projected gradient dot products).
PRECONDITIONERS = ("fisher", "ekfac", "none")
DTYPES = ("float32", "float64")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
_TASK_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def estimator_classes() -> dict[str, type[Estimator]]:
    """Every concrete inverse-Hessian estimator by its ``name`` (``"cg"``, ``"exact"``, ...).

    Found by importing each module of :mod:`influencer.estimators`, so a new estimator file is
    available to the command line without being listed here.
    """
    import influencer.estimators as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    found: dict[str, type[Estimator]] = {}
    todo = list(Estimator.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if (
            not inspect.isabstract(cls)
            and cls.name != Estimator.name
            and cls.__module__.startswith("influencer.")
        ):
            found.setdefault(cls.name, cls)
    return dict(sorted(found.items()))


def _option_names(cls: type[Estimator]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name != "damping"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExplainConfig:
    """Everything ``influencer explain`` does, in one place.

    The defaults explain the built-in job (a small CNN on scikit-learn's digits); ``task`` names a
    function ``module:function`` returning the user's own job instead (see :mod:`influencer.app.job.job`).
    """

    # what to explain
    task: str | None = None  # "package.module:function"; None = the built-in digits CNN
    test_ids: tuple[int, ...] | None = None  # None: chosen automatically (wrong and right predictions)
    num_test: int = 6  # how many test examples to choose when test_ids is None
    top_k: int = 5  # helpful and harmful training examples shown per test example
    out: str = "runs/explain"  # run directory: cache, scores, summary, report, log

    # How influence is computed. The default answers the question exactly for the layer it covers:
    # the digits job's head is fitted to the optimum of a convex objective (cross-entropy of a
    # linear map + L2), so its Hessian is positive definite and the influence function is the
    # first-order answer to "refit the head without this image", as in Koh & Liang's Inception
    # experiments. CG reaches a 1e-8 relative residual there in about 110 HVPs of the head, where
    # a dense Exact solve needs 2570 of them first; the whole network's Hessian is indefinite (CG
    # refuses it), and LiSSA adds sampling noise. Over the whole network with
    # the Gauss-Newton curvature and an exact solve the ranking is similar but not the same
    # (Spearman 0.64, top-10 overlap 0.7 on the default test examples, weight decay 1e-3;
    # `benchmarks/bench_explain.py --agreement`) at minutes of CPU time.
    estimator: str = "cg"
    damping: float | None = None  # None: DEFAULT_DAMPING (0 for the curvature-free "identity")
    estimator_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # An iterative solve (CG, LiSSA) that does not converge stops the run ("raise"), or is accepted
    # with a warning in the log and the summary ("warn"); None: the estimator's default ("raise").
    on_unconverged: str | None = None
    curvature: str = "hessian"
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
    # of exact gradients and solves. The job (task, parameters, head, dtype, and the digits job's
    # training) is then the store's; `preconditioner` says how test directions are formed: "fisher"
    # (the projected Fisher), "ekfac" (EK-FAC, before projection) or "none"; None: the store's. With
    # a store, `damping` is relative to the curvature's mean eigenvalue (None: the store's).
    store: str | None = None
    preconditioner: str | None = None

    # training of the built-in digits job (ignored for a user task)
    train_size: int | None = None  # use only the first N training images
    epochs: int = 20
    lr: float = 1e-2
    train_batch_size: int = 64
    weight_decay: float = 1e-2  # better conditioned than 1e-3: faster solves, and 96.7% vs 95.8% accuracy
    channels: int = 16
    seed: int = 0

    progress: bool = True

    def __post_init__(self) -> None:
        # Normalise containers so that TOML lists, JSON lists and tuples give equal configs.
        object.__setattr__(self, "estimator_options", types.MappingProxyType(dict(self.estimator_options)))
        if self.test_ids is not None:
            object.__setattr__(self, "test_ids", tuple(self.test_ids))
        if self.params is not None:
            object.__setattr__(self, "params", tuple(self.params))
        _check_types(self)
        if self.task is not None and not _TASK_SPEC.match(self.task):
            raise ConfigError(
                f"task must look like 'package.module:function' (a function returning the task, model, "
                f"training and test data); got {self.task!r}"
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
        for name in (
            "num_test",
            "top_k",
            "batch_size",
            "hessian_batch_size",
            "hessian_size",
            "epochs",
            "train_batch_size",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.channels < 1:
            raise ConfigError(f"channels must be >= 1, got {self.channels}")
        if self.train_size is not None and self.train_size < 2:
            raise ConfigError(f"train_size must be >= 2 (or unset for all), got {self.train_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.curvature not in CURVATURES:
            raise ConfigError(f"curvature must be one of {', '.join(CURVATURES)}; got {self.curvature!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if not _DEVICE.match(self.device):
            raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps'; got {self.device!r}")
        if not self.out.strip():
            raise ConfigError("out (the run directory) must not be empty")
        if self.store is not None and not self.store.strip():
            raise ConfigError("store (a gradient store directory) must not be empty; leave it unset")
        if self.preconditioner is not None and self.preconditioner not in PRECONDITIONERS:
            raise ConfigError(
                f"preconditioner must be one of {', '.join(PRECONDITIONERS)}; got {self.preconditioner!r}"
                + _did_you_mean(self.preconditioner, PRECONDITIONERS)
            )
        if self.on_unconverged is not None and self.on_unconverged not in ON_UNCONVERGED:
            raise ConfigError(
                f"on_unconverged must be one of {', '.join(ON_UNCONVERGED)}; got {self.on_unconverged!r}"
            )
        self.make_estimator()  # validates the estimator's name and options
        self.make_sampler()

    # ---- derived objects ------------------------------------------------------------------------

    @property
    def effective_damping(self) -> float:
        if self.damping is not None:
            return float(self.damping)
        return 0.0 if self.estimator == "identity" else DEFAULT_DAMPING

    def make_estimator(self) -> Estimator:
        """The configured estimator; its own validation reports bad option values."""
        classes = estimator_classes()
        cls = classes.get(self.estimator)
        if cls is None:
            raise ConfigError(
                f"unknown estimator {self.estimator!r}; choose one of {', '.join(classes)}"
                + _did_you_mean(self.estimator, classes)
            )
        allowed = _option_names(cls)
        unknown = [k for k in self.estimator_options if k not in allowed]
        if unknown:
            raise ConfigError(
                f"estimator {self.estimator!r} has no option {unknown[0]!r}; its options are "
                f"{', '.join(allowed) or '(none)'}" + _did_you_mean(unknown[0], allowed)
            )
        options = dict(self.estimator_options)
        if self.on_unconverged is not None and "on_unconverged" in allowed:
            options.setdefault("on_unconverged", self.on_unconverged)
        try:
            return cls(damping=self.effective_damping, **options)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"estimator {self.estimator!r}: {exc}") from exc

    def make_sampler(self) -> Sampler:
        """The sampler that chooses the curvature's examples when ``hessian_size`` is set."""
        if self.hessian_sampler not in SAMPLERS:
            raise ConfigError(
                f"unknown hessian_sampler {self.hessian_sampler!r}; choose one of {', '.join(SAMPLERS)}"
                + _did_you_mean(self.hessian_sampler, list(SAMPLERS))
            )
        return make_sampler(self.hessian_sampler)

    # ---- serialisation ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``ExplainConfig.from_dict(c.to_dict()) == c``."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "settings") -> ExplainConfig:
        """Build from a dict, refusing unknown keys (``source`` names where they came from)."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                raise ConfigError(
                    f"{source}: unknown setting {key!r}" + _did_you_mean(key, names) + f"; valid settings "
                    f"are {', '.join(names)}"
                )
        return cls(**dict(values))

    @classmethod
    def from_json(cls, text: str) -> ExplainConfig:
        return cls.from_dict(json.loads(text), "JSON settings")

    @classmethod
    def from_toml(cls, path: str | Path) -> ExplainConfig:
        return cls.from_dict(read_toml(path), str(path))

    def replace(self, **changes: Any) -> ExplainConfig:
        """A copy with ``changes`` applied (validated again); unknown names are refused."""
        return type(self).from_dict({**self.to_dict(), **changes}, "overrides")


def _toml() -> types.ModuleType:
    """``tomllib`` (Python 3.11+), or ``tomli`` from the ``app`` extra on Python 3.10."""
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    return require("tomli", "reading TOML settings on Python 3.10", "app")  # pragma: no cover


def read_toml(path: str | Path) -> dict[str, Any]:
    """The settings table of a TOML file, with a clear error for a missing or malformed file."""
    path = Path(path)
    tomllib = _toml()
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def parse_option(text: str) -> tuple[str, Any]:
    """``"depth=500"`` -> ``("depth", 500)``: values are read as TOML literals, else kept as strings."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"estimator options look like NAME=VALUE (e.g. depth=500); got {text!r}")
    tomllib = _toml()
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def _did_you_mean(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_types(config: ExplainConfig) -> None:
    """Refuse values of the wrong type (a TOML string where a number belongs, and so on)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        annotation = str(f.type)
        if value is None:
            if "None" not in annotation:
                raise ConfigError(f"{f.name} must be set; got None")
            continue
        if annotation.startswith("tuple"):
            item = "int" if "int" in annotation else "str"
            ok = all(isinstance(v, _TYPES[item]) and not isinstance(v, bool) for v in value)
            if not ok:
                raise ConfigError(f"{f.name} must be a list of {item}s; got {list(value)!r}")
            continue
        if annotation.startswith("Mapping"):
            if not all(isinstance(k, str) for k in value):
                raise ConfigError(f"{f.name} must be a table of NAME = VALUE; got {dict(value)!r}")
            continue
        base = annotation.split(" |")[0]
        expected = _TYPES.get(base)
        if expected is None:
            continue
        wrong_bool = isinstance(value, bool) and base != "bool"
        if not isinstance(value, expected) or wrong_bool:
            raise ConfigError(f"{f.name} must be a {base}; got {value!r} ({type(value).__name__})")
