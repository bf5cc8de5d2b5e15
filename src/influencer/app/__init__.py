"""The ``influencer`` application: command line, configuration, the explain pipeline, report and store.

From Python: ``explain(ExplainConfig(...))`` runs what ``influencer explain`` runs and returns an
:class:`ExplainResult`; ``Job`` describes a user's own trained model and data.
"""

from influencer.app.config import ExplainConfig
from influencer.app.jobs import Job
from influencer.app.pipeline import ExplainResult, explain

__all__ = ["ExplainConfig", "ExplainResult", "Job", "explain"]
