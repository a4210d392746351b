"""A module built from a state_dict, for commands that have a checkpoint but not the model's
code: it holds the store's layers as parameters, named and ordered as the store records them."""
from __future__ import annotations

import torch
from torch import nn

from .errors import ModelMismatchError


def module_for_store(state: dict, store) -> nn.Module:
    root = nn.Module()
    for layer in store.layers:
        if layer.name not in state:
            raise ModelMismatchError(f"the checkpoint lacks {layer.name}, which the store records")
        tensor = state[layer.name]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != layer.shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ModelMismatchError(f"checkpoint {layer.name} has shape {shape}, the store recorded {layer.shape}")
        *path, leaf = layer.name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        if not tensor.is_floating_point():
            raise ModelMismatchError(f"checkpoint {layer.name} is {tensor.dtype}, not a floating-point tensor")
        # The checkpoint's own dtype: a deletion's result is then fingerprinted exactly as it is
        # saved, so the output can be fed back in for the next request.
        module.register_parameter(leaf, nn.Parameter(tensor.detach().clone()))
    return root
