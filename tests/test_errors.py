"""Every error is in pyunlearn.errors, a PyunlearnError and also a built-in one."""
from __future__ import annotations

import pytest

import pyunlearn as pu
from pyunlearn import errors


@pytest.mark.parametrize("error, builtin", [
    (errors.StoreError, RuntimeError), (errors.StoreLockedError, RuntimeError),
    (errors.StoreNotFoundError, FileNotFoundError), (errors.StoreFormatError, ValueError),
    (errors.CorruptStoreError, OSError), (errors.ModelMismatchError, ValueError),
    (errors.NonFiniteUpdateError, ValueError), (errors.RecorderError, RuntimeError),
])
def test_every_error_is_a_pyunlearn_error_and_a_builtin(error, builtin):
    assert issubclass(error, errors.PyunlearnError) and issubclass(error, builtin)
    assert str(error("what happened")) == "what happened"


def test_a_missing_store_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no update store") as caught:
        pu.UpdateStore.open(tmp_path / "nothing.zarr")
    assert isinstance(caught.value, pu.StoreError)
