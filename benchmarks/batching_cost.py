"""What cohort batching costs the original model, with iid and with class-skewed units (issue 15),
and what mixing units into each batch buys back.

    python benchmarks/batching_cost.py                                      (the committed run: seeds 0-4)
    python benchmarks/batching_cost.py --data digits --subset 1400 --epochs 1 --seeds 0 1   (smoke)
    python benchmarks/batching_cost.py --skew user --units-per-batch 2 4 8 16 --plot \
        --out benchmarks/results/batching_cost-users.json       (per-user units of 1-2 classes, issue 25)

Data, model and training are fidelity.py's, through its own functions (load, make_trainer, which
calls pyunlearn.models.train): the fixed 20,000-sample Fashion-MNIST subset, SmallCNN(8, 16), 3
epochs, batch 128, SGD 0.05 + momentum 0.9, one torch thread. For every seed, the trainings
start from the same initial weights (torch.manual_seed(seed)):

- random: models.train's own random batches under the seed (fidelity's random1, random10, class);
- cohort iid: CohortBatchSampler over fidelity's `cohort` units (iid_units: 100 units of 200
  random samples);
- cohort skewed: CohortBatchSampler over its `cohort-skewed` units (class_units: units of 200
  samples of one class, 95 in this subset, the other 1,000 samples units of one);
- cohort skewed, m units/batch, for each m of --units-per-batch (default 2 4 8 16): the same
  units, CohortBatchSampler(units_per_batch=m): at most 128 // m samples of a unit in a batch
  (64, 32, 16, 8), so a full batch mixes at least m units, and a unit of 200 touches
  ceil(200 / (128 // m)) steps an epoch (4, 7, 13, 25) instead of 2.

--skew user replaces the one-class units by per-user units of one or two classes (fidelity.user_units:
97 users of 200 samples in the 20,000 subset, 50 of one class and 47 of two, the other 600
samples units of one): "cohort users" and "cohort users, m units/batch". --plot draws TA against
the steps touched per unit, and the paired TA difference to random batching against m, to the
--out path's .png.

Each trained model's test accuracy (%) and mean test cross-entropy (nats) on the full test set;
mean ± sd over the seeds, and each cohort training's difference to random batching paired by
seed (same initial weights) as mean ± sd of the per-seed differences. A difference counts (`*`)
only where |mean| exceeds that sd, the seed-to-seed spread. Also per training: optimizer steps
and how class-mixed the batches are (share of a batch's samples in its largest class, averaged
over samples, all epochs), and the price in forgetting: the steps (all epochs) that hold a
sample of a unit, mean over the units of more than one sample and for unit 0 (the unit the
fidelity scenarios forget); for random batching, of the class-skewed units.

Writes benchmarks/results/batching_cost.json (meta: machine, versions, config; per-seed values;
summary) and batching_cost.md.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from fidelity import SUBSET_SEED, UNITS, class_units, iid_units, load, make_trainer, training_arguments, \
    user_units, with_torch_threads  # a sibling
from pyunlearn.data import CohortBatchSampler, sample_batches
from pyunlearn.evaluation.metrics import accuracy, losses

VALUES = ("TA", "test_loss")


SKEWS = {"class": ("cohort skewed", class_units), "user": ("cohort users", user_units)}


def trainings(subset, mixes, skew: str = "class") -> dict[str, tuple[np.ndarray | None, int]]:
    """name → (each sample's unit, by position, for CohortBatchSampler, or None: random batches;
    units_per_batch). skew: the skewed units, "class" (one class each: class_units) or "user"
    (one or two classes each: user_units)."""
    label, units = SKEWS[skew]
    skewed = units(subset)
    runs = {"random": (None, 1), "cohort iid": (iid_units(subset), 1), label: (skewed, 1)}
    runs.update({f"{label}, {m} units/batch": (skewed, m) for m in mixes if m != 1})
    return runs


def batch_mix(subset, unit, units_per_batch: int, counted, args, seed: int) -> dict:
    """Steps, class mixing and steps touched per unit of the batches train() sees for this seed:
    the same data pipeline (subset.batches under the seed's generator, or the cohort sampler),
    labels and IDs only. `counted`: whose steps touched to count (each sample's unit by
    position; units numbered from UNITS on are units of one, left out)."""
    if unit is None:
        generator = torch.Generator().manual_seed(seed)
        epochs = [subset.batches(args.batch_size, generator=generator) for _ in range(args.epochs)]
    else:
        sampler = CohortBatchSampler(unit, args.batch_size, seed=seed, units_per_batch=units_per_batch)
        epochs = [sample_batches(subset, sampler) for _ in range(args.epochs)]
    position = torch.full((int(subset.ids.max()) + 1,), -1, dtype=torch.int64)
    position[subset.ids] = torch.arange(len(subset))
    touched = np.zeros(UNITS, dtype=np.int64)  # steps holding a sample of unit u
    steps, largest = 0, 0
    for batches in epochs:
        for ids, _, y in batches:
            steps += 1
            largest += int(torch.bincount(y).max())
            units = counted[position[ids].numpy()]
            touched[np.unique(units[units < UNITS])] += 1
    numbered = np.unique(counted[counted < UNITS])
    return {"steps": steps, "largest_class_share": largest / (args.epochs * len(subset)),
            "unit_steps": float(touched[numbered].mean()), "unit0_steps": int(touched[0])}


def _mean_sd(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def summarise(runs: list[dict]) -> dict:
    """Per training: mean and sd of each value; per cohort training: the paired difference to random."""
    names = list(dict.fromkeys(r["training"] for r in runs))
    by = {t: sorted((r for r in runs if r["training"] == t), key=lambda r: r["seed"]) for t in names}
    summary = {}
    for training, rows in by.items():
        entry = {v: _mean_sd([r[v] for r in rows])
                 for v in (*VALUES, "steps", "largest_class_share", "unit_steps", "unit0_steps", "seconds")}
        if training != "random":
            for v in VALUES:
                diffs = [r[v] - base[v] for r, base in zip(rows, by["random"], strict=True)]
                mean, sd = _mean_sd(diffs)
                entry[f"{v}_vs_random"] = {"mean": mean, "sd": sd, "per_seed": diffs, "counts": abs(mean) > sd}
        summary[training] = entry
    return summary


def plot(summary: dict, label: str, path: Path, command: str) -> None:
    """TA (mean ± sd over seeds) against the steps touched per unit, for the skewed units at each
    units_per_batch, beside random batching (its band) and iid units; and the paired TA
    difference to random batching against units_per_batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixed = [(t, e) for t, e in summary.items() if t == label or t.startswith(label + ",")]
    ms = [1 if t == label else int(t.split(", ")[1].split()[0]) for t, _ in mixed]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    random = summary["random"]
    left.axhspan(random["TA"][0] - random["TA"][1], random["TA"][0] + random["TA"][1], color="0.85",
                 label=f"random batching ± sd ({random['unit_steps'][0]:.0f} steps touched per unit)")
    left.axhline(random["TA"][0], color="0.4", lw=1)
    left.errorbar([random["unit_steps"][0]], [random["TA"][0]], yerr=[random["TA"][1]], marker="D", color="0.3",
                  capsize=3, label="random batching")
    left.errorbar([e["unit_steps"][0] for _, e in mixed], [e["TA"][0] for _, e in mixed],
                  yerr=[e["TA"][1] for _, e in mixed], marker="o", capsize=3, label=label)
    for (t, e), m in zip(mixed, ms):
        left.annotate(f"m={m}", (e["unit_steps"][0], e["TA"][0]), textcoords="offset points", xytext=(6, -12))
    if "cohort iid" in summary:
        e = summary["cohort iid"]
        left.errorbar([e["unit_steps"][0]], [e["TA"][0]], yerr=[e["TA"][1]], marker="s", color="C2", capsize=3,
                      label="cohort iid (m=1)")
    left.set_xscale("log")
    left.set_xlabel("optimizer steps touched by one unit's deletion (of all epochs)")
    left.set_ylabel("test accuracy (%)")
    left.legend(fontsize=8, loc="lower right")
    diffs = [e["TA_vs_random"] for _, e in mixed]
    right.errorbar(ms, [d["mean"] for d in diffs], yerr=[d["sd"] for d in diffs], marker="o", capsize=3)
    right.axhline(0, color="0.4", lw=1)
    right.set_xscale("log", base=2)
    right.set_xticks(ms, [str(m) for m in ms])
    right.set_xlabel("units per batch (m)")
    right.set_ylabel("TA − random batching (points, paired by seed)")
    fig.suptitle(f"{label}: what mixing units into batches buys back, and costs in steps touched", fontsize=10)
    fig.text(0.01, 0.005, command, fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(summary: dict, seeds, label: str = "cohort skewed") -> str:
    def cell(pair, digits):
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    def diff(entry, value, digits):
        if value not in entry:
            return "—"
        d = entry[value]
        return f"{d['mean']:+.{digits}f} ± {d['sd']:.{digits}f}{'*' if d['counts'] else ''}"

    lines = ["| training | TA | TA − random | test loss | test loss − random | steps | largest-class share of a batch "
             "| steps touched per unit | by unit 0 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for training, e in summary.items():
        lines.append(f"| {training} | {cell(e['TA'], 2)} | {diff(e, 'TA_vs_random', 2)} | {cell(e['test_loss'], 4)} | "
                     f"{diff(e, 'test_loss_vs_random', 4)} | {e['steps'][0]:.0f} | {e['largest_class_share'][0]:.3f} | "
                     f"{e['unit_steps'][0]:.1f} | {e['unit0_steps'][0]:.1f} |")
    lines += ["", f"Mean ± sd over training seeds {list(seeds)}; differences paired by seed (same initial weights), "
              "mean ± sd of the per-seed differences; `*`: |mean difference| exceeds its sd (only those count). "
              "Steps: optimizer steps over all epochs (mean over seeds). Steps touched: the steps (all epochs) "
              "holding a sample of a unit, mean over the units of more than one sample, and of unit 0 (mean "
              f"over seeds); for random batching, of the {label} units."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = training_arguments(__doc__, seeds=range(5))
    parser.add_argument("--units-per-batch", type=int, nargs="*", default=[2, 4, 8, 16],
                        help="the mixed trainings over the class-skewed units: CohortBatchSampler(units_per_batch=m)")
    parser.add_argument("--skew", default="class", choices=sorted(SKEWS),
                        help="the skewed units: class (one class each, 95 units of 200) or user (one or two classes "
                             "each, 97 users of 200)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "batching_cost.json")
    parser.add_argument("--plot", action="store_true", help="also plot TA against steps touched per unit to --out .png")
    args = parser.parse_args(argv)
    return with_torch_threads(args.threads, lambda: _run(args, argv))


def _run(args, argv) -> dict:
    from _meta import command_line, meta_comment, run_metadata  # benchmarks/, this script's folder, is on sys.path

    subset, test, _ = load(args)
    units = trainings(subset, args.units_per_batch, args.skew)
    label = SKEWS[args.skew][0]
    skewed = units[label][0]
    runs = []
    for seed in args.seeds:
        for training, (unit, m) in units.items():
            cohort_of = None if unit is None else dict(zip(subset.ids.tolist(), unit.tolist()))
            start = time.perf_counter()
            model, _ = make_trainer(args, cohort_of, units_per_batch=m)(subset, seed, False)
            seconds = time.perf_counter() - start
            run = {"training": training, "seed": seed, "units_per_batch": m, "TA": accuracy(model, test),
                   "test_loss": float(losses(model, test).mean()), "seconds": seconds,
                   **batch_mix(subset, unit, m, skewed if unit is None else unit, args, seed)}
            runs.append(run)
            print(f"seed {seed} {training:<29} TA {run['TA']:6.2f}  test loss {run['test_loss']:.4f}  "
                  f"steps {run['steps']}  largest-class share {run['largest_class_share']:.3f}  "
                  f"steps touched per unit {run['unit_steps']:.1f} (unit 0: {run['unit0_steps']})  {seconds:.1f} s",
                  flush=True)
    summary = summarise(runs)
    command = command_line("batching_cost.py", argv)
    meta = run_metadata({"command": command, **vars(args), "subset_seed": SUBSET_SEED,  # units of one are numbered from UNITS
                         "units": {t: None if u is None else int(np.unique(u[u < UNITS]).size)
                                   for t, (u, _) in units.items()}})
    out = {"meta": meta, "runs": runs, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    md = "\n".join([meta_comment(meta), f"`{command}`", "", table(summary, args.seeds, label), ""])
    args.out.with_suffix(".md").write_text(md)
    if args.plot:
        plot(summary, label, args.out.with_suffix(".png"), command)
    print(md)
    return out


if __name__ == "__main__":
    main()
