"""The store's layer table against a model: which parameters a store records (the trainable
ones, in a fixed order) and a module rebuilt from a state_dict for commands that have a
checkpoint but not the model's code."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelMismatchError


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


def module_for_store(state: dict, store) -> nn.Module:
    """A module holding the store's layers as parameters, named and ordered as the store records
    them, with the values of `state` (a state_dict)."""
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
