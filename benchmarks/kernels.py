"""The kernel measurements, shared by the script (bench_kernels.py) and the pytest-benchmark
suite (test_kernels_benchmark.py): a parameter set, a prepared workload, one function per
contender, and the floors they are held to."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pyunlearn.kernels import fingerprints as _fingerprint, ops
from _support import resnet18_cifar_shapes


@dataclass
class Workload:
    """Two successive optimizer steps' worth of parameters plus `rows` stored rows."""

    keep: float
    before: list[torch.Tensor]
    after: list[list[torch.Tensor]]  # two parameter sets to alternate, so Δ is never all zero
    k: list[int]
    rows: ops.Row
    decoded: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per row, per layer (int64 idx, fp32 Δ)

    @property
    def numel(self) -> int:
        return sum(b.numel() for b in self.before)


def make_workload(shapes, keep: float, rows: int, *, seed: int = 0, step_size: float = 1e-3) -> Workload:
    gen = torch.Generator().manual_seed(seed)
    before = [torch.randn(shape, generator=gen) for _, shape in shapes]
    after = [[b + step_size * torch.randn(b.shape, generator=gen) for b in before] for _ in range(2)]
    k = ops.k_for([b.numel() for b in before], keep)
    stored = []
    for _ in range(rows):  # distinct steps: a real store never holds the same row twice
        step = [b + step_size * torch.randn(b.shape, generator=gen) for b in before]
        stored.append(ops.prune_topk([b.clone() for b in before], step, k, "float16", refresh=False))
    stack = ops.Row(*(torch.stack(f) for f in zip(*stored)))
    decoded = [ops.decode_row(row, k) for row in stored]
    return Workload(keep, before, after, k, stack, decoded)


def resnet18_workload(keep: float, rows: int = 64) -> Workload:
    return make_workload(resnet18_cifar_shapes(), keep, rows)


class Alternating:
    """Calls fn(snapshot, after) with the two `after` sets in turn, as successive steps do."""

    def __init__(self, work: Workload):
        self.snapshot = [a.clone() for a in work.after[1]]
        self.after = work.after
        self.turn = 0

    def next(self):
        self.turn ^= 1
        return self.snapshot, self.after[self.turn]


def prune_native(work: Workload, state: Alternating):
    snapshot, after = state.next()
    return ops.prune_topk(snapshot, after, work.k, "float16", refresh=True)


def prune_torch(work: Workload, state: Alternating):
    """The baseline: per layer Δ, torch.topk of |Δ|, gather, refresh."""
    snapshot, after = state.next()
    out = []
    for b, a, k in zip(snapshot, after, work.k):
        delta = (a - b).view(-1)
        _, idx = torch.topk(delta.abs(), k)
        out.append((idx, delta[idx]))
        b.copy_(a)
    return out


class StreamingFloor:
    """numpy computing after − before into a preallocated buffer: the bytes a fused prune must
    at least move."""

    def __init__(self, work: Workload):
        self.a = [a.numpy() for a in work.after[0]]
        self.b = [b.numpy() for b in work.before]
        self.out = [np.empty_like(b) for b in self.b]

    def __call__(self):
        for a, b, o in zip(self.a, self.b, self.out):
            np.subtract(a, b, out=o)


def subtract_native(work: Workload, params):
    ops.subtract_sparse(params, work.rows, work.k)


def subtract_index_add(work: Workload, params):
    """The baseline: index_add_ per layer and row, with indices and Δ decoded beforehand."""
    for row in work.decoded:
        for p, (idx, delta) in zip(params, row):
            p.view(-1).index_add_(0, idx, delta, alpha=-1)


class SubtractFloor:
    """The bytes a subtract must at least move: every byte of the stored rows (index, values,
    scales) read once and every parameter read and written back once, streaming on all threads
    (the extension's _stream_floor: an OR over the rows, x ^= 0 over the parameters). It
    touches every parameter, not only the targeted ones: with 64 rows, 99.9% of the parameters
    are targeted at keep 0.1 and 47% at keep 0.01, where nearly every 64-byte line still holds
    one; the rows' bytes dominate either way."""

    def __init__(self, work: Workload, params):
        from pyunlearn.kernels import _native

        self._floor = _native._stream_floor
        self.read = [work.rows.index.numpy(), work.rows.values.numpy(), work.rows.scales.numpy()]
        self.touch = [p.numpy() for p in params]

    @property
    def bytes_moved(self) -> int:
        return sum(a.nbytes for a in self.read) + 2 * sum(a.nbytes for a in self.touch)

    def __call__(self):
        self._floor(self.read, self.touch)


def fingerprint_params(shapes, *, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _, shape in shapes]


def fingerprint_sha256(params):
    """The fingerprint before xh128 (still computed for stores that hold sha256 values)."""
    return _fingerprint.fingerprint(params, like="sha256:")


def fingerprint_xxh3(params):
    """The fingerprint now (format 5): XXH3-128 from the xxhash package, through the Python API."""
    return _fingerprint.fingerprint(params)


def fingerprint_xh128(params):
    """The fingerprint of format-4 stores: native xh128 on all threads, through the Python API."""
    return _fingerprint.fingerprint(params, like="xh128:")


class Xh128Native:
    """The bare native hash on a given number of threads (no per-tensor Python work)."""

    def __init__(self, params, threads: int):
        from pyunlearn.kernels import _native

        self._hash = _native.fingerprint
        self.arrays = [p.numpy() for p in params]
        self.threads = threads

    def __call__(self):
        return self._hash(self.arrays, self.threads)


class PrunerCall:
    """One optimizer step's prune on the demo's DigitsCNN, as the recorder makes it (a Pruner
    over the live parameters and a snapshot), and the bare native prune_topk call on the same
    arrays with preallocated outputs: the Pruner's own cost is the difference. Both run without
    refresh, so every call sees the same non-zero Δ (with refresh, every call after the first
    would prune Δ = 0); the recorder's refresh adds a copy of the 6k values to both."""

    def __init__(self, keep: float, *, seed: int = 0):
        from pyunlearn.kernels import _native
        from pyunlearn.models import DigitsCNN

        torch.manual_seed(seed)
        params = list(DigitsCNN().parameters())
        self.k = ops.k_for([p.numel() for p in params], keep)
        snapshots = [[p.detach().clone() for p in params] for _ in range(2)]
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 1e-3)  # one step's change
        self.pruner = ops.Pruner(snapshots[0], params, self.k, "float16")
        self._prune = _native.prune_topk
        self._args = ([b.numpy() for b in snapshots[1]], [p.detach().numpy() for p in params], self.k,
                      np.empty(sum(self.k), np.uint32), np.empty(sum(self.k), np.float16),
                      np.empty(len(self.k), np.float32), False)

    def pruner_call(self):
        return self.pruner(refresh=False)

    def bare_call(self):
        return self._prune(*self._args)
