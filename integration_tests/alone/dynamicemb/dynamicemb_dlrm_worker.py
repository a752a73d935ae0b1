"""A TorchRec DLRM with one table swapped for a dynamicemb table, trained, dumped and reloaded (torchrun).

Usage: torchrun --nproc_per_node N dynamicemb_dlrm_worker.py OUT_DIR   (gloo, CPU)

Only torch, torchrec and dynamicemb are imported: this is how a TorchRec user adds a dynamic table to a
model they already have. The model is torchrec's own ``DLRM`` over an ``EmbeddingBagCollection`` of three
tables (seed 001's setup: the collection on the meta device, sharded by ``DistributedModelParallel``).
``product_table`` becomes a dynamic table through its planner constraint (seed 004's way); ``user_table``
and ``category_table`` stay ordinary TorchRec tables. Product ids are arbitrary 40-bit ids, far beyond
``num_embeddings``: only a hash table can hold them.

Each rank trains on its half of every global batch, then the dynamic table is dumped with
``DynamicEmbDump``, a freshly built model gets the dense and static state through ``load_state_dict`` and
the dynamic rows through ``DynamicEmbLoad``, and both models are evaluated on the same batch. Rank r writes
OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, JaggedTensor, KeyedJaggedTensor, PoolingType
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.types import ShardingType
from torchrec.models.dlrm import DLRM
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from worker_exit import exit_without_teardown

from dynamicemb import (
    DynamicEmbDump,
    DynamicEmbeddingBagCollectionSharder,
    DynamicEmbeddingEnumerator,
    DynamicEmbeddingShardingPlanner,
    DynamicEmbInitializerArgs,
    DynamicEmbInitializerMode,
    DynamicEmbLoad,
    DynamicEmbParameterConstraints,
    DynamicEmbScoreStrategy,
    DynamicEmbTableOptions,
    ShardedDynamicEmbeddingBagCollection,
)

DIM = 8
DENSE_FEATURES = 4
GLOBAL_BATCH = 64
STEPS = 40
PRODUCTS = torch.randint(0, 2**40, (48,), generator=torch.Generator().manual_seed(7))  # the ids users click on
TABLES = [
    EmbeddingBagConfig(name="product_table", embedding_dim=DIM, num_embeddings=64, feature_names=["product"],
                       pooling=PoolingType.SUM),
    EmbeddingBagConfig(name="user_table", embedding_dim=DIM, num_embeddings=100, feature_names=["user"],
                       pooling=PoolingType.SUM),
    EmbeddingBagConfig(name="category_table", embedding_dim=DIM, num_embeddings=10, feature_names=["category"],
                       pooling=PoolingType.MEAN),
]  # fmt: skip
FUSED_PARAMS = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1, "eps": 1e-8}


def global_batch(step: int) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    """Dense features ``[B, 4]``, a KJT (one or two products, one user, one to three categories per sample)
    and labels ``[B]``: a click when the first product is one of the even-indexed products (learnable only
    through the dynamic table) or the first dense feature is large."""
    generator = torch.Generator().manual_seed(step)
    dense = torch.rand(GLOBAL_BATCH, DENSE_FEATURES, generator=generator)
    product_index = torch.randint(0, len(PRODUCTS), (GLOBAL_BATCH, 2), generator=generator)
    product_lengths = torch.randint(1, 3, (GLOBAL_BATCH,), generator=generator)
    products = torch.cat([PRODUCTS[row[:n]] for row, n in zip(product_index, product_lengths.tolist())])
    users = torch.randint(0, 100, (GLOBAL_BATCH,), generator=generator)
    category_lengths = torch.randint(1, 4, (GLOBAL_BATCH,), generator=generator)
    categories = torch.randint(0, 10, (int(category_lengths.sum()),), generator=generator)
    labels = ((product_index[:, 0] % 2 == 0) | (dense[:, 0] > 0.8)).float()
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["product", "user", "category"],
        values=torch.cat([products, users, categories]),
        lengths=torch.cat([product_lengths, torch.ones(GLOBAL_BATCH, dtype=torch.int64), category_lengths]),
    )
    return dense, features, labels


def local_batch(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    """This rank's contiguous share of the global batch of ``step``."""
    dense, features, labels = global_batch(step)
    share = GLOBAL_BATCH // world_size
    rows = slice(rank * share, (rank + 1) * share)
    local = KeyedJaggedTensor.from_jt_dict({key: _rows(jt, rows) for key, jt in features.to_dict().items()})
    return dense[rows], local, labels[rows]


