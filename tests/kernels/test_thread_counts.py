"""An absurd thread count is refused at the boundary with a message (issue 24, case 10), not
turned into per-thread scratch that exhausts memory inside OpenMP (a segfault before)."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("threads", [-1, 1025, 100000])
def test_the_native_module_refuses_absurd_thread_counts(native, threads):
    buffers = [np.arange(64, dtype=np.float32)]
    with pytest.raises(ValueError, match=f"threads must be 0 .* or between 1 and 1024, got {threads}"):
        native.fingerprint(buffers, threads=threads)
    before = [np.zeros(64, dtype=np.float32)]
    k, n = [4], 4
    out = (np.empty(n, np.uint32), np.empty(n, np.float32), np.empty(1, np.float32))
    with pytest.raises(ValueError, match="threads must be"):
        native.prune_topk(before, buffers, k, *out, True, threads=threads)
    assert native.fingerprint(buffers, threads=2) == native.fingerprint(buffers, threads=1)
