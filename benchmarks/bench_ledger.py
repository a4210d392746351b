"""The cost of a deletion request as a store's audit log grows: forget time, open time and the
size of zarr.json at the 1st, 10th, 100th, 1,000th and 10,000th request on one store.

    python benchmarks/bench_ledger.py [--requests 10000] [--out benchmarks/results/ledger.json]

One store of a small model (TinyNet, keep 0.25) records `requests` + 100 steps of batch size 1,
so that every request forgets one sample whose step no earlier request removed: each request
does the same work (find its step, subtract one row, append a record), whatever its number.
Requests come one after another from the model the previous one produced, as in a service.
At each checkpoint count the script times, interleaved and repeated: the next few requests
(forget: amnesiac_forget from call to return), opening the store in a fresh handle and reading
what a forget needs of its timeline (open: UpdateStore.open + the head state + the resume
point), and rec.flush() after one more training step (the recorder's checkpoint cost). The goal
(issue 24): request 10,000 at most 1.5x request 10, zarr.json the same size throughout
(but for its counters' digits).
"""
from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--repeats", type=int, default=5, help="requests (and opens) timed at each checkpoint")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ledger.json"))
    args = parser.parse_args(argv)
    from _meta import command_line, run_metadata

    checkpoints = [c for c in CHECKPOINTS if c <= args.requests]
    n = args.requests + args.repeats * len(checkpoints) + 100
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.zarr"
        torch.manual_seed(0)
        model = TinyNet()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        store = pu.UpdateStore.create(path, model, keep=0.25)
        x, y = torch.randn(n + 1, 8), torch.randint(0, 3, (n + 1,))
        with pu.UpdateRecorder(model, optimizer, store) as rec:
            for i in range(n):  # batch size 1: sample i is step i's only sample
                rec.batch([i])
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
                optimizer.step()
        done, rows = 0, []
        for checkpoint in checkpoints:
            while done < checkpoint - 1:  # requests 1 .. checkpoint-1, untimed
                pu.amnesiac_forget(model, store, [done])
                done += 1
            forget, opens = [], []
            for _ in range(args.repeats):  # request `checkpoint` and the next few, each timed
                start = time.perf_counter()
                pu.amnesiac_forget(model, store, [done])
                forget.append(time.perf_counter() - start)
                done += 1
                start = time.perf_counter()
                reader = pu.UpdateStore.open(path, mode="r")
                reader.ledger.state, reader.resume_point  # noqa: B018  what a forget reads first
                opens.append(time.perf_counter() - start)
            flush = _flush_time(model, optimizer, store, x, y, n)
            n += 1
            size = (path / "zarr.json").stat().st_size
            rows.append({"request": checkpoint, "records": len(store.ledger), "forget_ms_median": _ms(forget),
                         "forget_ms_best": round(min(forget) * 1e3, 2), "open_ms_median": _ms(opens),
                         "open_ms_best": round(min(opens) * 1e3, 2), "flush_ms": round(flush * 1e3, 2),
                         "zarr_json_bytes": size})
            print(f"request {checkpoint:>6}: forget {rows[-1]['forget_ms_median']:7.2f} ms (best "
                  f"{rows[-1]['forget_ms_best']:.2f}), open {rows[-1]['open_ms_median']:6.2f} ms, rec.flush "
                  f"{rows[-1]['flush_ms']:6.2f} ms, zarr.json {size:,} bytes, {rows[-1]['records']} records",
                  flush=True)
        store.close()
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


def _flush_time(model, optimizer, store, x, y, i) -> float:
    """rec.flush() after one more step (recording resumes from the model the last request made)."""
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
