"""rec.loader(dataloader, key=...): the loop body stays as it is, and every batch is declared
with the keys of exactly the samples it holds."""
from __future__ import annotations

import pytest
import torch

import pyunlearn as pu
from pyunlearn.recording import DeclaredBatches
from tests.support import TinyNet

N = 48
SECRET = "attach-helper-secret-0123456789"
USERS = [f"user{i}@example.com" for i in range(N)]


class _Indexed(torch.utils.data.Dataset):
    """(x, y) whose x carries the sample's index, so a test can tell which samples a batch holds."""

    def __init__(self, n: int = N):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=gen)
        self.x[:, 0] = torch.arange(n, dtype=torch.float32)
        self.y = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index], self.y[index]


class _Capture:
    """Stands in for a recorder: keeps what each batch declared."""

    def __init__(self):
        self.declared = []

    def batch(self, ids):
        self.declared.append(list(ids))


def _indices(x):
    return x[:, 0].long().tolist()


def _train(model, optimizer, batches):
    for x, y in batches:  # the loop body of a plain loop, unchanged
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _setup(tmp_path, name, **create):
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    store = pu.UpdateStore.create(tmp_path / name, model, keep=0.5, value_dtype="float32", **create)
    return model, optimizer, store


@pytest.mark.parametrize("workers", [0, 2])
def test_each_batch_declares_the_samples_it_holds(workers):
    loader = torch.utils.data.DataLoader(_Indexed(), batch_size=5, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, generator=torch.Generator().manual_seed(3))
    capture = _Capture()
    batches = DeclaredBatches(capture, loader, key=lambda i: USERS[i])
    assert len(batches) == len(loader) == 10
    for epoch in range(2):  # persistent workers restart the sampler: the queue restarts with it
        capture.declared.clear()
        seen = [_indices(x) for x, _ in batches]
        assert capture.declared == [[USERS[i] for i in batch] for batch in seen]
        assert sorted(i for batch in seen for i in batch) == list(range(N))
    # Without a key, the index is the ID; through a Subset, the index in the dataset underneath.
    subset = torch.utils.data.Subset(_Indexed(), list(range(10, 30)))
    capture = _Capture()
    seen = [_indices(x) for x, _ in DeclaredBatches(capture, torch.utils.data.DataLoader(subset, batch_size=6))]
    assert capture.declared == seen and seen[0] == [10, 11, 12, 13, 14, 15]


def test_a_shuffled_loader_yields_the_same_batches_as_without_the_helper(tmp_path):
    loader = torch.utils.data.DataLoader(_Indexed(), batch_size=8, shuffle=True)  # the global RNG
    torch.manual_seed(7)
    plain = [(x.clone(), y.clone()) for _ in range(2) for x, y in loader]
    model, optimizer, store = _setup(tmp_path, "s.zarr", secret=SECRET)
    attached = []
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        torch.manual_seed(7)
        for _ in range(2):
            for x, y in rec.loader(loader, key=lambda i: USERS[i]):
                attached.append((x.clone(), y.clone()))
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
    assert len(plain) == len(attached) == store.steps == 12
    for step, ((a, b), (c, d)) in enumerate(zip(plain, attached)):
        assert torch.equal(a, c) and torch.equal(b, d)
        for i in _indices(c):  # the step recorded the keys of the samples its batch held
            assert step in store.steps_for([USERS[i]]).steps.tolist()


