"""What an update store must keep to forget a backdoor (issue 25): attack success, test accuracy
and the worst class after subtraction, and after subtraction + repair, against the store's keep
and value precision; and candidate settings for removing the backdoor from a store at most a
quarter of the dense float32 store's size, cheaply.

    python benchmarks/poison_store.py                       (backdoor and backdoor-unit, seeds 0 1 2)
    python benchmarks/poison_store.py --scenarios backdoor-unit --units-per-batch 16 --out FILE
    python benchmarks/poison_store.py --data digits --subset 1400 --epochs 1 --seeds 0 --keeps 0.1 1.0 \
        --dtypes float16 --mia-seeds 0 --mia-samples 200                                   (smoke)

fidelity.py's data, model, training, poison scenarios and measurements (its functions): the
fixed 20,000-sample Fashion-MNIST subset with 1% of it backdoored (benchmarks/_poison.py),
SmallCNN(8, 16), 3 epochs, batch 128, SGD 0.05 + momentum 0.9, one torch thread; Original,
Retrain and Retrain seed 2 (the floors) per training seed, through pyunlearn.evaluation.experiment.
While the original trains it records one update store per keep × value dtype (--keeps,
--dtypes; and --extra-stores, e.g. keep 0.2 float16 for the search). Rows:

- "Subtract keep K dtype": amnesiac_forget with that store alone;
- "Subtract keep K dtype + repair": then unlearn.repair of every subtracted step (its retained
  samples replayed at the training learning rate);
- the candidates (CANDIDATES): repair of only the latest share of the steps, fine-tuning budgets
  after subtraction, the probe guard (fidelity.probe_guarded: per-class accuracy on 1,000
  retained samples, fine-tuned back in rounds of 0.05 epoch, at most 0.3 epoch), and
  fine-tuning alone.

Each row records the store's bytes on disk, over the keep 1 float32 store's and over the
uncompressed dense float32 updates; its seconds and share of the retrain's; and the work share
(samples trained on over the retrain's). Writes --out (.json, with meta) and .md.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from fidelity import (POISON_SCENARIOS, _fine_tune_share, attach, load, make_trainer, measured_beside, poison_arguments,
                      poison_measure, poison_notes, poison_summary, poison_table, probe_guarded, scenario,
                      training_arguments, with_torch_threads)  # a sibling
from pyunlearn.attribution import coefficient_rule
from pyunlearn.evaluation import experiment
from pyunlearn.unlearn import forget_and_repair, subtracted_steps

import pyunlearn as pu

KEEPS = (0.01, 0.03, 0.1, 0.3, 1.0)
DTYPES = ("float16", "float32")
EXTRA_STORES = ("0.2:float16",)  # the search's: keep 0.2 float16, between 0.1 and 0.3


def store_key(keep: float, dtype: str) -> str:
    return f"keep {keep:g} {dtype}"


DENSE = store_key(1.0, "float32")


def gradient_key(keep: float) -> str:
    return f"gradient keep {keep:g} float16"


def store_options(args) -> dict:
    grid = {store_key(k, d): dict(keep=k, value_dtype=d) for k in args.keeps for d in args.dtypes}
    for spec in args.extra_stores:
        keep, dtype = spec.split(":")
        grid[store_key(float(keep), dtype)] = dict(keep=float(keep), value_dtype=dtype)
    grid.setdefault(DENSE, dict(keep=1.0, value_dtype="float32"))  # the reference for the byte shares
    grid = {key: {**options, "attribution": "update"} for key, options in grid.items()}
    for keep in args.gradient_keeps:  # gradient attribution (pyunlearn.attribution): batch gradients + step hyper
        grid[gradient_key(keep)] = dict(keep=keep, value_dtype="float16", attribution="gradient")
    return grid


def subtract(key: str, *, repair: dict | None = None, fine_tune: float = 0.0, lr: float, batch_size: int,
             rule: tuple[str, float | None] | None = None):
    """Subtraction with store `key` (a gradient store under coefficient `rule`: (name, damping));
    then, with `repair`, unlearn.repair of the subtracted steps (options; "max_share": the latest
    steps, at most that share of training's steps); then `fine_tune` epochs of fine-tuning on
    retained data at lr / 5 (as fidelity's fine-tune row)."""
    def run(model, c):
        with coefficient_rule(*rule) if rule else contextlib.nullcontext():
            return _subtract(model, c)

    def _subtract(model, c):
        store = c.artifacts.stores[key]
        stored, raw = c.artifacts.bytes[key]
        extra = {"store_bytes": stored, "dense_store_bytes": c.artifacts.bytes[DENSE][0], "dense_bytes": raw}
        if repair is None:
            report = pu.amnesiac_forget(model, store, c.split.forget.ids)
            extra.update(steps_applied=report.steps_applied, samples_trained=0)
        else:
            options = dict(repair)
            if "max_share" in options:
                options["max_steps"] = max(1, int(options.pop("max_share") * store.steps))
            # the training rate: gradient stores record it, update stores do not
            report, fixed = forget_and_repair(model, store, c.split.forget.ids, c.split.retain, lr=lr, **options)
            extra.update(steps_applied=report.steps_applied, subtracted=int(subtracted_steps(report).size),
                         steps_replayed=fixed.steps_replayed, samples_replayed=fixed.samples_replayed,
                         samples_trained=fixed.samples_replayed + fixed.samples_fine_tuned)
        if fine_tune:
            tuned = _fine_tune_share(model, c, fine_tune, lr / 5, batch_size)
            extra.update(fine_tune_steps=tuned["steps"], samples_trained=extra["samples_trained"] + tuned["samples_trained"])
        return extra
    return run


def candidates(args) -> dict:
    """The settings tried for the targets (a quarter of the dense store at most; ≤30% of a retrain
    random, ≤10% as one unit)."""
    lr, bs = args.lr, args.batch_size
    guard = lambda run: probe_guarded(run, lr=lr / 5, batch_size=bs)
    table = {}
    for keep in args.search_keeps:
        key = store_key(keep, "float16")
        name = f"Subtract keep {keep:g} float16"
        table.update({
            f"{name} + repair (latest ≤10% of steps)": subtract(key, repair={"max_share": 0.1}, lr=lr, batch_size=bs),
            f"{name} + repair (latest ≤20% of steps)": subtract(key, repair={"max_share": 0.2}, lr=lr, batch_size=bs),
            f"{name} + fine-tune 0.1 epoch": subtract(key, fine_tune=0.1, lr=lr, batch_size=bs),
            f"{name} + fine-tune 0.2 epoch": subtract(key, fine_tune=0.2, lr=lr, batch_size=bs),
            f"{name} (probe-guarded)": guard(subtract(key, lr=lr, batch_size=bs)),
            f"{name} + repair (latest ≤20% of steps) (probe-guarded)":
                guard(subtract(key, repair={"max_share": 0.2}, lr=lr, batch_size=bs)),
        })
    for share in (0.1, 0.2, 0.3):
        table[f"Fine-tune {share:g} epoch"] = lambda m, c, share=share: _fine_tune_share(m, c, share, lr / 5, bs)
    for keep in args.search_keeps:  # update attribution's analogue of the gradient rows below
        table[f"Subtract keep {keep:g} float16 + repair (latest ≤20% of steps) + fine-tune 0.3 epoch"] = \
            subtract(store_key(keep, "float16"), repair={"max_share": 0.2}, fine_tune=0.3, lr=lr, batch_size=bs)
    # Gradient attribution: the first-order rule subtracts each removed batch's gradient with the
    # momentum it carried into every later step (which update attribution leaves in the later,
    # untouched steps' updates); own step only the step itself, damped 0.5 half way between.
    for keep in args.gradient_keeps:
        key = gradient_key(keep)
        for rule, label in ((("first-order", None), "first-order"), (("own-step", None), "own step"),
                            (("damped", 0.5), "damped 0.5")):
            name = f"Gradient keep {keep:g} float16, {label}"
            row = lambda **o: subtract(key, lr=lr, batch_size=bs, rule=rule, **o)
            table[name] = row()
            table[f"{name} + repair (latest ≤20% of steps)"] = row(repair={"max_share": 0.2})
            if label == "first-order":
                table[f"{name} + fine-tune 0.3 epoch"] = row(fine_tune=0.3)
                table[f"{name} + repair (latest ≤20% of steps) + fine-tune 0.3 epoch"] = \
                    row(repair={"max_share": 0.2}, fine_tune=0.3)
                table[f"{name} (probe-guarded)"] = guard(row())
                table[f"{name} + repair (latest ≤20% of steps) (probe-guarded)"] = guard(row(repair={"max_share": 0.2}))
    return table


def methods(args, grid: dict) -> dict:
    table = {}
    for key, options in grid.items():
        if options["attribution"] != "update":
            continue  # gradient stores: their rows are among the candidates
        table[f"Subtract {key}"] = subtract(key, lr=args.lr, batch_size=args.batch_size)
        table[f"Subtract {key} + repair"] = subtract(key, repair={}, lr=args.lr, batch_size=args.batch_size)
    table.update(candidates(args))
    if args.methods:
        table = {m: fn for m, fn in table.items() if m in args.methods}
    return table


def curve(summary: dict, grid: dict) -> list[dict]:
    """The keep × precision curve: per store, subtraction and subtraction + repair."""
    points = []
    for key, options in grid.items():
        if options["attribution"] != "update":
            continue
        for repaired in (False, True):
            name = f"Subtract {key}{' + repair' if repaired else ''}"
            if name not in summary["methods"]:
                continue
            e = summary["methods"][name]
            points.append({"keep": options["keep"], "dtype": options["value_dtype"], "repair": repaired,
                           **{k: e[k] for k in ("attack", "TA", "worst_drop_vs_original", "worst_drop_vs_retrain",
                                                "class0", "store_share", "store_share_raw", "time_share",
                                                "meets") if k in e}})
    return points


def curve_table(points: list[dict]) -> str:
    cell = lambda pair: f"{pair[0]:.2f} ± {pair[1]:.2f}"
    lines = ["| keep | values | store / dense store | store / raw dense f32 | ASR subtract | TA subtract | worst class "
             "drop vs Retrain, subtract | ASR + repair | TA + repair | worst class drop vs Retrain, + repair | "
             "time / retrain + repair |", "|" + "---|" * 11]
    by = {}
    for p in points:
        by.setdefault((p["keep"], p["dtype"]), {})[p["repair"]] = p
    for (keep, dtype), pair in sorted(by.items()):
        s, r = pair.get(False), pair.get(True)
        first = s or r
        lines.append(f"| {keep:g} | {dtype} | {first['store_share'][0]:.3f} | {first['store_share_raw'][0]:.3f} | "
                     + (f"{cell(s['attack'])} | {cell(s['TA'])} | {cell(s['worst_drop_vs_retrain'])} | " if s else "— | — | — | ")
                     + (f"{cell(r['attack'])} | {cell(r['TA'])} | {cell(r['worst_drop_vs_retrain'])} | "
                        f"{r['time_share'][0]:.3f} |" if r else "— | — | — | — |"))
    return "\n".join(lines)


def parse_args(argv):
    parser = training_arguments(__doc__)
    parser.add_argument("--scenarios", nargs="+", default=["backdoor", "backdoor-unit"], choices=POISON_SCENARIOS)
    parser.add_argument("--keeps", type=float, nargs="+", default=list(KEEPS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=["float16", "float32"])
    parser.add_argument("--extra-stores", nargs="*", default=list(EXTRA_STORES), help="keep:dtype stores beside the grid")
    parser.add_argument("--search-keeps", type=float, nargs="*", default=[0.1, 0.2],
                        help="the float16 stores the candidates use (each must be recorded: in the grid or extra)")
    parser.add_argument("--gradient-keeps", type=float, nargs="*", default=[0.01, 0.1],
                        help="gradient-attribution stores (float16) for the candidates' coefficient rules")
    parser.add_argument("--methods", nargs="+", help="only these rows (default: all)")
    parser.add_argument("--units-per-batch", type=int, default=1)
    parser.add_argument("--mia-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--mia-samples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "poison_store.json")
    poison_arguments(parser)
    args = parser.parse_args(argv)
    args.gradient_scenarios = []
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    return with_torch_threads(args.threads, lambda: _run(args, argv))


def _run(args, argv) -> dict:
    from _meta import command_line, meta_comment, run_metadata  # benchmarks/ is on sys.path

    subset, test, _ = load(args)
    grid = store_options(args)
    missing = [k for k in args.search_keeps if store_key(k, "float16") not in grid]
    if missing:
        raise SystemExit(f"--search-keeps {missing}: no such float16 store recorded (add it to --keeps or --extra-stores)")
    command = command_line("poison_store.py", argv)
    meta = run_metadata({"command": command, **vars(args), "stores": grid})
    out = {"meta": meta, "scenarios": {}}
    md = [meta_comment(meta), f"`{command}`", ""]
    for name in args.scenarios:
        prepare, cohort_of, poisoned = scenario(name, subset, test, args)
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        trainer = make_trainer(args, cohort_of, ("update", "gradient") if args.gradient_keeps else ("update",),
                               args.units_per_batch, stores=grid)
        notes = {**poison_notes(poisoned), "units_per_batch": args.units_per_batch if cohort_of else None}
        with measured_beside(poison_measure(poisoned, test)) as taken:
            results = experiment.run(seeds=args.seeds, prepare=prepare, train=trainer, methods=methods(args, grid),
                                     mia_seeds=args.mia_seeds, mia_samples=args.mia_samples,
                                     config={"scenario": name, **notes}, log=lambda line: print(line, flush=True))
        attach(results, taken)
        summary = poison_summary(results, poisoned.attack, args.epochs * len(prepare(args.seeds[0]).retain))
        points = curve(summary, grid)
        out["scenarios"][name] = {**results.to_dict(), "poison": summary, "curve": points,
                                  "seconds": time.perf_counter() - start}
        batching = (f"CohortBatchSampler(units_per_batch={args.units_per_batch}): the poison one unit"
                    if cohort_of else "random batches")
        md += [f"## {name}", "", notes["poison"] + f" Batches: {batching}.", "", "Keep × precision:", "",
               curve_table(points), "", "Every row:", "", poison_table(summary), ""]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
        args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
        print(poison_table(summary), flush=True)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return out


if __name__ == "__main__":
    main()
