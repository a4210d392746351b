"""How the store scales: forget latency, peak memory, bytes read and open + first lookup against
store size; the write rate against the codec's own encode time; the recorder's overhead on a
training step.

    python benchmarks/bench_scale.py [--quick] [--out benchmarks/results/scale.json]

Stores: 1k, 10k and 100k steps of a ~100k-parameter model (keep 0.01, batches of 32 IDs from a
fixed set of 32,000 samples, so 1k steps are one epoch and an ID is in one step per epoch) and
1k steps of ResNet-18 shapes. Rows are synthetic (a pool of pruned random steps, cycled): their
content does not change what is read. Each forget runs in a fresh process (open, lookup, read,
subtract, ledger write) so its peak-memory growth is its own; bytes read are counted by
wrapping the zarr store. Open + first lookup is timed twice: as the process's first zarr use
(cold) and with a second handle (warm, what a running service pays). --quick skips the 100k-step store (for a smoke run)."""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import pyunlearn as pu
from _support import resnet18_cifar_shapes

try:
    from _meta import run_metadata
except ImportError:  # run from elsewhere
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _meta import run_metadata

SAMPLES = 32_000
BATCH = 32
SMALL_SHAPES = [("fc1.weight", (256, 320)), ("fc1.bias", (256,)), ("fc2.weight", (64, 256)), ("fc2.bias", (64,)),
                ("out.weight", (10, 64)), ("out.bias", (10,))]  # 99,274 parameters


class Shaped(torch.nn.Module):
    """Parameters of the given shapes (names with dots kept via nested modules)."""

    def __init__(self, shapes, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        for name, shape in shapes:
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.05))


def row_pool(model, keep, count=64, seed=0):
    params = [p.detach() for p in model.parameters()]
    k = pu.kernels.k_for([p.numel() for p in params], keep)
    gen = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(count):
        after = [p + 1e-3 * torch.randn(p.shape, generator=gen) for p in params]
        pool.append(pu.kernels.prune_topk([p.clone() for p in params], after, k, refresh=False))
    return pool


def build(path: Path, shapes, steps: int, keep=0.01) -> dict:
    """A store of `steps` synthetic steps; returns its write rate and size."""
    model = Shaped(shapes)
    pool = row_pool(model, keep)
    store = pu.UpdateStore.create(path, model, keep=keep)
    rng = np.random.default_rng(0)
    order = rng.permutation(SAMPLES)
    start = time.perf_counter()
    for s in range(steps):
        if s and s % (SAMPLES // BATCH) == 0:
            order = rng.permutation(SAMPLES)
        first = (s % (SAMPLES // BATCH)) * BATCH
        store.append(pool[s % len(pool)], order[first : first + BATCH])
    store.flush()
    seconds = time.perf_counter() - start
    store.mark_final(model)
    stats = store.stats()
    store.close()
    torch.save(model.state_dict(), path.parent / f"{path.stem}.pt")
    return {"steps": steps, "write_steps_per_s": round(steps / seconds, 1), "bytes": stats.total_bytes,
            "smaller_than_dense": round(stats.ratio, 1)}


_FORGET = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np, torch
import zarr
from zarr.storage import LocalStore
import pyunlearn as pu
sys.path.insert(0, sys.argv[4])
from bench_scale import Shaped, SMALL_SHAPES
from _support import resnet18_cifar_shapes

class Counting(LocalStore):
    read = 0
    async def get(self, key, prototype, byte_range=None):
        buf = await super().get(key, prototype, byte_range)
        if buf is not None:
            Counting.read += len(buf)
        return buf

path, shapes, n_ids = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
model = Shaped(resnet18_cifar_shapes() if shapes == "resnet" else SMALL_SHAPES)
model.load_state_dict(torch.load(path.parent / f"{path.stem}.pt", weights_only=True))
ids = np.random.default_rng(n_ids).choice(32000, n_ids, replace=False)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
store = pu.UpdateStore.open(Counting(str(path)))
found = store.steps_for(ids[:1])
t_lookup = time.perf_counter() - t0  # cold: includes zarr's one-time start in this process
t0 = time.perf_counter()
store = pu.UpdateStore.open(Counting(str(path)))  # a second handle: what a running service pays
found = store.steps_for(ids[:1])
t_warm = time.perf_counter() - t0
from pyunlearn.store import shards as _shards
Counting.read, _shards.BYTES_READ_LOCALLY[0] = 0, 0  # rows are read from the files directly, past the store
t1 = time.perf_counter()
report = pu.amnesiac_forget(model, store, ids)
t_forget = time.perf_counter() - t1
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"open_first_lookup_ms": t_lookup * 1e3, "open_first_lookup_warm_ms": t_warm * 1e3,
                  "forget_ms": t_forget * 1e3,
                  "steps_touched": report.steps_applied, "bytes_read": Counting.read + _shards.BYTES_READ_LOCALLY[0],
                  "peak_growth_mb": (peak - base) / 1024}))
