"""What a store costs on disk, against dense updates and the entropy floor of its index."""
from __future__ import annotations

import math
from dataclasses import dataclass


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

    @classmethod
    def measure(cls, meta, bytes_on_disk: dict[str, int]) -> "StoreStats":
        total = sum(bytes_on_disk.values())
        numel = sum(layer.numel for layer in meta.layers)
        steps = meta.committed_steps
        entries = max(1, steps * meta.row_length)
        floor = sum(_entropy_bits(layer.k, layer.numel) for layer in meta.layers) / max(1, meta.row_length)
        dense = numel * 4 * steps
        return cls(
            steps=steps, samples=meta.committed_samples, bytes_on_disk=bytes_on_disk, total_bytes=total,
            dense_bytes=dense, ratio=dense / total if total else float("nan"),
            index_bits_per_entry=bytes_on_disk["index"] * 8 / entries, index_floor_bits_per_entry=floor,
            value_bits_per_entry=bytes_on_disk["values"] * 8 / entries,
        )

    def table(self) -> str:
        lines = [f"steps {self.steps}, sample IDs {self.samples}"]
        lines += [f"  {name:<12} {size:>14,} bytes" for name, size in self.bytes_on_disk.items()]
        lines += [
            f"  {'total':<12} {self.total_bytes:>14,} bytes",
            f"  dense float32 equivalent {self.dense_bytes:,} bytes: {self.ratio:.1f}x smaller",
            f"  index {self.index_bits_per_entry:.2f} bits per kept entry (entropy floor "
            + (f"{self.index_floor_bits_per_entry:.2f}, {self.index_bits_per_entry / self.index_floor_bits_per_entry:.3f}x)"
               if self.index_floor_bits_per_entry > 0 else "0: keep=1 stores every position)"),
            f"  values {self.value_bits_per_entry:.2f} bits per kept entry",
        ]
        return "\n".join(lines)


def _entropy_bits(k: int, n: int) -> float:
    if k <= 0 or k >= n:
        return 0.0
    p = k / n
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) * n
