"""The kernels: pruning each step's update to its top-k entries, subtracting stored rows, and
fingerprinting a model. The public face is `pyunlearn.kernels.ops` (re-exported here); the
backend of each device (native, reference, torch ops, CUDA) is chosen in `backends`.

    from pyunlearn import kernels
    row = kernels.prune_topk(before, after, k)
    kernels.subtract_sparse(params, row, k)
    kernels.supports("cuda")
"""
from .fingerprints import Fingerprints, fingerprint, same_model
from .ops import (DevicePruner, Pruner, Support, as_float32_work, backend, decode_row, k_for, kernel_ready,
                  prune_topk, prune_topk_reference, subtract_sparse, subtract_sparse_reference, supports)
from .row import Row

__all__ = ["Row", "prune_topk", "Pruner", "DevicePruner", "subtract_sparse", "k_for", "decode_row", "backend",
           "supports", "Support", "prune_topk_reference", "subtract_sparse_reference", "kernel_ready",
           "as_float32_work", "fingerprint", "same_model", "Fingerprints"]
