"""The main job: train a small CNN on the bundled digits with the recorder on, forget some
training samples by partial amnesiac unlearning, and show what changed."""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import SampleSet, digits, split
from .models import DigitsCNN, train
from .store import UpdateStore
from .unlearn import amnesiac_forget


@torch.no_grad()
def accuracy(model: nn.Module, data: SampleSet) -> float:
    if len(data) == 0:
        return float("nan")
    model.eval()
    correct = (model(data.x).argmax(1) == data.y).sum().item()
    model.train()
    return 100.0 * correct / len(data)


@dataclass
class DemoConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.05
    keep: float = 0.01
    forget: int = 10
    seed: int = 0
    store: str | None = None  # default: a temporary folder


def run(config: DemoConfig, out=print) -> dict:
    """Records one training run twice, pruned (keep) and dense (keep=1, float32, what Graves et
    al.'s amnesiac unlearning stores), then forgets the same samples from a copy of the model
    with each store."""
    torch.manual_seed(config.seed)
    train_set, test_set = split(digits(), 0.2, seed=config.seed)
    rng = np.random.default_rng(config.seed)
    forget_ids = np.sort(rng.choice(train_set.ids.numpy(), size=config.forget, replace=False))
    parts = {"forgotten": train_set.with_ids(forget_ids), "retained": train_set.without(forget_ids), "test": test_set}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(config.store) if config.store else Path(tmp)
        model = DigitsCNN()
        partial = UpdateStore.create(root / "partial.zarr", model, keep=config.keep, overwrite=True)
        dense = UpdateStore.create(root / "dense.zarr", model, keep=1.0, value_dtype="float32", overwrite=True)
        started = time.perf_counter()
        train(model, train_set, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
              seed=config.seed, stores=(partial, dense), progress=True)
        train_seconds = time.perf_counter() - started
        results = {"trained": ([accuracy(model, s) for s in parts.values()], None, None)}
        for name, store in ((f"partial amnesiac (keep={config.keep})", partial), ("dense amnesiac (keep=1)", dense)):
            copy = DigitsCNN()
            copy.load_state_dict(model.state_dict())
            report = amnesiac_forget(copy, store, forget_ids)
            results[name] = ([accuracy(copy, s) for s in parts.values()], report, store.stats())
            store.close()
    # The goal: what a model trained without the forgotten samples would do (same seed, epochs).
    torch.manual_seed(config.seed)
    retrained = train(DigitsCNN(), parts["retained"], epochs=config.epochs, batch_size=config.batch_size,
                      lr=config.lr, seed=config.seed)
    results["retrained without them"] = ([accuracy(retrained, s) for s in parts.values()], None, None)

    steps = results[f"partial amnesiac (keep={config.keep})"][2].steps
    out(f"\nDigits (sklearn, {len(train_set)} train / {len(test_set)} test), DigitsCNN, {config.epochs} epochs "
        f"= {steps} steps, trained in {train_seconds:.1f} s while recording two stores")
    out(f"Forgetting {config.forget} random training samples (IDs {forget_ids[:5].tolist()}...):\n")
    out(f"{'':<30} {'forgotten %':>11} {'retained %':>11} {'test %':>8} {'steps':>6} {'ms':>7} {'store bytes':>12}")
    for name, (acc, report, stats) in results.items():
        extra = (f"{report.steps_removed:>6} {report.seconds * 1e3:>7.1f} {stats.total_bytes:>12,}"
                 if report else f"{'':>6} {'':>7} {'':>12}")
        out(f"{name:<30} {acc[0]:>11.1f} {acc[1]:>11.1f} {acc[2]:>8.1f} {extra}")
    stats = results[f"partial amnesiac (keep={config.keep})"][2]
    out(f"\nThe pruned store is {stats.ratio:.0f}x smaller than dense float32 updates ({stats.dense_bytes:,} bytes).")
    return results
