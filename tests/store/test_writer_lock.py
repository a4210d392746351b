"""One writer at a time: the writer lock (who may break it, who takes a stale one over,
conditional puts on S3), write sessions, overwriting a store in use, and a handle that saw an
older commit."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

import pyunlearn as pu
from pyunlearn.store.location import zarr_store
from tests.support import TinyNet, recorded_store, tiny_data, tiny_training
from tests.support.stores import plus_one_row as _row
from tests.support.stores import small_recorded_run as _recorded


# ------------------------------------------------------------------ the lock

LOCK = "writer.lock"


def _new_store(path, options=None):
    """A store with no lock held (created, then closed)."""
    pu.UpdateStore.create(path, TinyNet(), keep=0.5, storage_options=options).close()


def _write_lock(path, options, payload: bytes) -> None:
    zstore, _ = zarr_store(path, options, read_only=False)
    sync(zstore.set(LOCK, default_buffer_prototype().buffer.from_bytes(payload)))


def _lock_of(path, options=None):
    zstore, _ = zarr_store(path, options, read_only=False)
    buf = sync(zstore.get(LOCK, default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def _holder(pid: int, host: str | None = None, token: str = "t" * 32) -> bytes:
    return json.dumps({"host": host or socket.gethostname(), "pid": pid, "token": token,
                       "since": time.time()}).encode()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def test_break_lock_refuses_the_live_writer_of_this_process_unless_forced(tmp_path):
    path = str(tmp_path / "s.zarr")
    writer = pu.UpdateStore.create(path, TinyNet(), keep=0.5)  # holds the lock
    with pytest.raises(pu.StoreLockedError) as refused:
        pu.UpdateStore.break_lock(path)
    message = str(refused.value)
    assert f"process {os.getpid()} on {socket.gethostname()}" in message
    assert "alive" in message and "force=True" in message
    assert _lock_of(path) is not None  # still there
    assert pu.UpdateStore.break_lock(path, force=True) is True
    assert _lock_of(path) is None
    writer.close()  # finds another's (no) lock: removes nothing, raises nothing
    assert pu.UpdateStore.break_lock(path) is False  # nothing left to break


def test_break_lock_judges_the_holder_of_each_lock(back_end):
    """A live process of this host is refused; a dead one, another host's, an unreadable lock
    are removed."""
    path, options = back_end
    _new_store(path, options)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _write_lock(path, options, _holder(sleeper.pid))
        with pytest.raises(pu.StoreLockedError, match=rf"process {sleeper.pid} .*alive.*force=True"):
            pu.UpdateStore.break_lock(path, storage_options=options)
        assert _lock_of(path, options) is not None
        assert pu.UpdateStore.break_lock(path, storage_options=options, force=True) is True
        assert _lock_of(path, options) is None
    finally:
        sleeper.kill()
        sleeper.wait()
    for payload in (_holder(_dead_pid()), _holder(sleeper.pid, host="another-host.invalid"), b"{not json"):
        _write_lock(path, options, payload)
        assert pu.UpdateStore.break_lock(path, storage_options=options) is True
        assert _lock_of(path, options) is None


def test_a_dead_writers_lock_is_taken_over_only_in_a_local_folder(back_end):
    """host + pid identify a process only on this machine's own disk: on object storage a lock
    that names this host and a dead pid may still be another machine's (same host name), so it
    is left to break_lock."""
    path, options = back_end
    _new_store(path, options)
    _write_lock(path, options, _holder(_dead_pid()))
    store = pu.UpdateStore.open(path, storage_options=options)
    if not path.startswith(("memory://", "s3://")):
        with pytest.warns(RuntimeWarning, match="no longer runs"):
            with store.writing():
                pass
        return
    with pytest.raises(pu.StoreLockedError, match="break_lock"):
        with store.writing():
            pass
    assert pu.UpdateStore.break_lock(path, storage_options=options) is True
    with store.writing():
        pass
    assert _lock_of(path, options) is None


def test_two_writers_racing_on_s3_exactly_one_wins(s3_server, tmp_path, monkeypatch):
    """The second writer's existence check sees no lock (as if it ran just before the first
    writer's put): only the conditional put (If-None-Match: *) keeps it from overwriting the
    first writer's lock. The installed moto server enforces the condition (412)."""
    path = f"s3://pyunlearn-tests/race-{tmp_path.name}/s.zarr"
    _new_store(path, s3_server)
    first = pu.UpdateStore.open(path, storage_options=s3_server)
    second = pu.UpdateStore.open(path, storage_options=s3_server)
    fs = second._zstore.fs
    real_info, real_pipe = fs._info, fs._pipe_file
    puts = []

    async def sees_nothing(key):
        return False

    async def info(path, *args, **kwargs):
        if path.endswith(LOCK) and kwargs.get("refresh"):  # the lock's existence check (a HEAD)
            raise FileNotFoundError(path)
        return await real_info(path, *args, **kwargs)

    async def pipe_file(path, data, *args, **kwargs):
        try:
            out = await real_pipe(path, data, *args, **kwargs)
        except Exception as exc:
            puts.append((path.rsplit("/", 1)[-1], kwargs.get("mode"), type(exc)))
            raise
        puts.append((path.rsplit("/", 1)[-1], kwargs.get("mode"), None))
        return out

    with first.writing():
        held = _lock_of(path, s3_server)  # the first writer's lock
        with monkeypatch.context() as race:
            race.setattr(second._zstore, "exists", sees_nothing)
            race.setattr(fs, "_info", info)
            race.setattr(fs, "_pipe_file", pipe_file)
            with pytest.raises(pu.StoreLockedError, match=f"process {os.getpid()}"):
                with second.writing():
                    pass
        assert json.loads(_lock_of(path, s3_server))["token"] == json.loads(held)["token"]
    assert (LOCK, "create", FileExistsError) in puts  # refused by the server, not by a check
    with second.writing():  # free again
        pass
    assert _lock_of(path, s3_server) is None


