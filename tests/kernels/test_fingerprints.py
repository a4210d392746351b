"""Model fingerprints: the native xh128 against its numpy reference, thread-count independence,
the algorithm named by a stored value's prefix, old sha256 values, parameter layouts."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyunlearn.kernels import fingerprints as _model
from pyunlearn.kernels import reference as _reference
from pyunlearn.kernels.fingerprints import Fingerprints, fingerprint, fingerprint_algorithm, same_model
from tests.support import TinyNet

FIXTURES = Path(__file__).parents[1] / "fixtures"
MiB = 2**20


@contextlib.contextmanager
def fingerprint_tuning(native, serial_below_blocks=None, simd=None):
    saved = native._fingerprint_tuning()
    native._set_fingerprint_tuning(saved[0] if serial_below_blocks is None else serial_below_blocks,
                                   saved[1] if simd is None else simd)
    try:
        yield
    finally:
        native._set_fingerprint_tuning(*saved)


def _old_fingerprint(params) -> str:
    """The fingerprint as pyunlearn wrote it before xh128 (sha256), for stores that hold it."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().to(torch.float32).contiguous().numpy())
    return "sha256:" + digest.hexdigest()[:32]


def _buffers(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for n in sizes]


# Stream lengths around every boundary the hash has: a stripe (64 bytes = 16 floats), a period
# (1 KiB), a block (1 MiB), several blocks; parts that split stripes and blocks; empty parts;
# bytes objects of odd lengths (the last stripe zero-padded).
BUFFER_SETS = {
    "nothing": [],
    "one-empty": [np.zeros(0, np.float32)],
    "one-float": [np.ones(1, np.float32)],
    "one-stripe": _buffers([16]),
    "stripe-plus-one": _buffers([17]),
    "one-period": _buffers([256]),
    "period-minus-one": _buffers([255]),
    "one-block": _buffers([MiB // 4]),
    "block-plus-one": _buffers([MiB // 4 + 1]),
    "split-everywhere": _buffers([3, 0, 1000, 5, 262_141, 1, 16, 33, 700_000, 0, 2]),
    "many-blocks": _buffers([2_500_000, 1_300_000]),
    "odd-bytes": [b"x", b"yz", np.arange(5, dtype=np.float32), b"abcdefg"],
}


@pytest.mark.parametrize("name", list(BUFFER_SETS))
def test_native_matches_reference(native, name):
    buffers = BUFFER_SETS[name]
    expected = _reference.xh128(buffers)
    assert len(expected) == 16
    for tuning in ({"serial_below_blocks": 0}, {"serial_below_blocks": 2**62}, {"serial_below_blocks": 0, "simd": False}):
        with fingerprint_tuning(native, **tuning):
            assert native.fingerprint(buffers) == expected, tuning


def test_known_value():
    """Pins the definition (csrc/fingerprint.h): a change to it would silently orphan every
    stored xh128 fingerprint."""
    assert _reference.xh128([]).hex() == "fa3adcd3cf9f6effb0a6cfa7332bfe9f"
    assert _reference.xh128([np.arange(17, dtype=np.float32)]).hex() == "ee99a81e14913e1a496cda00c8be6416"


def test_the_stream_is_the_concatenation(native):
    """As with sha256, only the bytes in order count, not where one buffer ends."""
    a, b = _buffers([1000, 333_333], seed=1)
    joined = np.concatenate([a, b])
    assert native.fingerprint([a, b]) == native.fingerprint([joined]) == _reference.xh128([joined])


def test_every_change_shows(native):
    """One flipped bit anywhere, two values swapped, a value moved, the stream shortened: all
    give new digests (the lanes are position-dependent within a period and scrambled between)."""
    base = _buffers([300_000], seed=2)[0]
    seen = {native.fingerprint([base])}
    for change in range(6):
        x = base.copy()
        if change == 0:
            x.view(np.uint32)[123_456] ^= 1
        elif change == 1:
            x.view(np.uint32)[-1] ^= 1 << 31
        elif change == 2:
            x[[10, 11]] = x[[11, 10]]
        elif change == 3:
            x[[0, 16]] = x[[16, 0]]  # same lane, neighbouring stripes
        elif change == 4:
            x = np.roll(x, 1)
        else:
            x = x[:-1]
        seen.add(native.fingerprint([x]))
    assert len(seen) == 7
    assert native.fingerprint([np.zeros(1000, np.float32)]) != native.fingerprint([np.zeros(1001, np.float32)])


_THREADS_SCRIPT = r"""
import json, numpy as np
from pyunlearn.kernels import _native
rng = np.random.default_rng(5)
buffers = [rng.standard_normal(n).astype(np.float32) for n in (7, 3_000_001, 262_144, 1_500_000)]
_native._set_fingerprint_tuning(0, True)  # parallel however small
print(json.dumps({"digest": _native.fingerprint(buffers).hex(), "threads": _native.max_threads()}))
"""


def test_same_digest_for_one_and_two_threads():
    results = []
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], env=env, capture_output=True, text=True,
                             check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert [r["threads"] for r in results] == [1, 2]
    assert results[0]["digest"] == results[1]["digest"]


def _params(seed=0):
    torch.manual_seed(seed)
    return [p for p in TinyNet().parameters() if p.requires_grad]


def test_default_is_xxh3_and_like_picks_the_algorithm():
    import xxhash

    params = _params()
    new = fingerprint(params)
    assert re.fullmatch(r"xxh3:[0-9a-f]{32}", new)
    # XXH3-128 of the float32 values, layer after layer: what any reader with xxhash computes
    assert new == "xxh3:" + xxhash.xxh3_128(b"".join(p.detach().numpy().astype("<f4").tobytes() for p in params)).hexdigest()
    xh128 = "xh128:" + _reference.xh128([p.detach().numpy() for p in params]).hex()  # stores of format 4
    assert fingerprint(params, like="xh128:" + "0" * 32) == xh128
    old = _old_fingerprint(params)
    assert fingerprint(params, like=old) == old
    assert fingerprint(params, like=new) == new
    assert fingerprint(params, like="sha256:anything") == old  # only the prefix picks
    for bad in ("md5:0123", "xh128", "", 42):
        with pytest.raises(ValueError, match="not a fingerprint"):
            fingerprint(params, like=bad)


def test_reference_fallback_gives_the_same_fingerprint(monkeypatch):
    params = _params(3)
    native = fingerprint(params)
    monkeypatch.setenv("PYUNLEARN_REFERENCE", "1")
    assert fingerprint(params) == native


def test_stored_sha256_values_still_match():
    """The v0.1 fixture store holds sha256 fingerprints; TinyNet seeded with 0 is its initial
    model. same_model recognises it, and nothing else."""
    attrs = json.loads((FIXTURES / "v0.1-tinynet.zarr" / "zarr.json").read_text())["attributes"]
    stored = attrs["fingerprint_initial"]
    assert stored.startswith("sha256:")
    params = _params(0)
    assert same_model(params, stored)
    assert not same_model(params, attrs["fingerprint_final"])
    assert same_model(params, fingerprint(params))
    assert not same_model(_params(1), stored)
    with torch.no_grad():
        params[0][0, 0] += 1e-6
    assert not same_model(params, stored)
    assert not same_model(params, None) and not same_model(params, "")


def test_layouts_and_dtypes_hash_their_float32_values():
    """Float32 values in row-major order, whatever the layout or dtype: a transposed view, a
    channels_last tensor and a bfloat16 model agree with their contiguous float32 copies."""
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(8, 3, 5, 5, generator=gen)
    matrix = torch.randn(30, 40, generator=gen)
    as_stored = [weight, matrix.t().contiguous()]
    layouts = [weight.to(memory_format=torch.channels_last), matrix.t()]
    assert not layouts[0].is_contiguous() and not layouts[1].is_contiguous()
    for like in (None, "sha256:"):
        assert fingerprint(layouts, like=like) == fingerprint(as_stored, like=like)
    half = [t.to(torch.bfloat16) for t in as_stored]
    widened = [t.to(torch.float32) for t in half]
    assert fingerprint(half) == fingerprint(widened) != fingerprint(as_stored)
    assert fingerprint(half, like="sha256:") == _old_fingerprint(widened)
    trained = torch.nn.Parameter(matrix.clone())
    assert fingerprint([trained]) == fingerprint([matrix])  # requires_grad does not matter


def test_fingerprints_hash_each_algorithm_once(monkeypatch):
    params = _params(2)
    calls = []
    real = _model.fingerprint
    monkeypatch.setattr(_model, "fingerprint", lambda p, like=None: calls.append(like) or real(p, like))
    prints = Fingerprints(params)
    old, new = _old_fingerprint(params), real(params)
    assert prints.matches(old) and prints.matches(new) and prints.matches(old)
    assert not prints.matches(None) and not prints.matches("xh128:" + "0" * 32)
    assert prints.get() == new and prints.get(like=old) == old
    assert sorted(fingerprint_algorithm(c) if c else "xxh3" for c in calls) == ["sha256", "xh128", "xxh3"]  # each once
