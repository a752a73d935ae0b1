"""One rank of the ``distribute`` tests; run with torchrun's environment variables set.

Usage: ``python distribute_worker.py OUT_DIR``. Trains a tiny model (a model-parallel static table,
a data-parallel table, a standalone dynamicemb collection and an MLP) for a few steps on this
rank's share of fixed global batches, then writes what it observed to ``OUT_DIR/rank<RANK>.json``;
the test compares a 2-process run with a 1-process run and makes the assertions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel

import gr_parallel
from dynamicemb import (
    DynamicEmbeddingCollection,
    DynamicEmbInitializerArgs,
    DynamicEmbInitializerMode,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbTableOptions,
)

GLOBAL_BATCH = 8
IDS_PER_SAMPLE = 2
DIM = 4
STEPS = 3
FEATURES = {"f_mp": 24, "f_dp": 6, "f_dyn": 1000}  # feature -> id range
STATIC_LR, DYNAMIC_LR, DENSE_LR, GAMMA = 0.05, 0.02, 0.1, 0.5


class TinyModel(nn.Module):
    """Sum-pooled embeddings of three features (fixed ``IDS_PER_SAMPLE`` ids each) -> MLP -> logit."""

    def __init__(self) -> None:
        super().__init__()
        self.model_parallel = EmbeddingCollection(
            tables=[EmbeddingConfig(name="mp", embedding_dim=DIM, num_embeddings=24, feature_names=["f_mp"])]
        )
        self.data_parallel = EmbeddingCollection(
            tables=[EmbeddingConfig(name="dp", embedding_dim=DIM, num_embeddings=6, feature_names=["f_dp"])]
        )
        options = DynamicEmbTableOptions(
            initializer_args=DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.CONSTANT, value=0.1),
            max_capacity=256,
        )
        adam = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=DYNAMIC_LR)
        dyn = EmbeddingConfig(name="dyn", embedding_dim=DIM, num_embeddings=256, feature_names=["f_dyn"])
        self.dynamic = nn.ModuleDict(
            {"dyn": DynamicEmbeddingCollection(tables=[dyn], table_options=options, optimizer=adam)}
        )
        self.mlp = nn.Sequential(nn.Linear(3 * DIM, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, features: dict[str, KeyedJaggedTensor], labels: torch.Tensor) -> torch.Tensor:
        looked_up = {
            **self.model_parallel(features["f_mp"]),
            **self.data_parallel(features["f_dp"]),
            **self.dynamic["dyn"](features["f_dyn"]),
        }
        pooled = [looked_up[f].values().view(-1, IDS_PER_SAMPLE, DIM).sum(1) for f in FEATURES]
        logits = self.mlp(torch.cat(pooled, dim=1)).squeeze(1)
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)


def global_batch(step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    ids = {f: torch.randint(0, n, (GLOBAL_BATCH, IDS_PER_SAMPLE), generator=generator) for f, n in FEATURES.items()}
    labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=generator).float()
    return ids, labels


def local_batch(step: int, rank: int, world_size: int) -> tuple[dict[str, KeyedJaggedTensor], torch.Tensor]:
    ids, labels = global_batch(step)
    size = GLOBAL_BATCH // world_size
    rows = slice(rank * size, (rank + 1) * size)
    lengths = torch.full((size,), IDS_PER_SAMPLE, dtype=torch.int64)
    features = {f: KeyedJaggedTensor(keys=[f], values=t[rows].reshape(-1), lengths=lengths) for f, t in ids.items()}
    return features, labels[rows]


def full_table(tensor: torch.Tensor | ShardedTensor, shape: tuple[int, int]) -> list[list[float]]:
    """A row-/table-wise sharded weight assembled from every rank's local shards."""
    full = torch.zeros(shape)
    pieces = (
        [(s.metadata.shard_offsets, s.tensor.detach().clone()) for s in tensor.local_shards()]
        if isinstance(tensor, ShardedTensor)
        else [([0, 0], tensor.detach().clone())]
    )
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    for (row, col), piece in (p for rank_pieces in gathered for p in rank_pieces):
        full[row : row + piece.shape[0], col : col + piece.shape[1]] = piece
    return full.tolist()


