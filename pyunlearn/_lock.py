"""The single-writer lock of an update store: a key created only if absent.

The lock names its holder (host, process, a random token). Taking it writes the key with
`set_if_not_exists` and reads it back: the writer whose token is there holds it. A lock left by
a process of this host that no longer runs (killed mid-training) is stale and taken over.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .errors import StoreLockedError

LOCK_KEY = "writer.lock"


def _read(store) -> dict | None:
    buf = sync(store.get(LOCK_KEY, default_buffer_prototype()))
    if buf is None:
        return None
    try:
        return json.loads(buf.to_bytes())
    except ValueError:
        return {"unreadable": True}


def _alive_here(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: cannot tell, assume it runs
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


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
        me = {"host": socket.gethostname(), "pid": os.getpid(), "token": token, "since": time.time()}
        for _ in range(2):
            sync(self._store.set_if_not_exists(LOCK_KEY, default_buffer_prototype().buffer.from_bytes(json.dumps(me).encode())))
            holder = _read(self._store)
            if holder is not None and holder.get("token") == token:
                self._token = token
                return
            if holder is not None and not holder.get("unreadable") and not _alive_here(holder):
                warnings.warn(f"{self._where}: taking over the writer lock of process {holder.get('pid')}, "
                              "which no longer runs", RuntimeWarning, stacklevel=4)
                sync(self._store.delete(LOCK_KEY))
                continue
            break
        who = "an unreadable lock" if holder is None or holder.get("unreadable") else \
            f"process {holder.get('pid')} on {holder.get('host')}"
        raise StoreLockedError(
            f"{self._where} is being written by {who}: one writer at a time. If that writer is gone for "
            f"good, remove the lock with UpdateStore.break_lock({self._where!r})"
        )

    def release(self) -> None:
        if self._token is None:
            return
        holder = _read(self._store)
        if holder is not None and holder.get("token") == self._token:
            sync(self._store.delete(LOCK_KEY))
        self._token = None

    @staticmethod
    def break_lock(store) -> bool:
        if _read(store) is None:
            return False
        sync(store.delete(LOCK_KEY))
        return True
