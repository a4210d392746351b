"""Failures outside the store say so (issue 24, case 10): an empty zarr.json, permission denied,
a full disk or a read-only file system name the file and the cause, never "damaged, restore from
a copy" for what is not damage, never a temporary file's name; nothing is committed."""
from __future__ import annotations

import errno

import pytest

import pyunlearn as pu
import pyunlearn.store.location as location
from tests.support import recorded_store


def test_an_empty_zarr_json_is_a_clear_error(tmp_path):
    recorded_store(tmp_path / "s.zarr", close=True)
    (tmp_path / "s.zarr" / "zarr.json").write_text("")
    with pytest.raises(pu.CorruptStoreError, match="zarr.json is not valid JSON .* empty or was cut short"):
        pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")


@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EACCES, "permission denied"),
                                         (errno.EROFS, "the file system is read-only")])
def test_a_commit_that_cannot_write_names_the_file_and_the_cause(tmp_path, monkeypatch, code, cause):
    recorded = recorded_store(tmp_path / "s.zarr")
    store = recorded.store
    steps = store.steps
    row = store.read([0])
    store.append(pu.Row(*(f[0] for f in row)), [5000])

    def refuse(source, target):
        raise OSError(code, "refused by the test")

    monkeypatch.setattr(location.os, "replace", refuse)
    with pytest.raises(pu.errors.StoreAccessError) as raised:
        store.flush()  # the step's shard, then the metadata
    message = str(raised.value)
    assert cause in message and str(tmp_path / "s.zarr") in message and ".partial" not in message
    assert isinstance(raised.value, OSError) and "Nothing was committed" in message
    monkeypatch.undo()
    assert pu.UpdateStore.open(tmp_path / "s.zarr", mode="r").steps == steps


def test_permission_denied_reading_is_not_called_damage(tmp_path, monkeypatch):
    recorded_store(tmp_path / "s.zarr", close=True)
    import zarr

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "s.zarr" / "zarr.json"))

    monkeypatch.setattr(zarr, "open_group", denied)
    with pytest.raises(pu.errors.StoreAccessError, match="permission denied reading") as raised:
        pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    assert "restore" not in str(raised.value) and "damaged" not in str(raised.value)
