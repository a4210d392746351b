"""Every error and warning pyunlearn raises of its own. Each error also derives from the built-in
error a caller would catch without knowing pyunlearn, so `except FileNotFoundError` or `except
ValueError` keeps working:

    PyunlearnError                          base of all below (catch this for "any pyunlearn error")
    ├── NonFiniteUpdateError   ValueError   a step's update holds NaN or Inf
    ├── ModelMismatchError     ValueError   the model is not the one the store or ledger describes
    ├── RecorderError          RuntimeError recording cannot go on
    │   ├── ResumeRefused                   the store's steps do not end with this model (recoverable)
    │   └── TrainingChangedError            the optimizer or a parameter changed mid-run (recording stops)
    ├── KeyMappingError        LookupError  keys cannot be mapped to IDs: no secret, the wrong one, a collision
    ├── NotFoundError          LookupError  none of a request's keys or IDs was used by a recorded step
    ├── GuardFailedError       RuntimeError a guarded forget could not keep the model within its tolerance
    └── StoreError             RuntimeError a store cannot be used as asked
        ├── StoreNotFoundError FileNotFoundError   no store at the path
        ├── StoreFormatError   ValueError          not a pyunlearn store, or an unknown format version
        ├── StoreLockedError                       another writer holds the store
        ├── StoreAccessError   OSError             a store file cannot be read or written: permission, no
        │                                          space left, a read-only file system (nothing is damaged)
        └── CorruptStoreError  OSError             stored data or metadata is damaged or missing

    StaleBuffersWarning        UserWarning  forgetting left BatchNorm running statistics as trained
"""


class PyunlearnError(Exception):
    """Base class of pyunlearn's own errors."""


class NonFiniteUpdateError(PyunlearnError, ValueError):
    """A layer's update (after − before) holds NaN or Inf: training diverged, nothing was recorded."""


class ModelMismatchError(PyunlearnError, ValueError):
    """The model is not the one the store (or its ledger) describes."""


class RecorderError(PyunlearnError, RuntimeError):
    """Recording cannot go on (the writer failed, or a step had no sample IDs)."""


class ResumeRefused(RecorderError):
    """The store has steps and the model is not the one they end with (recoverable: load the
    checkpoint's recorder state, or truncate the store, and step again)."""


class TrainingChangedError(RecorderError):
    """The optimizer's parameters, or a parameter's dtype, device or shape, changed mid-run:
    the step did not run and recording stops."""


class KeyMappingError(PyunlearnError, LookupError):
    """Keys cannot be mapped to sample IDs: the store's secret is missing or wrong, or two keys
    collide (pyunlearn.keys)."""


class NotFoundError(PyunlearnError, LookupError):
    """None of a deletion request's keys or IDs was used by any recorded step: nothing would be
    removed. Refused before anything changes unless the caller asks to record it as not-found."""


class GuardFailedError(PyunlearnError, RuntimeError):
    """A guarded forget (pyunlearn.forget) left the model below its tolerance on the probe even
    after the repairs its budget allowed: the model was restored and nothing was recorded."""


class StoreError(PyunlearnError, RuntimeError):
    """An update store cannot be used as asked."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The path holds no update store."""


class StoreFormatError(StoreError, ValueError):
    """The path holds a Zarr group that is not an update store, or one of a format version this
    code does not read."""


class StoreLockedError(StoreError):
    """Another writer holds the store."""


class StoreAccessError(StoreError, OSError):
    """A file of the store cannot be read or written for a reason outside the store: permission
    denied, no space left on the device, a read-only file system. The message names the file;
    nothing was committed, and the store is as it was."""


class CorruptStoreError(StoreError, OSError):
    """Stored data or metadata is damaged or missing (a checksum fails, a chunk cannot be
    decoded, a metadata field is malformed)."""


class StaleBuffersWarning(UserWarning):
    """A model with BatchNorm running statistics was forgotten without recomputing them."""
