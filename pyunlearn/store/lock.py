"""The single-writer lock of an update store: a key created only if absent.

The lock names its holder (host, process, a random token). Taking it creates the key only if it
is absent and reads it back: the writer whose token is there holds it. How "only if absent" is
enforced depends on the back-end:

- a local folder (zarr LocalStore): an exclusive create (a hard link), atomic;
- S3 (an FsspecStore over s3fs): a conditional PUT (If-None-Match: *), atomic on AWS S3 and on
  the S3-compatible services that implement it;
- anything else (other fsspec file systems): zarr's `set_if_not_exists`, check-then-put, so two
  writers starting within one round trip of each other can both believe they hold it.

A lock left by a process that no longer runs (killed mid-training) is taken over, with a
warning, only in a local folder, where host and pid identify the process. On object storage a
lock is never taken over: the same host name may be another machine's (containers), so the
user removes it with `UpdateStore.break_lock`.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings

from ..errors import StoreLockedError
from . import zarr_io
from .location import create_if_absent

LOCK_KEY = "writer.lock"


def _read(store) -> dict | None:
    data = zarr_io.get(store, LOCK_KEY)
    if data is None:
        return None
    try:
        holder = json.loads(data)
    except ValueError:
        return {"unreadable": True}
    return holder if isinstance(holder, dict) else {"unreadable": True}


def _is_local(store) -> bool:
    from zarr.storage import LocalStore

    return isinstance(store, LocalStore)


def _pid_alive(holder: dict) -> bool | None:
    """Whether the holder's process runs: True, False, or None (another host, no usable pid)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return None
    return True


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "another writer"
    if holder.get("unreadable"):
        return "an unreadable lock"
    return f"process {holder.get('pid')} on {holder.get('host')}"


class WriterLock:
    def __init__(self, store, where: str):
        self._store = store
        self._where = where
        self._token = None

    @property
    def held(self) -> bool:
        return self._token is not None

    def acquire(self) -> None:
        if self._token is not None:
            return
        token = uuid.uuid4().hex
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": token,
                         "since": time.time()}).encode()
        holder = None
        for _ in range(3):
            zarr_io.run(create_if_absent(self._store, LOCK_KEY, me))
            holder = _read(self._store)
            if holder is None:  # released (or broken) between the put and the read: try again
                continue
            if holder.get("token") == token:
                self._token = token
                return
            if _is_local(self._store) and not holder.get("unreadable") and _pid_alive(holder) is False:
                if self._take_over(holder):
                    warnings.warn(f"{self._where}: taking over the writer lock of process {holder.get('pid')}, "
                                  "which no longer runs", RuntimeWarning, stacklevel=4)
                continue
            break
        never = "" if _is_local(self._store) else " (on object storage a lock is never taken over automatically)"
        raise StoreLockedError(
            f"{self._where} is being written by {_describe(holder)}: one writer at a time. If that writer is "
            f"gone for good, remove the lock with UpdateStore.break_lock({self._where!r}){never}"
        )

    def _take_over(self, stale: dict) -> bool:
        """Removes a local stale lock, but only that one: the file is first moved aside, and put
        back if it turns out to be a lock another writer took meanwhile."""
        lock = os.path.join(str(self._store.root), LOCK_KEY)
        aside = f"{lock}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(lock, aside)
        except FileNotFoundError:  # another writer removed it first
            return False
        try:
            with open(aside, "rb") as f:
                moved = json.loads(f.read())
        except ValueError:
            moved = {}
        if isinstance(moved, dict) and moved.get("token") == stale.get("token"):
            os.unlink(aside)
            return True
        try:  # a fresh lock, not the stale one: give it back
            os.link(aside, lock)
        except FileExistsError:  # pragma: no cover - a third writer took it in between
            pass
        os.unlink(aside)
        return False

    def release(self) -> None:
        if self._token is None:
            return
        holder = _read(self._store)
        if holder is not None and holder.get("token") == self._token:
            zarr_io.delete(self._store, LOCK_KEY)
        self._token = None

    @staticmethod
    def break_lock(store, where: str = "the store", *, force: bool = False) -> bool:
        """Removes the lock; returns whether there was one. Without force, refuses (StoreLockedError)
        a lock whose holder is a running process of this host. Another host's process cannot be
        checked: its lock is removed."""
        holder = _read(store)
        if holder is None:
            return False
        if not force and not holder.get("unreadable") and _pid_alive(holder):
            raise StoreLockedError(
                f"{where}: the writer lock is held by {_describe(holder)}, which is alive: not removed. Close "
                "that writer (or stop its process); break_lock(..., force=True) removes the lock anyway, and "
                "two writers then corrupt the store"
            )
        zarr_io.delete(store, LOCK_KEY)
        return True
