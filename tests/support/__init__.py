"""Shared helpers of the tests (and, through benchmarks/_support.py, the benchmarks): the device
axis, parameter-set shapes, random layer sets, a tiny model and data set, a store recorded from
training them, a Lightning module, and S3 on loopback. Not part of the package: pyunlearn ships
none of this. Fixtures live in the conftest.py files; helpers of one part of the tests in the
modules here:

    kernels       bit comparisons, the native kernels on copies, rows, the native tuning knobs
    strategies    hypothesis strategies for layer sets
    stores        a store on a back-end, recorded runs to start from, what a store holds
    devices       a recorded run on each device of the `device` axis
    timeline      Year: a store's life in miniature, keyed by strings
    huggingface   the tiny BERT run of the Hugging Face tests (needs transformers)
    kill          the SIGKILL harness's victim
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pyunlearn import UpdateRecorder, UpdateStore

DEVICES: list[str] = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
"""The devices device-parametrised tests run on: the CPU, plus CUDA where torch sees a GPU."""


def resnet18_cifar_shapes(num_classes: int = 10) -> list[tuple[str, tuple[int, ...]]]:
    """The 62 trainable tensors of a CIFAR ResNet-18 (3×3 stem, no max-pool), 11.17M values.

    Generated from the architecture rather than torchvision, which is not installable here.
    """
    shapes = [("conv1.weight", (64, 3, 3, 3)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    in_planes = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            prefix = f"layer{stage}.{block}"
            shapes += [
                (f"{prefix}.conv1.weight", (planes, in_planes, 3, 3)),
                (f"{prefix}.bn1.weight", (planes,)),
                (f"{prefix}.bn1.bias", (planes,)),
                (f"{prefix}.conv2.weight", (planes, planes, 3, 3)),
                (f"{prefix}.bn2.weight", (planes,)),
                (f"{prefix}.bn2.bias", (planes,)),
            ]
            if stride != 1 or in_planes != planes:
                shapes += [
                    (f"{prefix}.shortcut.0.weight", (planes, in_planes, 1, 1)),
                    (f"{prefix}.shortcut.1.weight", (planes,)),
                    (f"{prefix}.shortcut.1.bias", (planes,)),
                ]
            in_planes = planes
    shapes += [("linear.weight", (num_classes, 512)), ("linear.bias", (num_classes,))]
    return shapes


def random_step(shapes, *, seed: int = 0, step_size: float = 1e-3):
    """A (before, after) pair of float32 layer lists, as one SGD step would leave them."""
    gen = torch.Generator().manual_seed(seed)
    before = [torch.randn(shape, generator=gen) for _, shape in shapes]
    after = [b + step_size * torch.randn(b.shape, generator=gen) for b in before]
    return before, after


class TinyNet(torch.nn.Module):
    """A two-layer MLP (8 → 16 → 3) with a frozen extra parameter, for store and recorder tests."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 3)
        self.frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) + 0 * self.frozen.sum()


def tiny_data(n: int = 120, *, seed: int = 0, first_id: int = 1000):
    """(ids, x, y) of a small random classification problem; IDs start at `first_id`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return torch.arange(first_id, first_id + n), x, y


def tiny_training(model, optimizer, data, *, epochs: int = 2, batch_size: int = 16, seed: int = 0,
                  recorder=None, after_step=None) -> int:
    """Seeded mini-batch training of `model`; declares each batch's IDs to `recorder` if given.
    Calls after_step(step) after every step. Returns the number of steps."""
    ids, x, y = data
    gen = torch.Generator().manual_seed(seed)
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(ids), generator=gen)
        for start in range(0, len(ids), batch_size):
            sel = order[start : start + batch_size]
            if recorder is not None:
                recorder.batch(ids[sel])
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[sel]), y[sel]).backward()
            optimizer.step()
            steps += 1
            if after_step is not None:
                after_step(steps)
    return steps


@dataclass(frozen=True)
class Recorded:
    """A recorded training run of recorded_store."""

    model: TinyNet  # as training left it
    store: UpdateStore  # open for writing, unless recorded_store was told to close it
    optimizer: torch.optim.Optimizer
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (ids, x, y) of tiny_data
    steps: int
    initial: dict[str, torch.Tensor]  # the model's state_dict before training


def recorded_store(path, *, keep: float = 0.25, value_dtype: str = "float16", attribution: str = "update",
                   momentum: float = 0.9, optimizer: Callable[[list], torch.optim.Optimizer] | None = None,
                   epochs: int = 2, n: int = 120, batch_size: int = 16, steps_per_chunk: int | None = None,
                   seed: int = 0, storage_options=None, close: bool = False, device="cpu") -> Recorded:
    """Trains a TinyNet (initialised after torch.manual_seed(seed); the data and the batch order
    keep tiny_data's and tiny_training's seed 0) on tiny_data(n) with tiny_training, recording
    every step into a new store at `path`.

    The optimizer is SGD(lr=0.1, momentum=momentum) over the trainable parameters, or
    optimizer(trainable parameters) when given. The store is left open unless close=True. The
    model and the data (`Recorded.data` too) are on `device`, the IDs on the CPU."""
    torch.manual_seed(seed)
    model = TinyNet().to(device)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(trainable) if optimizer is not None else torch.optim.SGD(trainable, lr=0.1, momentum=momentum)
    store = UpdateStore.create(path, model, keep=keep, value_dtype=value_dtype, attribution=attribution,
                               steps_per_chunk=steps_per_chunk, storage_options=storage_options)
    ids, x, y = tiny_data(n)
    data = (ids, x.to(device), y.to(device))
    with UpdateRecorder(model, opt, store) as rec:
        steps = tiny_training(model, opt, data, epochs=epochs, batch_size=batch_size, recorder=rec)
    if close:
        store.close()
    return Recorded(model, store, opt, data, steps, initial)


def tiny_lightning_module():
    """A LightningModule class that trains TinyNet with SGD and momentum, for the Lightning
    tests (needs the lightning package; defined on call so that this module does not import it)."""
    import lightning

    class TinyLightningModule(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = TinyNet()

        def forward(self, x):  # what guarded forgetting measures the probe with
            return self.net(x)

        def training_step(self, batch, batch_idx):
            _, x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)

    return TinyLightningModule


def tiny_lightning_model():
    """An untrained tiny_lightning_module(): the model `pyunlearn forget --model` builds to load
    a Lightning checkpoint into."""
    return tiny_lightning_module()()


class LoopbackS3:
    """A real S3 API on 127.0.0.1 (moto's server, a free port) with one bucket, for tests and
    benchmarks. `options` are the storage_options a store needs. Needs moto[server] and boto3."""

    def __init__(self, bucket: str, key: str = "pyunlearn-key", secret: str = "pyunlearn-secret"):
        import logging
        import socket

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        self.options = {"endpoint_url": endpoint, "key": key, "secret": secret}

    def stop(self) -> None:
        self._server.stop()
