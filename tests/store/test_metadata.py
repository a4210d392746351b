"""The store's metadata document: one checked value, checksummed on disk (an edited field fails
before anything changes), and the older formats it still reads (a format-2 store, the store
version 0.1 wrote: tests/fixtures/)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import pyunlearn as pu
from pyunlearn.store.metadata import StoreMetadata, attrs_checksum
from tests.support import recorded_store

FIXTURES = Path(__file__).parents[1] / "fixtures"


def test_metadata_round_trips_and_damaged_fields_are_corruption(tmp_path):
    store = recorded_store(tmp_path / "s.zarr", close=True).store
    attrs = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]
    meta = StoreMetadata.from_attrs(attrs, "s.zarr")
    assert meta == store.metadata and StoreMetadata.from_attrs(meta.to_checked_attrs(), "s.zarr") == meta
    # Field checks: each edit re-sealed with a valid checksum, so that the field's own check runs.
    def sealed(document):
        document = {k: v for k, v in document.items() if k != "checksum"}
        return document | {"checksum": attrs_checksum(document)}

    assert StoreMetadata.from_attrs(sealed(attrs), "s.zarr") == meta
    for field, bad in (("committed_steps", -1), ("committed_steps", "24"), ("layers", [{"name": "x"}]),
                       ("value_dtype", "int8"), ("row_length", meta.row_length + 1), ("fingerprint_initial", 3),
                       ("timeline", {"log": -1, "resume_point": None}), ("store_id", "not hex"),
                       ("resume_point", {"steps": "x", "fingerprint": "f"}), ("compression", "brotli:3"),
                       ("inner_steps", 7), ("lookup", {"from": 0, "runs": [["r2-5", 2, 5, 9]]}),
                       ("lookup", {"from": 0, "runs": [["r0-99", 0, 99, 9]]})):
        with pytest.raises(pu.CorruptStoreError, match="s.zarr"):
            StoreMetadata.from_attrs(sealed(dict(attrs, **{field: bad})), "s.zarr")
    damaged = dict(attrs)
    del damaged["timeline"]
    with pytest.raises(pu.CorruptStoreError, match="timeline"):
        StoreMetadata.from_attrs(sealed(damaged), "s.zarr")
    with pytest.raises(pu.StoreFormatError, match="format version 99"):
        StoreMetadata.from_attrs(dict(attrs, format_version=99), "s.zarr")


def _edit_attributes(path, edit):
    doc = json.loads(path.read_text())
    edit(doc["attributes"])
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("edit", [
    lambda a: a["timeline"].update(log=0),  # the log's records hidden: a rolled-back timeline
    lambda a: a.update(committed_steps=a["committed_steps"] - 1),
    lambda a: a.update(fingerprint_initial=a["fingerprint_initial"][:-1] + ("1" if a["fingerprint_initial"][-1] == "0" else "0")),
    lambda a: a.update(format_version=2),  # '5' -> '2' must not switch the checksum off
    lambda a: a.update(committed_samples=None),
], ids=["log", "count", "fingerprint", "version", "malformed"])
def test_edited_metadata_on_disk_fails_its_checksum_before_anything_changes(tmp_path, edit):
    recorded_store(tmp_path / "s.zarr", close=True)
    path = tmp_path / "s.zarr" / "zarr.json"
    _edit_attributes(path, edit)
    before = path.read_bytes()
    for attempt in (lambda: pu.UpdateStore.open(tmp_path / "s.zarr"),
                    lambda: pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")):
        with pytest.raises(pu.CorruptStoreError, match="checksum|claim format version"):
            attempt()
    assert path.read_bytes() == before


def test_an_edit_that_claims_format_2_to_skip_the_checksum_is_refused(tmp_path):
    recorded_store(tmp_path / "s.zarr", close=True)
    path = tmp_path / "s.zarr" / "zarr.json"
    _edit_attributes(path, lambda a: (a.update(format_version=2), a.pop("checksum")))
    with pytest.raises(pu.CorruptStoreError, match="claim format version 2"):
        pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")


def test_a_store_of_format_2_reads_and_is_checksummed_at_its_first_write(tmp_path):
    shutil.copytree(FIXTURES / "v0.2-format2.zarr", tmp_path / "s.zarr")  # written by pyunlearn 0.2.0
    path = tmp_path / "s.zarr" / "zarr.json"
    assert "checksum" not in json.loads(path.read_text())["attributes"]
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    assert store.metadata.format_version == 2
    with pytest.raises(pu.StoreError, match="records no step hyper-parameters"):
        store.read_step_hyper(store.steps)  # update stores record learning rates since format 4
    store.truncate(store.steps - 1)
    store.close()
    attrs = json.loads(path.read_text())["attributes"]
    assert attrs["format_version"] == 5 and attrs["checksum"].startswith("sha256:")


def test_reads_a_store_written_by_version_0_1(tmp_path):
    """tests/fixtures/v0.1-tinynet.zarr was written by pyunlearn 0.1.0 (format version 1)."""
    store = pu.UpdateStore.open(FIXTURES / "v0.1-tinynet.zarr", mode="r")
    assert store.steps == 8 and store.value_dtype == "float16"
    expected = json.loads((FIXTURES / "v0.1-tinynet.json").read_text())
    assert store.steps_for([1003]).steps.tolist() == expected["steps_of_1003"]
    assert store.read([7]).index[0].tolist() == expected["index_of_step_7"]
