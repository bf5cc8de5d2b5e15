"""The exceptions influencer raises; all derive from :class:`InfluencerError`."""

from influencer._kernel.errors import (
    ConfigError,
    ConvergenceError,
    DataError,
    IndefiniteHessianError,
    InfluencerError,
    NonFiniteError,
    TaskError,
    UnsafePathError,
)

__all__ = [
    "ConfigError",
    "ConvergenceError",
    "DataError",
    "IndefiniteHessianError",
    "InfluencerError",
    "NonFiniteError",
    "TaskError",
    "UnsafePathError",
]
