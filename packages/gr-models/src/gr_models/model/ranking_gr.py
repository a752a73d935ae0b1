"""RankingGR: HSTU over the user's history, one multi-task prediction per candidate."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor

from gr_models.configs.hstu_config import HSTUConfig
from gr_models.configs.task_config import RankingConfig
from gr_models.data.batch import Batch, RankingBatch
from gr_models.data.schema import DatasetSchema
from gr_models.metrics.classification import MultiTaskBinaryMetrics
from gr_models.model.base import GRModel
from gr_models.modules.embedding import ShardedEmbedding
from gr_models.modules.hstu_block import HSTUBlock, candidate_outputs, history_item_outputs
from gr_models.modules.losses import multi_task_bce
from gr_models.modules.mlp import MultiTaskHead


class RankingGR(GRModel):
    """Embeddings -> HSTU block -> candidate outputs -> multi-task MLP head -> per-task BCE.

    Scored tokens are the candidates when the batch has `num_candidates`, else every item (each item token is
    scored before its action token is seen, so no label leaks).

    Args:
        hstu_config: the HSTU block.
        task_config: tables, prediction head and number of tasks.
        device: where the model lives; default the current CUDA device, else the CPU.
    """

    def __init__(
        self, hstu_config: HSTUConfig, task_config: RankingConfig, device: torch.device | str | None = None
    ) -> None:
        super().__init__(device)
        self.hstu_config = hstu_config
        self.task_config = task_config
        self.num_tasks = int(task_config.num_tasks or 1)
        self.embedding = ShardedEmbedding(task_config.embedding_configs, self.device)
        self.hstu_block = HSTUBlock(hstu_config).to(self.device)
        self.head = MultiTaskHead(
            hstu_config.hidden_size,
            task_config.prediction_head_arch,
            task_config.prediction_head_act_type,
            task_config.prediction_head_bias,
        ).to(self.device)

    def logits(self, batch: RankingBatch) -> Tensor:
        """`[num scored items, num_tasks]` logits, rows in the order of `batch.labels`."""
        batch = self._on_device(batch)
        sequence = self.hstu_block(self.embedding(batch.features, batch.host_copy()), batch)
        if batch.num_candidates is not None:
            hidden = candidate_outputs(sequence)
        else:
            hidden = history_item_outputs(sequence)
        return self.head(hidden).float()

    def forward(self, batch: RankingBatch) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Returns `(losses [N, T], (logits [N, T], labels [N, T]))`; losses are per element (no reduction),
        logits and labels are detached."""
        if batch.labels is None:
            raise ValueError("RankingGR.forward needs labels; use RankingGR.logits for unlabeled batches")
        logits = self.logits(batch)
        labels = batch.labels.to(logits.device)
        if labels.shape != logits.shape:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)} but the model scores {tuple(logits.shape)} "
                f"(rows = scored items, columns = num_tasks={self.num_tasks})"
            )
        losses = multi_task_bce(logits, labels)
        return losses, (logits.detach(), labels.detach())

    @torch.no_grad()
    def evaluate_batch(self, batch: RankingBatch) -> dict[str, Tensor]:
        """`{"logits": [N, T], "labels": [N, T]}` for the metrics."""
        _, (logits, labels) = self(batch)
        return {"logits": logits, "labels": labels}

    def evaluate(
        self,
        batches: Iterable[tuple[Batch, bool]],
        schema: DatasetSchema,
        process_group: dist.ProcessGroup | None = None,
    ) -> dict[str, float]:
        """Per-task classification metrics (named by `schema.task_names`) of the counted batches' candidates."""
        metrics = MultiTaskBinaryMetrics(
            list(schema.task_names), process_group=process_group, sync_dist=process_group is not None
        )
        for batch, counts in batches:
            result = self.evaluate_batch(cast(RankingBatch, batch))
            if counts:
                metrics.update(result["logits"], result["labels"])
        return metrics.compute()
