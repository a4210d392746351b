"""The source paper's comparison, on real data: one trained model, every method, one table.

    python benchmarks/paper_table.py --data fashion-mnist --forget random:300
    python benchmarks/paper_table.py --data fashion-mnist --forget class:0
    python benchmarks/paper_table.py --data fashion-mnist --forget rare:0:100
    python benchmarks/paper_table.py --data digits --forget random:20 --epochs 2   (the CI smoke run)

Trains a small CNN with recorders on (dense keep=1 float32, and partial keeps 0.01/0.05/0.1/0.2
float16, all in the same run), retrains without the forget set, then from copies of the trained
model runs: Dense amnesiac (with and without 1 epoch of fine-tuning), Partial amnesiac at each
keep (no fine-tuning), Label flip and Gradient ascent, naive and partial (keep 0.1). Reports UA,
RA, TA, MIA-efficacy (%), the average gap to Retrain over those four, seconds, and store bytes.
Writes <out>/<name>.md, .csv and .png (TA and UA against stored bytes).
"""
from __future__ import annotations

import argparse
import copy
import csv
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import pyunlearn as pu
from pyunlearn.data import FASHION_MNIST_DEBIAN, SampleSet, digits, idx, parse_forget, split
from pyunlearn.evaluation.metrics import Evaluation, evaluate
from pyunlearn.models import SmallCNN, train
from pyunlearn.unlearn import fine_tune, gradient_ascent, label_flip

PARTIAL_KEEPS = (0.01, 0.05, 0.1, 0.2)
METHOD_KEEP = 0.1  # the layer-wise share for partial label flip / gradient ascent
FORGET_SEED = 54321  # random forget sets are drawn under FORGET_SEED + --seed (fidelity.py's rule)


@dataclass
class Row:
    method: str
    UA: float
    RA: float
    TA: float
    MIA: float
    gap: float  # average |difference| to Retrain over UA, RA, TA, MIA
    seconds: float
    store_bytes: int | None


def load(name: str, folder: str, seed: int) -> tuple[SampleSet, SampleSet, int]:
    if name == "digits":
        train_set, test_set = split(digits(), 0.2, seed=seed)
        return train_set, test_set, 8
    if name == "fashion-mnist":
        train_set, test_set = idx(folder)
        return train_set, test_set, 28
    raise ValueError(f"--data must be digits or fashion-mnist, got {name!r}")


def run(args) -> list[Row]:
    full_train, test_set, size = load(args.data, args.idx_folder, args.seed)
    # Not under the training seed itself: forget_random and the training batches both start from
    # torch.randperm under their seed, so the forget set would be the first batches of epoch 1.
    train_set, forget = parse_forget(args.forget, full_train, seed=FORGET_SEED + args.seed)
    retain = train_set.without(forget.ids)
    channels = (16, 32) if size == 8 else (8, 16)
    hyper = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(f"{args.data}: {len(train_set)} training samples, forgetting {len(forget)} ({args.forget}), "
          f"{len(test_set)} test; SmallCNN{channels}, {args.epochs} epochs", flush=True)

    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(args.seed)
        model = SmallCNN(size, channels)
        stores = {"dense": pu.UpdateStore.create(Path(tmp) / "dense.zarr", model, keep=1.0, value_dtype="float32")}
        for keep in PARTIAL_KEEPS:
            stores[keep] = pu.UpdateStore.create(Path(tmp) / f"partial-{keep}.zarr", model, keep=keep)
        start = time.perf_counter()
        train(model, train_set, stores=tuple(stores.values()), progress=True, **hyper)
        train_seconds = time.perf_counter() - start

        torch.manual_seed(args.seed)
        retrained = SmallCNN(size, channels)
        start = time.perf_counter()
        train(retrained, retain, progress=True, **hyper)
        retrain_seconds = time.perf_counter() - start

        def measure(name, m, seconds, store_bytes=None):
            e = evaluate(m, forget=forget, retain=retain, test=test_set, seed=args.seed, mia_samples=args.mia_samples)
            rows.append(Row(name, e.UA, e.RA, e.TA, e.MIA, 0.0, seconds, store_bytes))
            print(f"  {name:<34} UA {e.UA:6.2f} RA {e.RA:6.2f} TA {e.TA:6.2f} MIA {e.MIA:6.2f} "
                  f"({seconds:.2f} s)", flush=True)

        measure("Original", model, train_seconds)
        measure("Retrain", retrained, retrain_seconds)
        for key, store in stores.items():
            m = copy.deepcopy(model)
            report = pu.amnesiac_forget(m, store, forget.ids)
            size_bytes = store.stats().total_bytes
            if key == "dense":
                measure("Dense amnesiac", m, report.seconds, size_bytes)
                tuned = fine_tune(m, retain, epochs=1, lr=args.lr / 5, seed=args.seed)
                measure("Dense amnesiac + fine-tune", m, report.seconds + tuned.seconds, size_bytes)
            else:
                measure(f"Partial amnesiac keep={key}", m, report.seconds, size_bytes)
            store.close()
        for name, method, extra in (("Label flip", label_flip, {}),
                                    ("Gradient ascent", gradient_ascent, {"retain_data": retain})):
            for keep in (None, METHOD_KEEP):
                m = copy.deepcopy(model)
                report = method(m, forget, keep, seed=args.seed, **extra)
                measure(f"{name} {'naive' if keep is None else f'partial keep={keep}'}", m, report.seconds)

    reference = next(r for r in rows if r.method == "Retrain")
    ref = Evaluation(reference.UA, reference.RA, reference.TA, reference.MIA)
    for r in rows:
        r.gap = Evaluation(r.UA, r.RA, r.TA, r.MIA).gap(ref)
    return rows


