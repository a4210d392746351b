"""Unlearning methods. Algorithm 1 (amnesiac, from recorded updates) is in amnesiac.py."""
from .amnesiac import ForgetReport, amnesiac_forget

__all__ = ["ForgetReport", "amnesiac_forget"]
