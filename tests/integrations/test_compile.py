"""torch.compile: a compiled module and the plain one name their parameters alike in a store,
and the recorder and amnesiac_forget accept either.

The tests compile with backend="eager": dynamo traces the module and wraps it in an
OptimizedModule (the `_orig_mod.` names) as with the default backend, without inductor's C++
code generation, which takes minutes on a small CI machine and changes nothing pyunlearn sees."""
from __future__ import annotations

import pytest
import torch

import pyunlearn as pu
from pyunlearn.store.layers import trainable_parameters
from tests.support import TinyNet, tiny_data, tiny_training

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _compiled(model):
    return torch.compile(model, backend="eager")


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_compiled_and_plain_modules_name_their_parameters_alike():
    model = TinyNet()
    compiled = _compiled(model)
    assert [n for n, _ in compiled.named_parameters()][0].startswith("_orig_mod.")
    assert [n for n, _ in trainable_parameters(compiled)] == [n for n, _ in trainable_parameters(model)] == \
        ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    model.fc2 = _compiled(model.fc2)  # a compiled submodule
    assert [n for n, _ in trainable_parameters(model)] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def _run(path, *, compile_for_store: bool, compile_for_training: bool):
    torch.manual_seed(0)
    model = TinyNet()
    compiled = _compiled(model)
    trained = compiled if compile_for_training else model
    optimizer = torch.optim.SGD(_trainable(trained), lr=0.1, momentum=0.9)
    store = pu.UpdateStore.create(path, compiled if compile_for_store else model, keep=1.0, value_dtype="float32")
    with pu.UpdateRecorder(trained, optimizer, store) as rec:
        tiny_training(trained, optimizer, tiny_data(48), epochs=2, recorder=rec)
    return model, compiled, store


@pytest.mark.parametrize("compile_for_store, compile_for_training", [(True, True), (True, False), (False, True)])
def test_a_compiled_module_records_and_forgets_as_the_plain_one(tmp_path, compile_for_store, compile_for_training):
    plain_model, _, plain = _run(tmp_path / "plain.zarr", compile_for_store=False, compile_for_training=False)
    model, compiled, store = _run(tmp_path / "c.zarr", compile_for_store=compile_for_store,
                                  compile_for_training=compile_for_training)
    assert [layer.name for layer in store.layers] == [layer.name for layer in plain.layers]
    assert store.steps == plain.steps == 6
    assert store.final_fingerprint == plain.final_fingerprint  # the eager backend runs the same kernels
    for a, b in zip(store.read(range(6)), plain.read(range(6))):
        assert torch.equal(a, b)
    # Forgetting works on the compiled module and on the plain one (the same parameters).
    report = pu.amnesiac_forget(compiled if compile_for_training else model, store, [1003])
    assert report.steps_removed == len(plain.steps_for([1003]).steps) > 0
    expected = pu.amnesiac_forget(plain_model, plain, [1003])
    for a, b in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)
    assert expected.steps_removed == report.steps_removed
