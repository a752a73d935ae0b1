"""One rank of the ``distribute`` tests; run with torchrun's environment variables set.

Usage: ``python distribute_worker.py OUT_DIR``. Trains a tiny model (a model-parallel static table,
a data-parallel table, a standalone dynamicemb collection and an MLP) for a few steps on this
rank's share of fixed global batches, then writes what it observed to ``OUT_DIR/rank<RANK>.json``;
the test compares a 2-process run with a 1-process run and makes the assertions. In a world of
several ranks it then provokes errors and, last, rank 1 exits abruptly while rank 0 keeps
all-reducing (rank 0 records how that ends).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingCollection, EmbeddingConfig, JaggedTensor, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel

import gr_parallel
from dynamicemb import (
    DynamicEmbeddingCollection,
    DynamicEmbInitializerArgs,
    DynamicEmbInitializerMode,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbParameterConstraints,
    DynamicEmbTableOptions,
)
from dynamicemb.distributed import ShardedDynamicEmbModule

GLOBAL_BATCH = 8
IDS_PER_SAMPLE = 2
DIM = 4
STEPS = 3
FEATURES = {"f_mp": 24, "f_mix": 1000, "f_dp": 6, "f_dyn": 1000}  # feature -> id range
STATIC_LR, DYNAMIC_LR, DENSE_LR, GAMMA = 0.05, 0.02, 0.1, 0.5
FUSED = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": STATIC_LR}


def constant_rows() -> DynamicEmbTableOptions:
    return DynamicEmbTableOptions(
        initializer_args=DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.CONSTANT, value=0.1)
    )


class Embeddings(nn.Module):
    """The layout of gr-models' ``ShardedEmbedding``: ``model_parallel`` (a static table and a
    dynamic table declared by constraint), ``data_parallel``, and ``dynamic`` (a standalone
    dynamicemb collection with its own Adam)."""

    def __init__(self) -> None:
        super().__init__()
        self.model_parallel = EmbeddingCollection(
            tables=[
                EmbeddingConfig(name="mp", embedding_dim=DIM, num_embeddings=24, feature_names=["f_mp"]),
                EmbeddingConfig(name="mix", embedding_dim=DIM, num_embeddings=256, feature_names=["f_mix"]),
            ]
        )
        self.data_parallel = EmbeddingCollection(
            tables=[EmbeddingConfig(name="dp", embedding_dim=DIM, num_embeddings=6, feature_names=["f_dp"])]
        )
        adam = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=DYNAMIC_LR)
        dyn = EmbeddingConfig(name="dyn", embedding_dim=DIM, num_embeddings=256, feature_names=["f_dyn"])
        standalone = DynamicEmbeddingCollection(
            tables=[dyn], table_options=dataclasses.replace(constant_rows(), max_capacity=256), optimizer=adam
        )
        self.dynamic = nn.ModuleDict({"dyn": standalone})

    def sharding_options(self) -> gr_parallel.ShardingOptions:
        constraints = gr_parallel.sharded_embedding_constraints(self)
        constraints["mix"] = DynamicEmbParameterConstraints(use_dynamicemb=True, dynamicemb_options=constant_rows())
        return gr_parallel.ShardingOptions(constraints=constraints, fused_params=FUSED)

    def forward(self, features: dict[str, KeyedJaggedTensor]) -> dict[str, JaggedTensor]:
        mp_features = KeyedJaggedTensor.concat([features["f_mp"], features["f_mix"]])
        return {
            **self.model_parallel(mp_features),
            **self.data_parallel(features["f_dp"]),
            **self.dynamic["dyn"](features["f_dyn"]),
        }


class TinyModel(nn.Module):
    """Sum-pooled embeddings of four features (``IDS_PER_SAMPLE`` ids each) -> MLP -> BCE loss.

    ``shard_in_init``: built as a model that distributes itself when built in a world of several
    processes (shards its embedding child, makes itself data-parallel), instead of being passed to
    ``gr_parallel.distribute``.
    """

    def __init__(self, shard_in_init: bool = False) -> None:
        super().__init__()
        self.embedding = Embeddings()
        self.mlp = nn.Sequential(nn.Linear(len(FEATURES) * DIM, 8), nn.Tanh(), nn.Linear(8, 1))
        if shard_in_init:
            self.sharding = gr_parallel.shard_embedding_modules(self.embedding, self.embedding.sharding_options())
            gr_parallel.data_parallel_dense(self)

    def forward(self, features: dict[str, KeyedJaggedTensor], labels: torch.Tensor) -> torch.Tensor:
        looked_up = self.embedding(features)
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


def dynamic_rows(model: nn.Module) -> dict[str, dict[str, list[float]]]:
    """Every rank's shard of each dynamic table: table -> key -> embedding + optimizer state."""
    local: dict[str, dict[str, list[float]]] = {}
    for table in dynamic_tables(model).values():
        local[table.name] = {
            str(key): [*emb, *state]
            for keys, embs, states, _ in table.export()
            for key, emb, state in zip(keys.tolist(), embs.tolist(), states.tolist())
        }
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {name: {k: v for shard in gathered for k, v in shard[name].items()} for name in local}