"""


def forget_once(path: Path, shapes: str, n_ids: int) -> dict:
    pristine = (path / "zarr.json").read_bytes()
    try:
        out = subprocess.run([sys.executable, "-c", _FORGET, str(path), shapes, str(n_ids),
                              str(Path(__file__).resolve().parent)], capture_output=True, text=True, check=True)
    finally:
        (path / "zarr.json").write_bytes(pristine)  # every trial forgets from the store as recorded
        lock = path / "writer.lock"
        if lock.exists():
            lock.unlink()
    return json.loads(out.stdout.strip().splitlines()[-1])


def encode_only(path: Path, compression: str) -> float:
    """Seconds the codec alone takes for the store's row bytes (blosc + crc32c per inner chunk)."""
    import zarr
    from numcodecs import Blosc

    name, level = compression.split(":")
    codec = Blosc(cname=name, clevel=int(level), shuffle=Blosc.SHUFFLE)
    group = zarr.open_group(path, mode="r")
    n = dict(group.attrs)["committed_steps"]
    inner = dict(group.attrs)["inner_steps"]
    total = 0.0
    for array in ("values", "index", "scales"):
        data = group[array][:n]
        start = time.perf_counter()
        for s in range(0, n, inner):
            codec.encode(np.ascontiguousarray(data[s : s + inner]))
        total += time.perf_counter() - start
    return total


WRITE_ROUNDS = 3


def write_against_encode(path: Path, shapes, steps: int, first: dict, rounds: int) -> dict:
    """The store's write rate against its codec's own encode rate, in `rounds` rounds: each a
    build (the first round's is `first`, built at `path`; the others are built beside it and
    removed) then the encode of that build's rows, so a busy spell hits both halves of a round.
    The ratio (encode rate / write rate) per round, best and median."""
    compression = json.loads((path / "zarr.json").read_text())["attributes"]["compression"]
    again = path.with_name(f"again-{path.name}")
    writes, encodes = [], []
    for r in range(rounds):
        built, where = (first, path) if r == 0 else (build(again, shapes, steps), again)
        writes.append(built["write_steps_per_s"])
        encodes.append(round(steps / encode_only(where, compression), 1))
        if where == again:
            shutil.rmtree(again)
            again.with_suffix(".pt").unlink()
    ratios = [e / w for e, w in zip(encodes, writes)]
    return {"write_steps_per_s_rounds": writes, "encode_only_steps_per_s_rounds": encodes,
            "write_over_encode_rounds": [round(x, 3) for x in ratios],
            "write_over_encode": round(min(ratios), 2), "write_over_encode_median": round(statistics.median(ratios), 2)}


def step_overhead(model_fn, batch_fn, steps: int, rounds: int) -> dict:
    """Training-step time with and without the recorder: rounds of (plain, recorded), each a fresh
    model; best and median of the step times, the median of the per-round ratios (the two runs of
    a round are adjacent, so a busy spell hits both), and the training thread's own CPU time. The
    batches' sample IDs exist before timing in both modes, as a data loader hands them over."""
    import torch.nn.functional as F

    times = {"plain": [], "recorded": []}
    cpu = {"plain": [], "recorded": []}
    ids = [torch.arange(BATCH) + s * BATCH for s in range(steps + 2)]
    for r in range(rounds):
        for mode in ("plain", "recorded"):
            torch.manual_seed(r)
            model = model_fn()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            x, y = batch_fn()
            with tempfile.TemporaryDirectory() as tmp:
                rec = None
                if mode == "recorded":
                    store = pu.UpdateStore.create(Path(tmp) / "s.zarr", model, keep=0.01)
                    rec = pu.UpdateRecorder(model, opt, store)
                for s in range(steps + 2):
                    if s == 2:
                        start, start_cpu = time.perf_counter(), time.thread_time()  # after warm-up
                    if rec is not None:
                        rec.batch(ids[s])
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
                elapsed, elapsed_cpu = (time.perf_counter() - start) / steps, (time.thread_time() - start_cpu) / steps
                if rec is not None:
                    rec.close()
                    store.close()
            times[mode].append(elapsed)
            cpu[mode].append(elapsed_cpu)
    best = {m: min(v) for m, v in times.items()}
    med = {m: statistics.median(v) for m, v in times.items()}
    ratios = [r / p for r, p in zip(times["recorded"], times["plain"])]
    cpu_ratios = [r / p for r, p in zip(cpu["recorded"], cpu["plain"])]
    return {"plain_ms": round(best["plain"] * 1e3, 3), "recorded_ms": round(best["recorded"] * 1e3, 3),
            "overhead_best": round(best["recorded"] / best["plain"] - 1, 4),
            "overhead_median": round(med["recorded"] / med["plain"] - 1, 4),
            "overhead_median_of_round_ratios": round(statistics.median(ratios) - 1, 4),
            "training_thread_cpu_overhead_median": round(statistics.median(cpu_ratios) - 1, 4)}


