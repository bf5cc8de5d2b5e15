"""The layers that K-FAC, EK-FAC and the Kronecker projection model one by one.

:func:`supported_parameters` lists a model's parameters in supported layers (``nn.Linear``,
``nn.Conv2d``, transformers' ``Conv1D``) and why the others are not; :func:`find_layers` maps the
parameters an :class:`~influencer.Influence` explains to those layers; :class:`LayerCapture` records
the layers' input and output-gradient rows while the model runs.
"""

from influencer._kernel.layers import (
    Layer,
    LayerCapture,
    check_layer_model,
    find_layers,
    is_supported,
    supported_parameters,
)

__all__ = [
    "Layer",
    "LayerCapture",
    "check_layer_model",
    "find_layers",
    "is_supported",
    "supported_parameters",
]
