"""Recording: hooks an optimizer's step, prunes each step's update and hands it to the store.

    recorder       UpdateRecorder (the hooks, the IDs declared per step) and the writing rank's role
    row_sources    a step's row: the update against a snapshot (CPU, device) or the gradient
    transfer       rows from a device to the host without stopping training
    writer         the background thread that appends rows to the store
    distributed    DDP: the gather of each step's IDs (and every rank's refusal), a rank that does not write
    sharded        FSDP2 / DTensor models: the writer rank's gathered copy of the parameters
    loader         rec.loader(dataloader, key=...): a DataLoader's batches, each declared as it is yielded
    continuation   the refusal of forgotten samples and the resume checks the recorder asks
"""
from .loader import DeclaredBatches
from .recorder import UpdateRecorder, unwrap_model, unwrap_optimizer

__all__ = ["UpdateRecorder", "DeclaredBatches", "unwrap_model", "unwrap_optimizer"]
