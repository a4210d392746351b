"""The main job: train a small CNN on the bundled digits with the recorder on, forget some
training samples by partial amnesiac unlearning, and show what changed. It leaves the stores, the
trained model's checkpoint and a file of more IDs in its folder (default ./pyunlearn-demo), and
prints the `pyunlearn forget` command that forgets those from the checkpoint."""
from __future__ import annotations

import contextlib
import sys
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
    store: str = "pyunlearn-demo"  # the folder it leaves its stores, checkpoint and ID file in
    progress: bool | None = None  # progress bars; None: when standard error is a terminal


def _check(config: DemoConfig, train_size: int) -> None:
    """Refuses a configuration before any work (training takes a while)."""
    from ._validate import positive_int, ratio

    positive_int("epochs", config.epochs)
    positive_int("batch_size", config.batch_size)
    ratio("keep", config.keep)
    positive_int("forget", config.forget)
    if config.forget > train_size:
        raise ValueError(f"forget must be at most the {train_size} training samples, got {config.forget}")


@contextlib.contextmanager
def _steps_bar(enabled: bool, total: int, desc: str):
    """A progress bar over every optimizer step taken inside the block (a global step hook:
    pyunlearn.models.train makes its own optimizer)."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step")
    hook = torch.optim.optimizer.register_optimizer_step_post_hook(lambda *_: bar.update())
    try:
        yield
    finally:
        hook.remove()
        bar.close()


def run(config: DemoConfig, out=print) -> dict:
    """Records one training run twice, pruned (keep) and dense (keep=1, float32, what Graves et
    al.'s amnesiac unlearning stores), then forgets the same samples from a copy of the model
    with each store."""
    progress = sys.stderr.isatty() if config.progress is None else bool(config.progress)
    torch.manual_seed(config.seed)
    train_set, test_set = split(digits(), 0.2, seed=config.seed)
    _check(config, len(train_set))
    rng = np.random.default_rng(config.seed)
    forget_ids = np.sort(rng.choice(train_set.ids.numpy(), size=config.forget, replace=False))
    parts = {"forgotten": train_set.with_ids(forget_ids), "retained": train_set.without(forget_ids), "test": test_set}

    root = Path(config.store)
    root.mkdir(parents=True, exist_ok=True)
    model = DigitsCNN()
    partial = UpdateStore.create(root / "partial.zarr", model, keep=config.keep, overwrite=True)
    dense = UpdateStore.create(root / "dense.zarr", model, keep=1.0, value_dtype="float32", overwrite=True)
    started = time.perf_counter()
    train(model, train_set, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
          seed=config.seed, stores=(partial, dense), progress=progress)
    train_seconds = time.perf_counter() - started
    results = {"trained": ([accuracy(model, s) for s in parts.values()], None, None)}
    methods = ((f"partial amnesiac (keep={config.keep})", partial), ("dense amnesiac (keep=1)", dense))
    if progress:
        from tqdm import tqdm

        methods = tqdm(methods, desc="forgetting (each store)", unit="store")
    for name, store in methods:
        copy = DigitsCNN()
        copy.load_state_dict(model.state_dict())
        report = amnesiac_forget(copy, store, forget_ids)
        results[name] = ([accuracy(copy, s) for s in parts.values()], report, store.stats())
        store.close()
    torch.save(model.state_dict(), root / "model.pt")  # the trained model: on both stores' timelines
    more = np.setdiff1d(train_set.ids.numpy(), forget_ids)[rng.permutation(len(train_set) - len(forget_ids))[:3]]
    (root / "more-ids.txt").write_text("".join(f"{i}\n" for i in np.sort(more)))
    # The goal: what a model trained without the forgotten samples would do (same seed, epochs).
    torch.manual_seed(config.seed)
    retained_steps = config.epochs * -(-len(parts["retained"]) // config.batch_size)
    with _steps_bar(progress, retained_steps, "retraining without them"):
        retrained = train(DigitsCNN(), parts["retained"], epochs=config.epochs, batch_size=config.batch_size,
                          lr=config.lr, seed=config.seed)
    results["retrained without them"] = ([accuracy(retrained, s) for s in parts.values()], None, None)

    steps = results[f"partial amnesiac (keep={config.keep})"][2].steps
    out(f"\nDigits (sklearn, {len(train_set)} train / {len(test_set)} test), DigitsCNN, {config.epochs} epochs "
        f"= {steps} steps, trained in {train_seconds:.1f} s while recording two stores")
    out(f"Forgetting {config.forget} random training samples (IDs {forget_ids[:5].tolist()}...):\n")
    out(f"{'':<30} {'acc. forgotten %':>16} {'retained %':>11} {'test %':>8} {'steps':>6} {'ms':>7} "
        f"{'store bytes':>12}")
    for name, (acc, report, stats) in results.items():
        extra = (f"{report.steps_removed:>6} {report.seconds * 1e3:>7.1f} {stats.total_bytes:>12,}"
                 if report else f"{'':>6} {'':>7} {'':>12}")
        out(f"{name:<30} {acc[0]:>16.1f} {acc[1]:>11.1f} {acc[2]:>8.1f} {extra}")
    out("acc. forgotten %: accuracy on the forgotten samples, to compare with the retrained model's (it is not a "
        "share forgotten); steps: subtracted; ms: to forget")
    stats = results[f"partial amnesiac (keep={config.keep})"][2]
    out(f"\nThe pruned store is {stats.ratio:.0f}x smaller than dense float32 updates ({stats.dense_bytes:,} bytes).")
    out(f"\nThe stores, the trained model and three more IDs are in {root}/. Forget those from the trained "
        "model's checkpoint (it has not had the request above applied, so its steps are subtracted too), then "
        "read the audit log:\n"
        f"  pyunlearn forget --store {root / 'partial.zarr'} --checkpoint {root / 'model.pt'} "
        f"--ids {root / 'more-ids.txt'} --out {root / 'forgotten.pt'}\n"
        f"  pyunlearn inspect {root / 'partial.zarr'} --ledger")
    return results
