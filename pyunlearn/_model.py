"""What the store and the recorder need of a model: its trainable parameters in a fixed order,
and a fingerprint of their values."""
from __future__ import annotations

import hashlib

import torch


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def fingerprint(params) -> str:
    """sha256 over the parameters' float32 values in logical (row-major) order."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy())  # no copy
    return "sha256:" + digest.hexdigest()[:32]


def as_float32_work(param: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels can use for `param`: itself when it is a contiguous float32 CPU
    tensor (so kernels work in place), a contiguous float32 copy otherwise."""
    p = param.detach()
    if p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous():
        return p
    return p.to(device="cpu", dtype=torch.float32).contiguous()
