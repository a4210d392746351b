"""The cost of a deletion request as a store's audit log grows: forget time, open time and the
size of zarr.json at the 1st, 10th, 100th, 1,000th and 10,000th request on one store.

    python benchmarks/bench_ledger.py [--requests 10000] [--out benchmarks/results/ledger.json]

A small model (TinyNet, keep 0.25) records `requests` + a few hundred steps of batch size 1, so
that every request forgets one sample whose step no earlier request removed: each request does
the same work (find its step, subtract one row, append a record), whatever its number. For each
count c (1, 10, 100, 1,000, 10,000) a copy of that store gets c − 1 requests, one after another
from the model the previous one produced, as in a service. Then, in interleaved rounds (a slow
spell of the shared machine hits every count alike), each copy times request c (and in later
rounds c + 1, ...: amnesiac_forget from call to return) and an open (UpdateStore.open in a fresh
handle + what a forget reads first: the head state, the resume point); finally rec.flush() after
one more training step (the recorder's checkpoint cost). The goal
(issue 24): request 10,000 at most 1.5x request 10, zarr.json the same size throughout
(but for its counters' digits).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import pyunlearn as pu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _support import ROOT  # noqa: E402,F401  (puts the repository root on sys.path for tests.support)
from tests.support import TinyNet  # noqa: E402

CHECKPOINTS = (1, 10, 100, 1000, 10000)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ledger.json"))
    args = parser.parse_args(argv)
    from _meta import command_line, run_metadata

    checkpoints = [c for c in CHECKPOINTS if c <= args.requests]
    n = args.requests + args.rounds + 100  # every request and every timed one forgets a sample of its own
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder) / "base.zarr"
        torch.manual_seed(0)
        model = TinyNet()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        store = pu.UpdateStore.create(base, model, keep=0.25)
        x, y = torch.randn(n + 1, 8), torch.randint(0, 3, (n + 1,))
        with pu.UpdateRecorder(model, optimizer, store) as rec:
            for i in range(n):  # batch size 1: sample i is step i's only sample
                rec.batch([i])
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
                optimizer.step()
        store.close()
        trained = {k: v.clone() for k, v in model.state_dict().items()}
        runs = {}
        for checkpoint in checkpoints:  # one store per count, the requests before it applied
            path = Path(folder) / f"s{checkpoint}.zarr"
            shutil.copytree(base, path)
            model = TinyNet()
            model.load_state_dict(trained)
            store = pu.UpdateStore.open(path)
            for i in range(checkpoint - 1):
                pu.amnesiac_forget(model, store, [i])
            runs[checkpoint] = (path, model, store)
            print(f"prepared {checkpoint - 1} requests", flush=True)
        forget = {c: [] for c in checkpoints}
        opens = {c: [] for c in checkpoints}
        for r in range(args.rounds):  # interleaved: a slow spell of the machine hits every count alike
            for checkpoint in checkpoints:
                path, model, store = runs[checkpoint]
                start = time.perf_counter()
                # request number `checkpoint` (then the next ones), of a sample no prepared request used
                pu.amnesiac_forget(model, store, [args.requests + r])
                forget[checkpoint].append(time.perf_counter() - start)
                start = time.perf_counter()
                reader = pu.UpdateStore.open(path, mode="r")
                reader.ledger.state, reader.resume_point  # noqa: B018  what a forget reads first
                opens[checkpoint].append(time.perf_counter() - start)
        rows = []
        for checkpoint in checkpoints:
            path, model, store = runs[checkpoint]
            flush = _flush_time(model, store, x, y, n)
            rows.append({"request": checkpoint, "records": len(store.ledger),
                         "forget_ms_median": _ms(forget[checkpoint]), "forget_ms_best": _ms([min(forget[checkpoint])]),
                         "open_ms_median": _ms(opens[checkpoint]), "open_ms_best": _ms([min(opens[checkpoint])]),
                         "flush_ms": round(flush * 1e3, 2), "zarr_json_bytes": (path / "zarr.json").stat().st_size})
            store.close()
            r = rows[-1]
            print(f"request {checkpoint:>6}: forget {r['forget_ms_median']:7.2f} ms (best {r['forget_ms_best']:.2f}), "
                  f"open {r['open_ms_median']:6.2f} ms, rec.flush {r['flush_ms']:6.2f} ms, zarr.json "
                  f"{r['zarr_json_bytes']:,} bytes, {r['records']} records", flush=True)
    by = {r["request"]: r for r in rows}
    summary = {}
    if 10 in by and args.requests in by:
        summary = {f"forget_{args.requests}_over_10": round(by[args.requests]["forget_ms_median"] /
                                                             by[10]["forget_ms_median"], 2),
                   f"open_{args.requests}_over_10": round(by[args.requests]["open_ms_median"] /
                                                           by[10]["open_ms_median"], 2),
                   # The counters in zarr.json (steps, log length) gain digits; nothing in it grows with requests.
                   "zarr_json_bytes_range": [min(r["zarr_json_bytes"] for r in rows),
                                             max(r["zarr_json_bytes"] for r in rows)]}
        print(summary)
    meta = run_metadata(vars(args))
    meta["command_line"] = command_line("bench_ledger.py", argv)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1) + "\n")
    return 0


def _flush_time(model, store, x, y, i) -> float:
    """rec.flush() after one more step (recording resumes from the model the last request made)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        rec.batch([i])
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        optimizer.step()
        start = time.perf_counter()
        rec.flush()
        return time.perf_counter() - start


def _ms(values) -> float:
    return round(statistics.median(values) * 1e3, 2)


if __name__ == "__main__":
    sys.exit(main())
