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


def kernel_ready(param: torch.Tensor) -> bool:
    """Whether the kernels can read and write `param` in place: contiguous float32 on the CPU."""
    return param.dtype == torch.float32 and param.device.type == "cpu" and param.is_contiguous()


def as_float32_work(param: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels can use for `param`: itself when it is kernel-ready (so kernels
    work in place), a contiguous float32 copy otherwise."""
    p = param.detach()
    return p if kernel_ready(p) else p.to(device="cpu", dtype=torch.float32).contiguous()
