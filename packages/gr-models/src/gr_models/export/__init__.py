"""Export a trained GR for serving: `export_model` / `gr-export` write a `torch.export` program of the dense part,
a snapshot of the embedding tables and a standalone loader (`gr_models.export.loader`, copied into the export)."""

from gr_models.export.exporter import batch_features, export_model, table_snapshot
from gr_models.export.program import ServingProgram

__all__ = ["ServingProgram", "batch_features", "export_model", "table_snapshot"]
