"""UpdateStore: the pruned update of every optimizer step, in a Zarr v3 group, by sample ID.

Layout (all codecs from the Zarr v3 spec, so any v3 reader opens it):

    zarr.json             group attributes: format + version, layer table, keep, value encoding,
                          committed step / sample counts, model fingerprints, deletion ledger
    values   (steps, K)   float16 (Δ / scale) or float32 (Δ)      blosc-zstd + shuffle, crc32c
    index    (steps, K)   uint32 gaps, per layer                  blosc-zstd + shuffle, crc32c
    scales   (steps, L)   float32, per step and layer             blosc-zstd + shuffle, crc32c
    sample_ids (M,)       int64, the batches of all steps (each sorted), concatenated
    offsets  (steps + 1,) int64, step s used sample_ids[offsets[s]:offsets[s + 1]]
    writer.lock           present while a writer holds the store

Rows are buffered and written a whole chunk at a time; the committed counts in the group
attributes are written after the data, so readers (and a store reopened after a crash) see a
consistent prefix. Chunk files are replaced atomically on local disks.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from . import __version__, ops
from ._ids import as_ids
from ._lock import WriterLock
from ._model import fingerprint, trainable_parameters
from .errors import CorruptStoreError, ModelMismatchError, StoreError, StoreFormatError
from .row import Row

FORMAT_NAME = "pyunlearn.update-store"
FORMAT_VERSION = 2  # 2: attribution field, step_hyper for gradient stores
READABLE_VERSIONS = (1, 2)  # version 1 (pyunlearn 0.1.0): update attribution only
CHUNK_BYTES = 4 << 20  # ~4 MB per chunk: zarr's per-chunk cost (~0.3 ms) stays small beside the data
MAX_STEPS_PER_CHUNK = 16384  # a tiny model would otherwise buffer ~1M steps before writing
IDS_PER_CHUNK = CHUNK_BYTES // 8
_VALUE_DTYPES = {"float16": np.float16, "float32": np.float32}
ATTRIBUTIONS = ("update", "gradient")
# Gradient attribution, per step: the learning rate; the carry, how much of the previous step's
# momentum (SGD) or first moment (Adam) survives into this step (μ or β1, 0 when the optimizer's
# state was fresh, e.g. a resumed run without its optimizer state); Adam's step count; Adam's β1.
HYPER_COLUMNS = ("lr", "carry", "adam_step", "beta1")


@dataclass(frozen=True)
class Layer:
    name: str
    shape: tuple[int, ...]
    numel: int
    k: int
    offset: int  # where the layer's entries start in a row

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "numel": self.numel, "k": self.k, "offset": self.offset}

    @classmethod
    def from_json(cls, d: dict) -> "Layer":
        return cls(d["name"], tuple(d["shape"]), int(d["numel"]), int(d["k"]), int(d["offset"]))


class StepLookup(NamedTuple):
    steps: np.ndarray  # int64, sorted, unique: the steps whose batches held any of the IDs
    missing: np.ndarray  # int64, sorted, unique: IDs no committed step used


class Ledger(NamedTuple):
    removed_steps: np.ndarray  # int64, sorted: steps already subtracted from the model
    fingerprint: str | None  # of the model those subtractions produced


@dataclass
class StoreStats:
    steps: int
    samples: int
    bytes_on_disk: dict[str, int]
    total_bytes: int
    dense_bytes: int  # what dense amnesiac unlearning stores: numel · 4 bytes per step
    ratio: float  # dense_bytes / total_bytes
    index_bits_per_entry: float
    index_floor_bits_per_entry: float  # entropy of the positions: Σ H(k/n)·n / Σ k per step
    value_bits_per_entry: float

    def table(self) -> str:
        lines = [f"steps {self.steps}, sample IDs {self.samples}"]
        lines += [f"  {name:<11} {size:>14,} bytes" for name, size in self.bytes_on_disk.items()]
        lines += [
            f"  {'total':<11} {self.total_bytes:>14,} bytes",
            f"  dense float32 equivalent {self.dense_bytes:,} bytes: {self.ratio:.1f}x smaller",
            f"  index {self.index_bits_per_entry:.2f} bits per kept entry (entropy floor "
            + (f"{self.index_floor_bits_per_entry:.2f}, {self.index_bits_per_entry / self.index_floor_bits_per_entry:.3f}x)"
               if self.index_floor_bits_per_entry > 0 else "0: keep=1 stores every position)"),
            f"  values {self.value_bits_per_entry:.2f} bits per kept entry",
        ]
        return "\n".join(lines)


def _codecs(typesize: int):
    return [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=typesize), Crc32cCodec()]


def _zarr_store(path, storage_options, read_only: bool):
    """A zarr Store for a folder path, an fsspec URL (s3://…, memory://…), or a Store itself."""
    from zarr.abc.store import Store

    if isinstance(path, Store):
        return path, repr(path)
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(text, str):
        raise TypeError(f"path must be a folder path or an fsspec URL, got {type(path).__name__}")
    if "://" in text and not text.startswith("file://"):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(text, storage_options=storage_options, read_only=read_only), text
    from zarr.storage import LocalStore

    local = text[len("file://"):] if text.startswith("file://") else text
    return LocalStore(local, read_only=read_only), text


def _entropy_bits(k: int, n: int) -> float:
    if k <= 0 or k >= n:
        return 0.0
    p = k / n
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) * n


