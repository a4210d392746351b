"""Sample IDs as the store and recorder take them: a 1-D int64 numpy array."""
from __future__ import annotations

import numpy as np
import numpy.ma  # noqa: F401  numpy's unique imports it at its first call (6-9 ms): a store's first lookup paid that
import torch


def as_ids(ids, arg: str = "ids", *, allow_empty: bool = False) -> np.ndarray:
    """ints, a sequence of ints, an integer numpy array or tensor → 1-D int64 numpy array."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{arg} must hold integers, got a {ids.dtype} tensor")
        ids = ids.detach().cpu().numpy()
    elif isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        ids = np.array([ids])
    else:
        try:
            ids = np.asarray(ids)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{arg} must be integer sample IDs: {exc}") from None
    if ids.size == 0:  # [] comes out of numpy as float64
        ids = ids.astype(np.int64)
    if ids.dtype == object or ids.dtype.kind not in "iu":
        raise TypeError(f"{arg} must hold integers (int64 sample IDs), got dtype {ids.dtype}")
    if ids.ndim > 1:
        raise ValueError(f"{arg} must be 1-D, got shape {ids.shape}")
    if ids.dtype.kind == "u" and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{arg} holds values beyond int64")
    ids = ids.reshape(-1).astype(np.int64, copy=False)
    if not allow_empty and ids.size == 0:
        raise ValueError(f"{arg} is empty: pass at least one sample ID")
    return ids
