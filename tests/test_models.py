"""The bundled models' training loop (pyunlearn/models.py)."""
from __future__ import annotations

import numpy as np
import torch

from pyunlearn.data import digits


def test_models_train_takes_its_batches_from_a_batch_sampler(tmp_path):
    import pyunlearn as pu
    from pyunlearn.data import CohortBatchSampler
    from pyunlearn.models import DigitsCNN, train

    data = digits().subset(torch.arange(60))
    sampler = CohortBatchSampler(np.arange(60) // 10, 16, seed=3)  # units of 10 samples
    expected = [sorted(data.ids[torch.as_tensor(b)].tolist()) for b in sampler]
    sampler.set_epoch(0)
    model = DigitsCNN()
    store = pu.UpdateStore.create(tmp_path / "s.zarr", model, keep=0.1)
    train(model, data, epochs=1, batch_size=16, lr=0.05, seed=0, stores=(store,), batch_sampler=sampler)
    assert [ids.tolist() for ids in store.step_ids(range(store.steps))] == expected