def resnet18():
    """A CIFAR ResNet-18 (3×3 stem), for the step-overhead measurement."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, i, o, stride):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o)
            self.conv2, self.bn2 = nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o)
            self.shortcut = nn.Sequential() if stride == 1 and i == o else \
                nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    layers, i = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
    for o, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(i, o, stride), Block(o, o, 1)]
        i = o
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "scale.json")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    sizes = [1_000, 10_000] + ([] if args.quick else [100_000])
    id_counts = (1, 100, 10_000)
    results = {"meta": run_metadata({"sizes": sizes, "ids": id_counts, "samples": SAMPLES, "batch": BATCH,
                                     "keep": 0.01, "small_params": sum(math.prod(s) for _, s in SMALL_SHAPES)}),
               "stores": {}, "forget": [], "overhead": {}}
    with tempfile.TemporaryDirectory() as tmp:
        stores = [(f"small-{n}", SMALL_SHAPES, "small", n) for n in sizes] + \
                 [("resnet-1000", resnet18_cifar_shapes(), "resnet", 1000)]
        for name, shapes, kind, steps in stores:
            path = Path(tmp) / f"{name}.zarr"
            built = build(path, shapes, steps)
            if kind == "resnet":
                built.update(write_against_encode(path, shapes, steps, built, WRITE_ROUNDS))
            results["stores"][name] = built
            print(name, built, flush=True)
            for n_ids in id_counts:
                trials = [forget_once(path, kind, n_ids) for _ in range(3)]
                best = min(trials, key=lambda t: t["forget_ms"])
                row = {"store": name, "steps": steps, "ids": n_ids,
                       "forget_ms_best": round(best["forget_ms"], 1),
                       "forget_ms_median": round(statistics.median(t["forget_ms"] for t in trials), 1),
                       "open_first_lookup_ms_best": round(min(t["open_first_lookup_ms"] for t in trials), 1),
                       "open_first_lookup_warm_ms_best": round(min(t["open_first_lookup_warm_ms"] for t in trials), 1),
                       "peak_growth_mb_max": round(max(t["peak_growth_mb"] for t in trials), 1),
                       "bytes_read": best["bytes_read"], "steps_touched": best["steps_touched"]}
                results["forget"].append(row)
                print(row, flush=True)
    small = [r for r in results["forget"] if r["store"].startswith("small") and r["steps_touched"] > 0]
    for n_ids in id_counts:
        pts = [(math.log(r["steps_touched"]), math.log(r["forget_ms_best"])) for r in small if r["ids"] == n_ids]
        if len(pts) >= 2:
            xs, ys = zip(*pts)
            results.setdefault("exponent_vs_steps_touched", {})[n_ids] = round(float(np.polyfit(xs, ys, 1)[0]), 2)
    from pyunlearn.models import DigitsCNN

    results["overhead"]["digits_cnn"] = step_overhead(
        DigitsCNN, lambda: (torch.randn(BATCH, 1, 8, 8), torch.randint(0, 10, (BATCH,))), steps=400, rounds=9)
    results["overhead"]["resnet18_cpu"] = step_overhead(
        resnet18, lambda: (torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))), steps=5, rounds=5)
    print(results["overhead"], results.get("exponent_vs_steps_touched"), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    return 0


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for n_ids in sorted({r["ids"] for r in results["forget"]}):
        rows = [r for r in results["forget"] if r["ids"] == n_ids and r["store"].startswith("small")]
        ax.plot([r["steps"] for r in rows], [r["forget_ms_best"] for r in rows], "o-", label=f"forget {n_ids} IDs")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("store size (steps, ~100k-parameter model)")
    ax.set_ylabel("amnesiac_forget latency (ms, best of 3)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
