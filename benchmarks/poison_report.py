"""Tables of issue 25's poison results, from the JSON files fidelity.py and poison_store.py wrote:
per scenario, every row's attack metric, TA, class 0 and worst class, cost and whether it meets
the removal target, over all seeds and over the seeds whose Original trained (a poisoned unit
that fills whole batches collapsed one training to a single class: those seeds say nothing
about forgetting, and their mean would hide the others).

    python benchmarks/poison_report.py benchmarks/results/fidelity-poison.json \
        benchmarks/results/poison_store.json ... --out benchmarks/results/poison_report.md

A training collapsed where its Original's test accuracy is below --collapsed (default 50%; a
trained model here scores 79-87%, a collapsed one 10%). The summaries are
fidelity.poison_summary's, recomputed on the kept seeds (floors too).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fidelity import poison_summary, poison_table  # a sibling
from pyunlearn.evaluation import experiment


def results_of(scenario: dict, seeds=None) -> experiment.Results:
    rows = []
    for row in scenario["rows"]:
        if seeds is not None and row["seed"] not in seeds:
            continue
        row = {k: v for k, v in row.items() if k != "time_share"}
        rows.append(experiment.MethodRun(**row))
    return experiment.Results(rows, scenario["config"])


def retrain_samples(meta: dict, scenario: dict) -> int:
    config = meta["config"]
    forgotten = config["canaries"] if scenario["config"].get("poison_kind") == "canary" \
        else scenario["config"]["poisoned_samples"]
    return config["epochs"] * (config["subset"] - forgotten)


def trained_seeds(scenario: dict, threshold: float) -> list[int]:
    return sorted(r["seed"] for r in scenario["rows"] if r["method"] == experiment.ORIGINAL and r["TA"] >= threshold)


def report(paths: list[Path], threshold: float) -> str:
    from _meta import meta_comment, run_metadata  # benchmarks/ is on sys.path

    md = [meta_comment(run_metadata({"inputs": [str(p) for p in paths], "collapsed_below": threshold})), ""]
    for path in paths:
        data = json.loads(path.read_text())
        meta = data["meta"]
        md += [f"# {path.name}", "", f"`{meta['config']['command']}` at {meta['code']['commit'][:7]}", ""]
        for name, scenario in data["scenarios"].items():
            attack = scenario["poison"]["attack"]
            seeds = sorted({r["seed"] for r in scenario["rows"]})
            kept = trained_seeds(scenario, threshold)
            md += [f"## {name}", ""]
            if kept != seeds:
                collapsed = sorted(set(seeds) - set(kept))
                md += [f"Original collapsed (TA < {threshold:g}) at seed(s) {collapsed}; the table is over seeds "
                       f"{kept}, floors recomputed on them.", ""]
            if len(kept) < 1:
                md += ["No seed trained.", ""]
                continue
            summary = poison_summary(results_of(scenario, set(kept)), attack, retrain_samples(meta, scenario))
            md += [poison_table(summary), ""]
    return "\n".join(md)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", type=Path, nargs="+")
    parser.add_argument("--collapsed", type=float, default=50.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    text = report(args.inputs, args.collapsed)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return text


if __name__ == "__main__":
    main()
