"""The device a command runs on, refused clearly when this machine does not have it."""

from __future__ import annotations

import torch

from influencer.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, refusing clearly a device this machine does not have."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} was asked for, but torch sees no CUDA GPU (torch.cuda.is_available() is "
                "False): use --device cpu, or install a CUDA build of torch on a machine with a GPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} was asked for, but the MPS backend is not available; use cpu")
    return device
