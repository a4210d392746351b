"""Import paths of earlier versions, kept working for one version with a DeprecationWarning:
the modules moved into subpackages (see CHANGELOG.md, 0.3.0)."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module → its new home
MOVED = {
    "pyunlearn.ops": "pyunlearn.kernels.ops",
    "pyunlearn.row": "pyunlearn.kernels.row",
    "pyunlearn.recorder": "pyunlearn.recording.recorder",
    "pyunlearn.metrics": "pyunlearn.evaluation.metrics",
    "pyunlearn.experiment": "pyunlearn.evaluation.experiment",
}


def _warn(old: str, new: str, stacklevel: int) -> None:
    warnings.warn(f"{old} moved to {new}; the old path goes away in the next version", DeprecationWarning,
                  stacklevel=stacklevel)


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self._new = new

    def create_module(self, spec):
        return importlib.import_module(self._new)  # the module itself: one object under both names

    def exec_module(self, module) -> None:
        pass


class MovedModules(importlib.abc.MetaPathFinder):
    """`import pyunlearn.ops` (and `from pyunlearn.ops import x`) gives pyunlearn.kernels.ops,
    with a DeprecationWarning."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        _warn(fullname, new, stacklevel=4)
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())


def moved_attribute(name: str):
    """`pyunlearn.ops` as an attribute (`pu.ops.supports`): the new module, with the warning."""
    new = MOVED.get(f"pyunlearn.{name}")
    if new is None:
        raise AttributeError(f"module 'pyunlearn' has no attribute {name!r}")
    _warn(f"pyunlearn.{name}", new, stacklevel=4)
    return importlib.import_module(new)