def dynamic_tables(model: nn.Module) -> dict[str, Any]:
    return {
        name: table
        for module in gr_parallel.find_sharded_modules(model).values()
        if isinstance(module, ShardedDynamicEmbModule)
        for name, table in module.dynamic_embedding_tables().items()
    }


def train(shard_in_init: bool) -> dict[str, Any]:
    """A few steps of the model distributed by ``gr_parallel.distribute`` or by itself."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    dense_optimizer = lambda params: torch.optim.SGD(params, lr=DENSE_LR)
    model: nn.Module = TinyModel(shard_in_init)
    if shard_in_init:
        optimizer = gr_parallel.build_optimizer(model, dense_optimizer)
        sharding = model.sharding
    else:
        model = gr_parallel.distribute(
            model, sharding=model.embedding.sharding_options(), dense_optimizer=dense_optimizer
        )
        optimizer, sharding = model.optimizer, model.sharding
    with torch.random.fork_rng(devices=[]):  # what the default stream gives next, leaving it untouched
        next_draws = torch.rand(4).tolist()
    static_key = "embedding.model_parallel.embeddings.mp.weight"
    set_table(model.state_dict()[static_key], torch.arange(24 * DIM, dtype=torch.float32).view(24, DIM) / 100.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA)
    losses = []
    for step in range(STEPS):
        features, labels = local_batch(step, rank, world_size)
        optimizer.zero_grad()
        loss = model(features, labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world_size)
    optimizer.zero_grad()  # as the next step would: hands the last scheduled lr to the tables
    state = model.state_dict()
    return {
        "losses": losses,
        "next_draws_after_sharding": next_draws,
        "dense": {k: v.tolist() for k, v in state.items() if k.startswith(("mlp.", "embedding.data_parallel."))},
        "static": full_table(state[static_key], (24, DIM)),
        "dynamic": dynamic_rows(model),
        "sharding_types": {t: p.sharding_type for entries in sharding.plan.plan.values() for t, p in entries.items()},
        "sharded_paths": sorted(sharding.sharded_modules),
        "data_parallel_paths": sorted(sharding.data_parallel_modules),
        "dynamic_lrs_applied": {n: t.optimizer.args.learning_rate for n, t in dynamic_tables(model).items()},
        "group_lrs": sorted(float(group["lr"]) for group in optimizer.param_groups),
    }


def distribute_again() -> dict[str, Any]:
    """``distribute`` on a model that already sharded itself keeps its sharding and replicas."""
    torch.manual_seed(0)
    model = TinyModel(shard_in_init=True)
    again = gr_parallel.distribute(model)
    features, labels = local_batch(0, dist.get_rank(), dist.get_world_size())
    again(features, labels).backward()
    return {
        "sharded_paths": sorted(again.sharding.sharded_modules),
        "data_parallel_paths": sorted(again.sharding.data_parallel_modules),
        "planned": sorted(again.plan.plan),
    }


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

    fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1 if rank == 0 else 0.2}
    options = gr_parallel.ShardingOptions(fused_params=fused)
    observed["config_error"] = error_of(lambda: gr_parallel.shard_embedding_modules(Embeddings(), options))
    tiny_budget = gr_parallel.ShardingOptions(ddr_cap=1024, hbm_cap=0)
    observed["budget_error"] = error_of(lambda: gr_parallel.shard_embedding_modules(Embeddings(), tiny_budget))


def after_rank_1_dies(observed: dict[str, Any]) -> None:
    """Last: rank 1 exits abruptly; rank 0 records how its next all-reduces end (error, seconds)."""
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=30))
    dist.barrier(group=group)
    if dist.get_rank() == 1:
        return
    start = time.monotonic()
    try:
        for _ in range(10_000):
            dist.all_reduce(torch.ones(4), group=group)
            time.sleep(0.01)
        observed["peer_death"] = {"error": None}
    except RuntimeError as error:
        observed["peer_death"] = {"error": str(error), "seconds": time.monotonic() - start}


def main(out_dir: Path) -> None:
    gr_parallel.initialize_distributed()
    gr_parallel.initialize_model_parallel(tensor_model_parallel_size=1)
    observed: dict[str, Any] = {"distribute": train(shard_in_init=False)}
    if dist.get_world_size() == 1:
        (out_dir / "rank0.json").write_text(json.dumps(observed))
        gr_parallel.destroy_global_state()
        return
    observed["in_model"] = train(shard_in_init=True)
    observed["distributed_again"] = distribute_again()
    errors(observed)
    if dist.get_rank() == 1:
        (out_dir / "rank1.json").write_text(json.dumps(observed))
    after_rank_1_dies(observed)
    if dist.get_rank() == 0:
        (out_dir / "rank0.json").write_text(json.dumps(observed))
    os._exit(0)  # abruptly (rank 1 dies here; rank 0 skips the teardown of a world missing a rank)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
