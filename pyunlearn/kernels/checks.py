"""Argument checks shared by the native and reference kernels.

Every message names the argument, the layer (position and name) and what was expected, so a
caller can fix the call without reading this code.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch

from ..errors import NonFiniteUpdateError

_VALUE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
MAX_LAYER_NUMEL = 2**32 - 1  # indices within a layer are stored as uint32


def layer_label(arg: str, i: int, names: Sequence[str] | None) -> str:
    return f"{arg}[{i}] ({names[i]})" if names is not None else f"{arg}[{i}]"


def non_finite_update(i: int, names) -> NonFiniteUpdateError:
    """The error for layer i's update holding NaN or Inf (the same from every kernel path)."""
    return NonFiniteUpdateError(f"the update of {layer_label('after', i, names)} holds NaN or Inf; "
                                "nothing was recorded and the snapshot is unchanged")


# Why a stored row is refused; the native kernel reports the same two reasons.
REPEATED_INDEX = "repeats an index (a zero gap)"
INDEX_PAST_END = "decodes to an index past the layer's end"


def first_fault(gaps: torch.Tensor, positions: torch.Tensor, numel: int) -> str:
    """Which fault the native kernel reports for a bad segment: it scans blocks of 64 gaps and
    checks each block for a zero gap before checking where the block ends."""
    for start in range(0, gaps.numel(), 64):
        end = min(start + 64, gaps.numel())
        if bool((gaps[start:end] == 0).any()):
            return REPEATED_INDEX
        if int(positions[end - 1]) >= numel:
            return INDEX_PAST_END
    raise AssertionError("the segment has no fault")


def bad_stored_row(row: int, layer: int, reason: str, names, steps) -> ValueError:
    """The error for stored row `row` (its position in the batch given) whose indices in
    `layer` are invalid: named by the step it stores when `steps` is given, and by the layer's
    name when `names` is (the same from every kernel path)."""
    which = f"the stored row of step {int(steps[row])} (rows[{row}])" if steps is not None else f"rows[{row}]"
    return ValueError(f"{which}, {layer_label('layer', layer, names)}: {reason}; nothing was changed. Rows must "
                      "be as prune_topk writes them for these layers (a store that holds such a row is damaged)")


def check_steps(steps, rows: int):
    """Optional step numbers labelling the stored rows in errors: one int per row."""
    if steps is None:
        return None
    steps = [int(s) for s in steps]
    if len(steps) != rows:
        raise ValueError(f"steps must give one step number per stored row ({rows}), got {len(steps)}")
    return steps


def check_names(names, count: int) -> list[str] | None:
    if names is None:
        return None
    names = list(names)
    if len(names) != count or not all(isinstance(n, str) for n in names):
        raise ValueError(f"names must be {count} strings, one per layer; got {names!r}")
    return names


def check_list(arg: str, tensors) -> list:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"{arg} must be a list of tensors, one per layer; got {type(tensors).__name__}")
    return list(tensors)


class OneDevice:
    """The device every tensor of a call must share: the first one checked sets it, and a tensor
    elsewhere is refused naming both (kernels never move data between devices behind the caller's
    back)."""

    def __init__(self, device: torch.device | None = None):
        self.device, self._first = device, None if device is None else "the other arguments"

    def check(self, label: str, t: torch.Tensor) -> None:
        if self.device is None:
            self.device, self._first = t.device, label
        elif t.device != self.device:
            raise ValueError(f"{label} is on {t.device}, {self._first} on {self.device}: every tensor of the call must be "
                             f"on one device; move them there with .to({str(self.device)!r})")


def check_tensor_list(arg: str, tensors, names, *, writable: bool = False,
                      device: OneDevice | None = None) -> list[torch.Tensor]:
    """A list of contiguous float32 tensors on one device, each addressable with uint32 indices."""
    tensors = check_list(arg, tensors)
    device = device if device is not None else OneDevice()
    for i, t in enumerate(tensors):
        label = layer_label(arg, i, names)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{label} must be float32, got {t.dtype}; keep a float32 copy of the parameters")
        device.check(label, t)
        if not t.is_contiguous():
            raise ValueError(f"{label} must be contiguous; call .contiguous() on it (the kernels do not copy)")
        if t.numel() > MAX_LAYER_NUMEL:
            raise ValueError(f"{label} has {t.numel()} elements; at most {MAX_LAYER_NUMEL} fit uint32 indices")
        if writable and t.is_inference():
            raise ValueError(f"{label} is an inference tensor and cannot be updated in place")
    return tensors


