"""Kernel benchmark: native prune_topk / subtract_sparse / fingerprint against their baselines
and floors, and the recorder's per-step Pruner call, one run.

    python benchmarks/bench_kernels.py [--repeats N] [--rows S] [--keep 0.01 0.1] [--out FILE]

ResNet-18-shaped parameters (the 62 tensors of a CIFAR ResNet-18, 11.17M float32 values); the
Pruner on the demo's DigitsCNN (6k values). Prints tables with the baseline beside each kernel,
the ratio, and the floor where there is one; writes the same numbers as JSON (default
benchmarks/results/kernels.json, with the run's machine and versions under "meta") so runs can
be compared across commits. Times are the best of N rounds (contenders interleaved); medians
are in the JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pyunlearn import __version__
from pyunlearn.kernels import ops
from _support import resnet18_cifar_shapes

import kernels  # a sibling: Python puts the script's folder first on sys.path


@dataclass
class Config:
    keeps: tuple[float, ...] = (0.01, 0.1)
    repeats: int = 15
    rows: int = 64
    pruner_keep: float = 0.01  # the demo's
    pruner_rounds: int = 3000


@dataclass
class Timing:
    best_ms: float
    median_ms: float


@dataclass
class Result:
    kernel: str
    keep: float
    native: Timing
    baseline: str
    baseline_time: Timing
    speedup: float  # baseline / native
    floor: Timing | None = None
    vs_floor: float | None = None  # native / floor


@dataclass
class Fingerprint:
    """One model's fingerprint: sha256 (before format 4) and xh128 (format 4) against xxh3 (now), in ms."""

    sha256: Timing
    xxh3: Timing  # fingerprint(params): XXH3-128 (xxhash), through the Python API
    xh128: Timing  # fingerprint(params, like="xh128:"): the native hash on all threads
    xh128_native_1_thread: Timing  # the bare native hash on one thread
    xh128_native_all_threads: Timing
    speedup: float  # sha256 / xxh3, best times


@dataclass
class Micros:
    best_us: float
    median_us: float


@dataclass
class PerCall:
    """The recorder's prune per optimizer step on DigitsCNN."""

    keep: float
    pruner: Micros
    bare_native: Micros  # _native.prune_topk on prepared arrays
    overhead_us: float  # pruner − bare, best times


def race(contenders: dict, repeats: int) -> dict[str, Timing]:
    """Times the contenders in turn, round after round, so a slow spell of a shared machine
    hits them alike. Each gets one untimed warm-up call (first-touch page faults)."""
    samples = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing(round(min(s), 4), round(statistics.median(s), 4)) for name, s in samples.items()}


def run(config: Config) -> list[Result]:
    """The kernels: prune and subtract at each keep."""
    results = []
    for keep in config.keeps:
        work = kernels.resnet18_workload(keep, config.rows)
        native_state, torch_state = kernels.Alternating(work), kernels.Alternating(work)
        t = race({"native": lambda: kernels.prune_native(work, native_state),
                  "baseline": lambda: kernels.prune_torch(work, torch_state),
                  "floor": kernels.StreamingFloor(work)}, config.repeats)
        results.append(Result("prune_topk (fused, refresh)", keep, t["native"], "torch.topk per layer", t["baseline"],
                              round(t["baseline"].best_ms / t["native"].best_ms, 2), t["floor"],
                              round(t["native"].best_ms / t["floor"].best_ms, 2)))
        params = [a.clone() for a in work.after[0]]
        t = race({"native": lambda: kernels.subtract_native(work, params),
                  "baseline": lambda: kernels.subtract_index_add(work, params),
                  "floor": kernels.SubtractFloor(work, params)}, config.repeats)
        results.append(Result(f"subtract_sparse ({config.rows} rows)", keep, t["native"],
                              "index_add_ per layer and row", t["baseline"],
                              round(t["baseline"].best_ms / t["native"].best_ms, 2), t["floor"],
                              round(t["native"].best_ms / t["floor"].best_ms, 2)))
    return results


