"""The `pyunlearn` command: demo, inspect, forget, audit verify, selfcheck.

Exit codes: 0 done; 1 an error (one line on standard error); 2 a usage error (argparse);
3 (`forget`) none of the request's keys or IDs was used by a recorded step, so nothing was
changed (--record-not-found records it instead); 4 (`audit verify`) a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_ERROR, EXIT_NOT_FOUND, EXIT_AUDIT_FAILED = 1, 3, 4


def _same_bits(xs, ys) -> bool:
    import torch

    return all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
               for x, y in zip(xs, ys))


def _selfcheck(args) -> int:
    """Prune and subtract one step of a tiny model natively and with the torch reference."""
    import torch

    from . import __version__
    from .kernels import ops

    shapes = [("fc1.weight", (32, 64)), ("fc1.bias", (32,)), ("fc2.weight", (10, 32)), ("fc2.bias", (10,))]
    gen = torch.Generator().manual_seed(0)
    before = [torch.randn(shape, generator=gen) for _, shape in shapes]
    after = [b + 1e-3 * torch.randn(b.shape, generator=gen) for b in before]  # one SGD-sized step
    k = ops.k_for([b.numel() for b in before], 0.1)
    row = ops.prune_topk([b.clone() for b in before], after, k)
    reference_row = ops.prune_topk_reference([b.clone() for b in before], after, k)
    params, reference_params = [a.clone() for a in after], [a.clone() for a in after]
    ops.subtract_sparse(params, row, k)
    ops.subtract_sparse_reference(reference_params, reference_row, k)

    checks = {"prune_topk": _same_bits(row, reference_row), "subtract_sparse": _same_bits(params, reference_params)}
    cuda = ops.supports("cuda")
    if cuda.available:  # the same step on the GPU, through whichever kernels run there
        gpu = torch.device("cuda")
        gpu_row = ops.prune_topk([b.to(gpu) for b in before], [a.to(gpu) for a in after], k)
        gpu_params = [a.to(gpu) for a in after]
        ops.subtract_sparse(gpu_params, gpu_row, k)
        checks["prune_topk (cuda)"] = _same_bits([t.cpu() for t in gpu_row], reference_row)
        checks["subtract_sparse (cuda)"] = _same_bits([p.cpu() for p in gpu_params], reference_params)
    print(f"pyunlearn {__version__}, torch {torch.__version__}")
    print(f"kernels: {ops.backend()}")
    print(f"cuda: {cuda.kernels} kernels, {cuda.detail}" if cuda.available else "cuda: no GPU visible to torch")
    for name, ok in checks.items():
        print(f"  {name:<22} matches the torch reference bit for bit: {'yes' if ok else 'NO'}")
    return 0 if all(checks.values()) else 1


def _demo(args) -> int:
    from .demo import DemoConfig, run

    run(DemoConfig(epochs=args.epochs, keep=args.keep, forget=args.forget, seed=args.seed, store=args.store,
                   progress=args.progress))
    return 0


def _find_stores(path: str) -> list[str]:
    """`path` itself if it is a store (or not a local folder: a URL or a missing path, whose
    open says what is wrong), else the Zarr stores in the folders under it, up to 3 levels
    down (e.g. the demo's --store folder, which holds partial.zarr and dense.zarr)."""
    root = Path(path)
    if not root.is_dir() or (root / "zarr.json").exists():
        return [path]
    found = []
    for folder, subfolders, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        if "zarr.json" in files:
            found.append(folder)
            subfolders.clear()  # a store's own arrays hold zarr.json files too
        elif depth >= 3:
            subfolders.clear()
        subfolders.sort()
    return sorted(found) or [path]


def _inspect(args) -> int:
    paths = _find_stores(args.store)
    if args.json:
        from .store import UpdateStore

        exported = {}
        for path in paths:
            store = UpdateStore.open(path, mode="r")
            ledger = store.ledger
            exported[path] = {"head": store.head, "requests": ledger.audit(),
                              "records": [r.to_json() for r in ledger.records],
                              "models": [m.to_json() for m in ledger.models]}
        print(json.dumps(exported if len(paths) > 1 else exported[paths[0]], indent=2))
        return 0
    for i, path in enumerate(paths):
        if len(paths) > 1:
            print(("\n" if i else "") + f"== {path} ==")
        _inspect_one(path, ledger_table=args.ledger)
    return 0


def _inspect_one(path: str, *, ledger_table: bool) -> None:
    from .store import UpdateStore

    store = UpdateStore.open(path, mode="r")
    print(repr(store))
    print(store.stats().table())
    print(f"fingerprints: initial {store.initial_fingerprint}, final {store.final_fingerprint}")
    ledger = store.ledger
    print(f"audit log: {len(ledger)} records, {len(ledger.deletions)} deletion requests, {ledger.state.removed} steps "
          f"removed; head {store.head}" + (f"; latest deletion's model {ledger.fingerprint}" if ledger.fingerprint else ""))
    if ledger_table:
        _print_audit(ledger)
        return
    print(f"\n{'layer':<40} {'shape':<20} {'numel':>10} {'k':>8}")
    for layer in store.layers:
        print(f"{layer.name:<40} {str(layer.shape):<20} {layer.numel:>10} {layer.k:>8}")


def _print_audit(ledger) -> None:
    """Every record of the log, one line each, in aligned columns: #, time, kind, what it says."""
    audit = {row["record"]: row for row in ledger.audit()}
    rows = []
    for record in ledger.records:
        f = record.fields
        if record.kind == "deletion":
            row = audit[record.index]
            what = (f"request {f['request']}: {f['keys']} keys ({f['missing']} never seen), {row['steps_removed']} "
                    f"steps removed, {f['subtracted']} subtracted from record {f['from']}'s model "
                    f"{f['fingerprint_before']} → {f['fingerprint_after']} ({f['method']})")
            status = row["status"]
        elif record.kind == "catch-up":
            what = (f"record {f['from']}'s model brought up to date: {f['subtracted']} steps subtracted → "
                    f"{f['fingerprint_after']}")
            status = ""
        elif record.kind == "segment":
            what = f"training segment ended after step {f['steps'] - 1}: model {f['fingerprint']}"
            status = ""
        elif record.kind == "truncate":
            what, status = f"steps from {f['step']} on dropped", ""
        else:
            what, status = f"record {f['of']}: {f['reason']}", ""
        rows.append((str(record.index), record.time or "-", record.kind, status, what))
    header = ("#", "time (UTC)", "kind", "status", "")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    print()
    for r in [header] + rows:
        print(f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:<{widths[3]}}  {r[4]}".rstrip())


def _read_keys(path: Path) -> list[str]:
    """The keys of a --keys file (docs/guide.md: key files): UTF-8 (a byte-order mark is
    dropped), one key per line (blank lines skipped, spaces around a key dropped), or a JSON list
    of strings. A line that looks like another format (a comma, a tab, quotes, a bracket) is
    refused with its line number rather than read as a key no step used."""
    import json

    if not path.exists():
        raise FileNotFoundError(f"--keys {path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--keys {path}: not UTF-8 text ({exc}); save it as UTF-8, one key per line") from None
    if text.lstrip().startswith("["):
        try:
            keys = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"--keys {path}: starts like a JSON list but is not one ({exc})") from None
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"--keys {path}: a JSON key file must be a list of non-empty strings")
    else:
        keys = []
        for number, line in enumerate(text.splitlines(), start=1):
            key = line.strip()
            if not key:
                continue
            odd = next((c for c in (",", "\t", ";") if c in key), None)
            quoted = len(key) > 1 and key[0] == key[-1] and key[0] in "\"'"
            if odd or quoted or key[0] in "[{":
                what = f"holds {odd!r}" if odd else "is quoted" if quoted else "starts with a bracket"
                raise ValueError(f"--keys {path}, line {number}: {key[:40]!r} {what}: a key file holds one key per "
                                 "line, as it is (no separators, no quotes). A key that holds such characters goes in "
                                 "a JSON list file instead: [\"key one\", \"key, two\"]")
            keys.append(key)
    if not keys:
        raise ValueError(f"--keys {path}: the file holds no keys (one per line, or a JSON list)")
    return keys


