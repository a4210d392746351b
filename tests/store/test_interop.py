"""The store is plain Zarr v3 (sharding included): other readers open every array."""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import zarr

from tests.support import recorded_store

ARRAYS = ("values", "index", "scales", "sample_ids", "offsets", "step_hyper")


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("interop") / "s.zarr"
    with mock.patch("pyunlearn.store.id_index.TAIL_IDS", 8):  # so that the ID index has runs
        run = recorded_store(path, attribution="gradient", close=True)
    group = zarr.open_group(path, mode="r")
    assert run.store.metadata.lookup_runs and group["values"].shards is not None  # runs; sharded rows
    return path, run.store


def test_tensorstore_reads_every_array(store_path):
    import tensorstore as ts

    path, store = store_path
    group = zarr.open_group(path, mode="r")
    for name in ARRAYS:
        array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}).result()
        assert np.array_equal(array.read().result(), group[name][:]), name
    for run in store.metadata.lookup_runs:  # the ID index's runs, when the store has any
        array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "lookup" / run.name)}}).result()
        assert np.array_equal(array.read().result(), group["lookup"][run.name][:])


def test_xarray_opens_the_store_with_named_dimensions(store_path):
    import xarray as xr

    path, store = store_path
    ds = xr.open_zarr(path, consolidated=False)
    assert set(ARRAYS) <= set(ds.data_vars)
    assert ds["values"].dims == ("step", "entry") and ds["sample_ids"].dims == ("sample",)
    n = ds.attrs["committed_steps"]  # the extent: arrays are padded past it (docs/format.md)
    assert n == store.steps and ds.sizes["step"] >= n
    assert np.array_equal(ds["offsets"][: n + 1].values, zarr.open_group(path, mode="r")["offsets"][: n + 1])
