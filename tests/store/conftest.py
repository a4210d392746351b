"""Fixtures of the store tests."""
from __future__ import annotations

import pytest


@pytest.fixture(params=["local", "fsspec-memory", "s3"])
def back_end(request, tmp_path):
    """(path, storage_options) of the same store on each back-end: a local folder, an fsspec
    in-memory filesystem, and S3 (moto's server on loopback)."""
    if request.param == "local":
        return str(tmp_path / "s.zarr"), None
    if request.param == "fsspec-memory":
        return f"memory://pyunlearn-tests/{tmp_path.name}/s.zarr", None
    return f"s3://pyunlearn-tests/{tmp_path.name}/s.zarr", request.getfixturevalue("s3_server")