def _read_ids(path: Path):
    import numpy as np

    if not path.exists():
        raise FileNotFoundError(f"--ids {path}: no such file")
    if path.suffix == ".npy":
        ids = np.load(path, allow_pickle=False)
    else:
        text = path.read_bytes().decode("utf-8-sig", errors="replace").replace(",", " ").split()
        try:
            ids = np.array([int(t) for t in text], dtype=np.int64)
        except ValueError as exc:
            raise ValueError(f"--ids {path}: expected integer sample IDs separated by spaces, commas or lines "
                             f"({exc}); keys (text) go in a --keys file") from None
    if ids.size == 0:
        raise ValueError(f"--ids {path}: the file holds no IDs. To bring a checkpoint up to date with the requests "
                         "since it was made, use --catch-up")
    return ids


def _forget(args) -> int:
    """Forget with the log written in two steps around the save: the deletion is recorded as
    pending, the new checkpoint written atomically in the input's format, then the deletion
    confirmed (or undone if the save failed). A failure or a kill at any point leaves a log that
    matches a model on disk (the input checkpoint, or the output one, also when --out is
    --checkpoint)."""
    from .integrations.checkpoints import Checkpoint, sync_folder
    from .kernels import fingerprint
    from .store import UpdateStore
    from .store.layers import module_for_store
    from .unlearn import amnesiac_forget

    ids = [] if args.catch_up else _read_ids(Path(args.ids)) if args.ids else _read_keys(Path(args.keys))
    unguarded = [flag for flag, value in (("--retain", args.retain), ("--forget-data", args.forget_data),
                                          ("--tolerance-overall", args.tolerance_overall),
                                          ("--tolerance-per-class", args.tolerance_per_class)) if value is not None]
    if args.probe is None and unguarded:
        raise ValueError(f"{' and '.join(unguarded)} {'take' if len(unguarded) > 1 else 'takes'} part in guarded "
                         "forgetting: give --probe (and --model) too")
    if args.no_dampen and args.forget_data is None:
        raise ValueError("--no-dampen: there is no dampening to leave out without --forget-data (it needs the "
                         "forgotten samples); drop --no-dampen")
    out_path = Path(args.out)
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"--out {args.out}: folder {out_path.parent} does not exist")
    store = UpdateStore.open(args.store)
    try:
        checkpoint = Checkpoint.load(args.checkpoint, args.key, [layer.name for layer in store.layers])
        with store.writing("forgetting"):  # one writer from reading the log to writing it
            not_found = "record" if args.record_not_found else "raise"
            if args.probe is None:
                module = module_for_store(checkpoint.state, store)
                report = amnesiac_forget(module, store, ids, request_id=args.request_id, commit=False,
                                         not_found=not_found)
                checkpoint.replace({name: p for name, p in module.named_parameters()})
            else:  # guarded: the model's own code runs the probe
                from .unlearn import Tolerance, forget

                given = {"overall": args.tolerance_overall, "per_class": args.tolerance_per_class}
                tolerance = Tolerance(**{name: value for name, value in given.items() if value is not None})
                module = _built_model(args.model, checkpoint)
                guarded = forget(module, store, ids, probe=_samples("--probe", args.probe, store),
                                 retain_data=None if args.retain is None else _samples("--retain", args.retain, store),
                                 forget_data=None if args.forget_data is None else _samples("--forget-data",
                                                                                             args.forget_data, store),
                                 budget=args.budget, strategy=args.strategy, request_id=args.request_id,
                                 commit=False, not_found=not_found, dampen=not args.no_dampen, tolerance=tolerance)
                report = guarded.forget
                print(f"guard: {'; '.join(guarded.actions)}; probe {guarded.before.to_text()} before, "
                      f"{guarded.final.to_text()} after ({guarded.retrain_share:.3f} of a retrain)")
                checkpoint.replace(module.state_dict())
            pending = report.status == "pending"
            states = checkpoint.update_recorder_state(fingerprint(store.check_model(module)))
            if args.reset_optimizer:
                checkpoint.reset_optimizer()
            try:
                checkpoint.save(out_path)
            except BaseException:  # not in place: the new model does not exist, neither does its deletion
                if pending:
                    store.undo(report.record, "its model could not be saved: writing --out failed")
                raise
            # In place: if making the rename durable fails, the entry stays pending (later forgets
            # and training settle it) and the error is raised; else it is confirmed.
            sync_folder(out_path.parent)
            if pending:
                store.confirm(report.record)
            head = store.head
    finally:
        store.close()
    also = (f"; {states} recorder state{'s' if states != 1 else ''} updated (training resumes from it)" if states else "") + \
        ("; optimizer state emptied" if args.reset_optimizer else "")
    if report.request_id is None:
        print(f"{report.status}: {report.steps_applied} steps subtracted to bring this checkpoint up to date; wrote "
              f"{args.out}{also}; audit head {head}")
        return 0
    what = "IDs" if args.ids else "keys"
    found = f"{report.matched} of {len(ids)} {what} found" + (
        f", {len(report.missing_ids)} never seen by a recorded step" if len(report.missing_ids) else "")
    state = "not-found: recorded, nothing removed" if report.matched == 0 else "applied"
    print(f"request {report.request_id} {state} ({found}): {report.steps_removed} new steps, {report.steps_applied} "
          f"subtracted from this checkpoint, {report.seconds * 1e3:.1f} ms; wrote {args.out}{also}; audit head {head}")
    return 0