def test_the_store_equals_a_loop_with_rec_batch(tmp_path):
    data = _Indexed()
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))

    model, optimizer, attached = _setup(tmp_path, "attached.zarr", secret=SECRET)
    with pu.UpdateRecorder(model, optimizer, attached) as rec:
        for _ in range(2):
            _train(model, optimizer, rec.loader(loader, key=lambda i: USERS[i]))

    plain_model, plain_optimizer, by_hand = _setup(tmp_path, "by_hand.zarr", secret=SECRET)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    with pu.UpdateRecorder(plain_model, plain_optimizer, by_hand) as rec:
        for _ in range(2):
            for x, y in loader:
                rec.batch([USERS[i] for i in _indices(x)])
                plain_optimizer.zero_grad()
                torch.nn.functional.cross_entropy(plain_model(x), y).backward()
                plain_optimizer.step()
    assert attached.steps == by_hand.steps == 12
    for a, b in zip(attached.read(range(12)), by_hand.read(range(12))):
        assert torch.equal(a, b)
    for user in USERS:
        assert attached.steps_for([user]).steps.tolist() == by_hand.steps_for([user]).steps.tolist()
    assert attached.final_fingerprint == by_hand.final_fingerprint

    # Forgetting by key, then training on with the helper: the forgotten sample's batch is refused.
    report = pu.amnesiac_forget(model, attached, [USERS[5]], request_id="attach-1")
    assert report.steps_removed == 2
    with pu.UpdateRecorder(model, optimizer, attached) as rec:
        with pytest.raises(pu.RecorderError, match="deletion was requested"):
            _train(model, optimizer, rec.loader(loader, key=lambda i: USERS[i]))


def test_gradient_accumulation_declares_every_micro_batch(tmp_path):
    model, optimizer, store = _setup(tmp_path, "acc.zarr")
    loader = torch.utils.data.DataLoader(_Indexed(), batch_size=4)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        for i, (x, y) in enumerate(rec.loader(loader)):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if i % 3 == 2:
                optimizer.step()
                optimizer.zero_grad()
    assert store.steps == 4
    assert store.step_ids([0])[0].tolist() == list(range(12))
    assert store.step_ids([3])[0].tolist() == list(range(36, 48))


def test_loaders_without_indices_are_refused(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([(torch.zeros(8), 0)] * 4)

    capture = _Capture()
    with pytest.raises(ValueError, match="iterable-style dataset"):
        DeclaredBatches(capture, torch.utils.data.DataLoader(Stream(), batch_size=2))
    with pytest.raises(ValueError, match="batch_size=None"):
        DeclaredBatches(capture, torch.utils.data.DataLoader(_Indexed(), batch_size=None))
    with pytest.raises(ValueError, match="in_order=True"):
        DeclaredBatches(capture, torch.utils.data.DataLoader(_Indexed(), batch_size=2, num_workers=1, in_order=False))
    with pytest.raises(TypeError, match="needs a torch.utils.data.DataLoader"):
        DeclaredBatches(capture, [(torch.zeros(2, 8), torch.zeros(2))])
    with pytest.raises(TypeError, match="key must be a function"):
        DeclaredBatches(capture, torch.utils.data.DataLoader(_Indexed()), key=USERS)


def test_an_accelerate_prepared_loader_and_its_skipped_batches():
    """Accelerate's DataLoaderShard reads one batch ahead and, after skip_first_batches, samples
    batches it never yields: the declarations stay aligned with the batches yielded."""
    accelerate = pytest.importorskip("accelerate", reason="the Accelerate case needs accelerate")
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    try:
        accelerator = accelerate.Accelerator(cpu=True)
        loader = accelerator.prepare(torch.utils.data.DataLoader(_Indexed(), batch_size=5, shuffle=True))
        capture = _Capture()
        batches = DeclaredBatches(capture, loader, key=lambda i: USERS[i])
        seen = [_indices(x) for x, _ in batches]
        assert len(seen) == 10 and capture.declared == [[USERS[i] for i in batch] for batch in seen]
        capture = _Capture()
        skipped = DeclaredBatches(capture, accelerator.skip_first_batches(loader, 3))
        seen = [_indices(x) for x, _ in skipped]
        assert len(seen) == 7 and capture.declared == seen
        # A DataLoaderShard that skips batches itself samples them first, then drops them.
        from accelerate.data_loader import DataLoaderShard

        capture = _Capture()
        seen = [_indices(x) for x, _ in DeclaredBatches(capture, DataLoaderShard(_Indexed(), batch_size=5,
                                                                                 skip_batches=2))]
        assert seen[0] == [10, 11, 12, 13, 14] and capture.declared == seen
    finally:
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state()
