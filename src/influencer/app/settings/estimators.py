"""The inverse-Hessian estimators by name, and the one that the settings describe."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from typing import Any

from influencer.app.settings.values import did_you_mean
from influencer.errors import ConfigError
from influencer.estimators import Estimator


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
        wraps = any(f.name == "estimator" for f in dataclasses.fields(cls))  # a wrapper, not a method
        if (
            not inspect.isabstract(cls)
            and cls.name != Estimator.name
            and cls.__module__.startswith("influencer.")
            and not wraps
        ):
            found.setdefault(cls.name, cls)
    return dict(sorted(found.items()))


def option_names(cls: type[Estimator]) -> list[str]:
    return [
        f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("damping", "relative_damping")
    ]


def estimator_class(name: str) -> type[Estimator]:
    classes = estimator_classes()
    cls = classes.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown estimator {name!r}; choose one of auto, {', '.join(classes)}"
            + did_you_mean(name, [*classes, "auto"])
        )
    return cls


def check_estimator(name: str, options: dict[str, Any]) -> None:
    """Refuse an unknown estimator or option name (:func:`make_estimator` checks the values)."""
    cls = estimator_class(name)
    allowed = option_names(cls)
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ConfigError(
            f"estimator {name!r} has no option {unknown[0]!r} (-o {unknown[0]}=...); its options are "
            f"{', '.join(allowed) or '(none)'}" + did_you_mean(unknown[0], allowed)
        )


def make_estimator(name: str, options: dict[str, Any], damping: float) -> Estimator:
    """The estimator ``name`` with ``options`` and an absolute ``damping``; bad values in one line.
    ``on_unconverged`` is dropped for a method that always converges (it has no such option)."""
    cls = estimator_class(name)
    if "on_unconverged" not in option_names(cls):
        options = {k: v for k, v in options.items() if k != "on_unconverged"}
    check_estimator(name, options)
    try:
        return cls(damping=damping, **options)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"estimator {name!r}: {exc}") from exc
