"""What every GR model shares: its embedding tables, its device, and the split into dense and sparse parameters."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

import gr_parallel
from gr_models.data.batch import Batch
from gr_models.modules.embedding import ShardedEmbedding


class GRModel(nn.Module):
    """Base of RankingGR, RetrievalGR and SASRec. Subclasses set `self.embedding` and their dense modules."""

    embedding: ShardedEmbedding

    def __init__(self, device: torch.device | str | None) -> None:
        super().__init__()
        self._device = torch.device(device) if device is not None else gr_parallel.get_device()

    @property
    def device(self) -> torch.device:
        return self._device

    def _on_device(self, batch: Batch) -> Batch:
        return batch if batch.features.device() == self._device else batch.to(self._device)

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        """Every trainable parameter that is not a static embedding table (the dense optimizer's parameters)."""
        sparse = {id(weight) for _, weight in self.embedding.static_parameters()}
        return (p for p in self.parameters() if p.requires_grad and id(p) not in sparse)

    def sparse_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One row-sparse optimizer per static table (dynamic tables update themselves in backward)."""
        return self.embedding.sparse_optimizers()
