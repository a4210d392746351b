"""Where a store lives: a local folder, an fsspec URL (s3://…, memory://…) or a zarr Store."""
from __future__ import annotations

import os


def zarr_store(path, storage_options, read_only: bool):
    """A zarr Store for a folder path, an fsspec URL (s3://…, memory://…), or a Store itself."""
    from zarr.abc.store import Store

    if isinstance(path, Store):
        return path, repr(path)
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(text, str):
        raise TypeError(f"path must be a folder path or an fsspec URL, got {type(path).__name__}")
    if "://" in text and not text.startswith("file://"):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(text, storage_options=storage_options, read_only=read_only), text
    from zarr.storage import LocalStore

    local = text[len("file://"):] if text.startswith("file://") else text
    return LocalStore(local, read_only=read_only), text
