"""Optional dependencies: the core needs only torch, numpy and tqdm; the rest comes with an extra.

``pip install 'influencer[plot]'`` adds matplotlib (figures), ``[data]`` scikit-learn (the bundled
data sets), ``[app]`` everything the ``influencer`` command needs. Code that needs one of them calls
:func:`require`, so a missing package is one clear line naming the extra, not a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from influencer._kernel.errors import InfluencerError

# import name -> (distribution name, the smallest extra that installs it, or None for none)
PACKAGES: dict[str, tuple[str, str | None]] = {
    "matplotlib": ("matplotlib", "plot"),
    "sklearn": ("scikit-learn", "data"),
    "click": ("click", "app"),
    "tomli": ("tomli", "app"),
    "mnist1d": ("mnist1d", None),
}


class MissingExtraError(InfluencerError, ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def missing_message(modules: list[str], purpose: str, extra: str | None) -> str:
    """``"<purpose> needs click, scikit-learn (not installed): pip install 'influencer[app]' ..."``."""
    names = [PACKAGES.get(m, (m, None))[0] for m in modules]
    if extra is None:
        return f"{purpose} needs {', '.join(names)} (not installed): pip install {' '.join(names)}"
    return (
        f"{purpose} needs {', '.join(names)} (not installed): pip install 'influencer[{extra}]' "
        f"(from a source checkout: pip install -e '.[{extra}]')"
    )


def require(module: str, purpose: str, extra: str | None = None) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra that provides it.

    ``purpose`` says what needs it (``"influencer.plotting"``); ``extra`` defaults to the
    smallest extra that installs the package (none: the message says to install the package).
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != top:
            raise  # the package is there but one of its own dependencies is not: show that as it is
        extra = extra if extra is not None else PACKAGES.get(top, (top, None))[1]
        raise MissingExtraError(missing_message([top], purpose, extra)) from None


def missing(modules: list[str]) -> list[str]:
    """The import names in ``modules`` that are not installed (found without importing them)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: a module blocked in sys.modules
            found = False
        if not found:
            out.append(name)
    return out
