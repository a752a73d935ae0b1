"""One rank of the multi-process pipeline test; run with torchrun's environment variables set.

Usage: ``python pipeline_worker.py OUT_DIR``. Builds a tiny model with a row-wise sharded static
table and a sharded dynamic table (``gr_parallel.shard_embedding_modules``) and a data-parallel
dense head, trains it a few steps with the plain loop, then an identical fresh model with the
overlap pipeline, and writes both runs' losses and this rank's updated parameters (dense, static
shard, dynamic rows with optimizer state) to ``OUT_DIR/rank<RANK>.json``; the test compares them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from gr_parallel_launch import exit_without_teardown
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.streamable import Pipelineable

import gr_parallel
from dynamicemb import (
    DynamicEmbeddingCollection,
    DynamicEmbInitializerArgs,
    DynamicEmbInitializerMode,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbTableOptions,
)
from dynamicemb.distributed import ShardedDynamicEmbModule
from gr_parallel.pipeline import make_train_pipeline

DIM, BATCH, STEPS = 4, 4, 4
USERS, ITEMS = 16, 64


@dataclass
class Batch(Pipelineable):
    features: KeyedJaggedTensor  # keys "user" (1 id per sample) and "item" (1..3 ids per sample)
    labels: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(self.features.to(device=device, non_blocking=non_blocking), self.labels.to(device))

    def record_stream(self, stream: torch.Stream) -> None:
        self.features.record_stream(stream)
        self.labels.record_stream(stream)


def batches(rank: int) -> list[Batch]:
    generator = torch.Generator().manual_seed(10 + rank)
    made = []
    for _ in range(STEPS):
        item_lengths = torch.randint(1, 4, (BATCH,), generator=generator)
        values = torch.cat(
            [
                torch.randint(0, USERS, (BATCH,), generator=generator),
                torch.randint(0, ITEMS, (int(item_lengths.sum()),), generator=generator),
            ]
        )
        lengths = torch.cat([torch.ones(BATCH, dtype=torch.int64), item_lengths])
        features = KeyedJaggedTensor.from_lengths_sync(keys=["user", "item"], values=values, lengths=lengths)
        made.append(Batch(features, torch.randint(0, 2, (BATCH,), generator=generator).float()))
    return made


def select(features: KeyedJaggedTensor, key: str) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_jt_dict({key: features[key]})


class Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        users = EmbeddingConfig(name="users", embedding_dim=DIM, num_embeddings=USERS, feature_names=["user"])
        self.model_parallel = EmbeddingCollection(tables=[users])
        items = EmbeddingConfig(name="item_table", embedding_dim=DIM, num_embeddings=ITEMS, feature_names=["item"])
        options = DynamicEmbTableOptions(
            initializer_args=DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.CONSTANT, value=0.1),
            max_capacity=ITEMS,
        )
        adam = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.02)
        self.dynamic = nn.ModuleDict(
            {"item_table": DynamicEmbeddingCollection([items], table_options=options, optimizer=adam)}
        )


class Model(nn.Module):
    """User embedding + mean of item embeddings -> linear -> per-sample BCE, plus a small penalty on a
    second lookup of the item table (as gr-models' sampled negatives: a later call, not pipelined)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = Embeddings()
        self.head = nn.Linear(2 * DIM, 1)

    def sparse_inputs(self, batch: Batch) -> dict[nn.Module, KeyedJaggedTensor]:
        return {
            self.embedding.model_parallel: select(batch.features, "user"),
            self.embedding.dynamic["item_table"]: select(batch.features, "item"),
        }

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.sparse_inputs(batch)
        (users_module, user_ids), (items_module, item_ids) = inputs.items()
        users = users_module(user_ids)["user"].values()
        items = items_module(item_ids)["item"]
        pooled = torch.segment_reduce(items.values(), "mean", lengths=items.lengths())
        logits = self.head(torch.cat([users, pooled], dim=1)).squeeze(1)
        losses = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        negative_ids = KeyedJaggedTensor.from_lengths_sync(
            keys=["item"], values=torch.tensor([0, 1, 2]), lengths=torch.tensor([3])
        )
        negatives = items_module(negative_ids)["item"].values()
        return losses + 0.01 * negatives.square().sum(), logits.detach()


def build() -> tuple[Model, Any]:
    torch.manual_seed(0)
    model = Model()
    constraints = gr_parallel.sharded_embedding_constraints(model.embedding)
    fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05}
    gr_parallel.shard_embedding_modules(
        model.embedding, gr_parallel.ShardingOptions(constraints=constraints, fused_params=fused)
    )
    weight = model.state_dict()["embedding.model_parallel.embeddings.users.weight"]
    full = torch.arange(USERS * DIM, dtype=torch.float32).view(USERS, DIM) / 100.0
    with torch.no_grad():
        for shard in weight.local_shards():
            row, col = shard.metadata.shard_offsets
            rows, cols = shard.tensor.shape
            shard.tensor.copy_(full[row : row + rows, col : col + cols])
    gr_parallel.data_parallel_dense(model)
    optimizer = gr_parallel.build_optimizer(model, lambda params: torch.optim.Adam(params, lr=0.05))
    return model, optimizer


def local_state(model: Model) -> dict[str, Any]:
    """Dense weights, this rank's shard of the static table, this rank's dynamic rows (+ Adam state)."""
    state: dict[str, Any] = {}
    for name, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            state[name] = [shard.tensor.tolist() for shard in value.local_shards()]
        elif name.startswith("head."):
            state[name] = value.tolist()
    for module in gr_parallel.find_sharded_modules(model).values():
        if isinstance(module, ShardedDynamicEmbModule):
            for table_name, table in module.dynamic_embedding_tables().items():
                state[f"dynamic.{table_name}"] = {
                    str(key): [*emb, *opt]
                    for keys, embs, opts, _ in table.export()
                    for key, emb, opt in zip(keys.tolist(), embs.tolist(), opts.tolist())
                }
    return state


def train(kind: str, rank: int) -> dict[str, Any]:
    model, optimizer = build()
    pipeline = make_train_pipeline(kind, model, "cpu", [optimizer], sparse_inputs=model.sparse_inputs)  # type: ignore[arg-type]
    iterator = iter(batches(rank))
    losses = [pipeline.progress(iterator)[0].item() for _ in range(STEPS)]
    pipelined = getattr(pipeline, "pipelined_calls", 0)
    pipeline.close()
    return {"losses": losses, "state": local_state(model), "pipelined_calls": pipelined}


def mismatch_error(rank: int) -> str | None:
    """sparse_inputs that disagrees with the forward (the whole KJT for the item table) is an error."""
    model, optimizer = build()

    def wrong(batch: Batch) -> dict[nn.Module, KeyedJaggedTensor]:
        return {model.embedding.dynamic["item_table"]: batch.features}

    pipeline = make_train_pipeline("overlap", model, "cpu", [optimizer], sparse_inputs=wrong)
    try:
        pipeline.progress(iter(batches(rank)))
    except RuntimeError as error:
        return str(error)
    finally:
        pipeline.close()
    return None


def main(out_dir: Path) -> None:
    gr_parallel.initialize_distributed()
    rank = dist.get_rank()
    observed = {"plain": train("none", rank), "overlap": train("overlap", rank), "mismatch": mismatch_error(rank)}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(observed))
    dist.barrier()
    gr_parallel.destroy_global_state()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_without_teardown()
