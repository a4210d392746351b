"""The pruned update of one optimizer step, as prune_topk writes it and the store keeps it."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Row(NamedTuple):
    """One step's pruned update (1-D fields) or a stack of steps (2-D, one row per step).

    Layer i owns positions [offset_i, offset_i + k_i) of `index` and `values`, offset_i = sum of
    the k before it. `index` holds gaps: the first is idx_0 + 1, then idx_j − idx_{j−1}, so a
    running sum minus one gives the positions back. The update is values · scales[i].
    """

    index: torch.Tensor  # uint32 gaps
    values: torch.Tensor  # float16 (divided by the layer's scale) or float32 (the exact Δ)
    scales: torch.Tensor  # float32, one per layer; 1 for float32 values
