"""A model as a function of a flat parameter vector (``torch.func``), for code that checks or trains
a model the way :class:`~influencer.Influence` sees it."""

from influencer._kernel.functional import ModelFunction, select_parameters

__all__ = ["ModelFunction", "select_parameters"]
