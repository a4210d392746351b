"""A store's life in miniature for the timeline, key and command-line tests: `Year` trains
TinyNet segment by segment into a keep=1.0 float32 store keyed by strings, keeping its own
account of every step, so the expected weights of any model are a sum the test computes."""
from __future__ import annotations

import numpy as np
import torch

import pyunlearn as pu
from tests.support import TinyNet

SECRET = "a test secret of more than sixteen bytes"


def sample(key) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (x, y) per key (or int ID), whatever the order keys come in."""
    g = torch.Generator().manual_seed(int.from_bytes(str(key).encode()[-6:], "little"))
    return torch.randn(8, generator=g), torch.randint(0, 3, (), generator=g)


class Year:
    """Trains TinyNet with plain SGD into a keep=1.0 float32 store, segment by segment, and keeps
    its own account (independent of the ledger) of every step's update and batch, so the
    expected weights of any model are a sum the test computes itself."""

    def __init__(self, path):
        torch.manual_seed(0)
        self.model = TinyNet()
        self.initial = [p.detach().clone() for p in self.model.parameters()]
        self.store = pu.UpdateStore.create(path, self.model, keep=1.0, value_dtype="float32", secret=SECRET)
        self.updates: list[list[torch.Tensor]] = []  # per step, per parameter
        self.batches: list[set[str]] = []  # per step, its keys
        self.removed: set[int] = set()  # steps that held a key a request asked for

    def train(self, keys: list[str], *, seed: int) -> dict:
        """One segment: two epochs over `keys` in batches of 4; returns the model's state at its end."""
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)
        rng = np.random.default_rng(seed)
        with pu.UpdateRecorder(self.model, optimizer, self.store) as rec:
            for _ in range(2):
                order = rng.permutation(len(keys))
                for first in range(0, len(keys), 4):
                    self.step([keys[i] for i in order[first:first + 4]], optimizer, rec)
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def step(self, keys: list, optimizer, rec) -> None:
        """One recorded step on `keys`, its update and batch kept."""
        x = torch.stack([sample(k)[0] for k in keys])
        y = torch.stack([sample(k)[1] for k in keys])
        before = [p.detach().clone() for p in self.model.parameters()]
        rec.batch(keys)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(self.model(x), y).backward()
        optimizer.step()
        self.updates.append([p.detach() - b for p, b in zip(self.model.parameters(), before)])
        self.batches.append(set(keys))

    def request(self, keys: list[str]) -> None:
        self.removed |= {s for s, batch in enumerate(self.batches) if batch & set(keys)}

    def expected(self, steps: int) -> list[torch.Tensor]:
        """θ0 plus every update of a step below `steps` that no request removed."""
        out = [p.clone().double() for p in self.initial]
        for s in range(steps):
            if s not in self.removed:
                for o, u in zip(out, self.updates[s]):
                    o += u.double()
        return [o.float() for o in out]


def close(model, expected, atol=2e-5) -> bool:
    return all(torch.allclose(p.detach(), e, atol=atol, rtol=0) for p, e in zip(model.parameters(), expected))


def model_from(state: dict) -> TinyNet:
    model = TinyNet()
    model.load_state_dict(state)
    return model
