"""The update store's on-disk format: its metadata as one checked value, and its arrays.

docs/format.md is the contract other Zarr readers rely on; this module is its only writer.
The group attributes are read into a frozen StoreMetadata (every field checked, older format
versions upgraded in `from_attrs`, the one place that knows them) and written back whole
with `to_attrs`, so that no field is ever read from a raw dict elsewhere.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from .._validate import positive_int
from .._version import __version__
from ..attribution import HYPER_WIDTH
from ..errors import CorruptStoreError, StoreError, StoreFormatError
from ..kernels import fingerprint, k_for
from ..ledger import Ledger

FORMAT_NAME = "pyunlearn.update-store"
FORMAT_VERSION = 4  # 4: the ledger's timeline and audit records, keyed sample IDs; 3: checksummed attributes
READABLE_VERSIONS = (1, 2, 3, 4)  # 2 (0.2.0): attribution, optimizer, step_hyper; 1 (0.1.0): update attribution only
CHUNK_BYTES = 4 << 20  # ~4 MB per written chunk (a shard): zarr's per-object cost stays small beside the data
MAX_STEPS_PER_CHUNK = 16384  # a tiny model would otherwise buffer ~1M steps before writing
IDS_PER_CHUNK = CHUNK_BYTES // 8
# Inside a shard, rows are compressed in inner chunks of ~64 KB: a forget decodes only the inner
# chunks of the steps it touches, not the whole 4 MB.
INNER_BYTES = 64 << 10
IDS_PER_INNER_CHUNK = INNER_BYTES // 8
COMPRESSORS = ("zstd", "lz4", "lz4hc", "blosclz", "zlib")
DEFAULT_COMPRESSION = "zstd:1"  # chosen by measurement: benchmarks/bench_store.py
VALUE_DTYPES = {"float16": np.float16, "float32": np.float32}
ATTRIBUTIONS = ("update", "gradient")
ROW_ARRAYS = ("values", "index", "scales")  # one row per step; gradient (and format-4 update) stores add step_hyper


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
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), int(d["numel"]), int(d["k"]), int(d["offset"]))


@dataclass(frozen=True)
class ResumePoint:
    steps: int
    fingerprint: str
    # The ledger records the model training continues from had seen (pyunlearn/ledger.py): the
    # model a training segment ends with has those deletions applied, and no later ones.
    requests: int = 0

    def to_json(self) -> dict:
        return {"steps": self.steps, "fingerprint": self.fingerprint, "requests": self.requests}

    @classmethod
    def from_json(cls, d) -> "ResumePoint | None":
        if d is None:
            return None
        return cls(_count(d["steps"]), _optional(d["fingerprint"], str) or "", _count(d.get("requests", 0)))


@dataclass(frozen=True)
class Run:
    """One run of the persistent ID index (pyunlearn/_lookup.py)."""

    name: str
    step_from: int  # the run holds the pairs of steps [step_from, step_to)
    step_to: int
    pairs: int

    def to_json(self) -> list:
        return [self.name, self.step_from, self.step_to, self.pairs]

    @classmethod
    def from_json(cls, d) -> "Run":
        name, step_from, step_to, pairs = d
        if not isinstance(name, str) or not all(isinstance(v, int) and v >= 0 for v in (step_from, step_to, pairs)):
            raise ValueError(f"malformed lookup run {d!r}")
        return cls(name, step_from, step_to, pairs)


@dataclass(frozen=True)
class StoreMetadata:
    """The group attributes of an update store (see docs/format.md)."""

    format_version: int
    written_by: str
    layers: tuple[Layer, ...]
    keep: float
    value_dtype: str
    attribution: str
    optimizer: str | None  # gradient attribution: the optimizer family, set by the first recorder
    row_length: int
    steps_per_chunk: int
    committed_steps: int
    committed_samples: int
    fingerprint_initial: str
    fingerprint_final: str | None
    final_steps: int | None
    ledger: Ledger
    # The model as it was after `steps` committed steps (set by recorder.flush() and by
    # mark_final): a recorder may continue this store only from that model.
    resume_point: ResumePoint | None = None
    # Stores created since format 3 write every chunk, even one of zeros, so a missing chunk is
    # damage. Older stores may lack chunks of zeros: there a missing chunk cannot be told apart.
    chunks_always_written: bool = False
    # Version 3: steps per inner chunk of the row arrays (a divisor of steps_per_chunk; equal to it
    # for unsharded arrays and older stores), and the blosc compressor and level of new arrays.
    inner_steps: int = 0
    compression: str = "zstd:5"
    # Version 3: the persistent ID index (pyunlearn/_lookup.py): its runs cover steps from
    # lookup_from on, contiguously; steps before them and after them are found by scanning.
    lookup_from: int = 0
    lookup_runs: tuple = ()
    # Version 4: a check value of the secret that maps this store's keys to sample IDs
    # (pyunlearn/keys.py), None while its samples are integer IDs. Never the secret itself.
    key_check: str | None = None
    # Version 4: update stores record each step's learning rate too (step_hyper column 0, NaN
    # where unknown), so that pyunlearn.unlearn.repair can replay a removed step at its rate.
    update_hyper: bool = False

    def __post_init__(self):
        if self.inner_steps == 0:  # older stores: one chunk per write
            object.__setattr__(self, "inner_steps", self.steps_per_chunk)

    @classmethod
    def new(cls, named_params, *, keep: float, value_dtype: str, attribution: str,
            steps_per_chunk: int | None, compression: str = DEFAULT_COMPRESSION) -> "StoreMetadata":
        """The metadata of a new, empty store of these (name, parameter) pairs: k_i =
        ceil(keep · numel_i), at least 1; errors name the argument that is wrong."""
        if attribution not in ATTRIBUTIONS:
            raise ValueError(f"attribution must be 'update' or 'gradient', got {attribution!r}")
        if not named_params:
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
        if value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype must be 'float16' (scaled) or 'float32' (lossless), got {value_dtype!r}")
        layers, offset = [], 0
        for (name, p), k in zip(named_params, k_for([p.numel() for _, p in named_params], keep)):
            layers.append(Layer(name, tuple(p.shape), p.numel(), k, offset))
            offset += k
        try:
            compression = _compression(compression)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"compression: {exc}") from None
        chunk = default_steps_per_chunk(offset) if steps_per_chunk is None \
            else positive_int("steps_per_chunk", steps_per_chunk)
        return cls(
            format_version=FORMAT_VERSION, written_by=f"pyunlearn {__version__}", layers=tuple(layers),
            keep=float(keep), value_dtype=value_dtype, attribution=attribution, optimizer=None, row_length=offset,
            steps_per_chunk=chunk, committed_steps=0, committed_samples=0,
            fingerprint_initial=fingerprint([p for _, p in named_params]), fingerprint_final=None,
            final_steps=None, ledger=Ledger.empty(), chunks_always_written=True,
            inner_steps=inner_steps_for(offset, chunk), compression=compression,
            update_hyper=attribution == "update")

    @property
    def row_arrays(self) -> tuple[str, ...]:
        return ROW_ARRAYS + ("step_hyper",) if self.records_hyper else ROW_ARRAYS

    @property
    def records_hyper(self) -> bool:
        """Whether each step's hyper-parameters are stored (gradient stores: the family's columns;
        update stores since format 4: the learning rate)."""
        return self.attribution == "gradient" or self.update_hyper

    @property
    def array_names(self) -> tuple[str, ...]:
        return self.row_arrays + ("sample_ids", "offsets")

    def new_steps(self, steps: int, samples: int, runs: tuple) -> dict:
        """The changes a commit of new steps makes: the counts, the ID index's runs, and the final
        model dropped once steps go past it (it did not take them: forgetting them from it would
        subtract updates it never had)."""
        changes = dict(committed_steps=steps, committed_samples=samples, lookup_runs=runs)
        if self.final_steps is not None and steps > self.final_steps:
            changes.update(fingerprint_final=None, final_steps=None)
        return changes

    def resume_at(self, steps: int, fingerprint: str) -> "ResumePoint":
        """The resume point of the model after `steps` steps ("" : chosen by hand, model unknown):
        a model on the ledger's timeline at that step has seen what it says; any other model, a
        step of the current training segment, what the segment's start had seen."""
        found = self.ledger.latest_match(fingerprint, steps) if fingerprint else None
        if found is not None:
            return ResumePoint(steps, fingerprint, self.ledger.models[found].requests)
        return ResumePoint(steps, fingerprint, 0 if self.resume_point is None else self.resume_point.requests)

    def truncated(self, step: int, samples: int, where: str) -> dict:
        """The changes dropping steps >= step: the counts, no final model, the resume point kept if
        it was at `step` (else "chosen by hand"), the ledger without models past it (StoreError
        if a deletion reaches past it)."""
        ledger = self.ledger.truncated(step, where)
        return dict(committed_steps=step, committed_samples=samples, fingerprint_final=None, final_steps=None,
                    resume_point=self.resume_after_truncate(step), ledger=ledger)

    def resume_after_truncate(self, step: int) -> "ResumePoint":
        """Where training may continue once steps >= step are dropped: the model the timeline
        holds at `step` with the most deletions applied, else the resume point if it is at
        `step`, else "chosen by hand" (the recorder accepts the model it is given)."""
        model = self.ledger.model_at(step)
        if model is not None:
            return ResumePoint(step, model.fingerprint, model.requests)
        if self.resume_point is not None and self.resume_point.steps == step:
            return self.resume_point
        return self.resume_at(step, "")

    def final_model(self, fingerprint: str) -> dict:
        """The changes marking the model after the committed steps as a training segment's end:
        the final model, the resume point, and a model on the ledger's timeline that has seen
        the deletions the model this segment started from had seen."""
        point = self.resume_at(self.committed_steps, fingerprint)
        return dict(fingerprint_final=fingerprint, final_steps=point.steps, resume_point=point,
                    ledger=self.ledger.with_training_end(fingerprint, point.steps, point.requests))

    def deletion_changes(self, ledger: Ledger, replacing: Ledger, where: str) -> dict:
        """The changes replacing the ledger `replacing` (which must be the stored one) by
        `ledger`, or by the undo events that go back to it; the resume point follows."""
        if self.ledger != replacing:
            raise StoreError(f"{where}: the deletion ledger changed since this deletion read it "
                             "(another deletion was recorded meanwhile); nothing was written")
        if not ledger.extends(replacing):
            ledger = replacing.undone_back_to(ledger, where)
            point = self.resume_point
            for record in ledger.records[len(replacing.records):]:  # training must not have gone on from it
                undone = ledger.records[record.fields["of"]].fields
                if point is not None and point.requests > record.fields["of"] and (
                        point.fingerprint, point.steps) != (undone["fingerprint_after"], ledger.models[undone["model"]].steps):
                    raise StoreError(f"{where}: deletion request {undone['request']!r} can no longer be undone: "
                                     "training went on from its model since; nothing was written")
        return dict(ledger=ledger, resume_point=resume_point_after(self.resume_point, replacing, ledger))

    def replace(self, **changes) -> "StoreMetadata":
        return dataclasses.replace(self, **changes)

    def to_attrs(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "written_by": self.written_by,
            "layers": [layer.to_json() for layer in self.layers],
            "keep": self.keep,
            "value_dtype": self.value_dtype,
            "attribution": self.attribution,
            "optimizer": self.optimizer,
            "row_length": self.row_length,
            "steps_per_chunk": self.steps_per_chunk,
            "committed_steps": self.committed_steps,
            "committed_samples": self.committed_samples,
            "fingerprint_initial": self.fingerprint_initial,
            "fingerprint_final": self.fingerprint_final,
            "final_steps": self.final_steps,
            "ledger": self.ledger.to_attrs(),
            "resume_point": None if self.resume_point is None else self.resume_point.to_json(),
            "chunks_always_written": self.chunks_always_written,
            "inner_steps": self.inner_steps,
            "compression": self.compression,
            "lookup": {"from": self.lookup_from, "runs": [run.to_json() for run in self.lookup_runs]},
            "key_check": self.key_check,
            "update_hyper": self.update_hyper,
            "creation_complete": True,
        }

    def to_checked_attrs(self) -> dict:
        """to_attrs() with its checksum: what is written to disk."""
        attrs = self.to_attrs()
        attrs["checksum"] = attrs_checksum(attrs)
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict, where: str) -> "StoreMetadata":
        """The checked metadata of the group at `where`: StoreFormatError if it is not an
        update store of a version this code reads, CorruptStoreError if a field is malformed."""
        if attrs.get("format") != FORMAT_NAME:
            raise StoreFormatError(f"{where} is a Zarr group but not a pyunlearn update store "
                                   f"(format {attrs.get('format')!r})")
        version = attrs.get("format_version")
        if version not in READABLE_VERSIONS:
            raise StoreFormatError(f"{where} has update-store format version {version!r}; this pyunlearn "
                                   f"({__version__}) reads versions {', '.join(map(str, READABLE_VERSIONS))}")
        if attrs.get("creation_complete") is False:
            raise CorruptStoreError(f"{where}: creating this store did not finish (the process stopped midway); "
                                    "create it again with UpdateStore.create(..., overwrite=True)")
        if version < 3 and any(key in attrs for key in _SINCE_3):
            raise CorruptStoreError(f"{where}: the group attributes claim format version {version} but hold fields "
                                    "of version 3: zarr.json was edited. Restore it from a copy")
        if "checksum" in attrs or version >= 3:  # a flipped bit must not pass for another valid value
            expected = attrs_checksum({k: v for k, v in attrs.items() if k != "checksum"})
            if attrs.get("checksum") != expected:
                raise CorruptStoreError(f"{where}: the store's group attributes (ledger, committed counts, "
                                        "fingerprints) fail their checksum: zarr.json was damaged or edited. "
                                        "Restore it from a copy")
        if version < 4 and any(key in attrs for key in _SINCE_4):
            raise CorruptStoreError(f"{where}: the group attributes claim format version {version} but hold fields "
                                    "of version 4: zarr.json was edited. Restore it from a copy")
        attrs = _upgrade(dict(attrs), version)
        try:
            ledger = _ledger(attrs, version, where)
            meta = cls(
                format_version=int(version),
                written_by=str(attrs.get("written_by", "")),
                layers=tuple(Layer.from_json(d) for d in attrs["layers"]),
                keep=float(attrs["keep"]),
                value_dtype=_one_of(attrs["value_dtype"], VALUE_DTYPES, "value_dtype"),
                attribution=_one_of(attrs["attribution"], ATTRIBUTIONS, "attribution"),
                optimizer=_optional(attrs["optimizer"], str),
                row_length=_count(attrs["row_length"]),
                steps_per_chunk=_count(attrs["steps_per_chunk"]),
                committed_steps=_count(attrs["committed_steps"]),
                committed_samples=_count(attrs["committed_samples"]),
                fingerprint_initial=_optional(attrs["fingerprint_initial"], str),
                fingerprint_final=_optional(attrs["fingerprint_final"], str),
                final_steps=_optional(attrs["final_steps"], int),
                ledger=ledger,
                resume_point=_resume_point(attrs, version, ledger),
                chunks_always_written=attrs.get("chunks_always_written", False) is True,
                inner_steps=_count(attrs.get("inner_steps", 0)),
                compression=_compression(attrs.get("compression", "zstd:5")),
                # A store without the index (before format 3) scans its CSR arrays up to here.
                lookup_from=_count(attrs["lookup"]["from"]) if "lookup" in attrs else _count(attrs["committed_steps"]),
                lookup_runs=tuple(Run.from_json(r) for r in attrs["lookup"]["runs"]) if "lookup" in attrs else (),
                key_check=_optional(attrs.get("key_check"), str),
                update_hyper=attrs.get("update_hyper", False) is True,
            )
            covered = [meta.lookup_from] + [b for run in meta.lookup_runs for b in (run.step_from, run.step_to)]
            if covered[-1] > meta.committed_steps or any(a != b for a, b in zip(covered[::2], covered[1::2])):
                raise ValueError("the ID index's runs do not cover the committed steps in order")
            if meta.inner_steps < 1 or meta.steps_per_chunk % meta.inner_steps:
                raise ValueError(f"inner_steps {meta.inner_steps} does not divide steps_per_chunk {meta.steps_per_chunk}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise CorruptStoreError(f"{where}: the store's group attributes are malformed ({what}); "
                                    "restore its zarr.json from a copy") from None
        if sum(layer.k for layer in meta.layers) != meta.row_length:
            raise CorruptStoreError(f"{where}: the layer table's k add up to {sum(layer.k for layer in meta.layers)}, "
                                    f"not the row length {meta.row_length}")
        return meta


