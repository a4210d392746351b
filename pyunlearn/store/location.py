"""Where a store lives: a local folder, an fsspec URL (s3://…, memory://…) or a zarr Store."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from ..errors import StoreNotFoundError


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
    if os.path.isfile(local):
        raise StoreNotFoundError(f"{text} is a file: an update store is a folder (or an fsspec URL)")
    return LocalStore(local, read_only=read_only), text


def what_is_there(zstore) -> str:
    """'nothing' (no keys), 'pyunlearn' (a group whose attributes name the update-store format,
    finished or not) or 'other' (anything else: other files, another Zarr hierarchy)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from .metadata import FORMAT_NAME

    async def first_key():
        async for key in zstore.list():
            return key
        return None

    try:
        if sync(first_key()) is None:
            return "nothing"
    except FileNotFoundError:
        return "nothing"
    buf = sync(zstore.get("zarr.json", default_buffer_prototype()))
    if buf is None:
        return "other"
    try:
        attrs = json.loads(buf.to_bytes()).get("attributes", {})
    except (ValueError, AttributeError):
        return "other"
    return "pyunlearn" if isinstance(attrs, dict) and attrs.get("format") == FORMAT_NAME else "other"


def replace_file(path: Path, parts) -> None:
    """Writes the file at `path` whole from `parts` (bytes-like), as zarr's LocalStore does:
    readers see the old file or the new one, never a mix."""
    temporary = path.with_suffix(f".{uuid.uuid4().hex}.partial")  # zarr's own temporary name
    try:
        try:
            f = open(temporary, "wb")
        except FileNotFoundError:  # the first file of its folder
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(temporary, "wb")
        with f:
            f.writelines(parts)  # not joined first: a shard of rows is megabytes
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
