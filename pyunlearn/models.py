"""The small models the demo, the benchmarks and the tests train, and the training loop that
records them: SGD with momentum, one recorder per store."""
from __future__ import annotations

import torch
from torch import nn

from .data import SampleSet, sample_batches
from .evaluation.metrics import class_logits
from .recording import UpdateRecorder
from .store import UpdateStore


class SmallCNN(nn.Module):
    """Two 3×3 conv layers, each followed by 2×2 max-pooling, and a linear head, for square
    one-channel images whose side is a multiple of 4."""

    def __init__(self, image_size: int, channels: tuple[int, int], classes: int = 10):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.conv1 = nn.Conv2d(1, channels[0], 3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.fc = nn.Linear(channels[1] * (image_size // 4) ** 2, classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class DigitsCNN(SmallCNN):
    """SmallCNN for the 8×8 digits: 16 and 32 channels, ~6k parameters."""

    def __init__(self, classes: int = 10):
        super().__init__(8, (16, 32), classes)


def train(model, data: SampleSet, *, epochs: int, batch_size: int, lr: float, seed: int,
          stores: tuple[UpdateStore, ...] = (), progress: bool = False, batch_sampler=None):
    """SGD with momentum; records every step into each of `stores` (one recorder each). Batches
    are random ones of `batch_size` under `seed`, or each epoch's from `batch_sampler` (e.g. a
    pyunlearn.data.CohortBatchSampler over positions in `data`)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    recorders = [UpdateRecorder(model, optimizer, store) for store in stores]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs * -(-len(data) // batch_size), desc="training (recording)", unit="step")
    try:
        for _ in range(epochs):
            batches = data.batches(batch_size, generator=generator) if batch_sampler is None \
                else sample_batches(data, batch_sampler)
            for ids, x, y in batches:
                for recorder in recorders:
                    recorder.batch(ids)
                optimizer.zero_grad()
                nn.functional.cross_entropy(class_logits(model(x)), y).backward()
                optimizer.step()
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
        for recorder in recorders:
            recorder.close()
    return model