def check_same_numel(a_arg, a, b_arg, b, names) -> None:
    if len(a) != len(b):
        raise ValueError(f"{a_arg} has {len(a)} layers, {b_arg} has {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.numel() != y.numel():
            raise ValueError(
                f"{layer_label(a_arg, i, names)} has {x.numel()} elements, "
                f"{layer_label(b_arg, i, names)} has {y.numel()}"
            )


def check_k(k, tensors, names) -> list[int]:
    if isinstance(k, (str, bytes, torch.Tensor)) or not isinstance(k, Sequence):
        raise TypeError(f"k must be a list of ints, one per layer; got {type(k).__name__}")
    k = list(k)
    if len(k) != len(tensors):
        raise ValueError(f"k has {len(k)} entries but there are {len(tensors)} layers")
    out = []
    for i, (ki, t) in enumerate(zip(k, tensors)):
        try:
            if isinstance(ki, bool):
                raise TypeError
            ki = operator.index(ki)  # ints and numpy integers, not floats
        except TypeError:
            raise TypeError(f"k[{i}] must be an int, got {type(ki).__name__}") from None
        if not 0 <= ki <= t.numel():
            raise ValueError(
                f"{layer_label('k', i, names)} = {ki} must lie in [0, {t.numel()}] (the layer's element count)"
            )
        out.append(ki)
    return out


def check_value_dtype(value_dtype) -> torch.dtype:
    if isinstance(value_dtype, torch.dtype) and value_dtype in _VALUE_DTYPES.values():
        return value_dtype
    if isinstance(value_dtype, str) and value_dtype in _VALUE_DTYPES:
        return _VALUE_DTYPES[value_dtype]
    raise ValueError(f"value_dtype must be 'float16' (scaled) or 'float32' (lossless), got {value_dtype!r}")


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not torch.isfinite(torch.tensor(alpha, dtype=torch.float32)):
        raise ValueError(f"alpha must be finite in float32, got {alpha}")
    return alpha


def check_rows(rows, k: list[int], device: torch.device | None = None):
    """Stored rows as (index, values, scales), one row (1-D) or a stack (2-D), on the CPU or on
    `device` (the parameters'). Returns 2-D views."""
    try:
        index, values, scales = rows
    except (TypeError, ValueError):
        raise TypeError("rows must be a Row (index, values, scales) as prune_topk returns") from None
    for arg, t in (("rows.index", index), ("rows.values", values), ("rows.scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu" and (device is None or t.device != device):
            raise ValueError(f"{arg} is on {t.device}: stored rows must be on the CPU or on the parameters' device "
                             f"({device}); move them with .to({str(device or 'cpu')!r})")
        if not t.is_contiguous():
            raise ValueError(f"{arg} must be contiguous")
    if index.dtype != torch.uint32:
        raise TypeError(f"rows.index must be uint32 (gap-encoded), got {index.dtype}")
    if values.dtype not in (torch.float16, torch.float32):
        raise TypeError(f"rows.values must be float16 or float32, got {values.dtype}")
    if scales.dtype != torch.float32:
        raise TypeError(f"rows.scales must be float32, got {scales.dtype}")
    if not index.dim() == values.dim() == scales.dim() or index.dim() not in (1, 2):
        raise ValueError(
            "rows.index, rows.values and rows.scales must all be 1-D (one row) or all 2-D (a stack); "
            f"got {index.dim()}-D, {values.dim()}-D, {scales.dim()}-D"
        )
    if index.dim() == 1:
        index, values, scales = index[None], values[None], scales[None]
    total = sum(k)
    if index.shape[1] != total:
        raise ValueError(f"rows.index has {index.shape[1]} entries per row, but sum(k) = {total}")
    if values.shape != index.shape:
        raise ValueError(f"rows.values has shape {tuple(values.shape)}, rows.index {tuple(index.shape)}")
    if scales.shape != (index.shape[0], len(k)):
        raise ValueError(f"rows.scales has shape {tuple(scales.shape)}, expected {(index.shape[0], len(k))}")
    return index, values, scales


def check_prune_args(before, after, k, value_dtype, refresh, names):
    """prune_topk's arguments, checked and normalised (lists, ints, a torch dtype)."""
    names = check_names(names, len(check_list("after", after)))
    device = OneDevice()
    after = check_tensor_list("after", after, names, device=device)
    before = check_tensor_list("before", before, names, writable=bool(refresh), device=device)
    check_same_numel("after", after, "before", before, names)
    return before, after, check_k(k, after, names), check_value_dtype(value_dtype), names


def check_subtract_args(params, rows, k, alpha, names, steps):
    """subtract_sparse's arguments, checked; rows come back as 2-D (index, values, scales)."""
    names = check_names(names, len(check_list("params", params)))
    device = OneDevice()
    params = check_tensor_list("params", params, names, writable=True, device=device)
    k = check_k(k, params, names)
    rows = check_rows(rows, k, device.device)
    return params, rows, k, check_alpha(alpha), names, check_steps(steps, rows[0].shape[0])


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
