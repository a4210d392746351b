"""`pyunlearn selfcheck` says which kernels run: PYUNLEARN_REFERENCE=1 forces the torch reference.
(The command with the native kernels runs in tests/cli/test_entry_point.py.)"""
from __future__ import annotations


def test_env_variable_forces_the_reference(cli, monkeypatch):
    monkeypatch.setenv("PYUNLEARN_REFERENCE", "1")
    out = cli("selfcheck")
    assert out.returncode == 0, out.stderr
    assert "kernels: reference (torch; PYUNLEARN_REFERENCE is set)" in out.stdout
