"""pyunlearn: make a trained PyTorch model forget chosen training samples.

Importing this package does no work beyond importing torch: the native extension loads on the
first kernel call.
"""
from . import ops
from ._version import __version__
from .errors import NonFiniteUpdateError, PyunlearnError
from .row import Row

__all__ = ["__version__", "ops", "Row", "PyunlearnError", "NonFiniteUpdateError"]
