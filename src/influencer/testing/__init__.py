"""Exact references and checks users can run against their own models.

* :mod:`influencer.testing.references`: closed-form ridge influence and a dense float64 reference
  built independently of the library's functional machinery;
* :mod:`influencer.testing.checks`: :func:`check_influence`, a correctness report for a user's model.
"""

from influencer.testing.checks import CheckReport, check_influence
from influencer.testing.references import RidgeReference, dense_reference_scores, ridge_reference

__all__ = ["CheckReport", "RidgeReference", "check_influence", "dense_reference_scores", "ridge_reference"]
