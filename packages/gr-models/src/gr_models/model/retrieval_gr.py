"""RetrievalGR: next-item prediction with sampled or full softmax, evaluated by ranking the full item corpus."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gr_models.configs.hstu_config import HSTUConfig
from gr_models.configs.task_config import RetrievalConfig
from gr_models.data.batch import Batch, RetrievalBatch
from gr_models.data.schema import DatasetSchema
from gr_models.metrics.retrieval import RetrievalMetrics, target_ranks
from gr_models.model.base import GRModel
from gr_models.modules.embedding import ShardedEmbedding
from gr_models.modules.hstu_block import HSTUBlock, history_event_outputs
from gr_models.modules.jagged import lengths_to_offsets, token_coordinates
from gr_models.modules.losses import full_softmax_loss, sampled_softmax_loss
from gr_models.modules.preprocessing import HSTUSequence


class RetrievalGR(GRModel):
    """Embeddings -> sequence backbone -> the output after each history event scores the next item.

    Training: for every history event e of a user with a next item (item e+1 exists in the item sequence), the
    output at the event's last token is the query and item e+1 the positive; sampled softmax against in-batch
    and/or uniformly sampled negatives, or (`loss="full_softmax"`) cross-entropy over every item id of the table
    (see `RetrievalConfig`). Item embeddings (the input table) are the output
    vocabulary; queries and items are L2-normalized when `l2_normalize`.

    Evaluation (`evaluate_batch`): the query after the last history event predicts the first candidate
    (leave-last-out batches carry the held-out item as one candidate); without candidates, the query after the
    second-to-last item predicts the last item (needs causal attention). All `item_vocab_size` ids are scored.

    Args:
        hstu_config: the backbone configuration.
        task_config: tables, loss and evaluation settings.
        device: default the current CUDA device, else the CPU.
    """

    def __init__(
        self, hstu_config: HSTUConfig, task_config: RetrievalConfig, device: torch.device | str | None = None
    ) -> None:
        super().__init__(device)
        position = hstu_config.position_encoding
        if position is not None and position.count_from == "end":
            warnings.warn(
                "RetrievalGR with position encoding counted from the end (count_from='end'): training never uses "
                "the most recent event as a query, so the position every evaluation query has stays untrained; "
                "use PositionEncodingConfig(count_from='start')",
                stacklevel=2,
            )
        if position is not None and position.use_time_encoding and position.time_from == "query":
            warnings.warn(
                "RetrievalGR with time encoding measured from the query time (time_from='query'): a training "
                "query's tokens then encode how long before the sequence's last event they happened, which an "
                "evaluation query never sees; use PositionEncodingConfig(time_from='previous')",
                stacklevel=2,
            )
        self.hstu_config = hstu_config
        self.task_config = task_config
        self.embedding = ShardedEmbedding(task_config.embedding_configs, self.device)
        self.backbone = self._build_backbone(hstu_config).to(self.device)

    def _build_backbone(self, config: HSTUConfig) -> nn.Module:
        return HSTUBlock(config)

    def _normalize(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1, eps=1e-6) if self.task_config.l2_normalize else x

    def _item_table_size(self, item_feature_name: str) -> int:
        return self.embedding.table_of(item_feature_name).vocab_size

    def embed_items(self, item_feature_name: str, ids: Tensor) -> Tensor:
        """`[N, D]` embeddings of item `ids [N]` (int64) from the item table."""
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=[item_feature_name],
            values=ids.to(device=self.device, dtype=torch.int64),
            lengths=torch.tensor([ids.numel()], dtype=torch.int64, device=self.device),
        )
        return self.embedding.lookup(features, [item_feature_name])[item_feature_name].values()

    def _encode(self, batch: RetrievalBatch) -> tuple[HSTUSequence, Tensor, Tensor, Tensor]:
        """(sequence, item ids [N], item embeddings [N, D], item offsets [B+1])."""
        embeddings = self.embedding(batch.features, batch.host_copy())
        sequence = self.backbone(embeddings, batch)
        items = embeddings[batch.item_feature_name]
        item_ids = batch.features[batch.item_feature_name].values().to(torch.int64)
        return sequence, item_ids, items.values(), lengths_to_offsets(items.lengths())

    def _negatives(self, item_feature_name: str, num_queries: int) -> tuple[Tensor | None, Tensor | None]:
        """Uniform negatives: ids `[Q, M]` and embeddings `[Q, M, D]` per query, or `[M]` / `[M, D]` shared."""
        if self.task_config.negative_sampling == "in_batch":
            return None, None
        vocab = self._item_table_size(item_feature_name)
        count = self.task_config.num_negatives
        shape = (num_queries, count) if self.task_config.negatives_per_query else (count,)
        ids = torch.randint(0, vocab, shape, device=self.device)
        # each distinct id is looked up once: Q * M lookups (millions per batch) would make the table's backward
        # scatter that many rows; the gather below sums their gradients densely instead
        distinct, inverse = torch.unique(ids, return_inverse=True)
        embeddings = self._normalize(self.embed_items(item_feature_name, distinct))
        return ids, embeddings[inverse]

    def forward(self, batch: RetrievalBatch) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Returns `(losses [N], (queries [N, D], positive ids [N]))`: per-query sampled- or full-softmax losses."""
        batch = self._on_device(batch)
        sequence, item_ids, item_embeddings, item_offsets = self._encode(batch)
        users, event = token_coordinates(sequence.history_lengths)
        item_lengths = item_offsets[1:] - item_offsets[:-1]
        has_next = event + 1 < item_lengths[users]
        if not bool(has_next.any()):
            raise ValueError("the batch has no (history event, next item) pair to train on")
        target = (item_offsets[users] + event + 1)[has_next]
        queries = self._normalize(history_event_outputs(sequence)[has_next])
        positive_ids = item_ids[target]
        if self.task_config.loss == "full_softmax":
            corpus = self.all_item_embeddings(batch.item_feature_name)
            losses = full_softmax_loss(queries, positive_ids, corpus, temperature=self.task_config.temperature)
            return losses, (queries.detach(), positive_ids)
        positives = self._normalize(item_embeddings[target])
        negative_ids, negatives = self._negatives(batch.item_feature_name, queries.shape[0])
        losses = sampled_softmax_loss(
            queries,
            positive_ids,
            positives,
            negative_ids,
            negatives,
            temperature=self.task_config.temperature,
            in_batch_negatives=self.task_config.negative_sampling in ("in_batch", "mixed"),
        )
        return losses, (queries.detach(), positive_ids)

    def _eval_pairs(
        self, batch: RetrievalBatch, sequence: HSTUSequence, item_offsets: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(users [U], query rows into history_event_outputs [U], target item positions [U])."""
        history = sequence.history_lengths
        event_offsets = lengths_to_offsets(history)
        if batch.num_candidates is not None:
            users = torch.nonzero((sequence.num_candidates > 0) & (history > 0)).squeeze(1)
            query_rows = event_offsets[users] + history[users] - 1
            target = item_offsets[users] + history[users]
        else:
            if not self.hstu_config.is_causal:
                raise ValueError("evaluation without candidates needs causal attention (the last item is seen)")
            users = torch.nonzero(history >= 2).squeeze(1)
            query_rows = event_offsets[users] + history[users] - 2
            target = item_offsets[users] + history[users] - 1
        return users, query_rows, target

    def all_item_embeddings(self, item_feature_name: str, chunk: int = 65536) -> Tensor:
        """`[V, D]` (normalized) embeddings of every id in `[0, item vocab size)`."""
        vocab = self._item_table_size(item_feature_name)
        ids = torch.arange(vocab, device=self.device)
        return self._normalize(torch.cat([self.embed_items(item_feature_name, part) for part in ids.split(chunk)]))

    @torch.no_grad()
    def evaluate_batch(
        self,
        batch: RetrievalBatch,
        item_embeddings: Tensor | None = None,
        excluded_items: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Full-corpus ranking of each user's held-out item.

        Returns `{"ranks": [U] int64 (0 = ranked first; ties count against the target, see
        `gr_models.metrics.retrieval.target_ranks`), "scores": [U, V], "targets": [U]}`. With
        `eval_exclude_history`, items of the user's history (other than the target) are left out of the ranking.
        Pass `item_embeddings` (from `all_item_embeddings`) to reuse them across batches, and `excluded_items`
        (bool `[V]`, True for ids that are no item of the catalogue) to rank only the catalogue.
        """
        batch = self._on_device(batch)
        sequence, item_ids, _, item_offsets = self._encode(batch)
        users, query_rows, target = self._eval_pairs(batch, sequence, item_offsets)
        queries = self._normalize(history_event_outputs(sequence).index_select(0, query_rows))
        corpus = item_embeddings if item_embeddings is not None else self.all_item_embeddings(batch.item_feature_name)
        scores = queries @ corpus.t()
        target_ids = item_ids[target]
        exclude = None
        if self.task_config.eval_exclude_history:
            exclude = self._history_mask(scores.shape, users, item_ids, item_offsets, sequence.history_lengths)
        if excluded_items is not None:
            if excluded_items.shape != (scores.shape[1],):
                raise ValueError(f"excluded_items must be bool [{scores.shape[1]}], got {tuple(excluded_items.shape)}")
            absent = excluded_items.to(device=scores.device, dtype=torch.bool).expand_as(scores)
            exclude = absent if exclude is None else exclude | absent
        ranks = target_ranks(scores, target_ids, exclude)
        return {"ranks": ranks, "scores": scores, "targets": target_ids}

    def evaluate(
        self,
        batches: Iterable[tuple[Batch, bool]],
        schema: DatasetSchema,
        process_group: dist.ProcessGroup | None = None,
    ) -> dict[str, float]:
        """HR@k, NDCG@k (k in `task_config.eval_top_k`) and MRR of the counted batches' held-out items, each
        ranked against every item of `schema.item_feature_name`'s table (embedded once, before the batches)."""
        corpus = self.all_item_embeddings(schema.item_feature_name)
        metrics = RetrievalMetrics(
            list(self.task_config.eval_top_k), process_group=process_group, sync_dist=process_group is not None
        )
        for batch, counts in batches:
            ranks = self.evaluate_batch(cast(RetrievalBatch, batch), corpus)["ranks"]
            if counts:
                metrics.update_from_ranks(ranks)
        return metrics.compute()

    @staticmethod
    def _history_mask(
        shape: torch.Size, users: Tensor, item_ids: Tensor, item_offsets: Tensor, history: Tensor
    ) -> Tensor:
        """Bool `[U, V]`: True for the items in each evaluated user's history."""
        owner, position = token_coordinates(item_offsets[1:] - item_offsets[:-1])
        row_of_user = torch.full((history.numel(),), -1, dtype=torch.int64, device=item_ids.device)
        row_of_user[users] = torch.arange(users.numel(), device=item_ids.device)
        seen = (position < history[owner]) & (row_of_user[owner] >= 0)
        mask = torch.zeros(shape, dtype=torch.bool, device=item_ids.device)
        mask[row_of_user[owner][seen], item_ids[seen]] = True
        return mask
