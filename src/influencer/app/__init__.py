"""The ``influencer`` application: command line, configuration, the explain pipeline, report and store.

From Python: ``explain(ExplainConfig(...))`` runs what ``influencer explain`` runs and returns an
:class:`ExplainResult`; ``Job`` describes a user's own trained model and data.
"""

from influencer.app.settings.explain import ExplainConfig
from influencer.app.job.job import Job
from influencer.app.commands.explain import ExplainResult, explain

__all__ = ["ExplainConfig", "ExplainResult", "Job", "explain"]
