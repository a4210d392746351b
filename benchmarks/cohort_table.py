"""Deletion units: cohort-aware batching × momentum-aware attribution, against Retrain.

    python benchmarks/cohort_table.py --data fashion-mnist --forget cohort:100:200
    python benchmarks/cohort_table.py --data digits --forget cohort:20:20 --epochs 2   (smoke run)

cohort:U:M puts U·M random training samples into U units of M samples (the other samples are
units of one) and forgets one unit. For random and cohort batching (same epochs and seed) it
trains a SmallCNN recording four stores at once (attribution update / gradient × keep 1.0
float32 / 0.01 float16), retrains without the unit under the same batching, and forgets the unit
with each store. Columns: UA, RA, TA, MIA-efficacy, average gap to Retrain, steps touched,
seconds, store bytes. Writes <out>/<name>.md and .csv.
"""
from __future__ import annotations

import copy
import csv
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import pyunlearn as pu
from pyunlearn.data import CohortBatchSampler, SampleSet
from pyunlearn.evaluation.metrics import Evaluation, evaluate
from pyunlearn.models import SmallCNN
from pyunlearn.models import train as fit

from paper_table import load, parse_args  # a sibling: Python puts the script's folder first on sys.path

STORES = [("update", 1.0, "float32"), ("update", 0.01, "float16"), ("gradient", 1.0, "float32"),
          ("gradient", 0.01, "float16")]


@dataclass
class Row:
    batching: str
    method: str
    UA: float
    RA: float
    TA: float
    MIA: float
    gap: float
    steps_touched: int | None
    seconds: float
    store_bytes: int | None


def units(train: SampleSet, spec: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit of each training sample, IDs of the unit to forget) for 'cohort:U:M'."""
    try:
        kind, u, m = spec.split(":")
        u, m = int(u), int(m)
    except ValueError:
        raise ValueError(f"--forget must be cohort:U:M, got {spec!r}") from None
    if kind != "cohort" or u < 1 or m < 1 or u * m > len(train):
        raise ValueError(f"--forget cohort:U:M needs U, M >= 1 and U*M <= {len(train)}, got {spec!r}")
    rng = np.random.default_rng(seed)
    cohort = np.arange(u, u + len(train))  # everyone else: a unit of one
    chosen = rng.permutation(len(train))[: u * m]
    cohort[chosen] = np.repeat(np.arange(u), m)
    return cohort, train.ids.numpy()[cohort == 0]


def train(model, data: SampleSet, batching: str, cohort: np.ndarray, args, stores=()) -> float:
    torch.manual_seed(args.seed)
    sampler = CohortBatchSampler(cohort, args.batch_size, seed=args.seed) if batching == "cohort" else None
    start = time.perf_counter()
    fit(model, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        stores=tuple(stores), batch_sampler=sampler)
    return time.perf_counter() - start


def run(args) -> list[Row]:
    train_set, test_set, size = load(args.data, args.idx_folder, args.seed)
    cohort, forget_ids = units(train_set, args.forget, args.seed)
    forget = train_set.with_ids(forget_ids)
    keep_mask = ~np.isin(train_set.ids.numpy(), forget_ids)
    retain, retain_cohort = train_set.subset(torch.from_numpy(keep_mask)), cohort[keep_mask]
    channels = (16, 32) if size == 8 else (8, 16)
    rows: list[Row] = []
    for batching in ("random", "cohort"):
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(args.seed)
            model = SmallCNN(size, channels)
            stores = [pu.UpdateStore.create(Path(tmp) / f"{a}-{k}.zarr", model, keep=k, value_dtype=d, attribution=a)
                      for a, k, d in STORES]
            seconds = train(model, train_set, batching, cohort, args, stores)
            torch.manual_seed(args.seed)
            retrained = SmallCNN(size, channels)
            retrain_seconds = train(retrained, retain, batching, retain_cohort, args)

            def measure(method, m, secs, touched=None, size_bytes=None):
                e = evaluate(m, forget=forget, retain=retain, test=test_set, seed=args.seed, mia_samples=args.mia_samples)
                rows.append(Row(batching, method, e.UA, e.RA, e.TA, e.MIA, 0.0, touched, secs, size_bytes))
                print(f"  {batching:<7} {method:<28} UA {e.UA:6.2f} RA {e.RA:6.2f} TA {e.TA:6.2f} MIA {e.MIA:6.2f}"
                      f"{'' if touched is None else f'  steps {touched}'}", flush=True)

            measure("Original", model, seconds)
            measure("Retrain", retrained, retrain_seconds)
            for (attribution, keep, _), store in zip(STORES, stores):
                m = copy.deepcopy(model)
                report = pu.amnesiac_forget(m, store, forget_ids)
                measure(f"{attribution} keep={keep}", m, report.seconds, report.steps_removed, store.stats().total_bytes)
                store.close()
    for batching in ("random", "cohort"):
        ref = next(r for r in rows if r.batching == batching and r.method == "Retrain")
        ref_eval = Evaluation(ref.UA, ref.RA, ref.TA, ref.MIA)
        for r in rows:
            if r.batching == batching:
                r.gap = Evaluation(r.UA, r.RA, r.TA, r.MIA).gap(ref_eval)
    return rows


def write(rows: list[Row], args, argv=None) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    from _meta import command_line, meta_comment, run_metadata  # benchmarks/ is on sys.path (see paper_table above)
    command = command_line("cohort_table.py", argv)

    lines = [meta_comment(run_metadata({"command": command, **vars(args)})), f"`{command}` (seed {args.seed}, {args.epochs} epochs, batch {args.batch_size}); gap: to the Retrain "
             "of the same batching\n", "| batching | method | UA | RA | TA | MIA | avg gap to Retrain | steps touched | "
             "seconds | store bytes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.batching} | {r.method} | {r.UA:.2f} | {r.RA:.2f} | {r.TA:.2f} | {r.MIA:.2f} | {r.gap:.2f} | "
                     f"{'' if r.steps_touched is None else r.steps_touched} | {r.seconds:.2f} | "
                     f"{'' if r.store_bytes is None else f'{r.store_bytes:,}'} |")
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    with open(args.out / f"{args.name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    print(f"wrote {args.out / args.name}.md, .csv")


def main(argv=None) -> list[Row]:
    args = parse_args(argv, __doc__, "cohort:100:200", "cohort:U:M")
    rows = run(args)
    write(rows, args, argv)
    return rows

if __name__ == "__main__":
    main()
