"""The kernel measurements, shared by the script (bench_kernels.py) and the pytest-benchmark
suite (test_kernels_benchmark.py): a parameter set, a prepared workload, one function per
contender."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pyunlearn import ops
from pyunlearn.testing import resnet18_cifar_shapes


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
