"""A deletion the ledger records is a deletion that happened (issue 11): missing chunks, NaN rows,
unfinished or foreign folders, the CLI's order of writes, undoing a ledger entry."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn.cli import main
from tests.support import TinyNet, recorded_store


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(xs, ys):
    return all(torch.equal(x, y) for x, y in zip(xs, ys))


def _recorded(tmp_path, **options):
    run = recorded_store(tmp_path / "s.zarr", keep=0.3, momentum=0.0, steps_per_chunk=4, close=True, **options)
    return run.model, tmp_path / "s.zarr"


# ------------------------------------------------------------------ missing chunks
def test_a_missing_values_chunk_is_corruption_not_zeros(tmp_path):
    model, path = _recorded(tmp_path)
    store = pu.UpdateStore.open(path)
    steps = store.steps_for([1000]).steps
    (path / "values" / "c" / str(int(steps[0]) // 4) / "0").unlink()
    before = _params(model)
    with pytest.raises(pu.CorruptStoreError, match=r"chunk values/c/\d+/0 of array 'values' is missing"):
        pu.amnesiac_forget(model, store, [1000])
    assert _same(_params(model), before) and not pu.UpdateStore.open(path, mode="r").ledger.has_deletions


def test_a_missing_sample_ids_chunk_does_not_make_ids_look_unseen(tmp_path):
    _, path = _recorded(tmp_path)
    (path / "sample_ids" / "c" / "0").unlink()
    with pytest.raises(pu.CorruptStoreError, match="sample_ids"):
        pu.UpdateStore.open(path, mode="r").steps_for([1000])


def test_a_missing_chunk_of_the_id_index_does_not_make_ids_look_unseen(tmp_path, monkeypatch):
    monkeypatch.setattr("pyunlearn.store.id_index.TAIL_IDS", 16)  # every commit writes a run
    _, path = _recorded(tmp_path)
    store = pu.UpdateStore.open(path, mode="r")
    assert store.steps_for([1000]).missing.size == 0 and store.metadata.lookup_runs
    for run in store.metadata.lookup_runs:
        for chunk in (path / "lookup" / run.name / "c").rglob("*"):
            if chunk.is_file():
                chunk.unlink()
    with pytest.raises(pu.CorruptStoreError, match="lookup/r"):
        pu.UpdateStore.open(path, mode="r").steps_for([1000])


def test_a_missing_offsets_chunk_is_corruption(tmp_path):
    _, path = _recorded(tmp_path)
    (path / "offsets" / "c" / "0").unlink()
    with pytest.raises(pu.CorruptStoreError, match="offsets"):
        pu.UpdateStore.open(path).truncate(1)  # reads where step 1's IDs end
    assert pu.UpdateStore.open(path, mode="r").steps == 16  # nothing changed


def test_stored_rows_with_nan_are_refused_before_the_model_changes(tmp_path):
    model, path = _recorded(tmp_path, value_dtype="float32")
    store = pu.UpdateStore.open(path)
    steps = store.steps_for([1000, 1001, 1002]).steps
    import zarr

    values = zarr.open_array(path / "values", mode="r+")
    values[int(steps[-1]), 0] = np.nan  # a valid chunk (checksum fine) holding NaN
    before = _params(model)
    with pytest.raises(pu.CorruptStoreError, match=f"step {int(steps[-1])} holds NaN or Inf"):
        pu.amnesiac_forget(model, store, [1000, 1001, 1002])
    assert _same(_params(model), before) and not store.ledger.has_deletions


# ------------------------------------------------------------------ create and overwrite
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


# ------------------------------------------------------------------ the ledger's compare-and-swap, undo
def test_undoing_a_deletion_whose_model_could_not_be_saved(tmp_path):
    model, path = _recorded(tmp_path)
    final = _params(model)
    store = pu.UpdateStore.open(path)
    report = pu.amnesiac_forget(model, store, [1000])
    assert report.committed and store.ledger == report.ledger_after
    store.record_deletion(report.ledger_before, replacing=report.ledger_after)  # the save failed: undo
    assert not store.ledger.has_deletions
    restored = TinyNet()
    restored.load_state_dict(dict(zip([n for n, _ in model.named_parameters()], final)), strict=False)
    again = pu.amnesiac_forget(restored, store, [1000])  # from the final model, as if never forgotten
    assert again.steps_removed == report.steps_removed


def test_a_stale_ledger_write_is_refused(tmp_path):
    model, path = _recorded(tmp_path)
    other = TinyNet()
    other.load_state_dict(model.state_dict())
    store = pu.UpdateStore.open(path)
    report = pu.amnesiac_forget(model, store, [1000], commit=False)
    assert not report.committed and not store.ledger.has_deletions and store.ledger == report.ledger_pending
    pu.amnesiac_forget(other, pu.UpdateStore.open(path), [1001])  # another deletion came first
    with pytest.raises(pu.StoreError, match="ledger changed"):
        store.record_deletion(report.ledger_after, replacing=report.ledger_pending)


def test_a_pending_deletion_accepts_the_model_before_and_the_model_after(tmp_path):
    """The state a kill between "model saved" and "deletion committed" leaves: whichever of the
    two models survived on disk can be forgotten from, and settles the pending entry."""
    model, path = _recorded(tmp_path)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    report = pu.amnesiac_forget(model, pu.UpdateStore.open(path), [1000], commit=False)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    assert pu.UpdateStore.open(path, mode="r").ledger.pending is not None

    saved = TinyNet()
    saved.load_state_dict(after)  # the save went through: the pending deletion is applied
    r1 = pu.amnesiac_forget(saved, pu.UpdateStore.open(path), [1001])
    assert r1.ledger_after.removed_steps.tolist() == sorted(set(report.ledger_after.removed_steps) |
                                                             set(r1.ledger_after.removed_steps))
    assert set(report.ledger_after.removed_steps) <= set(r1.ledger_after.removed_steps)
    assert r1.steps_applied == r1.steps_removed  # only new steps were subtracted from it

    model2, path2 = _recorded(tmp_path / "b")
    pu.amnesiac_forget(model2, pu.UpdateStore.open(path2), [1000], commit=False)
    lost = TinyNet()
    lost.load_state_dict(final)  # the save never happened: the final model is still accepted
    r2 = pu.amnesiac_forget(lost, pu.UpdateStore.open(path2), [1001])
    assert r2.ledger_after.pending is None
    assert r2.steps_applied == r2.steps_removed == len(pu.UpdateStore.open(path2, mode="r").steps_for([1001]).steps)


# ------------------------------------------------------------------ the CLI
def _cli_setup(tmp_path):
    model, path = _recorded(tmp_path)
    torch.save(model.state_dict(), tmp_path / "final.pt")
    (tmp_path / "ids.txt").write_text("1000")
    return path


def _forget(tmp_path, out, checkpoint="final.pt", ids="ids.txt", store="s.zarr"):
    return subprocess.run([sys.executable, "-m", "pyunlearn.cli", "forget", "--store", str(tmp_path / store),
                           "--checkpoint", str(tmp_path / checkpoint), "--ids", str(tmp_path / ids),
                           "--out", str(out)], capture_output=True, text=True)


def test_cli_forget_with_a_bad_out_leaves_the_ledger_alone(tmp_path):
    path = _cli_setup(tmp_path)
    out = _forget(tmp_path, tmp_path / "no-such-folder" / "o.pt")
    assert out.returncode == 1 and "Traceback" not in out.stderr and "--out" in out.stderr
    assert not pu.UpdateStore.open(path, mode="r").ledger.has_deletions
    assert _forget(tmp_path, tmp_path / "o.pt").returncode == 0  # the next request is not refused


def test_cli_forget_writes_the_model_before_the_ledger(tmp_path, monkeypatch, capsys):
    """A save that fails midway (full disk, kill) leaves the input checkpoint intact and the
    ledger describing it, also when --out is --checkpoint."""
    path = _cli_setup(tmp_path)
    original = (tmp_path / "final.pt").read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    args = ["forget", "--store", str(path), "--checkpoint", str(tmp_path / "final.pt"),
            "--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "final.pt")]
    assert main(args) == 1
    assert "No space left" in capsys.readouterr().err
    assert (tmp_path / "final.pt").read_bytes() == original
    assert not pu.UpdateStore.open(path, mode="r").ledger.has_deletions
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".final")) == []  # no temp left
    monkeypatch.setattr(torch, "save", real_save)
    assert main(args) == 0  # in place, atomically: the ledger now describes the new file
    model = TinyNet()
    model.load_state_dict(torch.load(tmp_path / "final.pt", weights_only=True))
    store = pu.UpdateStore.open(path)
    assert store.ledger.fingerprint == pu.kernels.fingerprint(store.check_model(model))


@pytest.mark.parametrize("case", ["store-is-a-file", "id-past-int64", "pickled-object"])
def test_cli_bad_input_is_one_line(tmp_path, case):
    _cli_setup(tmp_path)
    kwargs = {}
    if case == "store-is-a-file":
        (tmp_path / "file.zarr").write_text("x")
        kwargs["store"] = "file.zarr"
    elif case == "id-past-int64":
        (tmp_path / "big.txt").write_text(str(2**63))
        kwargs["ids"] = "big.txt"
    else:
        torch.save({"fc1.weight": torch.zeros(1), "extra": pu.ForgetReport}, tmp_path / "pickled.pt")
        kwargs["checkpoint"] = "pickled.pt"
    out = _forget(tmp_path, tmp_path / "o.pt", **kwargs)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("pyunlearn forget: error: ")


@pytest.mark.parametrize("whole_copy", [False, True])
def test_a_failure_after_some_batches_puts_every_entry_back(tmp_path, monkeypatch, whole_copy):
    """Rows are subtracted a batch at a time; a failure in a later batch restores the entries
    the earlier ones changed (saved per batch, or a whole copy when the rows touch more entries
    than the model holds)."""
    import zarr

    import pyunlearn.unlearn.amnesiac as amnesiac

    model, path = _recorded(tmp_path, value_dtype="float32")
    store = pu.UpdateStore.open(path)
    steps = store.steps_for([1000, 1001, 1002, 1003]).steps
    assert steps.size >= 3
    zarr.open_array(path / "values", mode="r+")[int(steps[-1]), 0] = np.nan
    monkeypatch.setattr(amnesiac, "READ_BATCH_BYTES", 1)  # one row per batch
    if whole_copy:
        monkeypatch.setattr(amnesiac._Rollback, "__init__", _always_copy(amnesiac._Rollback.__init__))
    before = _params(model)
    with pytest.raises(pu.CorruptStoreError, match="NaN"):
        pu.amnesiac_forget(model, store, [1000, 1001, 1002, 1003])
    assert _same(_params(model), before)


def _always_copy(init):
    def patched(self, work, store, rows):
        init(self, work, store, rows)
        self._copy = [w.clone() for w in work]
    return patched


def test_change_norm_counts_each_entry_once(tmp_path):
    model, path = _recorded(tmp_path, value_dtype="float32")
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters() if p.requires_grad])
    report = pu.amnesiac_forget(model, pu.UpdateStore.open(path), [1000, 1001, 1002, 1003])
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    assert report.change_norm == pytest.approx(float(torch.linalg.vector_norm(after - before)), rel=1e-6)


def _sharded(tmp_path):
    run = recorded_store(tmp_path / "s.zarr", keep=0.3, momentum=0.0, close=True)
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    assert store._data.arrays["values"].shards is not None  # the default layout is sharded
    return run.model, store


def test_rows_read_from_shards_equal_zarrs(tmp_path):
    import zarr

    _, store = _sharded(tmp_path)
    steps = np.array([11, 0, 5, 5, 15])
    rows = store.read(steps)
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    for name, got in zip(("index", "values", "scales"), rows):
        assert np.array_equal(got.numpy(), group[name].oindex[steps, :]), name


@pytest.mark.parametrize("damage", ["flip", "missing"])
def test_a_damaged_or_missing_shard_is_corruption(tmp_path, damage):
    model, store = _sharded(tmp_path)
    shard = tmp_path / "s.zarr" / "values" / "c" / "0" / "0"
    if damage == "missing":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0x01  # one bit inside an inner chunk
        shard.write_bytes(bytes(data))
    before = _params(model)
    with pytest.raises(pu.CorruptStoreError, match="values"):
        pu.amnesiac_forget(model, store, [1000, 1001, 1002])
    assert _same(_params(model), before) and not store.ledger.has_deletions


@pytest.mark.parametrize("numel", [40, 100_000])  # dense buffer path, unique path
def test_rollback_change_norm_counts_an_entry_once_with_its_earliest_value(numel):
    from pyunlearn.unlearn.amnesiac import _Rollback

    class Store:  # what _Rollback reads of a store
        k, row_length = [3], 3

    work = [torch.zeros(numel)]
    rollback = _Rollback(work, Store(), rows=1)
    gaps = torch.tensor([[1, 2, 3]], dtype=torch.uint32)  # positions 0, 2, 5
    rollback.save(pu.Row(gaps, torch.ones(1, 3), torch.ones(1, 1)))
    work[0][[0, 2, 5]] -= 1.0
    rollback.save(pu.Row(torch.tensor([[3, 1, 2]], dtype=torch.uint32), torch.ones(1, 3), torch.ones(1, 1)))  # 2, 3, 5
    work[0][[2, 3, 5]] -= 2.0
    original = torch.zeros(numel)
    assert rollback.change_norm() == pytest.approx(float(torch.linalg.vector_norm(work[0] - original)))
    rollback.restore()
    assert torch.equal(work[0], original)


def test_cli_a_failed_folder_sync_after_the_rename_leaves_the_deletion_pending(tmp_path, monkeypatch, capsys):
    """Once the new checkpoint is renamed into place the deletion must not be rolled back: if
    making the rename durable fails, the entry stays pending, so the model on disk is accepted."""
    import os

    import pyunlearn.cli as cli

    path = _cli_setup(tmp_path)

    def failing_sync(folder):
        raise OSError(5, "EIO on directory fsync")

    monkeypatch.setattr(cli, "_sync_folder", failing_sync)
    args = ["forget", "--store", str(path), "--checkpoint", str(tmp_path / "final.pt"),
            "--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "final.pt")]
    assert main(args) == 1 and "EIO" in capsys.readouterr().err
    store = pu.UpdateStore.open(path)
    assert store.ledger.pending is not None
    model = TinyNet()
    model.load_state_dict(torch.load(tmp_path / "final.pt", weights_only=True))  # the new model, on disk
    pu.amnesiac_forget(model, store, [1001])  # accepted: settles the pending entry
    assert os.path.exists(tmp_path / "final.pt")


def test_forgetting_from_a_model_before_later_steps_skips_the_steps_it_never_took(tmp_path):
    """A model marked final at step N, then more steps recorded and flushed without a new final
    (a crash before close): forgetting from the step-N model must not subtract steps it never
    took."""
    model, path = _recorded(tmp_path)
    store = pu.UpdateStore.open(path)
    final_n = TinyNet()
    final_n.load_state_dict(model.state_dict())
    params = [p.detach() for p in store.check_model(model)]
    row = pu.kernels.prune_topk([p.clone() for p in params], [p + 1 for p in params], store.k, refresh=False)
    store.append(row, [99999])
    store.flush()
    assert store.final_fingerprint is None and store.final_steps is None
    before = [p.detach().clone() for p in final_n.parameters()]
    report = pu.amnesiac_forget(final_n, store, [99999])
    assert report.steps_removed == 1 and report.steps_applied == 0  # step N is removed, but not from this model
    assert all(torch.equal(a, b) for a, b in zip(before, final_n.parameters()))


def test_truncate_refuses_a_store_with_a_pending_deletion(tmp_path):
    model, path = _recorded(tmp_path)
    pu.amnesiac_forget(model, pu.UpdateStore.open(path), [1000], commit=False)
    with pytest.raises(pu.StoreError, match="deletions recorded for models or steps past step 3"):
        pu.UpdateStore.open(path).truncate(3)


def test_the_shard_reader_leaves_big_endian_arrays_to_zarr(tmp_path):
    import zarr
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    from pyunlearn.store.location import zarr_store
    from pyunlearn.store.shards import read_rows

    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    arr = group.create_array("a", shape=(8, 3), dtype="float32", chunks=(2, 3), shards=(4, 3),
                             serializer=BytesCodec(endian="big"), compressors=[BloscCodec(), Crc32cCodec()])
    arr[:] = np.arange(24, dtype="float32").reshape(8, 3)
    zstore, _ = zarr_store(str(tmp_path / "g.zarr"), None, read_only=True)
    assert read_rows(zstore, arr, np.array([1, 5]), "g") is None  # not the store's layout: zarr reads it


# ------------------------------------------------------------------ the shard writer
def _twin_arrays(tmp_path, dtype, shape, chunks, shards):
    """The same array in two local folders: one written by zarr, one by write_rows."""
    import zarr
    from zarr.storage import LocalStore

    from pyunlearn.store.metadata import codecs

    made = []
    for name in ("by-zarr", "by-pyunlearn"):
        zstore = LocalStore(str(tmp_path / name))
        arr = zarr.open_group(zstore, mode="w").create_array(
            "a", shape=shape, dtype=dtype, fill_value=0, chunks=chunks, shards=shards,
            compressors=codecs(np.dtype(dtype).itemsize, "zstd:1"), config={"write_empty_chunks": True})
        made.append((zstore, arr))
    return made


def _shard_files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted((folder / "a" / "c").rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("dtype, tail", [("float16", (37,)), ("uint32", (37,)), ("int64", ())])
def test_appends_written_straight_to_shards_are_the_bytes_zarr_writes(tmp_path, dtype, tail):
    from pyunlearn.store.shards import write_rows

    (zstore_z, by_zarr), (zstore_p, ours) = _twin_arrays(tmp_path, dtype, (40, *tail), (3, *tail), (12, *tail))
    rng = np.random.default_rng(0)
    # Appends as the store makes them: from a shard's start (the rows), and from anywhere (the
    # IDs and offsets): inside an inner chunk, on its boundary, across shards, one row, many.
    start = 0
    for count in (5, 1, 6, 2, 13, 4, 9):
        rows = (rng.standard_normal((count, *tail)) * 1000).astype(dtype)
        by_zarr[start : start + count] = rows
        assert write_rows(zstore_p, ours, start, rows, "test")
        start += count
        assert _shard_files(tmp_path / "by-pyunlearn") == _shard_files(tmp_path / "by-zarr"), (start, count)
    assert np.array_equal(ours[:start], by_zarr[:start])
    assert not list((tmp_path / "by-pyunlearn").rglob("*.partial"))  # no temporary file left behind


def test_chunk_writes_of_an_unsharded_array_are_the_bytes_zarr_writes(tmp_path):
    from pyunlearn.store.shards import write_rows

    (_, by_zarr), (zstore, ours) = _twin_arrays(tmp_path, "float64", (24, 4), (8, 4), None)
    rng = np.random.default_rng(1)
    for start, count in ((0, 3), (0, 8), (8, 5), (8, 8), (16, 1)):  # a chunk flushed part-filled, then whole
        rows = rng.standard_normal((count, 4))
        by_zarr[start : start + count] = rows
        assert write_rows(zstore, ours, start, rows, "test")
        assert _shard_files(tmp_path / "by-pyunlearn") == _shard_files(tmp_path / "by-zarr"), (start, count)
    assert not write_rows(zstore, ours, 3, rows, "test")  # not from a chunk's start: zarr merges it


def test_the_shard_writer_leaves_other_stores_and_layouts_to_zarr(tmp_path):
    import zarr
    from zarr.storage import MemoryStore

    from pyunlearn.store.shards import write_rows

    (_, _), (zstore, arr) = _twin_arrays(tmp_path, "float32", (8, 3), (2, 3), (4, 3))
    rows = np.ones((2, 3), dtype="float32")
    memory = MemoryStore()
    in_memory = zarr.open_group(memory, mode="w").create_array("a", shape=(8, 3), dtype="float32", chunks=(2, 3),
                                                                shards=(4, 3))
    assert not write_rows(memory, in_memory, 0, rows, "m")  # not a local folder
    assert not write_rows(zstore, arr, 7, rows, "t")  # past the array's end: zarr says what is wrong
    other_codecs = zarr.open_group(zstore, mode="a").create_array("b", shape=(8, 3), dtype="float32", chunks=(2, 3))
    assert not write_rows(zstore, other_codecs, 0, rows, "t")  # zarr's default codecs (zstd, no checksum)


def test_an_append_to_a_shard_that_vanished_is_corruption(tmp_path):
    from pyunlearn.store.shards import write_rows

    (_, _), (zstore, arr) = _twin_arrays(tmp_path, "int64", (24,), (4,), (12,))
    assert write_rows(zstore, arr, 0, np.arange(5), "s.zarr")
    (tmp_path / "by-pyunlearn" / "a" / "c" / "0").unlink()
    with pytest.raises(pu.CorruptStoreError, match="shard a/c/0 .* is missing"):
        write_rows(zstore, arr, 5, np.arange(3), "s.zarr")


def test_attributes_saved_straight_to_a_local_folder_are_the_document_zarr_writes(tmp_path):
    import json

    import zarr
    from zarr.storage import LocalStore

    from pyunlearn.store.arrays import save_attributes

    groups = {}
    for name in ("by-zarr", "by-pyunlearn"):
        zstore = LocalStore(str(tmp_path / name))
        groups[name] = (zstore, zarr.open_group(zstore, mode="w", zarr_format=3, attributes={"a": 1, "keep": "x"}))
    for attrs in ({"a": 2, "b": [1.5, None, "ü"]}, {"ledger": {"records": list(range(50))}, "a": 3}):
        groups["by-zarr"] = (groups["by-zarr"][0], groups["by-zarr"][1].update_attributes(attrs))
        zstore, group = groups["by-pyunlearn"]
        assert save_attributes(zstore, group, attrs).attrs.asdict() == groups["by-zarr"][1].attrs.asdict()
        documents = [json.loads((tmp_path / name / "zarr.json").read_bytes()) for name in ("by-pyunlearn", "by-zarr")]
        assert documents[0] == documents[1]
    reread = zarr.open_group(tmp_path / "by-pyunlearn", mode="r").attrs.asdict()
    assert reread == {"a": 3, "keep": "x", "b": [1.5, None, "ü"], "ledger": {"records": list(range(50))}}


def test_a_reader_sees_one_version_of_a_shard_a_writer_replaces_meanwhile(tmp_path, monkeypatch):
    """The reader opens a shard once: its index and its inner chunks come from the same file even
    when the writer appends to the shard between the two (rewriting the inner chunk the reader
    wants), where reading the chunk from the new file at the old offset fails its checksum."""
    import os

    from pyunlearn.store import shards as _shards

    (_, _), (zstore, arr) = _twin_arrays(tmp_path, "int64", (512,), (64,), (256,))
    first = np.arange(100, 170)
    assert _shards.write_rows(zstore, arr, 0, first, "s")  # rows 64-69 sit in a part-filled inner chunk
    later = np.random.default_rng(0).integers(0, 2**62, 58)  # fills it: its compressed length changes
    real_pread, calls = os.pread, []

    def pread_then_append(fd, n, offset):
        data = real_pread(fd, n, offset)
        calls.append(n)
        if len(calls) == 1:  # the index is read: now the writer appends to the same inner chunk
            assert _shards.write_rows(zstore, arr, 70, later, "s")
        return data

    monkeypatch.setattr(_shards.os, "pread", pread_then_append)
    assert _shards.read_rows(zstore, arr, np.array([64, 69]), "s").tolist() == [164, 169]
    assert len(calls) == 2
    monkeypatch.setattr(_shards.os, "pread", real_pread)
    assert _shards.read_rows(zstore, arr, np.array([69, 70]), "s").tolist() == [169, later[0]]


def test_a_reader_through_zarr_rereads_a_shard_a_writer_replaced_between_its_requests(tmp_path, monkeypatch):
    """Through a zarr store (S3, memory) the index and the chunks are two requests; a writer that
    replaces the shard between them makes the chunks fail their checksums, and the reader reads
    once more instead of calling the store damaged. Real damage still fails."""
    import zarr
    from zarr.storage import MemoryStore

    from pyunlearn.store import shards as _shards
    from pyunlearn.store.metadata import codecs

    zstore = MemoryStore()
    arr = zarr.open_group(zstore, mode="w").create_array(
        "a", shape=(512,), dtype="int64", fill_value=0, chunks=(64,), shards=(256,),
        compressors=codecs(8, "zstd:1"), config={"write_empty_chunks": True})
    arr[0:70] = np.arange(100, 170)
    later = np.random.default_rng(0).integers(0, 2**62, 58)
    real_fetch, calls = _shards._fetch, []

    def fetch_then_append(store, requests):
        out = real_fetch(store, requests)
        calls.append(len(requests))
        if len(calls) == 1:  # after the index: the writer fills the inner chunk the reader wants
            arr[0:128] = np.concatenate([np.arange(100, 170), later])
        return out

    monkeypatch.setattr(_shards, "_fetch", fetch_then_append)
    assert _shards.read_rows(zstore, arr, np.array([64, 69]), "s").tolist() == [164, 169]
    assert len(calls) == 4  # index, chunks (stale), index, chunks

    key = "a/c/0"
    data = bytearray(zarr.core.sync.sync(zstore.get(key, zarr.core.buffer.default_buffer_prototype())).to_bytes())
    data[10] ^= 0x01  # one bit inside inner chunk 0
    zarr.core.sync.sync(zstore.set(key, zarr.core.buffer.default_buffer_prototype().buffer.from_bytes(bytes(data))))
    with pytest.raises(pu.CorruptStoreError, match="inner chunk 0 of array 'a' fails its crc32c"):
        _shards.read_rows(zstore, arr, np.array([1]), "s")