class UpdateStore:
    """Pruned per-step updates of one model, indexed by sample ID. Make one with
    `UpdateStore.create(path, model, keep=0.01)`; reopen it with `UpdateStore.open(path)`."""

    def __init__(self, zstore, group, where: str, *, read_only: bool):
        self._zstore = zstore
        self._group = group
        self._where = where
        self._read_only = read_only
        self._lock = WriterLock(zstore, where)
        names = ["values", "index", "scales", "sample_ids", "offsets"]
        if dict(group.attrs).get("attribution", "update") == "gradient":
            names.append("step_hyper")
        self._arrays = {name: group[name] for name in names}
        self._load_attrs()
        self._buffer = None  # rows of the chunk being filled (see _start_buffer)
        self._pending_ids: list[np.ndarray] = []
        self._sample_index = None

    # ----------------------------------------------------------------- making and opening
    @classmethod
    def create(cls, path, model, keep: float = 0.01, value_dtype: str = "float16", *,
               attribution: str = "update", steps_per_chunk: int | None = None, overwrite: bool = False,
               storage_options=None) -> "UpdateStore":
        """A new, empty store for `model`'s trainable parameters (requires_grad), named as in
        model.named_parameters(); k_i = ceil(keep · numel_i), at least 1. Opened for writing.

        attribution: "update" stores each step's parameter change Δθ (the paper's method);
        "gradient" stores each step's batch gradient (for Adam, preconditioned) with the step's
        learning rate and momentum, so that forgetting can subtract a batch's whole first-order
        contribution to the final weights, including what momentum carried into later steps."""
        if attribution not in ATTRIBUTIONS:
            raise ValueError(f"attribution must be 'update' or 'gradient', got {attribution!r}")
        params = trainable_parameters(model)
        if not params:
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
        if value_dtype not in _VALUE_DTYPES:
            raise ValueError(f"value_dtype must be 'float16' (scaled) or 'float32' (lossless), got {value_dtype!r}")
        k = ops.k_for([p.numel() for _, p in params], keep)
        layers, offset = [], 0
        for (name, p), ki in zip(params, k):
            layers.append(Layer(name, tuple(p.shape), p.numel(), ki, offset))
            offset += ki
        row_length = offset
        if steps_per_chunk is None:
            steps_per_chunk = max(1, min(MAX_STEPS_PER_CHUNK, CHUNK_BYTES // max(1, row_length * 4)))
        elif isinstance(steps_per_chunk, bool) or not isinstance(steps_per_chunk, int) or steps_per_chunk < 1:
            raise ValueError(f"steps_per_chunk must be a positive int, got {steps_per_chunk!r}")
        entries_per_chunk = max(1, min(row_length, CHUNK_BYTES // 4)) if steps_per_chunk == 1 else row_length

        zstore, where = _zarr_store(path, storage_options, read_only=False)
        attrs = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "written_by": f"pyunlearn {__version__}",
            "layers": [layer.to_json() for layer in layers],
            "keep": float(keep),
            "value_dtype": value_dtype,
            "attribution": attribution,
            "optimizer": None,  # gradient attribution: the optimizer family, set by the first recorder
            "row_length": row_length,
            "steps_per_chunk": steps_per_chunk,
            "committed_steps": 0,
            "committed_samples": 0,
            "fingerprint_initial": fingerprint([p for _, p in params]),
            "fingerprint_final": None,
            "final_steps": None,
            "ledger": {"removed_steps": [], "fingerprint": None},
        }
        if overwrite:  # never wipe a store another writer is using
            guard = WriterLock(zstore, where)
            guard.acquire()
            guard.release()
        try:
            group = zarr.open_group(zstore, mode="w" if overwrite else "w-", attributes=attrs, zarr_format=3)
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as exc:
            raise FileExistsError(f"{where} already holds a Zarr store; open it with UpdateStore.open, "
                                  "or pass overwrite=True to replace it") from exc
        value_np = _VALUE_DTYPES[value_dtype]
        row_chunks = (steps_per_chunk, entries_per_chunk)
        group.create_array("values", shape=(0, row_length), dtype=value_np, chunks=row_chunks,
                           compressors=_codecs(np.dtype(value_np).itemsize), fill_value=0)
        group.create_array("index", shape=(0, row_length), dtype=np.uint32, chunks=row_chunks,
                           compressors=_codecs(4), fill_value=0)
        group.create_array("scales", shape=(0, len(layers)), dtype=np.float32,
                           chunks=(steps_per_chunk, len(layers)), compressors=_codecs(4), fill_value=0)
        group.create_array("sample_ids", shape=(0,), dtype=np.int64, chunks=(IDS_PER_CHUNK,),
                           compressors=_codecs(8), fill_value=0)
        offsets = group.create_array("offsets", shape=(1,), dtype=np.int64, chunks=(IDS_PER_CHUNK,),
                                     compressors=_codecs(8), fill_value=0)
        offsets[0] = 0
        if attribution == "gradient":  # per step: see HYPER_COLUMNS
            group.create_array("step_hyper", shape=(0, len(HYPER_COLUMNS)), dtype=np.float64,
                               chunks=(steps_per_chunk, len(HYPER_COLUMNS)),
                               compressors=_codecs(8), fill_value=0)
        store = cls(zstore, group, where, read_only=False)
        store._lock.acquire()
        return store

    @classmethod
    def open(cls, path, *, mode: str = "a", storage_options=None) -> "UpdateStore":
        """Opens an existing store. mode 'a' (default) may write; the writer lock is taken at the
        first change (append, truncate, a deletion), so readers never block the recorder.
        mode 'r' only reads."""
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' (read) or 'a' (read and write), got {mode!r}")
        zstore, where = _zarr_store(path, storage_options, read_only=mode == "r")
        try:
            group = zarr.open_group(zstore, mode="r" if mode == "r" else "r+", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise FileNotFoundError(f"no update store at {where}: create one with UpdateStore.create") from exc
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT_NAME:
            raise StoreFormatError(f"{where} is a Zarr group but not a pyunlearn update store "
                                   f"(format {attrs.get('format')!r})")
        if attrs.get("format_version") not in READABLE_VERSIONS:
            raise StoreFormatError(f"{where} has update-store format version {attrs.get('format_version')!r}; "
                                   f"this pyunlearn ({__version__}) reads versions {', '.join(map(str, READABLE_VERSIONS))}")
        if attrs.get("attribution", "update") not in ATTRIBUTIONS:
            raise StoreFormatError(f"{where} uses attribution {attrs.get('attribution')!r}, unknown to this pyunlearn")
        return cls(zstore, group, where, read_only=mode == "r")

    @staticmethod
    def break_lock(path, *, storage_options=None) -> bool:
        """Removes a writer lock left by a writer that is gone. Returns whether there was one."""
        zstore, _ = _zarr_store(path, storage_options, read_only=False)
        return WriterLock.break_lock(zstore)

    def _load_attrs(self) -> None:
        a = dict(self._group.attrs)
        self._attrs = a
        self.layers = [Layer.from_json(d) for d in a["layers"]]
        self.k = [layer.k for layer in self.layers]
        self.keep = float(a["keep"])
        self.value_dtype = a["value_dtype"]
        self.attribution = a.get("attribution", "update")  # stores of 0.1.0 predate the field
        self.row_length = int(a["row_length"])
        self.steps_per_chunk = int(a["steps_per_chunk"])
        self._committed_steps = int(a["committed_steps"])
        self._committed_samples = int(a["committed_samples"])

    def refresh(self) -> None:
        """Re-reads the committed counts: a reader sees what a writer committed since."""
        self._group = zarr.open_group(self._zstore, mode="r" if self._read_only else "r+", zarr_format=3)
        self._arrays = {name: self._group[name] for name in self._arrays}
        self._load_attrs()
        self._sample_index = None

    # ----------------------------------------------------------------- facts
    @property
    def path(self) -> str:
        return self._where

    @property
    def steps(self) -> int:
        """Committed steps (what readers see); appended rows count once flushed."""
        return self._committed_steps

    @property
    def samples(self) -> int:
        return self._committed_samples

    @property
    def initial_fingerprint(self) -> str:
        return self._attrs["fingerprint_initial"]

    @property
    def final_fingerprint(self) -> str | None:
        """Of the model when recording last closed (None while recording or after truncate)."""
        return self._attrs["fingerprint_final"]

    @property
    def ledger(self) -> Ledger:
        led = self._attrs["ledger"]
        return Ledger(np.asarray(led["removed_steps"], dtype=np.int64), led["fingerprint"])

    def check_model(self, model) -> list[torch.nn.Parameter]:
        """The model's trainable parameters in the store's layer order, or ModelMismatchError."""
        params = trainable_parameters(model)
        names = [n for n, _ in params]
        expected = [layer.name for layer in self.layers]
        if names != expected:
            missing = [n for n in expected if n not in names]
            extra = [n for n in names if n not in expected]
            raise ModelMismatchError(
                f"the model's trainable parameters do not match the store's layer table ({self._where}): "
                f"missing {missing[:5]}, unexpected {extra[:5]}"
                + ("" if missing or extra else "; same names in another order")
            )
        for (name, p), layer in zip(params, self.layers):
            if tuple(p.shape) != layer.shape:
                raise ModelMismatchError(f"parameter {name} has shape {tuple(p.shape)}, the store recorded {layer.shape}")
        return [p for _, p in params]

    # ----------------------------------------------------------------- writing
    def _require_writer(self) -> None:
        if self._read_only:
            raise StoreError(f"{self._where} was opened read-only (mode='r'); open it with mode='a' to change it")
        if not self._lock.held:
            self._lock.acquire()
            # Another writer may have committed since this handle read the attributes: start
            # from what is on disk, never from a stale copy.
            self.refresh()
            self._buffer = None
            self._pending_ids = []

    def _start_buffer(self) -> None:
        """The chunk that holds the next step, with its already committed rows read back, so the
        whole chunk is rewritten (atomically) when it is written next."""
        C, K, L = self.steps_per_chunk, self.row_length, len(self.layers)
        start = (self._committed_steps // C) * C
        buf = {
            "start": start,
            "rows": self._committed_steps - start,
            "values": np.zeros((C, K), dtype=_VALUE_DTYPES[self.value_dtype]),
            "index": np.zeros((C, K), dtype=np.uint32),
            "scales": np.zeros((C, L), dtype=np.float32),
        }
        if self.attribution == "gradient":
            buf["step_hyper"] = np.zeros((C, len(HYPER_COLUMNS)), dtype=np.float64)
        if buf["rows"]:
            for name in self._row_arrays():
                buf[name][: buf["rows"]] = self._read_array(name, slice(start, self._committed_steps))
        self._buffer = buf

    def _row_arrays(self) -> tuple[str, ...]:
        return ("values", "index", "scales", "step_hyper") if self.attribution == "gradient" else ("values", "index", "scales")

    def append(self, row: Row, ids, hyper: tuple[float, ...] | None = None) -> None:
        """Adds one step: its pruned row (as prune_topk returns it) and the sample IDs of its
        batch (may be empty); for gradient attribution also `hyper`, the step's values of
        HYPER_COLUMNS. Durable after flush() or once its chunk fills."""
        self._require_writer()
        self._refuse_if_ledger("record more steps into")
        index, values, scales = self._check_row(row)
        if (hyper is None) != (self.attribution == "update") or (hyper is not None and len(hyper) != len(HYPER_COLUMNS)):
            raise ValueError(f"hyper {HYPER_COLUMNS} is required with gradient attribution, and only then")
        # Sorted within the step: lookups do not care about order, and sorted IDs compress better.
        ids = np.sort(as_ids(ids, allow_empty=True))
        if self._buffer is None:
            self._start_buffer()
        buf = self._buffer
        r = buf["rows"]
        buf["index"][r], buf["values"][r], buf["scales"][r] = index, values, scales
        if hyper is not None:
            buf["step_hyper"][r] = hyper
        buf["rows"] = r + 1
        self._pending_ids.append(ids)
        if buf["rows"] == self.steps_per_chunk:
            try:
                self._write_buffer()
            except BaseException:
                buf["rows"] = r  # the step was not stored: a retry must not store it twice
                self._pending_ids.pop()
                raise
            self._buffer = None

    def _check_row(self, row):
        if not isinstance(row, tuple) or len(row) != 3:
            raise TypeError("row must be a Row (index, values, scales) as prune_topk returns")
        index, values, scales = (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in row)
        if index.shape != (self.row_length,) or index.dtype != np.uint32:
            raise ValueError(f"row.index must be uint32 of shape ({self.row_length},), got {index.dtype} {index.shape}")
        if values.shape != (self.row_length,) or values.dtype != _VALUE_DTYPES[self.value_dtype]:
            raise ValueError(f"row.values must be {self.value_dtype} of shape ({self.row_length},), "
                             f"got {values.dtype} {values.shape}")
        if scales.shape != (len(self.layers),) or scales.dtype != np.float32:
            raise ValueError(f"row.scales must be float32 of shape ({len(self.layers)},), got {scales.dtype} {scales.shape}")
        return index, values, scales

    def _write_buffer(self) -> None:
        buf = self._buffer
        start, end = buf["start"], buf["start"] + buf["rows"]
        if end <= self._committed_steps:
            return
        ids = np.concatenate(self._pending_ids) if self._pending_ids else np.empty(0, np.int64)
        counts = np.array([len(x) for x in self._pending_ids], dtype=np.int64)
        first_sample, last_sample = self._committed_samples, self._committed_samples + len(ids)
        # Data first, committed counts last: a crash in between leaves the old prefix.
        for name in self._row_arrays():
            arr = self._arrays[name]
            if arr.shape[0] < start + self.steps_per_chunk:
                arr.resize((start + self.steps_per_chunk, arr.shape[1]))
            arr[start:end] = buf[name][: buf["rows"]]
        self._grow(self._arrays["sample_ids"], last_sample)
        if len(ids):
            self._arrays["sample_ids"][first_sample:last_sample] = ids
        self._grow(self._arrays["offsets"], end + 1)
        self._arrays["offsets"][self._committed_steps + 1 : end + 1] = first_sample + np.cumsum(counts)
        self._commit(committed_steps=end, committed_samples=last_sample)
        self._pending_ids = []

    @staticmethod
    def _grow(arr, length: int) -> None:
        if arr.shape[0] < length:
            chunk = arr.chunks[0]
            arr.resize((-(-length // chunk) * chunk,))

    def _commit(self, **changes) -> None:
        # One metadata write for all changes. (zarr's attrs.update() writes once per key: a crash
        # between two of those writes left committed_steps and committed_samples disagreeing.)
        self._group = self._group.update_attributes(changes)
        self._attrs.update(changes)
        self._committed_steps = int(self._attrs["committed_steps"])
        self._committed_samples = int(self._attrs["committed_samples"])
        self._sample_index = None

    def flush(self) -> None:
        """Makes every appended step durable and visible to readers."""
        if self._buffer is not None and self._buffer["start"] + self._buffer["rows"] > self._committed_steps:
            self._require_writer()
            self._write_buffer()

    def truncate(self, step: int) -> None:
        """Drops steps >= step (to resume training from a checkpoint taken at `step`)."""
        self._require_writer()
        self.flush()
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= self._committed_steps:
            raise ValueError(f"step must be an int in [0, {self._committed_steps}], got {step!r}")
        if len(self.ledger.removed_steps):
            raise StoreError(f"{self._where} has a deletion ledger ({len(self.ledger.removed_steps)} steps removed); "
                             "truncating would detach it from the model it describes")
        samples = int(self._read_array("offsets", slice(int(step), int(step) + 1))[0])
        self._commit(committed_steps=int(step), committed_samples=samples, fingerprint_final=None, final_steps=None)
        self._buffer = None
        self._pending_ids = []

    def _refuse_if_ledger(self, action: str) -> None:
        if len(self.ledger.removed_steps):
            raise StoreError(f"{self._where} has a deletion ledger ({len(self.ledger.removed_steps)} steps removed): "
                             f"cannot {action} it, since further training would start from a model the ledger "
                             "does not describe. Record further training into a new store")

    def mark_final(self, model) -> None:
        """Records `model` as the trained model these steps produced (the recorder does this on
        close; call it yourself after recovering an interrupted run)."""
        self._require_writer()
        self._refuse_if_ledger("mark a new final model of")
        self.flush()
        self._commit(fingerprint_final=fingerprint(self.check_model(model)), final_steps=self._committed_steps)

    def _set_optimizer(self, family: str) -> None:
        """Gradient attribution: the optimizer family whose arithmetic the coefficients follow."""
        current = self._attrs.get("optimizer")
        if current is not None and current != family:
            raise StoreError(f"{self._where} was recorded with a {current} optimizer; cannot continue with {family}")
        if current is None:
            self._require_writer()
            self._commit(optimizer=family)

    def coefficients(self, steps) -> np.ndarray:
        """Gradient attribution: for each of `steps`, the factor c_t by which its stored (pruned)
        gradient moved the final weights (θ_final = … − c_t·g_t), from the stored per-step
        hyper-parameters of every step up to the final model.

        SGD with momentum μ: c_t = Σ_{s≥t} lr_s · μ_{t+1}···μ_s (exact for the gradient's linear
        effect, schedules included). Adam: the stored vector is g_t / (√v̂_t + ε), and
        c_t = (1 − β1) Σ_{s≥t} β1^(s−t) · lr_s / (1 − β1^(n_s)) with n_s Adam's step count —
        first-order, holding each later step's second-moment estimate at step t's value."""
        if self.attribution != "gradient":
            raise StoreError(f"{self._where} stores updates (attribution='update'); coefficients need 'gradient'")
        final = self._attrs.get("final_steps")
        if final is None:
            raise StoreError(f"{self._where} has no final model: close the recorder (or call mark_final) first")
        final = int(final)
        lr, carry, adam_step, beta1 = self._read_array("step_hyper", slice(0, final)).T
        adam = self._attrs.get("optimizer") == "adam"
        weight = lr / (1.0 - beta1 ** np.maximum(adam_step, 1)) if adam else lr
        total = np.zeros(final + 1)  # total[t] = Σ_{s≥t} weight_s · carry_{t+1}···carry_s
        for t in range(final - 1, -1, -1):
            total[t] = weight[t] + (carry[t + 1] if t + 1 < final else 0.0) * total[t + 1]
        c = total[:final] * (1.0 - beta1) if adam else total[:final]
        return c[np.asarray(steps, dtype=np.int64)]

    def _record_deletion(self, removed_steps: np.ndarray, model_fingerprint: str) -> None:
        self._require_writer()
        self._commit(ledger={"removed_steps": [int(s) for s in np.unique(removed_steps)],
                             "fingerprint": model_fingerprint})

    def release(self) -> None:
        """Flushes and gives up the writer lock but keeps the store open (the next change takes
        the lock again, re-reading what other writers committed meanwhile)."""
        self.flush()
        self._lock.release()

    def close(self) -> None:
        """Flushes (if written) and releases the writer lock."""
        try:
            if not self._read_only:
                self.flush()
        finally:
            self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------- reading
    def _read_array(self, name: str, selection, *, rows: np.ndarray | None = None):
        """arr[selection], or the given rows (orthogonal selection: only their chunks are read)."""
        arr = self._arrays[name]
        try:
            return arr.oindex[rows, :] if rows is not None else arr[selection]
        except Exception as exc:  # zarr/numcodecs raise many types for a damaged chunk
            where = f"rows of {name}" if rows is not None else f"{name}[{selection}]"
            raise CorruptStoreError(f"{self._where}: reading {where} failed: {exc}. A chunk is damaged "
                                    "or missing (its checksum does not match); restore the store from a copy") from exc

    def _index(self):
        """(sorted sample IDs, the step of each), built once per committed count."""
        if self._sample_index is None:
            n, m = self._committed_steps, self._committed_samples
            ids = self._read_array("sample_ids", slice(0, m)) if m else np.empty(0, np.int64)
            offsets = self._read_array("offsets", slice(0, n + 1))
            step_of = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
            order = np.argsort(ids, kind="stable")
            self._sample_index = (ids[order], step_of[order])
        return self._sample_index

    def steps_for(self, ids) -> StepLookup:
        """The committed steps whose batches held any of `ids`, and the IDs never seen."""
        ids = as_ids(ids)
        sorted_ids, step_of = self._index()
        left = np.searchsorted(sorted_ids, ids, side="left")
        right = np.searchsorted(sorted_ids, ids, side="right")
        counts = right - left
        # Every position in the [left, right) ranges, without a Python loop.
        positions = np.repeat(left - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        return StepLookup(np.unique(step_of[positions]), np.unique(ids[counts == 0]))

    def read(self, steps) -> Row:
        """The stored rows of `steps` (in the order given), reading only the chunks they lie in."""
        steps = as_ids(steps, "steps", allow_empty=True)
        if steps.size and (steps.min() < 0 or steps.max() >= self._committed_steps):
            raise ValueError(f"steps must lie in [0, {self._committed_steps}) (the committed steps)")
        unique, inverse = np.unique(steps, return_inverse=True)
        fields = []
        for name in ("index", "values", "scales"):
            arr = self._arrays[name]
            if unique.size:
                data = self._read_array(name, None, rows=unique)[inverse]
            else:
                data = np.empty((0, arr.shape[1]), dtype=arr.dtype)
            fields.append(torch.from_numpy(np.ascontiguousarray(data)))
        return Row(*fields)

    def stats(self) -> StoreStats:
        sizes = {name: int(arr.nbytes_stored()) for name, arr in self._arrays.items()}
        total = sum(sizes.values())
        numel = sum(layer.numel for layer in self.layers)
        steps = self._committed_steps
        entries = max(1, steps * self.row_length)
        floor = sum(_entropy_bits(layer.k, layer.numel) for layer in self.layers) / max(1, self.row_length)
        dense = numel * 4 * steps
        return StoreStats(
            steps=steps, samples=self._committed_samples, bytes_on_disk=sizes, total_bytes=total,
            dense_bytes=dense, ratio=dense / total if total else float("nan"),
            index_bits_per_entry=sizes["index"] * 8 / entries, index_floor_bits_per_entry=floor,
            value_bits_per_entry=sizes["values"] * 8 / entries,
        )

    def __repr__(self) -> str:
        return (f"UpdateStore({self._where!r}, steps={self.steps}, layers={len(self.layers)}, "
                f"keep={self.keep}, value_dtype={self.value_dtype!r})")
