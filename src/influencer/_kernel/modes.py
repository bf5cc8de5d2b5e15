"""Running a user's module in inference mode without changing the mode it is left in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (dropout off, batch-norm running statistics) for the block.

    Influence is defined for the deterministic model, but the caller's module may be in training
    mode: each submodule's ``training`` flag is restored on exit, so the user's module is left as
    it was found.
    """
    modes = [(m, m.training) for m in model.modules()]
    if not any(training for _, training in modes):
        yield model
        return
    model.eval()  # through train(False), so modules that override train() see the switch
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
