"""Helpers of the tests that record a store and then look at it, damage it or forget from it:
a store on a chosen back-end, the recorded runs several test files start from, a row to append
by hand, and what a store holds read back through its public API."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

import pyunlearn as pu
from tests.support import recorded_store


def where(target):
    """(path, storage_options) from a back_end pair (tests/store/conftest.py) or a plain local path."""
    return target if isinstance(target, tuple) else (str(target), None)


def open_store(target, **kwargs):
    path, options = where(target)
    return pu.UpdateStore.open(path, storage_options=options, **kwargs)


def create_store(target, model, **kwargs):
    path, options = where(target)
    return pu.UpdateStore.create(path, model, storage_options=options, **kwargs)


def record_on(target, **options):
    """(model, open store) of recorded_store (keep 0.25, 16 steps by default) on `target`."""
    path, storage_options = where(target)
    run = recorded_store(path, storage_options=storage_options, **options)
    return run.model, run.store


def recorded_path(tmp_path, **options):
    """(model, path) of a closed store at tmp_path/s.zarr: keep 0.3, no momentum, chunks of 4 steps
    (16 steps: 4 chunks)."""
    run = recorded_store(tmp_path / "s.zarr", keep=0.3, momentum=0.0, steps_per_chunk=4, close=True, **options)
    return run.model, tmp_path / "s.zarr"


def small_recorded_run(path):
    """(model, optimizer) of a closed 4-step store at `path` (keep 0.3, no momentum, 64 samples)."""
    run = recorded_store(path, keep=0.3, momentum=0.0, n=64, epochs=1, close=True)
    return run.model, run.optimizer


def sharded_store(tmp_path):
    """(model, store open for writing) of a store in the default (sharded) layout at tmp_path/s.zarr."""
    run = recorded_store(tmp_path / "s.zarr", keep=0.3, momentum=0.0, close=True)
    store = pu.UpdateStore.open(tmp_path / "s.zarr")
    assert zarr.open_array(tmp_path / "s.zarr" / "values", mode="r").shards is not None  # the default layout is sharded
    return run.model, store


def plus_one_row(store, model):
    """The row of a step that adds 1 to every trainable parameter of `model` (not applied)."""
    params = [p.detach() for p in store.check_model(model)]
    return pu.kernels.prune_topk([p.clone() for p in params], [p + 1 for p in params], store.k, refresh=False)


def params_copy(model):
    return [p.detach().clone() for p in model.parameters()]


def same_tensors(xs, ys):
    return all(torch.equal(x, y) for x, y in zip(xs, ys))


def stored_ids(store):
    """(sample_ids, offsets): the store's committed sample IDs and step boundaries as its arrays
    hold them (docs/format.md), read through store.step_ids."""
    per_step = store.step_ids(np.arange(store.steps))
    ids = np.concatenate(per_step) if per_step else np.empty(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in per_step], dtype=np.int64)])
    return ids, offsets


def write_sealed_value(path, step: int, column: int, value: float) -> None:
    """Writes `value` into the stored row of `step` at `column` and re-seals the step's row
    digest: a row as a recorder would have written it (a diverged run's NaN, say), which the
    place-bound digest accepts, so only the checks on the values themselves can refuse it."""
    import json

    from pyunlearn.store.digests import row_digest, store_id_bytes

    attrs = json.loads((Path(path) / "zarr.json").read_text())["attributes"]
    values = zarr.open_array(Path(path) / "values", mode="r+")
    values[step, column] = value
    fields = [zarr.open_array(Path(path) / name, mode="r")[step] for name in ("index", "values", "scales")]
    hyper = zarr.open_array(Path(path) / "step_hyper", mode="r")[step] if (Path(path) / "step_hyper").exists() else None
    digests = zarr.open_array(Path(path) / "step_digests", mode="r+")
    row = digests[step]
    row[:16] = np.frombuffer(row_digest(store_id_bytes(attrs["store_id"]), step, *fields, hyper), np.uint8)
    digests[step] = row
