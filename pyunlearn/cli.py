"""The `pyunlearn` command: demo, inspect, forget, selfcheck."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


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
    import os

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
            ledger = UpdateStore.open(path, mode="r").ledger
            exported[path] = {"requests": ledger.audit(), "models": [m.to_json() for m in ledger.models]}
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
    print(f"ledger: {len(ledger.deletions)} deletion requests, {len(ledger.removed_steps)} steps removed, "
          f"{len(ledger.models)} models on the timeline" +
          (f", latest deletion's model {ledger.fingerprint}" if ledger.fingerprint else ""))
    if ledger_table:
        _print_audit(ledger)
        return
    print(f"\n{'layer':<40} {'shape':<20} {'numel':>10} {'k':>8}")
    for layer in store.layers:
        print(f"{layer.name:<40} {str(layer.shape):<20} {layer.numel:>10} {layer.k:>8}")


def _print_audit(ledger) -> None:
    print(f"\n{'#':>3} {'time (UTC)':<24} {'request':<24} {'status':<8} {'keys':>6} {'unseen':>6} {'steps':>6} "
          f"{'applied':>7} {'from model':<40} {'to model':<40} method")
    for row in ledger.audit():
        print(f"{row['record']:>3} {row['time'] or '(before format 4)':<24} {row['request']:<24} {row['status']:<8} "
              f"{row['keys']:>6} {row['missing_keys']:>6} {row['steps_removed']:>6} {row['subtracted']:>7} "
              f"{row['fingerprint_before']:<40} {row['fingerprint_after']:<40} {row['method']} {row['params']}"
              + (f"  undone: {row['undo_reason']}" if row["undo_reason"] else ""))


def _read_keys(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"--keys {path}: no such file")
    keys = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not keys:
        raise ValueError(f"--keys {path}: the file holds no keys (one per line)")
    return keys


def _read_ids(path: Path):
    import numpy as np

    if not path.exists():
        raise FileNotFoundError(f"--ids {path}: no such file")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    text = path.read_text().replace(",", " ").split()
    try:
        return np.array([int(t) for t in text], dtype=np.int64)
    except ValueError as exc:
        raise ValueError(f"--ids {path}: expected integer sample IDs separated by spaces, commas or lines ({exc})") from None


def _forget(args) -> int:
    """Forget with the ledger in two writes around the save: the deletion is recorded as pending,
    the new checkpoint written atomically, then the deletion committed. A failure or a kill at
    any point leaves a ledger that matches a model on disk (the input checkpoint, or the output
    one, also when --out is --checkpoint)."""
    from .store.layers import module_for_store
    from .store import UpdateStore
    from .unlearn import amnesiac_forget

    ids = _read_ids(Path(args.ids)) if args.ids else _read_keys(Path(args.keys))
    if args.keys:
        from .errors import KeyMappingError
        from .keys import SECRET_ENV, SECRET_FILE_ENV, KeyHasher

        if KeyHasher.resolve() is None:
            raise KeyMappingError(f"--keys needs the store's secret: set {SECRET_ENV} (the secret) or "
                                  f"{SECRET_FILE_ENV} (a file holding it)")
    out_path = Path(args.out)
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"--out {args.out}: folder {out_path.parent} does not exist")
    checkpoint = _load_checkpoint(args.checkpoint)
    store = UpdateStore.open(args.store)
    try:
        weights = _Weights(checkpoint, args.key, args.checkpoint, [layer.name for layer in store.layers])
        with store.writing():  # one writer from reading the ledger to writing it
            module = module_for_store(weights.state, store)
            report = amnesiac_forget(module, store, ids, request_id=args.request_id, commit=False)
            out = weights.replaced({name: p.detach().clone() for name, p in module.named_parameters()})
            try:
                temporary = _write_temporary(out, out_path)
                try:
                    os.replace(temporary, out_path)
                except BaseException:
                    os.unlink(temporary)
                    raise
            except BaseException:  # not renamed: the new model does not exist, neither does its deletion
                store.record_deletion(report.ledger_before, replacing=report.ledger_pending)
                raise
            # Renamed: the new model is in place. If making the rename durable fails, the entry stays
            # pending (both models accepted) and the error is raised; else the deletion is committed.
            _sync_folder(out_path.parent)
            store.record_deletion(report.ledger_after, replacing=report.ledger_pending)
    finally:
        store.close()
    print(f"request {report.request_id}: forgot {len(ids)} {'IDs' if args.ids else 'keys'} "
          f"({len(report.missing_ids)} never seen): {report.steps_removed} new steps, "
          f"{report.steps_applied} subtracted from this checkpoint, {report.seconds * 1e3:.1f} ms; wrote {args.out}")
    return 0


class _Weights:
    """The state_dict inside a checkpoint: the checkpoint itself (a dict of tensors), its entry
    `key`, or the entry of a known wrapper: "state_dict" (Lightning checkpoints, and others),
    "model", "model_state_dict", "module". Its keys may carry a prefix before the store's layer
    names (a store created from `net` and a checkpoint of a module holding it as `self.net`:
    "net."); `state` has the store's names, and replaced() puts new values back in place,
    keeping everything else of the checkpoint (a Lightning checkpoint stays one)."""

    WRAPPERS = ("state_dict", "model", "model_state_dict", "module")

    def __init__(self, checkpoint, key: str | None, path: str, names: list[str]):
        self.checkpoint, self.key = checkpoint, key
        if not isinstance(checkpoint, dict):
            raise ValueError(f"--checkpoint {path}: expected a state_dict (a dict of tensors) or a dict holding one, "
                             f"got {type(checkpoint).__name__}")
        if key is not None:
            if key not in checkpoint:
                raise ValueError(f"--key {key}: {path} has no entry {key!r}; it has {_some(checkpoint)}")
            entry = checkpoint[key]
        elif _is_state_dict(checkpoint):
            entry = checkpoint
        else:
            self.key = next((k for k in self.WRAPPERS if _is_state_dict(checkpoint.get(k))), None)
            if self.key is None:
                raise ValueError(f"--checkpoint {path}: neither a state_dict (a dict of tensors) nor a checkpoint "
                                 f"with one under {', '.join(repr(k) for k in self.WRAPPERS)}; it has "
                                 f"{_some(checkpoint)}: name the entry with --key")
            entry = checkpoint[self.key]
        if not isinstance(entry, dict):
            raise ValueError(f"--key {key}: the entry is a {type(entry).__name__}, not a state_dict")
        self.entry = entry
        self.prefix = _prefix(entry, names)
        self.state = {name: entry[self.prefix + name] for name in names if self.prefix + name in entry} \
            if self.prefix else entry

    def replaced(self, values: dict) -> dict:
        entry = dict(self.entry)
        for name, value in values.items():
            entry[self.prefix + name] = value
        if self.key is None:
            return entry
        out = dict(self.checkpoint)
        out[self.key] = entry
        return out


def _is_state_dict(value) -> bool:
    import torch

    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _some(mapping: dict) -> str:
    keys = [repr(k) for k in list(mapping)[:8]]
    return ", ".join(keys) + (", ..." if len(mapping) > 8 else "") if keys else "no entries"


def _prefix(entry: dict, names: list[str]) -> str:
    """"" if the store's names are keys of `entry`, else the one prefix in front of all of them
    ("net.", "model.", "module.", ...), else "" (module_for_store then names what is missing)."""
    if not names or names[0] in entry:
        return ""
    for key in entry:
        if isinstance(key, str) and key.endswith("." + names[0]):
            prefix = key[: -len(names[0])]
            if all(prefix + name in entry for name in names):
                return prefix
    return ""


def _load_checkpoint(path: str):
    """torch.load with weights_only=True (a checkpoint may come from anywhere: never run its
    pickled code), its refusal as one line."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--checkpoint {path}: holds objects other than tensors, which are not loaded "
                         f"(weights_only); save model.state_dict() instead ({first})") from None


