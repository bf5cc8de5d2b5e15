"""The job cache: what every command needs of a job before its own work (the built-in job's trained
model, a head's features, retrained models), kept once outside any run directory, so ``explain``,
``index``, ``query`` and ``evaluate`` of the same job train and extract it once.

Where: ``--cache-dir`` (``cache_dir`` in the settings), else ``$INFLUENCER_CACHE``, else
``$XDG_CACHE_HOME/influencer``, else ``~/.cache/influencer``. It is a run directory
(:class:`~influencer.app.run.store.RunStore`): entries are keyed by fingerprints of everything they
depend on, written atomically, and one command at a time holds it (another waits for it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from influencer.app.run.store import RunStore

ENV = "INFLUENCER_CACHE"
# A second command waits this long for the cache (held while a job is trained or its features computed).
WAIT_S = 3600.0


def cache_root(cache_dir: str | None = None) -> Path:
    """The job cache's directory (see the module docstring)."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "influencer"


@contextlib.contextmanager
def job_cache(cache_dir: str | None = None) -> Iterator[RunStore]:
    """The job cache, locked while inside (waiting for another command that holds it)."""
    with RunStore(cache_root(cache_dir), wait=WAIT_S) as store:
        yield store
