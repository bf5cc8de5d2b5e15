"""Progress bars for long loops (tqdm), off unless asked for."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(
    items: Iterable[T], desc: str, enabled: bool, total: int | None = None, unit: str = "it"
) -> Iterator[T]:
    """``items`` wrapped in a tqdm bar when ``enabled``; the bare iterable otherwise."""
    if not enabled:
        return iter(items)
    return iter(tqdm(items, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=False))
