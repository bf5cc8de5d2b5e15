"""Exceptions raised for bad input. Each message says what is wrong and how to fix it."""

from __future__ import annotations


class InfluencerError(Exception):
    """Base class for every error raised by influencer."""


class TaskError(InfluencerError, ValueError):
    """A Task returned something of the wrong shape, dtype or kind (e.g. a reduced loss)."""


class DataError(InfluencerError, ValueError):
    """Data is empty, ragged, or does not match the data the model was trained on."""


class UnsafePathError(InfluencerError, OSError):
    """A path where influencer writes a file is a link or not a regular file, so writing could change
    some other file."""


class NonFiniteError(InfluencerError, FloatingPointError):
    """A loss, gradient or solver iterate contained NaN or infinity."""


class IndefiniteHessianError(InfluencerError, ArithmeticError):
    """The (damped) curvature is not positive definite, so its inverse is meaningless."""


class ConfigError(InfluencerError, ValueError):
    """A setting is out of range or settings contradict each other."""


class ConvergenceError(InfluencerError, ArithmeticError):
    """An iterative solver diverged (step too large, or curvature not positive definite)."""
