"""What the store and the recorder need of a model: its trainable parameters in a fixed order,
and a fingerprint of their values."""
from __future__ import annotations

import hashlib

import torch

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


def fingerprint(params) -> str:
    """sha256 over the parameters' float32 values in logical (row-major) order."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy())  # no copy
    return "sha256:" + digest.hexdigest()[:32]


def kernel_ready(param: torch.Tensor) -> bool:
    """Whether the kernels can read and write `param` in place: contiguous float32 on the CPU."""
    return param.dtype == torch.float32 and param.device.type == "cpu" and param.is_contiguous()


def as_float32_work(param: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels can use for `param`: itself when it is kernel-ready (so kernels
    work in place), a contiguous float32 copy otherwise."""
    p = param.detach()
    return p if kernel_ready(p) else p.to(device="cpu", dtype=torch.float32).contiguous()