def run_fingerprint(config: Config) -> Fingerprint:
    params = kernels.fingerprint_params(resnet18_cifar_shapes())
    t = race({"sha256": lambda: kernels.fingerprint_sha256(params),
              "xxh3": lambda: kernels.fingerprint_xxh3(params),
              "xh128": lambda: kernels.fingerprint_xh128(params),
              "native-1": kernels.Xh128Native(params, 1),
              "native-all": kernels.Xh128Native(params, 0)}, config.repeats)
    return Fingerprint(t["sha256"], t["xxh3"], t["xh128"], t["native-1"], t["native-all"],
                       round(t["sha256"].best_ms / t["xxh3"].best_ms, 2))


def run_pruner(config: Config) -> PerCall:
    call = kernels.PrunerCall(config.pruner_keep)
    t = race({"pruner": call.pruner_call, "bare": call.bare_call}, config.pruner_rounds)
    us = {name: Micros(round(x.best_ms * 1e3, 2), round(x.median_ms * 1e3, 2)) for name, x in t.items()}
    return PerCall(config.pruner_keep, us["pruner"], us["bare"], round(us["pruner"].best_us - us["bare"].best_us, 2))


def table(results: list[Result], fingerprint: Fingerprint | None = None, per_call: PerCall | None = None) -> str:
    lines = [
        f"{'kernel':<30} {'keep':>5} {'native ms':>10} {'baseline ms':>12} {'speedup':>8} {'floor ms':>9} {'/floor':>7}",
        "-" * 87,
    ]
    for r in results:
        floor = f"{r.floor.best_ms:>9.2f} {r.vs_floor:>6.2f}x" if r.floor else f"{'':>9} {'':>7}"
        lines.append(f"{r.kernel:<30} {r.keep:>5} {r.native.best_ms:>10.2f} {r.baseline_time.best_ms:>12.2f} "
                     f"{r.speedup:>7.1f}x {floor}")
    if fingerprint is not None:
        f = fingerprint
        lines += ["", "fingerprint of the ResNet-18 shapes (ms, best / median)",
                  f"  sha256 (before format 4)   {f.sha256.best_ms:>8.2f} / {f.sha256.median_ms:.2f}",
                  f"  xxh3 (fingerprint())       {f.xxh3.best_ms:>8.2f} / {f.xxh3.median_ms:.2f}   "
                  f"{f.speedup:.1f}x faster",
                  f"  xh128 (format 4)           {f.xh128.best_ms:>8.2f} / {f.xh128.median_ms:.2f}",
                  f"  xh128 native, all threads  {f.xh128_native_all_threads.best_ms:>8.2f} / "
                  f"{f.xh128_native_all_threads.median_ms:.2f}",
                  f"  xh128 native, 1 thread     {f.xh128_native_1_thread.best_ms:>8.2f} / "
                  f"{f.xh128_native_1_thread.median_ms:.2f}"]
    if per_call is not None:
        p = per_call
        lines += ["", f"recorder prune per step, DigitsCNN at keep {p.keep} (us, best / median)",
                  f"  Pruner call                {p.pruner.best_us:>8.2f} / {p.pruner.median_us:.2f}",
                  f"  bare native prune_topk     {p.bare_native.best_us:>8.2f} / {p.bare_native.median_us:.2f}"
                  f"   (Pruner overhead {p.overhead_us:.2f} us)"]
    return "\n".join(lines)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "pyunlearn": __version__, "kernels": ops.backend(), "python": platform.python_version()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=Config.repeats)
    parser.add_argument("--rows", type=int, default=Config.rows)
    parser.add_argument("--keep", type=float, nargs="+", default=list(Config.keeps))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "kernels.json")
    args = parser.parse_args(argv)
    config = Config(tuple(args.keep), args.repeats, args.rows)
    info = machine()
    print(f"ResNet-18-shaped parameters (62 tensors, 11.17M values); {info['kernels']}; "
          f"torch {info['torch']} on {info['torch_threads']} threads; {info['cpu']}")
    results = run(config)
    fingerprint = run_fingerprint(config)
    per_call = run_pruner(config)
    print(table(results, fingerprint, per_call))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from _meta import run_metadata  # benchmarks/ is on sys.path (see kernels above)

    args.out.write_text(json.dumps({"meta": run_metadata(asdict(config)), "machine": info, "config": asdict(config),
                                    "results": [asdict(r) for r in results], "fingerprint": asdict(fingerprint),
                                    "per_call": asdict(per_call)}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