def _rows(jagged: JaggedTensor, rows: slice) -> JaggedTensor:
    """The samples ``rows`` of ``jagged``."""
    offsets = jagged.offsets()
    return JaggedTensor(
        values=jagged.values()[offsets[rows.start] : offsets[rows.stop]], lengths=jagged.lengths()[rows]
    )


def build_model() -> DistributedModelParallel:
    """The DLRM on the meta device, planned by dynamicemb's planner and sharded by DMP."""
    torch.manual_seed(0)  # the same dense initialization on every rank and for every build
    ebc = EmbeddingBagCollection(tables=TABLES, device=torch.device("meta"))
    model = DLRM(ebc, dense_in_features=DENSE_FEATURES, dense_arch_layer_sizes=[16, DIM],
                 over_arch_layer_sizes=[16, 1], dense_device=torch.device("cpu"))  # fmt: skip
    constraints = {
        "product_table": DynamicEmbParameterConstraints(
            sharding_types=[ShardingType.ROW_WISE.value],
            use_dynamicemb=True,
            dynamicemb_options=DynamicEmbTableOptions(
                initializer_args=DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.NORMAL, std_dev=0.05),
                score_strategy=DynamicEmbScoreStrategy.STEP,
                training=True,
            ),
        ),
        "user_table": ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]),
        "category_table": ParameterConstraints(sharding_types=[ShardingType.DATA_PARALLEL.value]),
    }
    world_size = dist.get_world_size()
    topology = Topology(world_size=world_size, local_world_size=world_size, compute_device="cpu")
    planner = DynamicEmbeddingShardingPlanner(
        eb_configs=TABLES,
        topology=topology,
        constraints=constraints,
        batch_size=GLOBAL_BATCH // world_size,
        enumerator=DynamicEmbeddingEnumerator(topology=topology, constraints=constraints),
        storage_reservation=HeuristicalStorageReservation(percentage=0.05),
    )
    sharder = DynamicEmbeddingBagCollectionSharder(fused_params=FUSED_PARAMS, use_index_dedup=True)
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    return DistributedModelParallel(model, device=torch.device("cpu"), sharders=[sharder], plan=plan)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    out = Path(sys.argv[1])
    model = build_model()
    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(model.named_parameters())),
        lambda params: torch.optim.Adagrad(params, lr=0.1),
    )
    optimizer = CombinedOptimizer([model.fused_optimizer, dense_optimizer])
    loss_fn = torch.nn.BCEWithLogitsLoss()

    losses = []
    for step in range(STEPS):
        dense, features, labels = local_batch(step, rank, world_size)
        loss = loss_fn(model(dense, features).squeeze(1), labels)
        optimizer.zero_grad()
        loss.backward()  # the fused optimizers update the embedding rows here
        optimizer.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world_size)

    dump_dir = out / "dump"
    DynamicEmbDump(str(dump_dir), model, optim=True)
    dense, features, labels = local_batch(10_000, rank, world_size)
    model.eval()
    with torch.no_grad():
        trained = model(dense, features)
    fresh = build_model()
    fresh.eval()
    with torch.no_grad():
        fresh.load_state_dict(model.state_dict())  # dense layers and the static tables
        before_load = fresh(dense, features)
        DynamicEmbLoad(str(dump_dir), fresh, optim=True)
        after_load = fresh(dense, features)

    dynamic = [m for m in model.modules() if isinstance(m, ShardedDynamicEmbeddingBagCollection)]
    plan = {table: sharding for module_plan in model.plan.plan.values() for table, sharding in module_plan.items()}
    report = {
        "world_size": world_size,
        "losses": losses,
        "sharding": {table: plan[table].sharding_type for table in plan},
        "dynamic_modules": len(dynamic),
        "dynamic_rows": sum(t.size() for m in dynamic for t in m.dynamic_embedding_tables().values()),
        "accuracy": ((trained.squeeze(1) > 0).float() == labels).float().mean().item(),
        "reload_equal": torch.equal(after_load, trained),
        "differs_before_load": not torch.equal(before_load, trained),
        "dump_files": sorted(p.name for p in dump_dir.rglob("*") if p.is_file()),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
    exit_without_teardown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