# Written only since version 3: a document holding any of them and claiming an older version has
# been edited to skip the checksum.
_SINCE_3 = ("checksum", "resume_point", "chunks_always_written", "creation_complete", "inner_steps", "compression",
            "lookup")


# Written only since version 4 (the ledger's form changed too: pyunlearn/ledger.py reads both).
_SINCE_4 = ("key_check", "update_hyper")


def resume_point_after(point: "ResumePoint | None", old: Ledger, new: Ledger) -> "ResumePoint | None":
    """Where training may continue once the ledger goes from `old` to `new`: a deletion applied to
    the model training would continue from moves the resume point to the model it produced (the
    old one holds the deleted samples' updates); undoing it moves the point back."""
    for record in new.records[len(old.records):]:
        if point is None:
            return None
        fields = record.fields
        if record.kind == "undo":
            undone = new.records[fields["of"]].fields
            if point.fingerprint == undone["fingerprint_after"]:
                start = new.models[undone["from_model"]]
                point = ResumePoint(point.steps, start.fingerprint, start.requests)
        elif record.kind == "deletion":
            start = new.models[fields["from_model"]]
            if point.fingerprint == start.fingerprint and point.steps == start.steps:
                point = ResumePoint(point.steps, fields["fingerprint_after"], new.models[fields["model"]].requests)
    return point


