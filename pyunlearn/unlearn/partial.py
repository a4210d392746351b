"""Layer-wise partial updates: at each unlearning step only each layer's k_i = ceil(keep·numel_i)
entries with the largest |gradient| may change; every other entry, and its optimizer state
(momentum, Adam moments), is put back bit for bit after the optimizer step. Buffers are not
parameters: BatchNorm running statistics still move while the methods train. Putting back the
state too matters: otherwise momentum gathered on a frozen entry would move it the first time it
is selected, and weight decay would shrink entries that were never chosen."""
from __future__ import annotations

import torch

from .._validate import ratio
from ..kernels import ops
from ..store.layers import trainable_parameters


def check_keep(keep) -> float | None:
    """None (naive: every entry may change) or a ratio in (0, 1]."""
    return None if keep is None else ratio("keep, if not None (naive: update everything),", keep)


class LayerwiseMask:
    """Wraps optimizer steps so only the top-|grad| entries of each layer change."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, keep: float):
        self.params = [p for _, p in trainable_parameters(model)]
        if not self.params:
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
        self.optimizer = optimizer
        self._names = [name for name, _ in trainable_parameters(model)]
        self.k = ops.k_for([p.numel() for p in self.params], check_keep(keep))
        self._zeros = [torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for p in self.params]
        self.fixed: list[torch.Tensor] | None = None  # a saliency mask: the same entries at every step

    def top_k(self, scores: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Per layer, the flat positions of the k largest |score| (the top-k kernel of the model's
        device on Δ = score − 0), on that device; a layer without a score selects nothing."""
        flat = [g.detach().to(device=z.device, dtype=torch.float32).reshape(-1).contiguous() if g is not None else z
                for g, z in zip(scores, self._zeros)]
        row = ops.prune_topk(self._zeros, flat, self.k, "float32", refresh=False, names=self._names)
        return [positions if g is not None else positions[:0]
                for (positions, _), g in zip(ops.decode_row(row, self.k), scores)]

    def selection(self) -> list[torch.Tensor]:
        """Per layer, the entries this step may change: the fixed saliency mask if one was set,
        else the k largest |grad| of this step. A parameter without a gradient selects nothing."""
        if self.fixed is not None:
            return [positions if p.grad is not None else positions[:0] for positions, p in zip(self.fixed, self.params)]
        return self.top_k([p.grad for p in self.params])

    def fix_saliency(self, saliency: list[torch.Tensor]) -> None:
        """Fixes the mask to each layer's k entries of largest |saliency| (SalUn-style: the
        forget set's loss gradient at deletion time), for every later step."""
        if len(saliency) != len(self.params):
            raise ValueError(f"saliency holds {len(saliency)} tensors, the model {len(self.params)} trainable parameters")
        self.fixed = self.top_k(saliency)

    def step(self) -> None:
        chosen = self.selection()
        saved = [(p.detach().clone(), self._state_tensors(p)) for p in self.params]
        self.optimizer.step()
        with torch.no_grad():
            for p, (before, state_before), positions in zip(self.params, saved, chosen):
                # The mask in the parameter's logical shape: positions count in row-major order,
                # and torch.where works whatever the memory layout (channels_last, transposed).
                frozen = torch.ones(p.numel(), dtype=torch.bool, device=p.device)
                frozen[positions] = False
                frozen = frozen.view(p.shape)
                p.copy_(torch.where(frozen, before, p))
                for name, now in self.optimizer.state.get(p, {}).items():
                    if not isinstance(now, torch.Tensor) or now.shape != p.shape:
                        continue  # step counters and other scalars
                    # State the step created (the first one) starts from zero for frozen entries.
                    old = state_before.get(name)
                    now.copy_(torch.where(frozen, old if old is not None else torch.zeros_like(now), now))

    def _state_tensors(self, p) -> dict[str, torch.Tensor]:
        """Copies of the optimizer's per-entry state of p (tensors shaped like p)."""
        state = self.optimizer.state.get(p, {})
        return {name: v.detach().clone() for name, v in state.items()
                if isinstance(v, torch.Tensor) and v.shape == p.shape}
