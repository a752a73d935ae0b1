"""A DLRM-style ranking baseline over the same batches as `RankingGR`: pooled embeddings, dot interaction, MLP.

Each candidate is one sample with these pooled features (TorchRec `EmbeddingBagCollection`, mean pooling):

- the user's contextual ids (one bag per contextual feature, e.g. user id, gender, age, occupation, zip code);
- the candidate's item id and each of its side features (e.g. the movie's genre set);
- bags of the user's history: the history item ids (``history_<item>``, sharing the item table), each history side
  feature (``history_<side>``, sharing that feature's table) and the history actions (``history_<action>``).

Candidate actions are the labels and never enter a feature; timestamps are not used. Interaction (DLRM's "dot"
interaction without dense features): the F pooled embeddings `[N, F, D]`, flattened, concatenated with the
F (F - 1) / 2 dot products of every pair, into an MLP that ends in one logit per task. Loss: per-task binary
cross-entropy, as `RankingGR`.

A batch without candidates (`data.max_train_candidates=0`, as `RankingGR` trains on every history position) is
scored at every event: each event is a sample whose history bags hold the user's events before it (mean pooled;
empty, hence zero, for a user's first event), the samples `RankingGR` scores on such a batch. The bags are not
materialized (they would hold O(n^2) ids per user): the table looks up each event's own ids and the means over
earlier events come from prefix sums (`every_position_features`, `_means_over_earlier_events`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gr_models.configs.embedding_config import EmbeddingOptimizerParam
from gr_models.data.batch import RankingBatch
from gr_models.data.schema import UNBOUNDED_VOCAB, DatasetSchema
from gr_models.modules.jagged import lengths_to_offsets, token_coordinates
from gr_models.modules.losses import multi_task_bce
from gr_models.modules.mlp import MLP
from gr_models.modules.sparse_optimizer import SparseRowOptimizer

__all__ = ["DLRMBaseline"]


def _gather_bags(values: Tensor, lengths: Tensor, owners: Tensor) -> tuple[Tensor, Tensor]:
    """For rows `owners [N]` (indices of jagged rows with `lengths [B]` over `values`): (values of each owner's
    row, concatenated [sum lengths[owners]], their lengths [N])."""
    offsets = lengths_to_offsets(lengths)
    bag_lengths = lengths.to(torch.int64)[owners]
    row, position = token_coordinates(bag_lengths)
    return values[offsets[owners][row] + position], bag_lengths


def _means_over_earlier_events(per_event: Tensor, lengths: Tensor) -> Tensor:
    """`[E, D]` rows of users' events (`lengths [B]`, user-major) -> `[E, D]`: each row replaced by the mean of the
    rows of its user's earlier events (zero for a user's first event, as the mean of an empty bag)."""
    _, position = token_coordinates(lengths, per_event.shape[0])
    before = torch.cumsum(per_event, dim=0) - per_event  # sums over every earlier row of the batch
    first = torch.arange(per_event.shape[0], device=per_event.device) - position  # each row's user's first row
    before = before - before[first]  # minus the sums over earlier users' rows
    return before / position.clamp(min=1).unsqueeze(1).to(before.dtype)


class DLRMBaseline(nn.Module):
    """See the module docstring.

    Args:
        schema: a ranking schema (item, action, contextual and side features, tasks).
        dim: embedding width of every table.
        mlp_hidden: hidden widths of the top MLP (one logit per task is appended).
        table_optimizer: the row-sparse optimizer of every table (as `RankingGR`'s static tables); default Adam.
        activation: of the MLP.
        device: where the model lives (default the CPU).
    """

    def __init__(
        self,
        schema: DatasetSchema,
        dim: int,
        mlp_hidden: Sequence[int],
        *,
        table_optimizer: EmbeddingOptimizerParam | None = None,
        activation: str = "relu",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if schema.kind != "ranking" or schema.action_feature_name is None:
            raise ValueError("DLRMBaseline needs a ranking schema with an action feature")
        unbounded = [n for n in schema.id_feature_names if schema.vocab_sizes[n] == UNBOUNDED_VOCAB]
        if unbounded:
            raise ValueError(f"DLRMBaseline needs bounded vocabularies; {unbounded} are hashed (unbounded)")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.schema = schema
        self.num_tasks = schema.num_tasks
        self.table_optimizer = table_optimizer or EmbeddingOptimizerParam(optimizer_str="adam", learning_rate=1e-3)
        item, action = schema.item_feature_name, schema.action_feature_name
        self.action_feature_name = action
        groups = {name: [name] for name in schema.contextual_feature_names}
        for name in (item, *schema.side_feature_names):
            groups[name] = [name, f"history_{name}"]
        groups[action] = [f"history_{action}"]
        tables = [
            EmbeddingBagConfig(
                name=f"{name}_table",
                embedding_dim=dim,
                num_embeddings=schema.vocab_sizes[name],
                feature_names=features,
                pooling=PoolingType.MEAN,
            )
            for name, features in groups.items()
        ]
        self.ebc = EmbeddingBagCollection(tables=tables, device=self.device)
        self.feature_names = [f for features in groups.values() for f in features]
        count = len(self.feature_names)
        self.top = MLP(count * dim + count * (count - 1) // 2, [*mlp_hidden, self.num_tasks], activation).to(
            self.device
        )
        self._pairs: Tensor
        self.register_buffer("_pairs", torch.triu_indices(count, count, offset=1, device=self.device), persistent=False)

    def candidate_features(self, batch: RankingBatch) -> KeyedJaggedTensor:
        """One KJT row per candidate (stride = total candidates) with the pooled features of the module docstring."""
        if batch.num_candidates is None:
            raise ValueError("candidate_features needs candidates (a batch without them: every_position_features)")
        schema = self.schema
        jagged = batch.features.to_dict()
        item_lengths = jagged[schema.item_feature_name].lengths().to(torch.int64)
        num_candidates = batch.num_candidates.to(device=item_lengths.device, dtype=torch.int64)
        history = item_lengths - num_candidates
        owners, position = token_coordinates(num_candidates)
        candidate_index = lengths_to_offsets(item_lengths)[owners] + history[owners] + position
        ones = torch.ones_like(owners)
        bags: dict[str, tuple[Tensor, Tensor]] = {}  # feature -> (ids, bag lengths)
        for name in schema.contextual_feature_names:
            bags[name] = _gather_bags(jagged[name].values(), jagged[name].lengths(), owners)
        for name in (schema.item_feature_name, *schema.side_feature_names):
            bags[name] = (jagged[name].values()[candidate_index], ones)
        user, event = token_coordinates(item_lengths)
        is_history = event < history[user]  # candidate actions are labels: only history events enter the bags
        for name in (schema.item_feature_name, *schema.side_feature_names, self.action_feature_name):
            bags[f"history_{name}"] = _gather_bags(jagged[name].values()[is_history], history, owners)
        return KeyedJaggedTensor(
            keys=list(bags),
            values=torch.cat([ids for ids, _ in bags.values()]).to(torch.int64),
            lengths=torch.cat([bag_lengths for _, bag_lengths in bags.values()]).to(torch.int32),
        )

    def every_position_features(self, batch: RankingBatch) -> KeyedJaggedTensor:
        """For a batch without candidates, one KJT row per event (stride = total events): the bags of its user's
        contextual ids, its item and side ids, and under each ``history_*`` name the event's own id, which
        `logits` turns into the mean over the user's earlier events."""
        schema = self.schema
        jagged = batch.features.to_dict()
        owners, _ = token_coordinates(jagged[schema.item_feature_name].lengths().to(torch.int64))
        ones = torch.ones_like(owners)
        bags: dict[str, tuple[Tensor, Tensor]] = {}
        for name in schema.contextual_feature_names:
            bags[name] = _gather_bags(jagged[name].values(), jagged[name].lengths(), owners)
        for name in (schema.item_feature_name, *schema.side_feature_names):
            bags[name] = (jagged[name].values(), ones)
        for name in (schema.item_feature_name, *schema.side_feature_names, self.action_feature_name):
            bags[f"history_{name}"] = (jagged[name].values(), ones)
        return KeyedJaggedTensor(
            keys=list(bags),
            values=torch.cat([ids for ids, _ in bags.values()]).to(torch.int64),
            lengths=torch.cat([bag_lengths for _, bag_lengths in bags.values()]).to(torch.int32),
        )

    def _pooled(self, batch: RankingBatch) -> dict[str, Tensor]:
        """Pooled `[N, D]` embedding of every feature, one row per scored event."""
        if batch.num_candidates is not None:
            return self.ebc(self.candidate_features(batch)).to_dict()
        pooled = self.ebc(self.every_position_features(batch)).to_dict()
        lengths = batch.features[self.schema.item_feature_name].lengths().to(torch.int64)
        for name in self.feature_names:
            if name.startswith("history_"):
                pooled[name] = _means_over_earlier_events(pooled[name], lengths)
        return pooled

    def logits(self, batch: RankingBatch) -> Tensor:
        """`[N, num_tasks]` logits, rows in the order of `batch.labels` (the candidates, or every event of a batch
        without candidates)."""
        batch = batch if batch.features.device() == self.device else batch.to(self.device)
        pooled = self._pooled(batch)
        embeddings = torch.stack([pooled[name] for name in self.feature_names], dim=1)  # [N, F, D]
        dots = torch.bmm(embeddings, embeddings.transpose(1, 2))[:, self._pairs[0], self._pairs[1]]
        return self.top(torch.cat([embeddings.flatten(1), dots], dim=1)).float()

    def forward(self, batch: RankingBatch) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Returns `(losses [N, T], (logits [N, T], labels [N, T]))` as `RankingGR.forward`."""
        if batch.labels is None:
            raise ValueError("DLRMBaseline.forward needs labels; use DLRMBaseline.logits for unlabeled batches")
        logits = self.logits(batch)
        labels = batch.labels.to(logits.device)
        if labels.shape != logits.shape:
            raise ValueError(f"labels have shape {tuple(labels.shape)} but the model scores {tuple(logits.shape)}")
        return multi_task_bce(logits, labels), (logits.detach(), labels.detach())

    @torch.no_grad()
    def evaluate_batch(self, batch: RankingBatch) -> dict[str, Tensor]:
        """`{"logits": [N, T], "labels": [N, T]}` for the metrics."""
        _, (logits, labels) = self(batch)
        return {"logits": logits, "labels": labels}

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        """The MLP's parameters (the dense optimizer's); the tables train with `sparse_optimizers()`."""
        return (p for p in self.top.parameters() if p.requires_grad)

    def sparse_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One row-sparse optimizer per table (`table_optimizer`): only looked-up rows move."""
        return {
            name: SparseRowOptimizer([bag.weight], self.table_optimizer)
            for name, bag in self.ebc.embedding_bags.items()
        }
