"""Brief fine-tuning on retained data: what dense amnesiac unlearning needs afterwards."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..data import SampleSet
from ..evaluation.metrics import class_logits
from ._loop import UnlearnReport, check_data, optimise


def fine_tune(model: torch.nn.Module, retain_data: SampleSet, *, epochs: int = 1, lr: float = 0.01,
              batch_size: int = 128, seed: int = 0, max_steps: int | None = None) -> UnlearnReport:
    """Plain SGD (momentum 0.9) on `retain_data` for `epochs` epochs, or `max_steps` steps if
    that ends first (a share of an epoch: after label flipping, say), in place."""
    retain_data = check_data("retain_data", retain_data)
    return optimise(model, "fine-tune", lambda g: retain_data.batches(batch_size, generator=g),
                    lambda b: F.cross_entropy(class_logits(model(b[1])), b[2]), epochs=epochs, lr=lr, keep=None,
                    seed=seed, max_steps=max_steps)