def set_table(tensor: torch.Tensor | ShardedTensor, full: torch.Tensor) -> None:
    shards = tensor.local_shards() if isinstance(tensor, ShardedTensor) else []
    with torch.no_grad():
        for shard in shards:
            row, col = shard.metadata.shard_offsets
            rows, cols = shard.tensor.shape
            shard.tensor.copy_(full[row : row + rows, col : col + cols])


def dynamic_rows(model: gr_parallel.DistributedModel) -> dict[str, list[float]]:
    """Every rank's shard of the dynamic table: key -> embedding + Adam state."""
    (module,) = [m for path, m in model.sharding.sharded_modules.items() if path.startswith("dynamic")]
    table = module.dynamic_embedding_tables()["dyn"]
    local = {
        str(key): [*emb, *state]
        for keys, embs, states, _ in table.export()
        for key, emb, state in zip(keys.tolist(), embs.tolist(), states.tolist())
    }
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {key: row for shard in gathered for key, row in shard.items()}


def train(observed: dict[str, Any]) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TinyModel()
    static_init = torch.arange(24 * DIM, dtype=torch.float32).view(24, DIM) / 100.0
    fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": STATIC_LR}
    distributed = gr_parallel.distribute(
        model,
        sharding=gr_parallel.ShardingOptions(
            constraints=gr_parallel.sharded_embedding_constraints(model), fused_params=fused
        ),
        dense_optimizer=lambda params: torch.optim.SGD(params, lr=DENSE_LR),
    )
    set_table(distributed.state_dict()["model_parallel.embeddings.mp.weight"], static_init)
    scheduler = torch.optim.lr_scheduler.StepLR(distributed.optimizer, step_size=1, gamma=GAMMA)
    losses = []
    for step in range(STEPS):
        features, labels = local_batch(step, rank, world_size)
        distributed.optimizer.zero_grad()
        loss = distributed(features, labels)
        loss.backward()
        distributed.optimizer.step()
        scheduler.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world_size)
    distributed.optimizer.zero_grad()  # as the next step would: hands the last scheduled lr to the tables
    state = distributed.state_dict()
    observed["losses"] = losses
    observed["dense"] = {k: v.tolist() for k, v in state.items() if k.startswith(("mlp.", "data_parallel."))}
    observed["static"] = full_table(state["model_parallel.embeddings.mp.weight"], (24, DIM))
    observed["dynamic"] = dynamic_rows(distributed)
    observed["sharded_paths"] = sorted(distributed.sharding.sharded_modules)
    observed["data_parallel_paths"] = sorted(distributed.sharding.data_parallel_modules)
    table = dynamic_table(distributed)
    observed["dynamic_lr_applied"] = table.optimizer.args.learning_rate
    observed["group_lrs"] = sorted(float(group["lr"]) for group in distributed.optimizer.param_groups)


def dynamic_table(model: gr_parallel.DistributedModel) -> Any:
    (module,) = [m for path, m in model.sharding.sharded_modules.items() if path.startswith("dynamic")]
    return module.dynamic_embedding_tables()["dyn"]


def error_of(call: Any) -> str | None:
    try:
        call()
    except (RuntimeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def errors(observed: dict[str, Any]) -> None:
    rank = dist.get_rank()
    config = EmbeddingConfig(name="solo", embedding_dim=DIM, num_embeddings=16, feature_names=["f"])
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    wrapped = DistributedModelParallel(nn.ModuleDict({"solo": DynamicEmbeddingCollection(tables=[config])}))
    observed["replica_error"] = error_of(lambda: wrapped.module["solo"](kjt))
    local = DynamicEmbeddingCollection(tables=[config], process_local=True)
    observed["process_local_ok"] = error_of(lambda: local(kjt)) is None

    model = TinyModel()
    fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1 if rank == 0 else 0.2}
    options = gr_parallel.ShardingOptions(fused_params=fused)
    observed["config_error"] = error_of(lambda: gr_parallel.shard_embedding_modules(model, options))
    tiny_budget = gr_parallel.ShardingOptions(ddr_cap=1024, hbm_cap=0)
    observed["budget_error"] = error_of(lambda: gr_parallel.shard_embedding_modules(TinyModel(), tiny_budget))


def main(out_dir: Path) -> None:
    gr_parallel.initialize_distributed()
    gr_parallel.initialize_model_parallel(tensor_model_parallel_size=1)
    observed: dict[str, Any] = {}
    train(observed)
    if dist.get_world_size() > 1:
        errors(observed)
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(observed))
    gr_parallel.destroy_global_state()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
