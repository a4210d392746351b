"""Recording a sharded model (FSDP2's `fully_shard`, or any model whose parameters are DTensors
laid out over every rank): the writer rank keeps a gathered copy of the trainable parameters
and records it as it would an unsharded model.

Why gather rather than record each rank's shard: a store's row keeps the k largest entries of
each *whole* parameter, and which entries those are depends on every shard; the gathered copy
gives exactly the row an unsharded run would record, so the store, its timeline fingerprints and
forgetting are those of the plain model (forget on the gathered model, e.g. a full state_dict,
and load the result back into the sharded one). The cost: after every step each trainable
parameter is all-gathered (DTensor.full_tensor(), one parameter at a time, so a rank that does
not write holds one whole parameter at most) and the writer rank holds the whole model twice
(the copy and the recorder's snapshot), as it would recording an unsharded model.
"""
from __future__ import annotations

import torch

from ..errors import RecorderError

__all__ = ["ShardedModel"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return None
    return DTensor


class ShardedModel:
    """The trainable parameters of a sharded model and, on the writer rank, a module holding
    their gathered values under the same names (`view`), refreshed by gather() — a collective
    every rank calls at the same points: as recording starts and after every step."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], *, writes: bool):
        self.names = [name for name, _ in named]
        self._params = [p for _, p in named]
        self.view: torch.nn.Module | None = None
        self._copies: list[torch.Tensor] | None = None
        if writes:
            self.view = _module_of(named)
            self._copies = [p for p in self.view.parameters()]

    @classmethod
    def detect(cls, model: torch.nn.Module, dist, *, names) -> "ShardedModel | None":
        """A ShardedModel if any trainable parameter of `model` is a DTensor, else None.
        `names`: (name, parameter) as the store names them. Refuses (RecorderError) layouts the
        writer cannot gather: no process group of several ranks, or a mesh over only some of them."""
        dtensor = _dtensor_type()
        trainable = [(name, p) for name, p in names if p.requires_grad]
        if dtensor is None or not any(isinstance(p, dtensor) for _, p in trainable):
            return None
        if dist is None:
            raise RecorderError(
                "the model's parameters are DTensors (FSDP2's fully_shard, or tensor parallelism), but "
                "torch.distributed does not run several processes here: pyunlearn records a sharded model by "
                "gathering its parameters over every rank, so create the recorder on every rank after "
                "init_process_group")
        for name, p in trainable:
            if isinstance(p, dtensor) and p.device_mesh.size() != dist.world:
                raise RecorderError(
                    f"parameter {name} is laid out over {p.device_mesh.size()} of the {dist.world} ranks (device mesh "
                    f"{tuple(p.device_mesh.shape)}): pyunlearn gathers every parameter over all ranks for the "
                    "writer rank, so it records models sharded over one mesh of every rank (fully_shard(model) "
                    "over the default mesh, or a mesh of all ranks); other layouts are not supported")
        return cls(trainable, writes=dist.writes)

    def gather(self) -> None:
        """The parameters' current values into the writer's copy (every rank must call it)."""
        dtensor = _dtensor_type()
        with torch.no_grad():
            for i, p in enumerate(self._params):
                full = p.full_tensor() if isinstance(p, dtensor) else p.detach()
                if self._copies is not None:
                    self._copies[i].copy_(full)
                del full  # a rank that does not write holds one gathered parameter at a time


def _module_of(named: list[tuple[str, torch.nn.Parameter]]) -> torch.nn.Module:
    """A module with one (unsharded, zero-filled until gathered) parameter per name, named and
    ordered as given, on the parameter's device and in its dtype."""
    root = torch.nn.Module()
    for name, p in named:
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=p.device)))
    return root
