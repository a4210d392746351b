"""The update store: the pruned update of every optimizer step of one model, by sample ID, in a
Zarr v3 group (docs/format.md).

    update_store   UpdateStore, the facade: create/open, append, read, the write session
    metadata       the group attributes as one checked value (StoreMetadata), format versions
    layers         the layer table against a model's parameters; a module from a state_dict
    arrays         the arrays on disk, read with every failure a CorruptStoreError
    shards         reading rows straight from shards, writing a shard whole
    presence       a missing chunk is damage, never zeros
    chunk_buffer   the chunk of steps being filled
    id_index       which steps used which sample IDs (the persistent index and the scans)
    lock           the single-writer lock
    location       a path or URL as a zarr Store
    stats          what a store costs on disk
"""
from .id_index import StepLookup
from .metadata import Layer, StoreMetadata
from .stats import StoreStats
from .update_store import UpdateStore

__all__ = ["UpdateStore", "Layer", "StepLookup", "StoreStats", "StoreMetadata"]
