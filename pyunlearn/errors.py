"""Exceptions pyunlearn raises beyond the built-in TypeError / ValueError / KeyError."""


class PyunlearnError(Exception):
    """Base class of pyunlearn's own errors."""


class NonFiniteUpdateError(PyunlearnError, ValueError):
    """A layer's update (after − before) holds NaN or Inf: training diverged, nothing was recorded."""