def _built_model(factory: str | None, checkpoint):
    """The model --model names (`package.module:function`, called with no arguments), with the
    checkpoint's weights loaded (strict: every parameter and buffer)."""
    import importlib

    if not factory or ":" not in factory:
        raise ValueError("--probe needs the model's code to measure it: --model package.module:function (a function "
                         "returning the untrained model)")
    module_name, _, name = factory.partition(":")
    try:
        make = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--model {factory}: cannot import it ({exc})") from None
    model = make()
    model.load_state_dict(checkpoint.model_state(), strict=True)
    return model


def _samples(arg: str, path: str, store):
    """A SampleSet saved with torch.save({"ids": ..., "x": ..., "y": ...}) (loaded weights_only);
    "keys" (a list of str) instead of "ids" names the samples by their keys, mapped with the
    store's secret as the recorder mapped them (a replay finds the steps' samples by ID)."""
    import torch

    from .data import SampleSet

    from .integrations.checkpoints import load_torch

    saved = load_torch(path)
    named = isinstance(saved, dict) and len({"ids", "keys"} & saved.keys()) == 1
    if not named or not {"x", "y"} <= saved.keys():
        raise ValueError(f"{arg} {path}: expected a dict of 'x', 'y' (tensors) and either 'ids' (a tensor of the "
                         "store's sample IDs) or 'keys' (a list of str, on a store of keys): torch.save of a "
                         "SampleSet's fields")
    ids = saved["ids"] if "ids" in saved else store.ids_for(saved["keys"], arg)
    return SampleSet(torch.as_tensor(ids, dtype=torch.int64), saved["x"], torch.as_tensor(saved["y"]).long())


