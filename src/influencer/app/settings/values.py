"""What settings may be, without importing torch: names the flags choose from, defaults, type checks,
TOML reading and one-line suggestions. The command line's ``--help`` reads only this module."""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
from pathlib import Path
from typing import Any

from influencer.errors import ConfigError

CURVATURES = ("hessian", "gauss_newton")
DTYPES = ("float32", "float64")
# How a gradient store's scores are preconditioned (influencer.index.preconditioners): the projected
# Fisher (after projection), EK-FAC (before projection), or none (projected gradient dot products).
PRECONDITIONERS = ("fisher", "ekfac", "none")
SCORE_DTYPES = ("bfloat16", "float32", "float64")  # a store's products: query scores, the Fisher
PROJECTORS = ("kronecker", "gaussian", "rademacher", "identity")
BASES = ("pca", "random")  # of a Kronecker projection
# The samplers of influencer.samplers (checked against it when a sampler is made).
SAMPLER_NAMES = ("class", "feature", "logit", "random")
# How scores are computed: influence functions, or the exact derivative through the training run.
METHODS = ("influence", "unrolled")

DEFAULT_K_IN = 32  # Kronecker: projected input dimension per layer
DEFAULT_K_OUT = 32  # Kronecker: projected output dimension per layer
DEFAULT_K = 1024  # Gaussian / Rademacher: projected dimension
# Damping of the gradient store's preconditioners, relative to the curvature's mean eigenvalue per
# layer block: ProjectedFisher(relative_damping=...), EKFAC(relative_damping=...).
DEFAULT_RELATIVE_DAMPING = 0.1

# Flags of the built-in digits job: meaningless for a --task job, so refused with one.
DIGITS_FLAGS = ("train_size", "epochs", "lr", "weight_decay", "train_batch_size", "channels")


def flag(name: str) -> str:
    """The command-line flag of a setting: ``hessian_size`` -> ``--hessian-size``."""
    return "-o" if name == "estimator_options" else "--" + name.replace("_", "-")


def did_you_mean(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise ConfigError(
            f"{name} must be one of {', '.join(choices)}; got {value!r}" + did_you_mean(str(value), choices)
        )


def check_damping(name: str, value: Any) -> None:
    """Refuse a damping that is not a finite number >= 0."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if not ok or value < 0 or value == float("inf"):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r} ({flag(name)})")


def check_positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value} ({flag(name)})")


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def check_types(config: Any) -> None:
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


def to_dict(config: Any) -> dict[str, Any]:
    """A settings dataclass as plain JSON values (tuples as lists, mappings as dicts)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, (types.MappingProxyType, dict)):
            value = dict(value)
        out[f.name] = value
    return out


def from_dict(cls: Any, values: dict[str, Any], source: str) -> Any:
    """``cls(**values)``, refusing unknown keys (``source`` names where they came from)."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise ConfigError(
                f"{source}: unknown setting {key!r}" + did_you_mean(key, names) + f"; valid settings "
                f"are {', '.join(names)}"
            )
    return cls(**dict(values))


def _toml() -> types.ModuleType:
    """``tomllib`` (Python 3.11+), or ``tomli`` from the ``app`` extra on Python 3.10."""
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    from influencer.extras import require

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
    except IsADirectoryError as exc:
        raise ConfigError(f"config file {path} is a directory: give a TOML file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not text (not UTF-8): give a TOML file") from exc
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