def test_a_local_takeover_removes_only_the_stale_lock(tmp_path):
    """Two writers taking over the same stale lock: the slower one must not remove the lock the
    faster one has just written in its place."""
    from pyunlearn.store.lock import WriterLock

    path = str(tmp_path / "s.zarr")
    _new_store(path)
    stale = json.loads(_holder(_dead_pid()))
    fresh = _holder(os.getpid(), token="f" * 32)  # written by the faster writer after it removed the stale one
    _write_lock(path, None, fresh)
    slower = WriterLock(zarr_store(path, None, read_only=False)[0], path)
    assert slower._take_over(stale) is False
    assert _lock_of(path) == fresh
    assert sorted(p.name for p in (tmp_path / "s.zarr").iterdir() if "lock" in p.name) == [LOCK]


def test_overwrite_refuses_a_store_in_use(tmp_path):
    writer = pu.UpdateStore.create(tmp_path / "s.zarr", TinyNet())
    with pytest.raises(pu.StoreLockedError):
        pu.UpdateStore.create(tmp_path / "s.zarr", TinyNet(), overwrite=True)
    writer.close()
    pu.UpdateStore.create(tmp_path / "s.zarr", TinyNet(), overwrite=True).close()


# ------------------------------------------------------------------ the write session

def test_a_write_session_releases_only_the_lock_it_took(tmp_path):
    store = recorded_store(tmp_path / "s.zarr", close=True).store
    other = pu.UpdateStore.open(tmp_path / "s.zarr")
    with store.writing():
        with pytest.raises(pu.StoreLockedError):
            with other.writing():
                pass
        with store.writing():  # nested: already held, so not released at its end
            pass
        with pytest.raises(pu.StoreLockedError):
            other.truncate(1)
    with other.writing():  # released at the end of the outer session
        other.truncate(10)
    with store.writing():  # a session starts from what is on disk, not from its stale copy
        assert store.steps == 10


def test_a_failing_session_still_releases_its_lock(tmp_path):
    store = recorded_store(tmp_path / "s.zarr", close=True).store
    with pytest.raises(ZeroDivisionError):
        with store.writing():
            1 / 0
    with pu.UpdateStore.open(tmp_path / "s.zarr").writing():
        pass


def test_a_read_only_store_refuses_a_session(tmp_path):
    recorded_store(tmp_path / "s.zarr", close=True)
    with pytest.raises(pu.StoreError, match="read-only"):
        with pu.UpdateStore.open(tmp_path / "s.zarr", mode="r").writing():
            pass


def test_a_handle_opened_earlier_does_not_overwrite_newer_commits(tmp_path):
    model, optimizer = _recorded(tmp_path / "s.zarr")
    early = pu.UpdateStore.open(tmp_path / "s.zarr")
    other = pu.UpdateStore.open(tmp_path / "s.zarr")
    other.truncate(4)
    with pu.UpdateRecorder(model, optimizer, other) as rec:
        tiny_training(model, optimizer, tiny_data(32, first_id=5000), epochs=1, recorder=rec)
    other.close()
    assert early.steps == 4  # its view is old...
    early.append(_row(early, model), [9999])
    early.flush()  # ...but writing starts from what is on disk
    fresh = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    assert fresh.steps == 7
    assert fresh.steps_for([5000, 9999]).missing.size == 0
