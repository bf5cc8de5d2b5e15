"""Progress bars for long loops (tqdm), and the progress of iterative solves.

The setting everywhere is ``progress``: ``True`` shows a bar on stderr for every long step;
``None`` ("auto", :class:`~influencer.Influence`'s default) does the same on a terminal or in a
notebook, and only for a step still running after :data:`AUTO_DELAY` seconds, so quick steps and
redirected output (logs, test runs) stay clean; ``False`` shows nothing.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
Progress = bool | None

AUTO_DELAY = 2.0  # seconds a step runs before its bar appears, when progress is None


def _options(enabled: Progress) -> dict[str, Any] | None:
    """tqdm keyword arguments for the setting, or None for no bar."""
    if enabled is False:
        return None
    if enabled is None:
        return {"delay": AUTO_DELAY} if _interactive() else None
    return {}


def _interactive() -> bool:
    """Whether someone is watching: stderr is a terminal, or this runs in a Jupyter kernel."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):
        pass
    return "ipykernel" in sys.modules


def progress_bar(
    items: Iterable[T], desc: str, enabled: Progress, total: int | None = None, unit: str = "it"
) -> Iterator[T]:
    """``items`` wrapped in a tqdm bar when ``enabled`` asks for one; the bare iterable otherwise."""
    options = _options(enabled)
    if options is None:
        return iter(items)
    bar = tqdm(items, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=False, **options)
    return iter(bar)


class SolveProgress:
    """The progress of an iterative solve: iteration, worst relative residual and time left.

    The time left is extrapolated from how fast the log of the residual has fallen towards ``tol``
    (Krylov residuals fall about geometrically), and bounded by the iterations left to
    ``max_iter``. The last state stays printed when the solve ends.
    """

    def __init__(self, desc: str, enabled: Progress, tol: float, max_iter: int) -> None:
        options = _options(enabled)
        self.tol, self.max_iter = tol, max_iter
        self.delay = 0.0 if options is None else options.get("delay", 0.0)
        self.start = time.perf_counter()
        self.first: float | None = None
        self.bar = (
            None
            if options is None
            else tqdm(
                total=max_iter,
                desc=desc,
                bar_format="{desc}: iteration {n}/{total}{postfix} [{elapsed}]",
                dynamic_ncols=True,
                leave=False,
                **options,
            )
        )

    @property
    def enabled(self) -> bool:
        return self.bar is not None

    def update(self, iteration: int, residual: float) -> None:
        """After ``iteration`` (1-based): the largest relative residual of the unconverged columns."""
        if self.bar is None:
            return
        if self.first is None:
            self.first = residual
        self.bar.set_postfix_str(
            f"residual {residual:.2e} (tol {self.tol:.0e}){self._left(iteration, residual)}", refresh=False
        )
        self.bar.update(iteration - self.bar.n)

    def _left(self, iteration: int, residual: float) -> str:
        elapsed = time.perf_counter() - self.start
        per_iteration = elapsed / iteration
        bound = per_iteration * (self.max_iter - iteration)
        if self.first is None or not (0 < residual < self.first) or residual <= self.tol:
            return ""
        fallen = math.log(self.first / residual)  # in the iterations after the first
        rate = fallen / max(elapsed - per_iteration, 1e-9)
        left = min(math.log(residual / self.tol) / rate, bound)
        return f", about {duration_text(left)} left"

    def close(self) -> None:
        if self.bar is not None:
            if time.perf_counter() - self.start >= self.delay:  # a delayed bar that never showed stays hidden
                self.bar.refresh()
            self.bar.close()


def duration_text(seconds: float) -> str:
    """``"45 s"``, ``"12 min"`` or ``"1.5 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
