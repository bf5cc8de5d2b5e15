"""The ``influencer`` application: command line, settings, the shared steps, report and stores.

From Python: ``explain(ExplainConfig(...))`` runs what ``influencer explain`` runs and returns an
:class:`ExplainResult`; ``Job`` describes a user's own trained model and data. Layout:
:mod:`~influencer.app.commands` (one module per command), :mod:`~influencer.app.settings`,
:mod:`~influencer.app.steps` (what every command is made of), :mod:`~influencer.app.job`,
:mod:`~influencer.app.run` (run directories, the gradient store) and :mod:`~influencer.app.report`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from influencer.app.commands.explain import ExplainResult, explain
    from influencer.app.job.job import Job
    from influencer.app.settings.explain import ExplainConfig

# Imported on first use, so the command line's --help does not load torch.
_LAZY = {
    "ExplainConfig": "influencer.app.settings.explain",
    "ExplainResult": "influencer.app.commands.explain",
    "Job": "influencer.app.job.job",
    "explain": "influencer.app.commands.explain",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'influencer.app' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["ExplainConfig", "ExplainResult", "Job", "explain"]
