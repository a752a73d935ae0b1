"""One rank of the sharded-model gr_checkpoint test; run with torchrun's environment variables set.

Usage: ``python gr_checkpoint_sharded_worker.py save|load OUT_DIR``. The model is TorchRec's
``DistributedModelParallel`` over an ``EmbeddingCollection`` holding a dynamic table (sharded by
dynamicemb) and an ordinary row-wise TorchRec table (fused row-wise AdaGrad), plus a dense head
trained with Adam. ``save`` trains three steps on rank-specific batches and saves to
``OUT_DIR/ckpt``; ``load`` builds the model from another seed and loads it. Both then write what
the test compares to ``OUT_DIR/<mode>.rank<r>.json``: evaluation outputs on fixed batches, this
rank's dynamic rows (with optimizer state), its rows of the static table and of their fused
optimizer state, and the dense Adam state.
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
from torchrec.distributed.model_parallel import DistributedModelParallel, get_unwrapped_module
from torchrec.distributed.planner import Topology
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from worker_exit import exit_without_teardown

import gr_checkpoint
from dynamicemb import DynamicEmbScoreStrategy, DynamicEmbTableOptions
from dynamicemb.distributed import DynamicEmbeddingCollectionSharder, find_sharded_modules
from dynamicemb.planner import DynamicEmbeddingShardingPlanner, DynamicEmbParameterConstraints

DIM = 4
CONFIGS = [
    EmbeddingConfig(name="item_table", embedding_dim=DIM, num_embeddings=64, feature_names=["item"]),
    EmbeddingConfig(name="category_table", embedding_dim=DIM, num_embeddings=16, feature_names=["category"]),
]


class Ranker(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ec = EmbeddingCollection(tables=CONFIGS, device=torch.device("meta"))
        self.head = nn.Linear(DIM, 1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        out = self.ec(features)
        return self.head(torch.cat([out["item"].values(), out["category"].values()])).squeeze(1)


def _batch(seed: int) -> KeyedJaggedTensor:
    generator = torch.Generator().manual_seed(seed)
    items = torch.randint(0, 1 << 40, (5,), generator=generator)
    categories = torch.randint(0, 16, (5,), generator=generator)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["item", "category"], values=torch.cat([items, categories]), lengths=torch.tensor([2, 3, 3, 2])
    )


def _sharded_model(seed: int) -> DistributedModelParallel:
    torch.manual_seed(seed)
    constraints = {
        "item_table": DynamicEmbParameterConstraints(
            use_dynamicemb=True,
            dynamicemb_options=DynamicEmbTableOptions(score_strategy=DynamicEmbScoreStrategy.STEP),
        ),
        "category_table": DynamicEmbParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value]),
    }
    world_size = dist.get_world_size()
    topology = Topology(world_size=world_size, local_world_size=world_size, compute_device="cpu")
    sharder = DynamicEmbeddingCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05}
    )
    model = Ranker()
    planner = DynamicEmbeddingShardingPlanner(eb_configs=CONFIGS, topology=topology, constraints=constraints)
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    return DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=[sharder])


def _local_rows(sharded: Any) -> list[list[Any]]:
    """``[global row, values...]`` of this rank's shards of a ShardedTensor."""
    rows = []
    for shard in sharded.local_shards():
        start = shard.metadata.shard_offsets[0]
        tensor = shard.tensor.reshape(shard.tensor.shape[0], -1)
        rows += [[start + i, *row] for i, row in enumerate(tensor.tolist())]
    return rows


def _observe(model: DistributedModelParallel, dense_optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    (dynamic_module,) = find_sharded_modules(model).values()
    table = dynamic_module.dynamic_embedding_tables()["item_table"]
    dynamic_rows = [
        [key, *embedding, *state]
        for keys, embeddings, states, _ in table.export()
        for key, embedding, state in zip(keys.tolist(), embeddings.tolist(), states.tolist())
    ]
    (momentum,) = model.fused_optimizer.state_dict()["state"].values()
    head = get_unwrapped_module(model).head
    model.eval()
    with torch.no_grad():
        outputs = [model(_batch(1000 + i)).tolist() for i in range(2)]
    return {
        "outputs": outputs,
        "dynamic_rows": dynamic_rows,
        "static_rows": _local_rows(model.state_dict()["ec.embeddings.category_table.weight"]),
        "static_momentum_rows": _local_rows(next(iter(momentum.values()))),
        "head_exp_avg": dense_optimizer.state[head.weight]["exp_avg"].tolist(),
    }


def main(mode: str, out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = _sharded_model(seed=0 if mode == "save" else 7)
    dense_optimizer = torch.optim.Adam(dict(in_backward_optimizer_filter(model.named_parameters())).values(), lr=0.01)
    if mode == "save":
        for step in range(3):
            dense_optimizer.zero_grad()
            model(_batch(100 * rank + step)).sum().backward()
            dense_optimizer.step()
        gr_checkpoint.save(out_dir / "ckpt", model, dense_optimizer, extra_state={"step": 3})
    else:
        assert gr_checkpoint.load(out_dir / "ckpt", model, dense_optimizer) == {"step": 3}
    (out_dir / f"{mode}.rank{rank}.json").write_text(json.dumps(_observe(model, dense_optimizer)))
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    exit_without_teardown()
