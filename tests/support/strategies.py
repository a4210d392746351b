"""Hypothesis strategies for layer sets: shapes, values with ties, zeros, denormals, k."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

DENORMAL = np.float32(1e-40)


@st.composite
def layer_values(draw, numel: int) -> np.ndarray:
    """Δ values of one layer, drawn from a mix meant to break selection: a few distinct
    magnitudes (many ties), signs, zeros, denormals, and ordinary normals at any scale."""
    kind = draw(st.sampled_from(["normal", "ties", "zeros", "denormal", "mixed"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "normal":
        scale = 10.0 ** draw(st.integers(-30, 30))
        return (rng.standard_normal(numel) * scale).astype(np.float32)
    if kind == "ties":
        levels = np.array(draw(st.lists(st.floats(-4, 4, width=32), min_size=1, max_size=4)), dtype=np.float32)
        return rng.choice(levels, numel).astype(np.float32)
    if kind == "zeros":
        return np.zeros(numel, dtype=np.float32)
    if kind == "denormal":
        return (rng.integers(-3, 4, numel) * DENORMAL).astype(np.float32)
    parts = [rng.standard_normal(numel).astype(np.float32), np.zeros(numel, np.float32),
             (rng.integers(-3, 4, numel) * DENORMAL).astype(np.float32),
             np.full(numel, -2.5, np.float32)]
    return np.choose(rng.integers(0, 4, numel), parts).astype(np.float32)


@st.composite
def step(draw, max_layers: int = 5, max_numel: int = 3000):
    """(before, after, k): a layer set whose update after − before is exactly the drawn Δ
    wherever that is representable (before is 0 for half the draws, random otherwise)."""
    count = draw(st.integers(1, max_layers))
    numels = [draw(st.one_of(st.just(1), st.integers(1, max_numel))) for _ in range(count)]
    before, after, k = [], [], []
    for n in numels:
        delta = torch.from_numpy(draw(layer_values(n)))
        if draw(st.booleans()):
            base = torch.zeros(n)
        else:
            base = torch.from_numpy(np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(n).astype(np.float32))
        shape = (n,) if n % 2 else (2, n // 2) if n > 1 else (1,)
        before.append(base.reshape(shape))
        after.append((base + delta).reshape(shape))
        k.append(draw(st.one_of(st.just(0), st.just(n), st.integers(0, n))))
    return before, after, k
