"""Scores and their sign, stated once in :mod:`influencer._kernel.scores`: a score is the predicted
change of the test measurement if the training example were removed (positive = helpful)."""

from influencer._kernel.scores import TopK, removal_scores, top_k

__all__ = ["TopK", "removal_scores", "top_k"]
