"""The sharded -> standalone test: ``python sharded_to_standalone_worker.py save|load OUT_DIR``.

``save`` (under torchrun's environment variables, any world size): a ``DistributedModelParallel`` over an
``EmbeddingCollection`` whose one table is dynamic (sharded by dynamicemb, fused Adam, frequency admission with
threshold 2), trained two steps; every rank sees key ``100 + r`` twice (admitted) and keys ``200 + r``, ``300 + r``
once (counted, not admitted); saved with ``gr_checkpoint.save`` to ``OUT_DIR/ckpt``. ``load`` (one plain process):
a standalone ``DynamicEmbeddingCollection`` of the same table loads it. Both write ``OUT_DIR/<mode>.rank<r>.json``:
rows (key, embedding, optimizer state), admission counts, optimizer step; ``load`` also whether one more sighting
of key 200 admits it.
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
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from worker_exit import exit_without_teardown

import gr_checkpoint
from dynamicemb import (
    DynamicEmbeddingCollection,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbTableOptions,
    FrequencyAdmissionStrategy,
)
from dynamicemb.distributed import DynamicEmbeddingCollectionSharder
from dynamicemb.planner import DynamicEmbeddingShardingPlanner, DynamicEmbParameterConstraints

CONFIG = EmbeddingConfig(name="item_table", embedding_dim=4, num_embeddings=64, feature_names=["item"])
LEARNING_RATE = 0.05


def _options() -> DynamicEmbTableOptions:
    return DynamicEmbTableOptions(admit_strategy=FrequencyAdmissionStrategy(threshold=2))


class Model(nn.Module):
    def __init__(self, ec: nn.Module) -> None:
        super().__init__()
        self.ec = ec

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.ec(features)["item"].values().square().sum()


def _kjt(keys: list[int]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["item"], values=torch.tensor(keys), lengths=torch.tensor([len(keys)])
    )


def _sharded() -> DistributedModelParallel:
    torch.manual_seed(0)
    world = dist.get_world_size()
    constraints = {"item_table": DynamicEmbParameterConstraints(use_dynamicemb=True, dynamicemb_options=_options())}
    sharder = DynamicEmbeddingCollectionSharder(
        fused_params={"optimizer": EmbOptimType.ADAM, "learning_rate": LEARNING_RATE}
    )
    model = Model(EmbeddingCollection(tables=[CONFIG], device=torch.device("meta")))
    topology = Topology(world_size=world, local_world_size=world, compute_device="cpu")
    planner = DynamicEmbeddingShardingPlanner(eb_configs=[CONFIG], topology=topology, constraints=constraints)
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    return DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=[sharder])


def _standalone() -> Model:
    optimizer = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=LEARNING_RATE)
    return Model(DynamicEmbeddingCollection(tables=[CONFIG], table_options=_options(), optimizer=optimizer))


def _table(model: nn.Module) -> Any:
    (module,) = {
        **gr_checkpoint.dynamic_tables.find_dynamic_modules(model),
        **gr_checkpoint.dynamic_tables.find_sharded_modules(model),
    }.values()
    return module.dynamic_embedding_tables()["item_table"]


def _observe(table: Any) -> dict[str, Any]:
    rows = [
        [key, *embedding, *state]
        for keys, embeddings, states, _ in table.export()
        for key, embedding, state in zip(keys.tolist(), embeddings.tolist(), states.tolist())
    ]
    counts = {int(k): int(c) for keys, counts in table.counter.dump() for k, c in zip(keys, counts)}
    return {"rows": sorted(rows), "counts": counts, "optimizer_step": int(table.optimizer.step)}


def main(mode: str, out_dir: Path) -> None:
    if mode == "save":
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        model = _sharded()
        for keys in ([100 + rank, 200 + rank], [100 + rank, 300 + rank]):
            model(_kjt(keys)).backward()
        gr_checkpoint.save(out_dir / "ckpt", model)
        record = _observe(_table(model))
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
    else:
        rank = 0
        model = _standalone()
        gr_checkpoint.load(out_dir / "ckpt", model)
        record = _observe(_table(model))
        model(_kjt([200])).backward()  # its second sighting: admitted now
        record["admitted_after_one_more_sighting"] = 200 in {
            int(k) for keys, *_ in _table(model).export() for k in keys
        }
    (out_dir / f"{mode}.rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    exit_without_teardown()
