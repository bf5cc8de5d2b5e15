"""Small reference models: logistic regression, a tanh MLP, a small CNN and an RBF kernel model."""

from influencer.models.kernels import RBFKernelModel, median_gamma, squared_distances
from influencer.models.networks import MLP, LogisticRegression, SmallCNN

__all__ = ["MLP", "LogisticRegression", "RBFKernelModel", "SmallCNN", "median_gamma", "squared_distances"]