def _write_temporary(state: dict, path: Path) -> str:
    """torch.save into a temporary file beside `path`, fsynced: renamed over `path` next, readers
    see the old file or the new one, never a partial one (also when `path` is the input)."""
    import tempfile

    import torch

    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(temporary)
        raise
    return temporary


def _sync_folder(folder: Path) -> None:
    """Makes a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def main(argv=None) -> int:
    from ._version import __version__

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
    demo.add_argument("--store", help="where to keep the update stores (default: a temporary folder)")
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
                        help="a state_dict saved with torch.save, a dict holding one ('state_dict', 'model', ...), or "
                             "a Lightning .ckpt (loaded weights_only)")
    forget.add_argument("--key", help="the checkpoint's entry holding the state_dict (default: the checkpoint itself "
                                      "if it is one, else 'state_dict', 'model', 'model_state_dict' or 'module')")
    which = forget.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", help="file of sample IDs: whitespace/comma separated, or .npy")
    which.add_argument("--keys", help="file of sample keys, one per line (UTF-8); the store's secret comes from "
                                      "PYUNLEARN_SECRET or PYUNLEARN_SECRET_FILE")
    forget.add_argument("--request-id", type=_request_id,
                        help="the request's id in the audit trail (default: one is generated)")
    forget.add_argument("--out", required=True, help="where to write the new checkpoint (the input's structure)")
    forget.set_defaults(run=_forget)

    selfcheck = commands.add_parser("selfcheck", help="say which kernels are native and check them on a tiny model")
    selfcheck.set_defaults(run=_selfcheck)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except _USER_ERRORS as exc:
        # Every pyunlearn error, and what bad files or arguments raise: one line, exit 1.
        # (argparse's own usage errors exit 2.) Anything else is a bug and keeps its traceback.
        message = " ".join(str(exc).split())  # one line, whatever the message holds
        print(f"pyunlearn {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
