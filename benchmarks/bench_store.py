"""Store and recorder benchmark, one run:

  1. bytes per step at keep 0.01 / 0.05 / 0.1 (float16 values) against dense float32 updates
     and against the entropy floor of the positions, on a real training run (DigitsCNN on the
     bundled digits, 10 epochs) and on ResNet-18-shaped parameters with synthetic steps;
  2. training step time of the CNN with and without the recorder;
  3. amnesiac_forget latency for 1, 10 and 100 IDs from the 10-epoch CNN store, and for 1 ID
     from the ResNet-18-shaped store.

    python benchmarks/bench_store.py [--out FILE] [--resnet-steps N]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import pyunlearn as pu
from pyunlearn.data import digits, split
from pyunlearn.models import DigitsCNN, train
from _support import resnet18_cifar_shapes

KEEPS = (0.01, 0.05, 0.1)


@dataclass
class SizeResult:
    model: str
    keep: float
    steps: int
    bytes_per_step: float
    dense_bytes_per_step: float
    smaller_than_dense: float
    index_bits: float
    index_floor_bits: float
    index_vs_floor: float
    value_bits: float


def size_result(model: str, store: pu.UpdateStore) -> SizeResult:
    s = store.stats()
    return SizeResult(model, store.keep, s.steps, s.total_bytes / s.steps, s.dense_bytes / s.steps,
                      round(s.ratio, 1), round(s.index_bits_per_entry, 3), round(s.index_floor_bits_per_entry, 3),
                      round(s.index_bits_per_entry / s.index_floor_bits_per_entry, 3), round(s.value_bits_per_entry, 3))


def cnn_stores(root: Path, epochs: int = 10):
    """One training run of the digits CNN, recorded at every keep at once."""
    torch.manual_seed(0)
    train_set, _ = split(digits(), 0.2, seed=0)
    model = DigitsCNN()
    stores = [pu.UpdateStore.create(root / f"cnn-{keep}.zarr", model, keep=keep) for keep in KEEPS]
    train(model, train_set, epochs=epochs, batch_size=32, lr=0.05, seed=0, stores=tuple(stores))
    return model, stores, train_set


def resnet_store(root, keep: float, steps: int, *, storage_options=None):
    """Synthetic SGD-like steps on ResNet-18-shaped parameters, recorded the way the recorder
    does (prune with refresh, append), with 32 sample IDs per step. `root`: a folder or URL."""
    shapes = resnet18_cifar_shapes()
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Module()
    for i, (_, shape) in enumerate(shapes):
        model.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(shape, generator=gen)))
    store = pu.UpdateStore.create(f"{root}/resnet-{keep}.zarr", model, keep=keep, storage_options=storage_options)
    params = [p.detach() for p in store.check_model(model)]
    snapshot = [p.clone() for p in params]
    for step in range(steps):
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen), alpha=1e-3)
        store.append(pu.kernels.prune_topk(snapshot, params, store.k), np.arange(step * 32, step * 32 + 32))
    store.mark_final(model)
    return model, store


def step_times(epochs: int = 10, repeats: int = 5) -> dict:
    """Training step time of the digits CNN (batch 32, SGD with momentum) without and with
    recording at keep 0.01, runs interleaved so a slow spell of the machine hits both. The
    steady-state step time excludes the one-off costs of creating the store and closing the
    recorder (final flush, fingerprint), which are reported apart."""
    train_set, _ = split(digits(), 0.2, seed=0)
    samples = {"without recorder": [], "with recorder": []}
    one_off = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for name in samples:
                torch.manual_seed(0)
                model = DigitsCNN()
                optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
                start = time.perf_counter()
                recorder = None
                if name == "with recorder":
                    store = pu.UpdateStore.create(Path(tmp) / f"{r}.zarr", model, keep=0.01)
                    recorder = pu.UpdateRecorder(model, optimizer, store)
                opened = time.perf_counter()
                gen, steps = torch.Generator().manual_seed(0), 0
                for _ in range(epochs):
                    for ids, x, y in train_set.batches(32, generator=gen):
                        if recorder is not None:
                            recorder.batch(ids)
                        optimizer.zero_grad()
                        torch.nn.functional.cross_entropy(model(x), y).backward()
                        optimizer.step()
                        steps += 1
                trained = time.perf_counter()
                samples[name].append((trained - opened) / steps)
                if recorder is not None:
                    recorder.close()
                    store.close()
                    one_off.append((opened - start) + (time.perf_counter() - trained))
    out = {name: {"best_ms": round(min(v) * 1e3, 4), "median_ms": round(statistics.median(v) * 1e3, 4)}
           for name, v in samples.items()}
    out["steps"] = steps
    out["create_and_close_ms"] = round(statistics.median(one_off) * 1e3, 1)
    return out


def forget_latency(model, store, candidates: np.ndarray, counts=(1, 10, 100), repeats: int = 5) -> dict:
    """Median seconds of amnesiac_forget on a fresh copy of the final model, per ID count."""
    out = {}
    rng = np.random.default_rng(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # Each trial starts from the store as recording left it: the trial's deletion is undone after
    # it (store.undo: its steps count as not removed again), so no trial subtracts another's steps.
    for n in counts:
        times, steps = [], []
        for _ in range(repeats):
            model.load_state_dict(state)  # the original final model: on the timeline, nothing in effect
            report = pu.amnesiac_forget(model, store, rng.choice(candidates, n, replace=False))
            times.append(report.seconds)
            steps.append(report.steps_removed)
            store.undo(report.record, "a benchmark trial")
        out[n] = {"median_s": round(statistics.median(times), 4), "steps_removed": int(np.median(steps))}
    model.load_state_dict(state)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "store.json")
    parser.add_argument("--resnet-steps", type=int, default=24)
    args = parser.parse_args(argv)
    results = {"kernels": pu.kernels.backend(), "sizes": [], "step_time": None, "forget": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, stores, train_set = cnn_stores(root)
        results["sizes"] += [asdict(size_result("DigitsCNN (5.9k params), 10 epochs", s)) for s in stores]
        results["forget"]["DigitsCNN keep=0.01, 450 steps"] = forget_latency(model, stores[0], train_set.ids.numpy())
        for keep in KEEPS:
            resnet, store = resnet_store(root, keep, args.resnet_steps)
            results["sizes"].append(asdict(size_result("ResNet-18 shapes (11.2M), synthetic steps", store)))
            if keep == 0.01:
                results["forget"][f"ResNet-18 shapes keep=0.01, {store.steps} steps"] = forget_latency(
                    resnet, store, np.arange(store.samples), counts=(1,), repeats=3)
    results["step_time"] = step_times()

    print(f"kernels: {results['kernels']}\n")
    print(f"{'model':<38} {'keep':>5} {'bytes/step':>11} {'dense/step':>11} {'smaller':>8} "
          f"{'index bits':>10} {'floor':>6} {'/floor':>7} {'value bits':>10}")
    for r in results["sizes"]:
        print(f"{r['model']:<38} {r['keep']:>5} {r['bytes_per_step']:>11,.0f} {r['dense_bytes_per_step']:>11,.0f} "
              f"{r['smaller_than_dense']:>7.1f}x {r['index_bits']:>10.2f} {r['index_floor_bits']:>6.2f} "
              f"{r['index_vs_floor']:>6.3f}x {r['value_bits']:>10.2f}")
    st = results["step_time"]
    overhead = st["with recorder"]["best_ms"] / st["without recorder"]["best_ms"] - 1
    results["recording_overhead"] = round(overhead, 4)
    print(f"\nDigitsCNN training step ({st['steps']} steps): {st['without recorder']['best_ms']:.3f} ms without "
          f"recorder, {st['with recorder']['best_ms']:.3f} ms with (keep 0.01): overhead {overhead * 100:+.1f}% "
          f"(best of 5; medians {st['without recorder']['median_ms']:.3f} / {st['with recorder']['median_ms']:.3f} ms); "
          f"creating the store and closing the recorder once: {st['create_and_close_ms']:.0f} ms")
    print("\namnesiac_forget latency (median):")
    for name, by_count in results["forget"].items():
        cells = ", ".join(f"{n} IDs {v['median_s'] * 1e3:.1f} ms ({v['steps_removed']} steps)" for n, v in by_count.items())
        print(f"  {name}: {cells}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from _meta import run_metadata  # benchmarks/, the script's folder, is on sys.path

    meta = run_metadata({"resnet_steps": args.resnet_steps, "keeps": list(KEEPS), "value_dtype": "float16"})
    args.out.write_text(json.dumps({"meta": meta, **results}, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
