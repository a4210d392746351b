"""What the store and the recorder need of a model: its trainable parameters in a fixed order,
and a fingerprint of their values."""
from __future__ import annotations

import hashlib

import torch

from . import _reference
from .errors import ModelMismatchError


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter with requires_grad, in named_parameters() order.
    Names leave out torch.compile's wrapper (`_orig_mod.`, also of a compiled submodule), so a
    compiled module and the plain one name their parameters alike."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(".".join(part for part in name.split(".") if part != "_orig_mod"), p)
            for name, p in model.named_parameters() if p.requires_grad]


def match_layers(model: torch.nn.Module, layers, where: str) -> list[torch.nn.Parameter]:
    """The model's trainable parameters in the order of `layers` (a store's layer table), or
    ModelMismatchError saying what differs."""
    params = trainable_parameters(model)
    names, expected = [n for n, _ in params], [layer.name for layer in layers]
    if names != expected:
        missing = [n for n in expected if n not in names]
        extra = [n for n in names if n not in expected]
        raise ModelMismatchError(
            f"the model's trainable parameters do not match the store's layer table ({where}): "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
            + ("" if missing or extra else "; same names in another order"))
    for (name, p), layer in zip(params, layers):
        if tuple(p.shape) != layer.shape:
            raise ModelMismatchError(f"parameter {name} has shape {tuple(p.shape)}, the store recorded {layer.shape}")
    return [p for _, p in params]


#: The algorithm of new fingerprints. Stores keep whichever algorithm wrote each value, so a
#: comparison with a stored value must hash with that value's algorithm (see same_model).
FINGERPRINT_ALGORITHM = "xh128"
_ALGORITHMS = ("xh128", "sha256")


def fingerprint_algorithm(value: str) -> str:
    """The algorithm a fingerprint names by its prefix: 'xh128', or 'sha256' (the only one
    before xh128; stores keep such values); ValueError for anything else."""
    algorithm, sep, _ = value.partition(":") if isinstance(value, str) else ("", "", "")
    if not sep or algorithm not in _ALGORITHMS:
        raise ValueError(f"not a fingerprint this pyunlearn can compute: {value!r} "
                         "(expected 'xh128:' or 'sha256:' and 32 hex digits)")
    return algorithm


def fingerprint(params, like: str | None = None) -> str:
    """A model's identity: "<algorithm>:<32 hex digits>" over its parameters' float32 values in
    logical (row-major) order, layer after layer (a bfloat16 model and its float32 copy agree).

    The algorithm is xh128 (csrc/fingerprint.h: a native parallel hash, ~10x faster than
    sha256), or that of `like`, a stored fingerprint: the result then equals `like` exactly
    when the values are the ones it was computed from. xh128 identifies models; it is not a
    security measure (whoever chooses the values can forge a collision; a store's metadata is
    protected by its checksum, not by this)."""
    algorithm = FINGERPRINT_ALGORITHM if like is None else fingerprint_algorithm(like)
    values = [p.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy() for p in params]  # no copy
    if algorithm == "sha256":
        digest = hashlib.sha256()
        for v in values:
            digest.update(v)
        return "sha256:" + digest.hexdigest()[:32]
    from .ops import _native  # not at the top: ops imports autograd helpers this module does not need

    native = _native()
    raw = native.fingerprint(values) if native is not None else _reference.xh128(values)
    return "xh128:" + raw.hex()


def same_model(params, stored_fingerprint: str | None) -> bool:
    """Whether `params` hold the values a stored fingerprint was computed from, hashing with
    that fingerprint's algorithm (so sha256 values of older stores still match). None or ""
    (no model known) never matches."""
    if not stored_fingerprint:
        return False
    return fingerprint(params, like=stored_fingerprint) == stored_fingerprint


class Fingerprints:
    """One model's fingerprints, each algorithm hashed at most once: for a caller comparing the
    model with several stored values that may use different algorithms (a store recorded
    before the switch to xh128 and forgotten from after it). Valid while the values do not
    change."""

    def __init__(self, params):
        self._params = list(params)
        self._by_algorithm: dict[str, str] = {}

    def get(self, like: str | None = None) -> str:
        """fingerprint(params, like), computed once per algorithm."""
        algorithm = FINGERPRINT_ALGORITHM if like is None else fingerprint_algorithm(like)
        if algorithm not in self._by_algorithm:
            self._by_algorithm[algorithm] = fingerprint(self._params, like=None if like is None else like)
        return self._by_algorithm[algorithm]

    def matches(self, stored_fingerprint: str | None) -> bool:
        """same_model(params, stored_fingerprint), computed once per algorithm."""
        return bool(stored_fingerprint) and self.get(like=stored_fingerprint) == stored_fingerprint


def kernel_ready(param: torch.Tensor) -> bool:
    """Whether the kernels can read and write `param` in place: contiguous float32 (on its device)."""
    return param.dtype == torch.float32 and param.is_contiguous()


def as_float32_work(param: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels can use for `param`, on its device: itself when it is kernel-ready
    (so kernels work in place), a contiguous float32 copy otherwise."""
    p = param.detach()
    return p if kernel_ready(p) else p.to(dtype=torch.float32, memory_format=torch.contiguous_format)


def one_device(named_params, arg: str, doing: str) -> torch.device:
    """The one device the (name, parameter) pairs live on, or a ValueError naming two that
    differ: pyunlearn keeps each model's snapshot, rows and work on one device. The CPU for none."""
    first = None
    for name, p in named_params:
        if first is None:
            first = (name, p.device)
        elif p.device != first[1]:
            raise ValueError(f"{arg}'s parameters are on more than one device ({first[0]} on {first[1]}, {name} on "
                             f"{p.device}): {doing} needs them all on one device. Move the model there first, e.g. "
                             f"{arg}.to({str(first[1])!r})")
    return torch.device("cpu") if first is None else first[1]
