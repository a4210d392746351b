"""The zarr internals pyunlearn relies on, in one place.

The store talks to zarr's key-value layer directly where zarr's array API would cost a trip
through its event loop per call (reading shards, writing the audit log, the lock): that needs
`zarr.core.sync.sync` (run a coroutine on zarr's loop) and an async group's item access, which
zarr does not promise to keep. Every such use is here, with the zarr version it was written
for; `check()` runs at import and fails loudly, naming what changed, if an internal is gone,
and warns on a zarr version this pyunlearn was not tested with (tests/store/test_zarr_io.py).
"""
from __future__ import annotations

import asyncio
import warnings

import zarr
from zarr.buffer import default_buffer_prototype

TESTED = ((3, 1),)  # the zarr minor versions this module was written and tested for (pyproject: zarr>=3.1,<4)


def check() -> None:
    """ImportError naming the internal if this zarr lacks one pyunlearn uses; a RuntimeWarning
    for a zarr minor version not in TESTED."""
    try:
        from zarr.core.sync import sync  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"pyunlearn needs zarr.core.sync.sync, which zarr {zarr.__version__} does not have ({exc}): "
                          "install a zarr pyunlearn supports (zarr>=3.1,<3.2 is tested)") from exc
    if not hasattr(zarr.Group, "_async_group") and "_async_group" not in getattr(zarr.Group, "__annotations__", {}):
        raise ImportError(f"pyunlearn reads a group's items through Group._async_group, which zarr {zarr.__version__} "
                          "does not have: install a zarr pyunlearn supports (zarr>=3.1,<3.2 is tested)")
    version = tuple(int(p) for p in zarr.__version__.split(".")[:2] if p.isdigit())
    if version not in TESTED:
        warnings.warn(f"zarr {zarr.__version__} is not a version pyunlearn was tested with "
                      f"({', '.join('.'.join(map(str, v)) for v in TESTED)}.x); its store reads and writes zarr's "
                      "internals (pyunlearn/store/zarr_io.py)", RuntimeWarning, stacklevel=2)


def run(coroutine):
    """The coroutine's result, run on zarr's event loop (its stores are async)."""
    from zarr.core.sync import sync

    return sync(coroutine)


def gather(coroutines):
    """Several coroutines on zarr's loop in one trip (each trip costs about a millisecond)."""
    async def all_of():
        return await asyncio.gather(*coroutines)

    return run(all_of())


def buffer(data: bytes):
    return default_buffer_prototype().buffer.from_bytes(data)


def get(zstore, key: str, byte_range=None) -> bytes | None:
    """The bytes at `key` (or a byte range of them), None if absent."""
    buf = run(zstore.get(key, default_buffer_prototype(), byte_range))
    return None if buf is None else buf.to_bytes()


def get_many(zstore, requests) -> list[bytes | None]:
    """The bytes of each (key, byte range or None), in one trip; None where a key is absent."""
    prototype = default_buffer_prototype()
    return [None if b is None else b.to_bytes()
            for b in gather(zstore.get(key, prototype, byte_range) for key, byte_range in requests)]


def put(zstore, key: str, data: bytes) -> None:
    run(zstore.set(key, buffer(data)))


def exists(zstore, key: str) -> bool:
    return run(zstore.exists(key))


def exist_many(zstore, keys) -> list[bool]:
    return gather(zstore.exists(key) for key in keys)


def delete(zstore, key: str) -> None:
    run(zstore.delete(key))


def first_key(zstore) -> str | None:
    """Any key of the store, or None for an empty one."""
    async def first():
        async for key in zstore.list():
            return key
        return None

    return run(first())


def open_arrays(group, names) -> list:
    """group[name] for each name, in one trip through zarr's loop instead of one per array
    (~0.5 ms each when a store is opened). KeyError for a missing one."""
    return [zarr.Array(a) for a in gather(group._async_group.getitem(name) for name in names)]


def write_together(writes) -> None:
    """arr[selection] = values for each (arr, selection, values), in one trip."""
    if writes:  # the trip costs about a millisecond even with nothing to write
        gather(arr.async_array.setitem(selection, values) for arr, selection, values in writes)


check()
