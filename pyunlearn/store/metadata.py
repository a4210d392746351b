"""The update store's metadata (its group attributes) as one checked value.

docs/format.md is the contract other Zarr readers rely on; this module is its only writer.
The group attributes are parsed into a frozen StoreMetadata (every field checked, older format
versions recognised in `from_attrs`, the one place that knows them) and written back whole with
`to_checked_attrs`, so that no field is ever read from a raw dict elsewhere. It is a value: what
a change to the timeline means is pyunlearn.ledger's to say; the store puts the answer here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from .._validate import positive_int
from .._version import __version__
from ..attribution import HYPER_WIDTH
from ..errors import CorruptStoreError, StoreError, StoreFormatError
from ..kernels import fingerprint, k_for
from ..ledger import ResumePoint

FORMAT_NAME = "pyunlearn.update-store"
# 5: the audit log outside zarr.json, place-bound step digests, canonical keys; 4: the ledger's timeline and
# audit records, keyed sample IDs; 3: checksummed attributes; 2 (0.2.0): attribution, optimizer, step_hyper;
# 1 (0.1.0): update attribution only
FORMAT_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
KEY_MAPPINGS = (1, 2)  # how keys become IDs (pyunlearn.keys): 1 the key's bytes as given (format 4), 2 canonical
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
DIGEST_BYTES = 32  # step_digests: per step, the XXH3-128 of its row, then of its sample IDs (pyunlearn/store/digests.py)


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
class Run:
    """One run of the persistent ID index (pyunlearn/store/id_index.py)."""

    name: str
    step_from: int  # the run holds the pairs of steps [step_from, step_to)
    step_to: int
    pairs: int
    # Version 5: the SHA-256 of the run's attributes (fences and chunk digests) as canonical JSON,
    # so that the table in the checksummed metadata pins what the run array's own zarr.json says.
    attributes: str | None = None

    def to_json(self) -> list:
        base = [self.name, self.step_from, self.step_to, self.pairs]
        return base if self.attributes is None else base + [self.attributes]

    @classmethod
    def from_json(cls, d) -> "Run":
        name, step_from, step_to, pairs, *rest = d
        if not isinstance(name, str) or not all(isinstance(v, int) and v >= 0 for v in (step_from, step_to, pairs)) \
                or len(rest) > 1 or (rest and not isinstance(rest[0], str)):
            raise ValueError(f"malformed lookup run {d!r}")
        return cls(name, step_from, step_to, pairs, rest[0] if rest else None)


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
    # The model training may go on from (pyunlearn.ledger.ResumePoint), as of the first
    # `log_length` records of the audit log (a record appended since moves it: ledger.resume_after).
    resume_point: ResumePoint | None = None
    log_length: int = 0
    # Stores created since format 3 write every chunk, even one of zeros, so a missing chunk is
    # damage. Older stores may lack chunks of zeros: there a missing chunk cannot be told apart.
    chunks_always_written: bool = False
    # Version 3: steps per inner chunk of the row arrays (a divisor of steps_per_chunk; equal to it
    # for unsharded arrays and older stores), and the blosc compressor and level of new arrays.
    inner_steps: int = 0
    compression: str = "zstd:5"
    # Version 3: the persistent ID index (pyunlearn/store/id_index.py): its runs cover steps from
    # lookup_from on, contiguously; steps before them and after them are found by scanning.
    lookup_from: int = 0
    lookup_runs: tuple = ()
    # Version 4: a check value of the secret that maps this store's keys to sample IDs
    # (pyunlearn/keys.py), None while its samples are integer IDs. Never the secret itself.
    key_check: str | None = None
    # Version 4: update stores record each step's learning rate too (step_hyper column 0, NaN
    # where unknown), so that pyunlearn.unlearn.repair can replay a removed step at its rate.
    update_hyper: bool = False
    # Version 5: the store's identity (32 hex digits, random), which every step digest covers;
    # the first step with a digest (steps before it were written by an older version); how keys
    # become IDs (KEY_MAPPINGS; None while the store has no keys); the check value of the key
    # that authenticates the audit log (None: its records carry no MAC).
    store_id: str | None = None
    digests_from: int | None = None
    key_mapping: int | None = None
    audit_key_check: str | None = None
    # Before version 5: the ledger as stored in the attributes (converted by store/legacy.py).
    legacy: dict | None = None

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
            fingerprint_initial=fingerprint([p for _, p in named_params]), chunks_always_written=True,
            inner_steps=inner_steps_for(offset, chunk), compression=compression,
            update_hyper=attribution == "update", store_id=uuid.uuid4().hex, digests_from=0)

    @property
    def row_arrays(self) -> tuple[str, ...]:
        """The arrays with one row per step: the row, then step_hyper and step_digests where kept."""
        return ROW_ARRAYS + (("step_hyper",) if self.records_hyper else ()) + \
            (("step_digests",) if self.digests_from is not None else ())

    @property
    def keyed(self) -> bool:
        """Whether the store's samples are keys mapped to IDs with a secret (pyunlearn.keys)."""
        return self.key_check is not None

    @property
    def records_hyper(self) -> bool:
        """Whether each step's hyper-parameters are stored (gradient stores: the family's columns;
        update stores since format 4: the learning rate)."""
        return self.attribution == "gradient" or self.update_hyper

    @property
    def array_names(self) -> tuple[str, ...]:
        return self.row_arrays + ("sample_ids", "offsets")

    def replace(self, **changes) -> "StoreMetadata":
        return dataclasses.replace(self, **changes)

    def to_attrs(self) -> dict:
        """The attributes of format 5, without the checksum (a store of an older format is
        converted before anything is written to it: `legacy` must be None)."""
        if self.legacy is not None:
            raise StoreError("a store of an older format is written only once its ledger was converted")
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
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
            "timeline": {"log": self.log_length,
                         "resume_point": None if self.resume_point is None else {
                             "steps": self.resume_point.steps, "fingerprint": self.resume_point.fingerprint,
                             "seen": self.resume_point.seen}},
            "chunks_always_written": self.chunks_always_written,
            "inner_steps": self.inner_steps,
            "compression": self.compression,
            "lookup": {"from": self.lookup_from, "runs": [run.to_json() for run in self.lookup_runs]},
            "key_check": self.key_check,
            "key_mapping": self.key_mapping,
            "update_hyper": self.update_hyper,
            "store_id": self.store_id,
            "digests_from": self.digests_from,
            "audit_key_check": self.audit_key_check,
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
        update store of a version this code reads, CorruptStoreError if a field is malformed,
        unknown, or belongs to a later version than the one claimed (docs/format.md: versions)."""
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
            raise StoreFormatError(f"{where} is a Zarr group but not a pyunlearn update store "
                                   f"(format {attrs.get('format') if isinstance(attrs, dict) else None!r})")
        version = attrs.get("format_version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise StoreFormatError(f"{where} has update-store format version {version!r}; this pyunlearn "
                                   f"({__version__}) reads versions {', '.join(map(str, READABLE_VERSIONS))}")
        if attrs.get("creation_complete") is False:
            raise CorruptStoreError(f"{where}: creating this store did not finish (the process stopped midway); "
                                    "create it again with UpdateStore.create(..., overwrite=True)")
        if "checksum" in attrs or version >= 3:  # a flipped bit must not pass for another valid value
            expected = attrs_checksum({k: v for k, v in attrs.items() if k != "checksum"})
            if attrs.get("checksum") != expected:
                raise CorruptStoreError(f"{where}: the store's group attributes (committed counts, fingerprints, "
                                        "the timeline's mark) fail their checksum: zarr.json was damaged or edited. "
                                        "Restore it from a copy")
        known = set(_FIELDS_OF[version]) | {"checksum"}
        later = [key for key in attrs if key not in known and any(key in _FIELDS_OF[v] for v in _FIELDS_OF if v > version)]
        if later:
            raise CorruptStoreError(f"{where}: the group attributes claim format version {version} but hold fields of a "
                                    f"later version ({', '.join(sorted(later))}): zarr.json was edited (a store is never "
                                    "relabelled with an older version). Restore it from a copy")
        unknown = sorted(set(attrs) - known - {"checksum"})
        if unknown:
            raise CorruptStoreError(f"{where}: the group attributes hold fields format version {version} does not "
                                    f"define ({', '.join(unknown)}): zarr.json was edited, or written by a later "
                                    "pyunlearn. Restore it from a copy, or upgrade pyunlearn")
        required = [f for f in ("timeline", "store_id", "digests_from") if f not in attrs] if version >= 5 else []
        if required:
            raise CorruptStoreError(f"{where}: the group attributes lack fields format version {version} requires "
                                    f"({', '.join(required)}): zarr.json was damaged or edited. Restore it from a copy")
        attrs = _upgrade(dict(attrs), version)
        try:
            mark = attrs.get("timeline") or {}
            point = mark.get("resume_point")
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
                resume_point=None if point is None else ResumePoint(
                    _count(point["steps"]), _optional(point["fingerprint"], str) or "", _count(point["seen"])),
                log_length=_count(mark.get("log", 0)),
                chunks_always_written=attrs.get("chunks_always_written", False) is True,
                inner_steps=_count(attrs.get("inner_steps", 0)),
                compression=_compression(attrs.get("compression", "zstd:5")),
                # A store without the index (before format 3) scans its CSR arrays up to here.
                lookup_from=_count(attrs["lookup"]["from"]) if "lookup" in attrs else _count(attrs["committed_steps"]),
                lookup_runs=tuple(Run.from_json(r) for r in attrs["lookup"]["runs"]) if "lookup" in attrs else (),
                key_check=_optional(attrs.get("key_check"), str),
                key_mapping=_optional(attrs.get("key_mapping"), int) if version >= 5 else
                (1 if attrs.get("key_check") is not None else None),
                update_hyper=attrs.get("update_hyper", False) is True,
                store_id=_optional(attrs.get("store_id"), str),
                digests_from=_optional(attrs.get("digests_from"), int),
                audit_key_check=_optional(attrs.get("audit_key_check"), str),
                legacy=None if version >= 5 else {key: attrs.get(key) for key in _LEGACY},
            )
            covered = [meta.lookup_from] + [b for run in meta.lookup_runs for b in (run.step_from, run.step_to)]
            if covered[-1] > meta.committed_steps or any(a != b for a, b in zip(covered[::2], covered[1::2])):
                raise ValueError("the ID index's runs do not cover the committed steps in order")
            if meta.inner_steps < 1 or meta.steps_per_chunk % meta.inner_steps:
                raise ValueError(f"inner_steps {meta.inner_steps} does not divide steps_per_chunk {meta.steps_per_chunk}")
            if version >= 5:
                if not (isinstance(meta.store_id, str) and len(meta.store_id) == 32 and
                        all(c in "0123456789abcdef" for c in meta.store_id)):
                    raise ValueError(f"store_id {meta.store_id!r} is not 32 lower-case hex digits")
                if meta.key_mapping not in (None, *KEY_MAPPINGS) or (meta.key_mapping is None) != (meta.key_check is None):
                    raise ValueError(f"key_mapping {meta.key_mapping!r} does not go with key_check {meta.key_check!r}")
                if meta.digests_from is not None and meta.digests_from > meta.committed_steps:
                    raise ValueError(f"digests_from {meta.digests_from} is past the committed steps")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise CorruptStoreError(f"{where}: the store's group attributes are malformed ({what}); "
                                    "restore its zarr.json from a copy") from None
        if sum(layer.k for layer in meta.layers) != meta.row_length:
            raise CorruptStoreError(f"{where}: the layer table's k add up to {sum(layer.k for layer in meta.layers)}, "
                                    f"not the row length {meta.row_length}")
        return meta


# The attributes each format version writes (docs/format.md): a document claiming a version may
# hold only that version's fields (an older label on newer fields means zarr.json was edited).
_V1 = ("format", "format_version", "written_by", "layers", "keep", "value_dtype", "row_length", "steps_per_chunk",
       "committed_steps", "committed_samples", "fingerprint_initial", "fingerprint_final", "final_steps", "ledger")
_V2 = _V1 + ("attribution", "optimizer")
_V3 = _V2 + ("resume_point", "chunks_always_written", "creation_complete", "inner_steps", "compression", "lookup")
_V4 = _V3 + ("key_check", "update_hyper")
_V5 = tuple(k for k in _V4 if k not in ("fingerprint_final", "final_steps", "ledger", "resume_point")) + (
    "timeline", "key_mapping", "store_id", "digests_from", "audit_key_check")
_FIELDS_OF = {1: _V1, 2: _V2, 3: _V3, 4: _V4, 5: _V5}
_LEGACY = ("ledger", "fingerprint_final", "final_steps", "resume_point")  # before format 5: converted by store/legacy.py


def attrs_checksum(attrs: dict) -> str:
    """SHA-256 of the attributes as canonical JSON (docs/format.md: keys sorted, separators ","
    and ":", non-ASCII as \\uXXXX escapes, numbers as Python's json writes them)."""
    text = json.dumps(attrs, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode("ascii")).hexdigest()


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
