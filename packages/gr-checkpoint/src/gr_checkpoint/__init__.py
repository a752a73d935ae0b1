"""Atomic, reshardable checkpoints of models with dynamic embedding tables.

``save(path, model, optimizer)`` writes dynamic tables to ``path/dynamicemb_module/`` and the rest
(model, optimizer, extra state) to ``path/torch_module/`` through ``torch.distributed.checkpoint``,
with ``path/manifest.json`` describing it; ``load(path, model, optimizer)`` checks the manifest
against the model and restores everything. Loading never runs code from the files (see the README's
"Loading untrusted checkpoints"); ``gr-checkpoint convert --trust PATH`` converts a trusted format-1
checkpoint.
"""

from gr_checkpoint.async_save import SaveHandle, wait_for_saves
from gr_checkpoint.checkpoint import load, save
from gr_checkpoint.convert import convert_trusted_checkpoint
from gr_checkpoint.dynamic_tables import StandaloneDynamicTablesError
from gr_checkpoint.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    LegacyCheckpointError,
    UnsafeCheckpointError,
    UnsafeExtraStateError,
)
from gr_checkpoint.manifest import DynamicTableSpec, Manifest, TensorSpec, read_manifest
from gr_checkpoint.steps import checkpoint_path, latest_checkpoint, save_step

__version__ = "0.1.0"

__all__ = [
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "DynamicTableSpec",
    "LegacyCheckpointError",
    "Manifest",
    "SaveHandle",
    "StandaloneDynamicTablesError",
    "TensorSpec",
    "UnsafeCheckpointError",
    "UnsafeExtraStateError",
    "__version__",
    "checkpoint_path",
    "convert_trusted_checkpoint",
    "latest_checkpoint",
    "load",
    "read_manifest",
    "save",
    "save_step",
    "wait_for_saves",
]