def write(rows: list[Row], args, out: Path, argv=None) -> None:
    from _meta import command_line, meta_comment, run_metadata  # benchmarks/, this script's folder, is on sys.path

    out.mkdir(parents=True, exist_ok=True)
    command = command_line("paper_table.py", argv)
    header = "| method | UA | RA | TA | MIA | avg gap to Retrain | seconds | store bytes |\n|---|---|---|---|---|---|---|---|\n"
    body = "".join(f"| {r.method} | {r.UA:.2f} | {r.RA:.2f} | {r.TA:.2f} | {r.MIA:.2f} | {r.gap:.2f} | {r.seconds:.2f} | "
                   f"{'' if r.store_bytes is None else f'{r.store_bytes:,}'} |\n" for r in rows)
    meta = meta_comment(run_metadata({"command": command, **vars(args)}))
    (out / f"{args.name}.md").write_text(f"{meta}\n`{command}` (seed {args.seed}, {args.epochs} epochs)\n\n"
                                         + header + body)
    with open(out / f"{args.name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stored = [r for r in rows if r.store_bytes]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for metric, marker in (("TA", "o"), ("UA", "s")):
        ax.scatter([r.store_bytes for r in stored], [getattr(r, metric) for r in stored], marker=marker, label=metric)
        for r in stored:
            ax.annotate(r.method.replace("Partial amnesiac ", "").replace("Dense amnesiac", "dense"),
                        (r.store_bytes, getattr(r, metric)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    retrain = next(r for r in rows if r.method == "Retrain")
    ax.axhline(retrain.TA, color="C0", linestyle=":", label="TA of Retrain")
    ax.axhline(retrain.UA, color="C1", linestyle=":", label="UA of Retrain")
    ax.set_xscale("log")
    ax.set_xlabel("stored update bytes")
    ax.set_ylabel("%")
    ax.set_title(f"{args.data}, forget {args.forget}: amnesiac unlearning vs storage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{args.name}.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / args.name}.md, .csv, .png")


def parse_args(argv, doc: str, forget_default: str, forget_help: str):
    """The experiment scripts' shared command line."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist", choices=["digits", "fashion-mnist"])
    parser.add_argument("--idx-folder", default=FASHION_MNIST_DEBIAN, help="folder of the IDX files")
    parser.add_argument("--forget", default=forget_default, help=forget_help)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mia-samples", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", help="file name stem (default: <data>-<forget>)")
    args = parser.parse_args(argv)
    args.name = args.name or f"{args.data}-{args.forget.replace(':', '-')}"
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv, __doc__, "random:300", "random:N, class:C or rare:C:N")
    rows = run(args)
    write(rows, args, args.out, argv)
    return rows

if __name__ == "__main__":
    main()
