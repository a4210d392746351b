"""Where a store lives: a local folder, an fsspec URL (s3://…, memory://…) or a zarr Store."""
from __future__ import annotations

import asyncio
import errno
import json
import os
import uuid
from pathlib import Path

from ..errors import StoreAccessError, StoreNotFoundError
from . import zarr_io


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
    from .metadata import FORMAT_NAME

    try:
        if zarr_io.first_key(zstore) is None:
            return "nothing"
    except FileNotFoundError:
        return "nothing"
    data = zarr_io.get(zstore, "zarr.json")
    if data is None:
        return "other"
    try:
        attrs = json.loads(data).get("attributes", {})
    except (ValueError, AttributeError):
        return "other"
    return "pyunlearn" if isinstance(attrs, dict) and attrs.get("format") == FORMAT_NAME else "other"


def replace_file(path: Path, parts) -> None:
    """Writes the file at `path` whole from `parts` (bytes-like), as zarr's LocalStore does:
    readers see the old file or the new one, never a mix. A failure names `path` (not the
    temporary file) and says why: StoreAccessError for permission, space or a read-only file
    system."""
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
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise access_error(exc, path, "writing") from exc
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def access_error(exc: OSError, path, doing: str) -> OSError:
    """`exc` as the error a user can act on: StoreAccessError naming `path` for permission, space
    and read-only file systems; `exc` itself otherwise."""
    why = {errno.EACCES: "permission denied: give this user write access to the store's folder",
           errno.EPERM: "permission denied: give this user write access to the store's folder",
           errno.ENOSPC: "no space left on the device: free space, then retry",
           errno.EDQUOT: "the disk quota is exhausted: free space, then retry",
           errno.EROFS: "the file system is read-only: open the store with mode='r', or copy it somewhere writable"}
    if exc.errno not in why:
        return exc
    return StoreAccessError(f"{doing} {path} failed: {why[exc.errno]}. Nothing was committed; the store is as it was")


def _s3_path(store, key: str) -> tuple[object, str] | None:
    """(s3fs file system, the bucket/key of `key`) when the store is an FsspecStore over S3."""
    from zarr.storage import FsspecStore

    if not isinstance(store, FsspecStore):
        return None
    try:
        from s3fs import S3FileSystem
    except ImportError:  # pragma: no cover - an S3 store cannot exist without s3fs
        return None
    if not isinstance(store.fs, S3FileSystem):
        return None
    return store.fs, f"{store.path.rstrip('/')}/{key}"


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code behind an error s3fs translated (its cause is botocore's ClientError)."""
    response = getattr(exc.__cause__, "response", None) or getattr(exc, "response", None)
    return (response or {}).get("Error", {}).get("Code") if isinstance(response, dict) else None


async def create_if_absent(store, key: str, data: bytes) -> None:
    """Writes `key` unless it exists; never overwrites one that another writer created first
    where the back-end can enforce it: a local folder by a hard link (atomic), S3 by a
    conditional PUT (If-None-Match: *); other back-ends check, then put. The caller reads the
    key back to learn whether its bytes are the ones there."""
    s3 = _s3_path(store, key)
    if s3 is None:
        await store.set_if_not_exists(key, zarr_io.buffer(data))
        return
    fs, path = s3
    try:  # a fresh HEAD (not s3fs's listing cache): the common case, and all that a service
        await fs._info(path, refresh=True)  # ignoring the condition gets
        return
    except FileNotFoundError:
        pass
    for attempt in range(5):
        try:
            await fs._pipe_file(path, data, mode="create")  # PutObject with If-None-Match: *
            return
        except FileExistsError:  # 412 PreconditionFailed: another writer's object is there
            return
        except OSError as exc:
            code = _s3_code(exc)
            if code == "PreconditionFailed":
                return
            if code == "ConditionalRequestConflict" and attempt < 4:  # 409: a concurrent put; retry
                await asyncio.sleep(0.05 * 2**attempt)
                continue
            if code in ("NotImplemented", "InvalidArgument", "InvalidRequest"):  # pragma: no cover
                break
            raise
    # The service rejects the condition: check-then-put, as on other back-ends.
    await store.set_if_not_exists(key, zarr_io.buffer(data))
