"""Unlearning methods: `forget`, the recommended guarded entry point (subtraction, then repair
within a budget while a probe says the model lost too much); amnesiac (Algorithm 1, from recorded updates), label flipping
(Algorithm 2), gradient ascent (Algorithm 3), each of the last two naive (keep=None) or with
layer-wise partial updates (keep=r); fine-tuning on retained data; and recomputing BatchNorm
statistics from retained data, which none of the others reach."""
from ._loop import UnlearnReport
from .amnesiac import Deletion, ForgetReport, amnesiac_forget, forgetting
from .buffers import StaleBuffersWarning, recompute_batchnorm
from .dampen import DampenReport, dampen
from .finetune import fine_tune
from .gradient import gradient_ascent
from .guarded import GuardedReport, ProbeScore, Tolerance, forget, score
from .label_flip import label_flip
from .partial import LayerwiseMask
from .repair import RepairReport, forget_and_repair, repair, subtracted_steps

__all__ = ["forget", "GuardedReport", "Tolerance", "ProbeScore", "score", "ForgetReport", "amnesiac_forget",
           "forgetting", "Deletion", "label_flip", "gradient_ascent", "fine_tune", "LayerwiseMask",
           "UnlearnReport", "StaleBuffersWarning", "recompute_batchnorm",
           "repair", "forget_and_repair", "RepairReport", "subtracted_steps", "dampen", "DampenReport"]
