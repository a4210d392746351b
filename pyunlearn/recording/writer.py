"""The recorder's writer thread: appends the rows the training thread hands over to the store."""
from __future__ import annotations

import queue
import threading
import time

from ..errors import NonFiniteUpdateError, RecorderError
from ..store import UpdateStore
from .transfer import PendingRow


_STOP = object()


class BackgroundWriter:
    """A thread that appends rows to the store. Rows arrive in hand-offs of several rows
    through a bounded queue (back-pressure: a slow disk slows training). Every `flush_every_s`
    seconds (if not None) the training thread hands over what it holds and the writer flushes
    the store after its next append. After an error it keeps draining, so the training thread
    never blocks on a dead writer; the error is re-raised in the training thread by raise_error()."""

    def __init__(self, store: UpdateStore, handoff_rows: int, queue_size: int, flush_every_s: float | None):
        self._store, self._handoff_rows, self._flush_every_s = store, handoff_rows, flush_every_s
        self._outgoing: list[tuple] = []
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.error: BaseException | None = None
        self._last_handoff = self._last_flush = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="pyunlearn-writer", daemon=True)
        self._thread.start()

    def put(self, item: tuple) -> None:
        self._outgoing.append(item)
        if len(self._outgoing) >= self._handoff_rows or (
                self._flush_every_s is not None and time.monotonic() - self._last_handoff >= self._flush_every_s):
            self._hand_off()

    def _hand_off(self) -> None:
        if self._outgoing:
            self._queue.put(self._outgoing)  # blocks while the writer is behind
            self._outgoing = []
        self._last_handoff = time.monotonic()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self.error is not None:
                    continue
                try:
                    for row, ids, hyper in item:
                        pending = row if type(row) is PendingRow else None
                        if pending is not None:
                            row = pending.wait()  # this thread waits for the device, never the training one
                        self._store.append(row, ids, hyper)  # copies the row: its buffers can be reused
                        if pending is not None:
                            pending.release()
                        if self._flush_every_s is not None and \
                                time.monotonic() - self._last_flush >= self._flush_every_s:
                            self._store.flush()
                            self._last_flush = time.monotonic()
                except BaseException as exc:  # re-raised in the training thread
                    self.error = exc
            finally:
                self._queue.task_done()

    def drain(self) -> None:
        """Hands off what is left and waits until the writer appended everything (or failed)."""
        self._hand_off()
        self._queue.join()

    def stop(self) -> None:
        """Hands off what is left and waits until everything was written (or failed)."""
        try:
            self._hand_off()
        finally:
            self._queue.put(_STOP)
            self._thread.join()

    def failure(self) -> "NonFiniteUpdateError | RecorderError | None":
        """The error raise_error() would raise, or None: the recorder checks it before each step."""
        if self.error is None:
            return None
        if isinstance(self.error, NonFiniteUpdateError):  # found in the background on a device
            failure = NonFiniteUpdateError(f"recording stopped: {self.error}")
        else:
            failure = RecorderError(f"writing to {self._store.path} failed: {self.error!r}; "
                                    "steps since the last flush are lost")
        failure.__cause__ = self.error
        return failure

    def raise_error(self) -> None:
        failure = self.failure()
        if failure is not None:
            raise failure
