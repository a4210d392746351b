"""Recording throughput and amnesiac_forget latency: S3 (moto's server on loopback) vs local disk.

    python benchmarks/bench_s3.py

ResNet-18-shaped parameters, synthetic steps recorded as the recorder does (prune + append, 32
IDs a step, ~4 MB chunks), then forgetting one ID. Loopback S3 has no network latency: real S3
adds tens of milliseconds per request, which this does not measure.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyunlearn as pu
from _support import LoopbackS3

from bench_store import resnet_store  # a sibling: Python puts the script's folder first on sys.path

STEPS = 24


def measure(path, options) -> dict:
    start = time.perf_counter()
    model, store = resnet_store(path, 0.01, STEPS, storage_options=options)
    store.close()
    record_s = time.perf_counter() - start
    reopened = pu.UpdateStore.open(store.path, storage_options=options)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    times = []
    for i in range(5):
        model.load_state_dict(state)
        report = pu.amnesiac_forget(model, reopened, [i * 37])
        times.append(report.seconds)
        reopened.undo(report.record, "a benchmark trial")  # the next trial starts from nothing in effect
    return {"record_steps_per_s": round(STEPS / record_s, 2), "forget_1_id_ms": round(statistics.median(times) * 1e3, 1),
            "bytes": reopened.stats().total_bytes}


def main() -> int:
    s3 = LoopbackS3("bench")
    with tempfile.TemporaryDirectory() as tmp:
        results = {"local disk": measure(Path(tmp), None), "S3 (moto, loopback)": measure("s3://bench", s3.options)}
    s3.stop()
    print(f"ResNet-18 shapes, keep 0.01, {STEPS} synthetic steps; {pu.kernels.backend()}")
    print(f"{'back-end':<22} {'record steps/s':>15} {'forget 1 ID ms':>15} {'bytes':>12}")
    for name, r in results.items():
        print(f"{name:<22} {r['record_steps_per_s']:>15.2f} {r['forget_1_id_ms']:>15.1f} {r['bytes']:>12,}")
    out = Path(__file__).resolve().parent / "results" / "s3.json"
    from _meta import run_metadata  # benchmarks/ is on sys.path (see bench_store above)

    meta = run_metadata({"model": "ResNet-18 shapes", "keep": 0.01, "steps": STEPS, "ids_per_step": 32})
    out.write_text(json.dumps({"meta": meta, **results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