def _audit(args) -> int:
    from .store import UpdateStore
    from .store.verify import verify

    audit_key = Path(args.audit_key_file).read_bytes().strip() if args.audit_key_file else None
    store = UpdateStore.open(args.store, mode="r", audit_key=audit_key)
    findings = verify(store, head=args.head, chain_only=args.chain_only)
    for finding in findings:
        print(finding.line())
    bad = [f for f in findings if not f.ok]
    print(f"{args.store}: {'sound' if not bad else f'{len(bad)} check(s) FAILED'}")
    return 0 if not bad else EXIT_AUDIT_FAILED


def _user_errors() -> tuple[type[BaseException], ...]:
    from pickle import UnpicklingError  # torch.load(weights_only=True) refusing a pickled object

    from .errors import PyunlearnError

    return (PyunlearnError, OSError, ValueError, TypeError, KeyError, RuntimeError, OverflowError, UnpicklingError)


_USER_ERRORS = _user_errors()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _request_id(text: str) -> str:
    if not 0 < len(text) <= 200:
        raise argparse.ArgumentTypeError("must be 1 to 200 characters")
    return text


def _float_in(expected: str, inside, outside: str):
    """An argparse type: a number for which inside(value) holds; `expected` and `outside` word
    the errors for text that is not a number and for a number out of range."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not inside(value):
            raise argparse.ArgumentTypeError(f"{outside}, got {value}")
        return value
    return parse


_positive_float = _float_in("a positive number", lambda v: 0.0 < v < float("inf"), "must be positive")
_share = _float_in("a share of accuracy in [0, 1)", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
_ratio = _float_in("a number in (0, 1]", lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")


def main(argv=None) -> int:
    from ._version import __version__
    from .unlearn.guarded import STRATEGIES, Tolerance  # imported with the package already

    parser = argparse.ArgumentParser(prog="pyunlearn", description="Make trained PyTorch models forget training samples.")
    parser.add_argument("--version", action="version", version=f"pyunlearn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    # Arguments are checked as they are parsed, before any work (the demo trains for a while).
    demo = commands.add_parser("demo", help="train on the bundled digits with recording, forget samples, show the effect")
    demo.add_argument("--epochs", type=_positive_int, default=10)
    demo.add_argument("--keep", type=_ratio, default=0.01, help="share of each layer's update entries kept, in (0, 1] "
                                                                 "(default 0.01)")
    demo.add_argument("--forget", type=_positive_int, default=10, help="how many training samples to forget (default 10)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--store", default="pyunlearn-demo",
                      help="the folder for the stores, the trained model and an ID file (default ./pyunlearn-demo)")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress bars (default: when standard error is a terminal)")
    demo.set_defaults(run=_demo)

    inspect = commands.add_parser("inspect", help="a store's size, layer table and ledger (every store under a folder)")
    inspect.add_argument("store", help="a store, or a folder holding stores (such as the demo's --store folder)")
    inspect.add_argument("--ledger", action="store_true", help="the audit trail: every deletion request as a table")
    inspect.add_argument("--json", action="store_true", help="the audit trail and the models on the timeline as JSON")
    inspect.set_defaults(run=_inspect)

    forget = commands.add_parser("forget", help="forget sample IDs from a saved checkpoint")
    forget.add_argument("--store", required=True)
    forget.add_argument("--checkpoint", required=True,
                        help="a state_dict saved with torch.save, a dict holding one ('state_dict', 'model', ...), a "
                             "Lightning .ckpt (loaded weights_only), a .safetensors file, or a Hugging Face Trainer "
                             "checkpoint folder; the output is written in the same format")
    forget.add_argument("--key", help="the checkpoint's entry holding the state_dict (default: the checkpoint itself "
                                      "if it is one, else 'state_dict', 'model', 'model_state_dict' or 'module')")
    which = forget.add_mutually_exclusive_group(required=True)
    which.add_argument("--keys", help="file of sample keys (a store of keys): one per line, UTF-8, or a JSON list; the "
                                      "store's secret comes from PYUNLEARN_SECRET or PYUNLEARN_SECRET_FILE")
    which.add_argument("--ids", help="file of integer sample IDs (a store of integer IDs): whitespace/comma "
                                     "separated, or .npy")
    which.add_argument("--catch-up", action="store_true",
                       help="no request: bring the checkpoint up to date with every request since it was made")
    forget.add_argument("--request-id", type=_request_id,
                        help="the request's id in the audit trail (default: one is generated; an id used before is "
                             "refused)")
    forget.add_argument("--record-not-found", action="store_true",
                        help=f"record a request none of whose keys a recorded step used as not-found (exit 0); "
                             f"without it such a request changes nothing and exits {EXIT_NOT_FOUND}")
    forget.add_argument("--out", required=True, help="where to write the new checkpoint (the input's format and "
                                                       "structure; a recorder state in it names the new model)")
    forget.add_argument("--reset-optimizer", action="store_true",
                        help="empty the optimizer state saved in the checkpoint (momentum, Adam's moments: they still "
                             "carry the forgotten samples' gradients); its settings stay")
    guard = forget.add_argument_group("guarded forgetting (pyunlearn.forget): measure a probe, repair within a budget")
    guard.add_argument("--probe", help="a validation probe: torch.save({'ids' or 'keys', 'x', 'y'}) of retained or "
                                       "held-out samples; the result must stay within the tolerance on it, or nothing "
                                       "changes")
    guard.add_argument("--model", help="package.module:function returning the untrained model (the probe needs "
                                       "the model's code)")
    guard.add_argument("--retain", help="retained training data to repair with, as --probe; a replay finds each "
                                        "step's samples by ID: on a store of keys, name them by 'keys'")
    guard.add_argument("--budget", type=_positive_float, default=0.3,
                       help="what the repairs and dampenings may cost, as a share of a retrain (default 0.3)")
    guard.add_argument("--strategy", choices=STRATEGIES, default="auto",
                       help="how to repair if the probe falls: auto (default: chosen from the store's statistics of "
                            "the request, see docs/guide.md), subtract (no repair), replay, fine-tune")
    guard.add_argument("--forget-data", help="the forgotten samples with their labels as trained on, as --probe: the "
                                             "request then dampens what only they rely on (a backdoor that "
                                             "subtraction leaves), before a repair and at the end, each kept only "
                                             "if the probe holds; with --retain, the classes they hold most of are "
                                             "exempt from the tolerance")
    guard.add_argument("--no-dampen", action="store_true", help="leave the dampening out although --forget-data is given")
    guard.add_argument("--tolerance-overall", type=_share, metavar="SHARE",
                       help="how far the probe's accuracy may fall below the model before the request (default "
                            f"{Tolerance().overall:g})")
    guard.add_argument("--tolerance-per-class", type=_share, metavar="SHARE",
                       help=f"how far each class's accuracy on the probe may fall (default {Tolerance().per_class:g}, "
                            "or twice the class's binomial standard error on the probe if larger)")
    forget.set_defaults(run=_forget)

    audit = commands.add_parser("audit", help="check a store's audit log, forgotten IDs and data (an auditor's check)")
    audits = audit.add_subparsers(dest="audit_command", required=True)
    check = audits.add_parser("verify", help="every record's hash chain and MAC, the states, the forgotten IDs, "
                                             "every step's place-bound digests; with --head, that no record is gone")
    check.add_argument("store")
    check.add_argument("--head", help="a head kept from an earlier forget (\"<records>:sha256:<hex>\"): the log must "
                                      "still hold it")
    check.add_argument("--audit-key-file", help="a file holding the audit key of a store of integer IDs (a store of "
                                                "keys takes its secret from PYUNLEARN_SECRET[_FILE])")
    check.add_argument("--chain-only", action="store_true",
                       help="accept an authenticated log whose MACs cannot be checked here (no secret or audit key): "
                            "the hash chain alone, said so in the output")
    check.set_defaults(run=_audit)

    selfcheck = commands.add_parser("selfcheck", help="say which kernels are native and check them on a tiny model")
    selfcheck.set_defaults(run=_selfcheck)

    args = parser.parse_args(argv)
    from .errors import NotFoundError

    try:
        return args.run(args)
    except NotFoundError as exc:  # a request that matched nothing: not a success, not a crash
        print(f"pyunlearn {args.command}: not found: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except _USER_ERRORS as exc:
        # Every pyunlearn error, and what bad files or arguments raise: one line, exit 1.
        # (argparse's own usage errors exit 2.) Anything else is a bug and keeps its traceback.
        message = " ".join(str(exc).split())  # one line, whatever the message holds
        print(f"pyunlearn {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