def _resume_point(attrs: dict, version: int, ledger: Ledger) -> "ResumePoint | None":
    """The resume point; before format 4 a deletion did not move it off the final model, so it
    is moved here as format 4 would have (training continues from the deletion's result)."""
    point = ResumePoint.from_json(attrs.get("resume_point"))
    return point if version >= 4 else resume_point_after(point, Ledger.empty(), ledger)


def _ledger(attrs: dict, version: int, where: str) -> Ledger:
    if version >= 4:
        return Ledger.from_attrs(attrs["ledger"], where)
    return Ledger.from_format_3(attrs["ledger"], final_fingerprint=_optional(attrs["fingerprint_final"], str),
                                final_steps=_optional(attrs["final_steps"], int),
                                steps=_count(attrs["committed_steps"]), where=where)


def attrs_checksum(attrs: dict) -> str:
    """sha256 of the attributes as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(attrs, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _upgrade(attrs: dict, version: int) -> dict:
    """Fields a store of an older format version lacks, with the values they implied."""
    if version == 1:  # pyunlearn 0.1.0 recorded updates only
        attrs.setdefault("attribution", "update")
        attrs.setdefault("optimizer", None)
    return attrs


def _one_of(value, allowed, field: str):
    if value not in allowed:
        raise ValueError(f"{field} {value!r} is not one of {', '.join(allowed)}")
    return value


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative int, got {value!r}")
    return value


def _optional(value, kind):
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        raise TypeError(f"expected {kind.__name__} or null, got {value!r}")
    return value


def check_row(meta: StoreMetadata, row, hyper) -> dict[str, np.ndarray]:
    """A pruned row (index, values, scales) and, for gradient stores, the step's
    hyper-parameters, as the store's arrays hold them; or an error naming what does not fit."""
    if not isinstance(row, tuple) or len(row) != 3:
        raise TypeError("row must be a Row (index, values, scales) as prune_topk returns")
    fields = dict(zip(("index", "values", "scales"),
                      (t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t) for t in row)))
    K, L = meta.row_length, len(meta.layers)
    for name, dtype, shape in (("index", np.uint32, (K,)), ("values", VALUE_DTYPES[meta.value_dtype], (K,)),
                               ("scales", np.float32, (L,))):
        got = fields[name]
        if got.shape != shape or got.dtype != dtype:
            raise ValueError(f"row.{name} must be {np.dtype(dtype)} of shape {shape}, got {got.dtype} {got.shape}")
    if (hyper is None and meta.attribution == "gradient") or (hyper is not None and not meta.records_hyper) or \
            (hyper is not None and len(hyper) > HYPER_WIDTH):
        raise ValueError(f"hyper (at most {HYPER_WIDTH} values) is required with gradient attribution, optional for "
                         "update stores of format 4 (the learning rate), refused otherwise")
    if meta.records_hyper:  # an update step without one: its learning rate is unknown
        row_hyper = np.zeros(HYPER_WIDTH)  # (np.pad costs more than the rest of this check)
        row_hyper[: 1 if hyper is None else len(hyper)] = np.nan if hyper is None else hyper
        fields["step_hyper"] = row_hyper
    return fields


