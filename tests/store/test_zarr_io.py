"""The zarr internals pyunlearn relies on (pyunlearn/store/zarr_io.py) are still there and still
behave as the store expects: a zarr that changed them fails here, loudly, not in a user's store."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import zarr

from pyunlearn.store import zarr_io


def test_the_internals_exist_and_the_version_is_a_tested_one():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an untested zarr minor version warns: fail on it here
        zarr_io.check()
    version = tuple(int(p) for p in zarr.__version__.split(".")[:2])
    assert version in zarr_io.TESTED, f"zarr {zarr.__version__} is installed; TESTED lists {zarr_io.TESTED}"


def test_the_key_value_calls_round_trip(tmp_path):
    store = zarr.storage.LocalStore(str(tmp_path / "s"))
    assert zarr_io.first_key(store) is None
    zarr_io.put(store, "a/b.json", b"hello")
    assert zarr_io.get(store, "a/b.json") == b"hello" and zarr_io.get(store, "missing") is None
    assert zarr_io.exists(store, "a/b.json") and zarr_io.exist_many(store, ["a/b.json", "x"]) == [True, False]
    from zarr.abc.store import RangeByteRequest

    assert zarr_io.get_many(store, [("a/b.json", RangeByteRequest(1, 3)), ("x", None)]) == [b"el", None]
    assert zarr_io.first_key(store) == "a/b.json"
    zarr_io.delete(store, "a/b.json")
    assert not zarr_io.exists(store, "a/b.json")


def test_arrays_open_and_write_in_one_trip(tmp_path):
    group = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3)
    for name in ("a", "b"):
        group.create_array(name, shape=(4,), dtype=np.int64, chunks=(4,), fill_value=0)
    a, b = zarr_io.open_arrays(group, ["a", "b"])
    zarr_io.write_together([(a, slice(0, 2), np.array([1, 2])), (b, slice(2, 4), np.array([3, 4]))])
    assert group["a"][:].tolist() == [1, 2, 0, 0] and group["b"][:].tolist() == [0, 0, 3, 4]
    with pytest.raises(KeyError):
        zarr_io.open_arrays(group, ["missing"])
