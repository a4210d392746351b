"""Making and opening a store: the layout a new store describes, its chunk sizes, what create
and open refuse, and create's care with what a folder already holds (an unfinished create,
files that are not a store, a store to overwrite)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import zarr

import pyunlearn as pu
from tests.support import TinyNet
from tests.support.stores import record_on as _record
from tests.support.stores import recorded_path as _recorded


def test_create_describes_the_model(tmp_path):
    model = TinyNet()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=0.1)
    assert [layer.name for layer in store.layers] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert store.k == [math.ceil(0.1 * n) for n in (128, 16, 48, 3)] == [13, 2, 5, 1]
    assert [layer.offset for layer in store.layers] == [0, 13, 15, 20]
    attrs = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["format"] == "pyunlearn.update-store" and attrs["format_version"] == 5
    assert attrs["value_dtype"] == "float16" and attrs["row_length"] == 21
    # Every array uses spec codecs only: bytes, blosc, crc32c — inside the spec's sharding codec
    # where the array is sharded (its shard index: bytes, crc32c) — and names its dimensions.
    for name in ("values", "index", "scales", "sample_ids", "offsets"):
        meta = json.loads((tmp_path / "s.zarr" / name / "zarr.json").read_text())
        codecs = meta["codecs"]
        if codecs[0]["name"] == "sharding_indexed":
            assert [c["name"] for c in codecs[0]["configuration"]["index_codecs"]] == ["bytes", "crc32c"], name
            codecs = codecs[0]["configuration"]["codecs"]
        assert [c["name"] for c in codecs] == ["bytes", "blosc", "crc32c"], name
        assert meta["dimension_names"][0] in ("step", "sample", "step_boundary"), name


def test_chunks_follow_a_byte_target(tmp_path):
    small = pu.UpdateStore.create(tmp_path / "a.zarr", TinyNet(), keep=0.1)
    assert small.steps_per_chunk == 16384  # 84 bytes a row: capped
    big_model = torch.nn.Linear(4096, 1024)
    big = pu.UpdateStore.create(tmp_path / "b.zarr", big_model, keep=0.1)
    row_bytes = big.row_length * 4
    assert 1 <= big.steps_per_chunk and big.steps_per_chunk * row_bytes <= 8 << 20
    assert big.steps_per_chunk * row_bytes >= (4 << 20) - row_bytes


def test_open_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no update store"):
        pu.UpdateStore.open(tmp_path / "missing.zarr")
    zarr.open_group(tmp_path / "other.zarr", mode="w", attributes={"format": "something-else"})
    with pytest.raises(pu.StoreFormatError, match="not a pyunlearn update store"):
        pu.UpdateStore.open(tmp_path / "other.zarr")
    _record(tmp_path / "future.zarr")
    meta = tmp_path / "future.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["format_version"] = 99
    meta.write_text(json.dumps(doc))
    with pytest.raises(pu.StoreFormatError, match="format version 99; this pyunlearn .* reads versions 1, 2"):
        pu.UpdateStore.open(tmp_path / "future.zarr")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pu.UpdateStore.create(tmp_path / "other.zarr", TinyNet())


def test_bad_create_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep must be a ratio"):
        pu.UpdateStore.create(tmp_path / "a", TinyNet(), keep=0.0)
    with pytest.raises(ValueError, match="value_dtype"):
        pu.UpdateStore.create(tmp_path / "b", TinyNet(), value_dtype="int8")
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        pu.UpdateStore.create(tmp_path / "c", frozen)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        pu.UpdateStore.create(tmp_path / "d", "model")


def test_a_crash_inside_create_leaves_a_folder_that_says_so(tmp_path, monkeypatch):
    import pyunlearn.store.arrays as fmt

    real = fmt.create_arrays

    def crash(group, meta):
        group.create_array("values", shape=(0, 1), dtype="f4")
        raise KeyboardInterrupt  # the process stops midway

    monkeypatch.setattr("pyunlearn.store.arrays.create_arrays", crash)
    with pytest.raises(KeyboardInterrupt):
        pu.UpdateStore.create(tmp_path / "s.zarr", TinyNet())
    monkeypatch.setattr("pyunlearn.store.arrays.create_arrays", real)
    with pytest.raises(pu.CorruptStoreError, match="did not finish.*overwrite=True"):
        pu.UpdateStore.open(tmp_path / "s.zarr")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pu.UpdateStore.create(tmp_path / "s.zarr", TinyNet())
    pu.UpdateStore.create(tmp_path / "s.zarr", TinyNet(), overwrite=True).close()
    assert pu.UpdateStore.open(tmp_path / "s.zarr", mode="r").steps == 0


@pytest.mark.parametrize("overwrite", [False, True])
def test_create_never_deletes_what_is_not_a_store(tmp_path, overwrite):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError) as caught:
        pu.UpdateStore.create(folder, TinyNet(), overwrite=overwrite)
    assert "not a pyunlearn update store" in str(caught.value) and "pass overwrite=True" not in str(caught.value)
    assert (folder / "thesis.tex").read_text() == "years of work" and not (folder / "zarr.json").exists()


def test_create_in_an_empty_folder_and_over_a_store(tmp_path):
    (tmp_path / "empty").mkdir()
    pu.UpdateStore.create(tmp_path / "empty", TinyNet()).close()
    _, path = _recorded(tmp_path)
    pu.UpdateStore.create(path, TinyNet(), overwrite=True).close()
    assert pu.UpdateStore.open(path, mode="r").steps == 0
