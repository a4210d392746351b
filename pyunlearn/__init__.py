"""pyunlearn: make a trained PyTorch model forget chosen training samples.

Importing this package does no work beyond importing torch and zarr: the native extension
loads on the first kernel call.
"""
from ._version import __version__  # noqa: I001 (first: store.py reads it)
from . import data, keys, metrics, ops, unlearn
from .errors import (CorruptStoreError, KeyMappingError, ModelMismatchError, NonFiniteUpdateError, PyunlearnError, StoreError,
                     StoreFormatError, StoreLockedError)
from .recorder import RecorderError, UpdateRecorder
from .row import Row
from .store import UpdateStore
from .unlearn import ForgetReport, amnesiac_forget

__all__ = [
    "__version__", "ops", "data", "keys", "metrics", "unlearn", "Row", "UpdateStore", "UpdateRecorder", "amnesiac_forget", "ForgetReport",
    "PyunlearnError", "NonFiniteUpdateError", "StoreError", "StoreFormatError", "StoreLockedError",
    "CorruptStoreError", "ModelMismatchError", "RecorderError", "KeyMappingError",
]
