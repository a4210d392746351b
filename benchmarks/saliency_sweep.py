"""Partial label flipping at matched forgetting: naive, the per-step mask and the saliency mask.

    python benchmarks/saliency_sweep.py                       (the committed run: class 0, seeds 0 1 2)
    python benchmarks/saliency_sweep.py --data digits --seeds 0 --lrs 0.001 0.004   (smoke)

fidelity.py compares the masks at one setting, where they forget different amounts. Here each
variant runs label flipping (25 steps, no guard) at several learning rates on the same trained
model (Fashion-MNIST 20k subset as in fidelity.py, SmallCNN, 3 epochs), forgetting class 0, and
reports UA and TA per rate; for each variant and seed, the lowest rate reaching UA >= --ua
(default 99) is the matched point. Writes benchmarks/results/saliency_sweep.json (with meta).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from pyunlearn.data import FASHION_MNIST_DEBIAN, digits, idx, split
from pyunlearn.evaluation.metrics import accuracy
from pyunlearn.models import SmallCNN, train
from pyunlearn.unlearn import label_flip

VARIANTS = {"naive": (None, "step"), "per-step mask keep 0.1": (0.1, "step"), "saliency mask keep 0.1": (0.1, "saliency")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    parser.add_argument("--idx-folder", default=FASHION_MNIST_DEBIAN)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.0005, 0.001, 0.002, 0.004])
    parser.add_argument("--ua", type=float, default=99.0, help="UA (%%) that counts as forgotten")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "saliency_sweep.json")
    args = parser.parse_args(argv)
    from _meta import command_line, run_metadata  # benchmarks/, this script's folder, is on sys.path

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on the shared 2-core VM two threads trained 7x slower
    try:
        if args.data == "digits":
            (train_all, test), size, channels, n = split(digits(), 0.2, seed=0), 8, (16, 32), None
        else:
            (train_all, test), size, channels, n = idx(args.idx_folder), 28, (8, 16), 20000
        subset = train_all if n is None else train_all.subset(
            torch.randperm(len(train_all), generator=torch.Generator().manual_seed(12345))[:n])
        forget = subset.subset(subset.y == 0)
        runs = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = train(SmallCNN(size, channels), subset, epochs=3, batch_size=128, lr=0.05, seed=seed)
            for name, (keep, mask) in VARIANTS.items():
                for lr in args.lrs:
                    m = copy.deepcopy(model)
                    label_flip(m, forget, keep, lr=lr, mask=mask, max_steps=25, seed=seed)
                    runs.append({"seed": seed, "variant": name, "lr": lr, "UA": 100.0 - accuracy(m, forget),
                                 "TA": accuracy(m, test)})
                    print(f"seed {seed} {name:<24} lr {lr:<7} UA {runs[-1]['UA']:6.2f} TA {runs[-1]['TA']:6.2f}",
                          flush=True)
    finally:
        torch.set_num_threads(threads)
    matched = {}
    for name in VARIANTS:
        points = []
        for seed in args.seeds:
            hits = [r for r in runs if r["seed"] == seed and r["variant"] == name and r["UA"] >= args.ua]
            if hits:
                points.append(min(hits, key=lambda r: r["lr"]))
        matched[name] = {"seeds_reaching": len(points), "TA_mean": float(np.mean([p["TA"] for p in points])) if points
                         else None, "UA_mean": float(np.mean([p["UA"] for p in points])) if points else None,
                         "lrs": [p["lr"] for p in points]}
        print(f"matched at UA >= {args.ua}: {name:<24} {matched[name]}", flush=True)
    command = command_line("saliency_sweep.py", argv)
    out = {"meta": run_metadata({"command": command, **vars(args)}), "runs": runs, "matched": matched}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    return out


if __name__ == "__main__":
    main()
