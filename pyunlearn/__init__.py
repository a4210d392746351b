"""pyunlearn: make a trained PyTorch model forget chosen training samples.

The package's parts: `store` (the update store), `recording` (the recorder), `kernels` (pruning,
subtracting, fingerprints), `unlearn` (the forgetting methods), `evaluation` (metrics and
experiments), `integrations` (Lightning, Hugging Face); `ledger` (the timeline's rules), `keys`
(keys to sample IDs), `data`, `attribution`, `errors`.

Importing this package does no work beyond importing torch and zarr: the native extension
loads on the first kernel call.
"""
from ._version import __version__  # noqa: I001 (first: the store's metadata reads it)
from . import _deprecated, data, evaluation, kernels, keys, unlearn
from .errors import (CorruptStoreError, GuardFailedError, KeyMappingError, ModelMismatchError, NonFiniteUpdateError,
                     NotFoundError, PyunlearnError, RecorderError, StoreError, StoreFormatError, StoreLockedError)
from .kernels import Row
from .recording import UpdateRecorder
from .store import UpdateStore
from .unlearn import ForgetReport, Tolerance, amnesiac_forget, forget

_deprecated.install()

__all__ = [
    "__version__", "kernels", "data", "keys", "evaluation", "unlearn", "Row", "UpdateStore", "UpdateRecorder",
    "forget", "Tolerance", "amnesiac_forget", "ForgetReport", "PyunlearnError", "NonFiniteUpdateError", "StoreError", "StoreFormatError",
    "StoreLockedError", "CorruptStoreError", "ModelMismatchError", "RecorderError", "KeyMappingError", "NotFoundError",
    "GuardFailedError",
]


def __getattr__(name: str):  # pyunlearn.ops, .metrics, ... of earlier versions
    return _deprecated.moved_attribute(name)
