"""What keys and the audit trail cost: mapping keys to IDs, bytes per key on disk, lookup time in
a store of 10^6 keys, and the ledger's growth per deletion request.

    python benchmarks/bench_lifecycle.py [--keys 1000000] [--requests 100] [--out benchmarks/results/lifecycle.json]

Two stores of the same steps (a tiny model, 32 samples per step, 10^6 samples each seen once)
are recorded side by side: one with int64 IDs 0..n-1 (the data helpers' IDs, which compress
well), one with string keys (e-mail-like, mapped by the keyed hash to pseudorandom 63-bit IDs,
which do not). Bytes per key are the ID arrays' stored bytes (sample_ids, offsets and the
persistent index's runs) divided by the samples. Then `--requests` deletion requests of one key
each, and as many of ten keys, are made on the keyed store; the ledger's growth is measured
on zarr.json and on the forgotten_ids array.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import pyunlearn as pu

try:
    from _meta import run_metadata
except ImportError:  # run from elsewhere
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _meta import run_metadata

SECRET = "benchmark secret, at least sixteen bytes"
BATCH = 32


def _keys(n: int) -> list[str]:
    return [f"user{i:08d}@example.com" for i in range(n)]


def _record(path: Path, ids_per_step: list, model: torch.nn.Module) -> pu.UpdateStore:
    store = pu.UpdateStore.create(path, model, keep=1.0, value_dtype="float32", secret=SECRET)
    params = [p.detach() for p in store.check_model(model)]
    row = pu.kernels.prune_topk([p.clone() for p in params], [p + 1e-3 for p in params], store.k,
                          value_dtype="float32", refresh=False)
    for ids in ids_per_step:
        store.append(row, store.ids_for(ids, recording=True))
    store.mark_final(model)
    return store


def _id_bytes(path: Path) -> int:
    """Stored bytes of the ID arrays: sample_ids, offsets and the index's runs."""
    total = 0
    for folder in ("sample_ids", "offsets", "lookup"):
        total += sum(f.stat().st_size for f in (path / folder).rglob("*") if f.is_file() and f.name != "zarr.json")
    return total


def _best(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/lifecycle.json")
    args = parser.parse_args()
    n = args.keys - args.keys % BATCH
    keys = _keys(n)
    hasher = pu.keys.KeyHasher(SECRET)
    results: dict = {}

    best, median = _best(lambda: hasher.ids(keys), 3)
    results["map_keys"] = {"keys": n, "best_s": best, "median_s": median, "us_per_key": best / n * 1e6}
    print(f"map {n} keys to IDs: best {best:.2f} s ({best / n * 1e6:.2f} µs/key), median {median:.2f} s")

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    order = np.random.default_rng(0).permutation(n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        int_steps = [order[i:i + BATCH] for i in range(0, n, BATCH)]
        key_steps = [[keys[j] for j in step] for step in int_steps]
        start = time.perf_counter()
        ints = _record(tmp / "ints.zarr", int_steps, model)
        int_s = time.perf_counter() - start
        start = time.perf_counter()
        keyed = _record(tmp / "keys.zarr", key_steps, model)
        key_s = time.perf_counter() - start
        results["record"] = {"steps": len(int_steps), "int_ids_s": int_s, "keys_s": key_s}
        per_int, per_key = _id_bytes(tmp / "ints.zarr") / n, _id_bytes(tmp / "keys.zarr") / n
        results["bytes_per_sample"] = {"int_ids": per_int, "keys": per_key}
        print(f"record {len(int_steps)} steps: int IDs {int_s:.1f} s, keys {key_s:.1f} s; "
              f"ID bytes per sample: int IDs {per_int:.2f}, keys {per_key:.2f}")
        ints.close()
        keyed.close()

        rng = np.random.default_rng(1)
        lookups = {}
        for count in (1, 1000):
            chosen = [keys[i] for i in rng.choice(n, count, replace=False)]

            def open_and_look():
                pu.UpdateStore.open(tmp / "keys.zarr", mode="r", secret=SECRET).steps_for(chosen)

            open_and_look()  # the process's first zarr use is not what a service pays
            best, median = _best(open_and_look, args.repeat)
            lookups[str(count)] = {"best_s": best, "median_s": median}
            print(f"open + steps_for({count} keys) in a store of {n} keys: best {best * 1e3:.1f} ms, "
                  f"median {median * 1e3:.1f} ms")
        results["open_and_lookup"] = lookups

        store = pu.UpdateStore.open(tmp / "keys.zarr", secret=SECRET)
        attrs = tmp / "keys.zarr" / "zarr.json"
        growth = {}
        for per_request in (1, 10):
            before_json = attrs.stat().st_size
            before_ids = _forgotten_bytes(tmp / "keys.zarr")
            for r in range(args.requests):
                asked = [keys[i] for i in rng.choice(n, per_request, replace=False)]
                pu.amnesiac_forget(model, store, asked, request_id=f"bench-{per_request}-{r}")
            json_growth = (attrs.stat().st_size - before_json) / args.requests
            id_growth = (_forgotten_bytes(tmp / "keys.zarr") - before_ids) / args.requests
            growth[str(per_request)] = {"zarr_json_bytes_per_request": json_growth,
                                        "forgotten_ids_bytes_per_request": id_growth}
            print(f"requests of {per_request} key(s): zarr.json +{json_growth:.0f} B/request, "
                  f"forgotten_ids +{id_growth:.0f} B/request")
        start = time.perf_counter()
        pu.UpdateStore.open(tmp / "keys.zarr", mode="r").ledger.audit()
        results["open_with_ledger_s"] = time.perf_counter() - start
        results["ledger_growth"] = growth
        results["zarr_json_bytes_after"] = attrs.stat().st_size
        store.close()

    out = {"meta": run_metadata(vars(args)), **results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


def _forgotten_bytes(path: Path) -> int:
    folder = path / "forgotten_ids"
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


if __name__ == "__main__":
    main()
