"""Exceptions pyunlearn raises beyond the built-in TypeError / ValueError / KeyError."""


class PyunlearnError(Exception):
    """Base class of pyunlearn's own errors."""


class NonFiniteUpdateError(PyunlearnError, ValueError):
    """A layer's update (after − before) holds NaN or Inf: training diverged, nothing was recorded."""


class StoreError(PyunlearnError):
    """An update store cannot be used as asked."""


class StoreFormatError(StoreError, ValueError):
    """The path holds no update store, or one of a format version this code does not read."""


class StoreLockedError(StoreError):
    """Another writer holds the store."""


class CorruptStoreError(StoreError):
    """A chunk of the store fails its checksum or cannot be decoded."""


class ModelMismatchError(PyunlearnError, ValueError):
    """The model is not the one the store (or its ledger) describes."""
