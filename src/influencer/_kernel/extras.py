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

# import name -> (distribution name, the smallest extra that installs it)
PACKAGES: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "plot"),
    "sklearn": ("scikit-learn", "data"),
    "click": ("click", "app"),
    "tomli": ("tomli", "app"),
    "mnist1d": ("mnist1d", "dev"),
}


class MissingExtraError(InfluencerError, ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def install_hint(extra: str) -> str:
    return f"pip install 'influencer[{extra}]' (from a source checkout: pip install -e '.[{extra}]')"


def missing_message(packages: list[str], purpose: str, extra: str) -> str:
    """``"<purpose> needs click, scikit-learn (not installed): pip install 'influencer[app]' ..."``."""
    names = ", ".join(PACKAGES.get(p, (p, extra))[0] for p in packages)
    return f"{purpose} needs {names} (not installed): {install_hint(extra)}"


def require(module: str, purpose: str, extra: str | None = None) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra that provides it.

    ``purpose`` says what needs it (``"influencer.paper.plotting"``); ``extra`` defaults to the
    smallest extra that installs the package.
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != top:
            raise  # the package is there but one of its own dependencies is not: show that as it is
        raise MissingExtraError(missing_message([top], purpose, extra or _extra(top))) from None


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


def _extra(module: str) -> str:
    return PACKAGES.get(module, (module, "all"))[1]
