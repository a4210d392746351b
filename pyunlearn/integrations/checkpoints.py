"""Checkpoints as `pyunlearn forget` reads and writes them: it writes what it read.

    torch file      a state_dict, or a dict holding one ("state_dict": Lightning .ckpt files and
                    others, "model", "model_state_dict", "module", or the entry --key names),
                    loaded with weights_only (a checkpoint may come from anywhere)
    .safetensors    a flat dict of tensors (the Hugging Face format), written back as safetensors
                    with the input's metadata
    a folder        a Hugging Face Trainer checkpoint (model.safetensors or pytorch_model.bin,
                    trainer_state.json, optimizer.pt, ...): written back as a folder

The output keeps everything of the input but the trained weights: the structure, the key prefix
before the store's names (a store created from `net`, a Lightning module holding it as
`self.net`: "net."), each tensor's dtype. A recorder state in it (UpdateRecorder.state_dict(), as
the Lightning and Trainer callbacks save it) is updated to the forgotten model, so training
resumes from the output (`fit(ckpt_path=...)`, `train(resume_from_checkpoint=...)`); with
reset_optimizer the optimizer's state (momentum, Adam's moments, which still carry the forgotten
samples' gradients) is emptied, its settings kept. Files are written to a temporary name and
renamed into place, so a reader sees the old checkpoint or the new one, never a mix.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

RECORDER_STATE = "pyunlearn.recorder-state"
WRAPPERS = ("state_dict", "model", "model_state_dict", "module")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class Checkpoint:
    """A checkpoint read for forgetting: `state` has the store's layer names (a view of the
    weights), `entry` the whole state_dict as stored (buffers and frozen parameters included)."""

    def __init__(self, path: str, kind: str, content: dict, key: str | None, names: list[str],
                 metadata: dict | None = None, folder_weights: str | None = None):
        self.path, self.kind, self.content, self.key = path, kind, content, key
        self.metadata, self.folder_weights = metadata, folder_weights
        entry = content if key is None else content[key]
        if not isinstance(entry, dict):
            raise ValueError(f"--key {key}: the entry is a {type(entry).__name__}, not a state_dict")
        self.entry = entry
        self.prefix = _prefix(entry, names)
        self.state = {name: entry[self.prefix + name] for name in names if self.prefix + name in entry}
        self.trainer_state: dict | None = None  # a Trainer folder's trainer_state.json
        self._reset_optimizer = False

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, path: str, key: str | None, names: list[str]) -> "Checkpoint":
        where = Path(path)
        if where.is_dir():
            weights = next((name for name in HF_WEIGHTS if (where / name).is_file()), None)
            if weights is None:
                raise ValueError(f"--checkpoint {path}: a folder, but not a Hugging Face Trainer checkpoint (no "
                                 f"{' or '.join(HF_WEIGHTS)})")
            inner = cls.load(str(where / weights), None, names)
            checkpoint = cls(path, "folder", inner.content, None, names, inner.metadata, folder_weights=weights)
            state_file = where / "trainer_state.json"
            if state_file.is_file():
                checkpoint.trainer_state = json.loads(state_file.read_text())
            return checkpoint
        if not where.is_file():
            raise FileNotFoundError(f"--checkpoint {path}: no such file or folder")
        if where.suffix == ".safetensors":
            safetensors = _safetensors(path)
            with safetensors.safe_open(path, framework="pt") as f:
                metadata = f.metadata()
                content = {k: f.get_tensor(k) for k in f.keys()}
            return cls(path, "safetensors", content, None, names, metadata)
        content = load_torch(path)
        if not isinstance(content, dict):
            raise ValueError(f"--checkpoint {path}: expected a state_dict (a dict of tensors) or a dict holding one, "
                             f"got {type(content).__name__}")
        if key is not None:
            if key not in content:
                raise ValueError(f"--key {key}: {path} has no entry {key!r}; it has {_some(content)}")
        elif not _is_state_dict(content):
            key = next((k for k in WRAPPERS if _is_state_dict(content.get(k))), None)
            if key is None:
                raise ValueError(f"--checkpoint {path}: neither a state_dict (a dict of tensors) nor a checkpoint with "
                                 f"one under {', '.join(repr(k) for k in WRAPPERS)}; it has {_some(content)}: name the "
                                 "entry with --key")
        return cls(path, "torch", content, key, names)

    def model_state(self) -> dict:
        """The whole state_dict under the model's own names (the prefix removed): what
        model.load_state_dict takes."""
        prefix = self.prefix
        return {k[len(prefix):]: v for k, v in self.entry.items() if k.startswith(prefix)}

    # ------------------------------------------------------------------ changing
    def replace(self, values: dict) -> None:
        """Puts new values (by the model's own names) in place, each in the stored tensor's dtype."""
        entry = dict(self.entry)
        for name, value in values.items():
            old = entry.get(self.prefix + name)
            entry[self.prefix + name] = value.detach().to(old.dtype) if isinstance(old, torch.Tensor) else value
        self.entry = entry
        if self.key is None:
            self.content = entry
        else:
            self.content = dict(self.content)
            self.content[self.key] = entry

    def update_recorder_state(self, fingerprint: str) -> int:
        """Every recorder state in the checkpoint (a Lightning callback's, the Trainer's
        trainer_state.json, a plain dict's "recorder") now names the forgotten model (which took
        the same steps), so training resumes from it. Returns how many it updated."""
        return sum(_update_states(holder, fingerprint) for holder in (self.content, self.trainer_state))

    def reset_optimizer(self) -> None:
        """Empties the optimizer state saved with the model (kept: its settings, the parameter
        groups): training then resumes with fresh momentum."""
        self._reset_optimizer = True
        if self.kind == "torch":
            self.content = _cleared_optimizers(self.content)

    # ------------------------------------------------------------------ writing
    def save(self, out: Path) -> None:
        """Writes the checkpoint to `out` in the input's format, atomically."""
        if self.kind == "folder":
            return self._save_folder(out)
        if (out.suffix == ".safetensors") != (self.kind == "safetensors"):
            raise ValueError(f"--out {out}: the checkpoint is a {'safetensors' if self.kind == 'safetensors' else 'torch'} "
                             f"file, so the output is one too: name it {'*.safetensors' if self.kind == 'safetensors' else 'something other than *.safetensors'}")
        write = self._write_safetensors if self.kind == "safetensors" else _write_torch
        write_atomically(out, lambda f: write(self.content, f))

    def _write_safetensors(self, content: dict, f) -> None:
        safetensors = _safetensors(str(self.path))
        # safetensors refuses tensors that share memory (tied weights): each is written on its own
        data = {k: v.detach().contiguous().clone() for k, v in content.items()}
        f.write(safetensors.torch.save(data, metadata=self.metadata))

    def _save_folder(self, out: Path) -> None:
        source = Path(self.path)
        staging = out.parent / f".{out.name}.{uuid.uuid4().hex}.partial"
        shutil.copytree(source, staging)
        try:
            weights = staging / self.folder_weights
            if self.folder_weights.endswith(".safetensors"):
                inner = Checkpoint(str(source / self.folder_weights), "safetensors", self.content, None, [],
                                   self.metadata)
                write_atomically(weights, lambda f: inner._write_safetensors(self.content, f))
            else:
                write_atomically(weights, lambda f: _write_torch(self.content, f))
            if self.trainer_state is not None:
                (staging / "trainer_state.json").write_text(json.dumps(self.trainer_state, indent=2, sort_keys=True))
            if self._reset_optimizer and (staging / "optimizer.pt").is_file():
                optimizer = load_torch(str(staging / "optimizer.pt"))
                write_atomically(staging / "optimizer.pt", lambda f: _write_torch(_cleared_optimizers(optimizer), f))
            aside = None
            if out.exists():
                aside = out.parent / f".{out.name}.{uuid.uuid4().hex}.old"
                os.replace(out, aside)
            os.replace(staging, out)
            if aside is not None:
                shutil.rmtree(aside)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


# ---------------------------------------------------------------------------------- helpers
def load_torch(path: str):
    """torch.load with weights_only=True, its refusal as one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--checkpoint {path}: holds objects other than tensors, which are not loaded "
                         f"(weights_only); save model.state_dict() instead ({first})") from None


def _safetensors(path: str):
    try:
        import safetensors
        import safetensors.torch  # noqa: F401
    except ImportError:
        raise ValueError(f"{path}: reading and writing safetensors needs the safetensors package: "
                         "pip install 'pyunlearn[hf]'") from None
    return safetensors


def _write_torch(content: dict, f) -> None:
    torch.save(content, f)


def write_atomically(path: Path, write) -> None:
    """write(file) into a temporary file beside `path`, fsynced, then renamed over `path`: a
    reader finds the old file or the new one, never a partial one. The rename is durable once
    the folder is synced (sync_folder), which the caller does: `pyunlearn forget` tells a failed
    save from a failed sync after the rename (the deletion then stays pending)."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def sync_folder(folder: Path) -> None:
    """Makes a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _update_states(holder, fingerprint: str) -> int:
    """Recorder states found anywhere inside `holder` (dicts and lists), updated in place."""
    if isinstance(holder, dict):
        if holder.get("format") == RECORDER_STATE:
            holder["fingerprint"] = fingerprint
            return 1
        return sum(_update_states(v, fingerprint) for v in holder.values())
    if isinstance(holder, list):
        return sum(_update_states(v, fingerprint) for v in holder)
    return 0


def _cleared_optimizers(content):
    """`content` with every optimizer state_dict's "state" emptied (Lightning's
    "optimizer_states", a plain checkpoint's "optimizer", a Trainer's optimizer.pt itself)."""
    if isinstance(content, dict):
        if set(content) >= {"state", "param_groups"}:
            return {**content, "state": {}}
        return {k: _cleared_optimizers(v) for k, v in content.items()}
    if isinstance(content, list):
        return [_cleared_optimizers(v) for v in content]
    return content


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _some(mapping: dict) -> str:
    keys = [repr(k) for k in list(mapping)[:8]]
    return ", ".join(keys) + (", ..." if len(mapping) > 8 else "") if keys else "no entries"


def _prefix(entry: dict, names: list[str]) -> str:
    """"" if the store's names are keys of `entry`, else the one prefix in front of all of them
    ("net.", "model.", "module.", ...), else "" (the caller then names what is missing)."""
    if not names or names[0] in entry:
        return ""
    for key in entry:
        if isinstance(key, str) and key.endswith("." + names[0]):
            prefix = key[: -len(names[0])]
            if all(prefix + name in entry for name in names):
                return prefix
    return ""


__all__ = ["Checkpoint", "RECORDER_STATE", "load_torch", "sync_folder", "write_atomically"]