def _compression(value) -> str:
    """'<blosc compressor>:<level>', e.g. 'zstd:1', checked."""
    name, _, level = str(value).partition(":") if isinstance(value, str) else ("", "", "")
    if name not in COMPRESSORS or not level.isdigit() or not 0 <= int(level) <= 9:
        raise ValueError(f"expected '<compressor>:<level>' with a compressor of {', '.join(COMPRESSORS)} and a "
                         f"level 0-9 (e.g. {DEFAULT_COMPRESSION!r}), got {value!r}")
    return value


def codecs(typesize: int, compression: str = DEFAULT_COMPRESSION):
    name, level = compression.split(":")
    return [BloscCodec(cname=name, clevel=int(level), shuffle="shuffle", typesize=typesize), Crc32cCodec()]


def default_steps_per_chunk(row_length: int) -> int:
    return max(1, min(MAX_STEPS_PER_CHUNK, CHUNK_BYTES // max(1, row_length * 4)))


def inner_steps_for(row_length: int, steps_per_chunk: int) -> int:
    """The largest divisor of steps_per_chunk whose rows fit in ~INNER_BYTES (at least 1)."""
    target = max(1, INNER_BYTES // max(1, row_length * 4))
    return max(d for d in range(1, min(target, steps_per_chunk) + 1) if steps_per_chunk % d == 0)
