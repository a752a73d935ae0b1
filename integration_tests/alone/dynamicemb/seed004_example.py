"""Seed 004 (dynamicemb's example introduction) as a script: its code blocks in order, only imports added.

Usage: torchrun --nproc_per_node N seed004_example.py OUT_DIR [--prefetch_pipeline]

Between the markers below stands the seed's code unchanged. The seed leaves some names to its surrounding
example (``args``, ``backend``, ``device``, sizes, optimizer settings, ``get_local_size``, the topology's
capacities and bandwidths); they are defined above the seed's code. The device is a CUDA device with NCCL when
one is available, else the CPU with gloo (the only change for CPU: the seed's example targets GPUs). After the
seed's code the script does what the seed's last sections describe in words: train and evaluate ``dmp``, dump
it with ``DynamicEmbDump`` and load it back with ``DynamicEmbLoad``. Rank r writes OUT_DIR/rank<r>.json.
"""

# ruff: noqa: E501, W291  (the seed's code below keeps its long comment line and its trailing blank)

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.constants import CROSS_NODE_BANDWIDTH, INTRA_NODE_BANDWIDTH
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import DataType
from worker_exit import exit_without_teardown

from dynamicemb import (
    DynamicEmbDump,
    DynamicEmbeddingCollectionSharder,
    DynamicEmbeddingEnumerator,
    DynamicEmbeddingShardingPlanner,
    DynamicEmbInitializerArgs,
    DynamicEmbInitializerMode,
    DynamicEmbLoad,
    DynamicEmbParameterConstraints,
    DynamicEmbScoreStrategy,
    DynamicEmbTableOptions,
)


def get_local_size() -> int:
    """Processes on this host (the seed's example takes it from its launcher's environment)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("out_dir", type=Path)
parser.add_argument("--prefetch_pipeline", action="store_true")
args = parser.parse_args()

backend = "nccl" if torch.cuda.is_available() else "gloo"
local_rank = int(os.environ.get("LOCAL_RANK", "0"))
device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
dist.init_process_group(backend)
torch.manual_seed(0)

embedding_dim, num_embeddings, batch_size = 16, 1024, 16
learning_rate, beta1, beta2, weight_decay, eps = 0.05, 0.9, 0.999, 0.0, 1e-8
caching, cache_ratio, training = False, 0.5, True
total_hbm_need = num_embeddings * embedding_dim * 4 * 3  # float32 embedding + Adam's two moments
hbm_cap = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
ddr_cap = None  # TorchRec's default host memory
intra_host_bw, inter_host_bw = INTRA_NODE_BANDWIDTH, CROSS_NODE_BANDWIDTH
dict_const = {}

# ---- the seed's code, unchanged -----------------------------------------------------------------------
# fmt: off
eb_configs = [
  EmbeddingConfig(
    name="user_id",
    embedding_dim=embedding_dim,
    num_embeddings=num_embeddings,
    feature_names=["user_id"], # a list, means different features can share the same table
    data_type=DataType.FP32,  # weight or embedding's data type.
  ),
]
ec = EmbeddingCollection(
    tables=eb_configs,
    device=torch.device("meta"),  # set device to 'meta
)

optimizer_kwargs = {
  "optimizer": EmbOptimType.ADAM,
  "learning_rate": learning_rate,
  "beta1": beta1,
  "beta2": beta2,
  "weight_decay": weight_decay,
  "eps": eps,
}

fused_params = {}
fused_params.update(optimizer_kwargs)
fused_params["output_dtype"] = SparseType.FP32 # data type of the output after lookup, and can differ from the stored.
fused_params["prefetch_pipeline"] = args.prefetch_pipeline  # whether enable prefetch for embedding lookup module

# precision of all-to-all
qcomm_codecs_registry = (
  get_qcomm_codecs_registry(
    qcomms_config=QCommsConfig(
      # pyre-ignore
      forward_precision=CommType.FP32,
      # pyre-ignore
      backward_precision=CommType.FP32,
    )
  )
  if backend == "nccl"
  else None
)

sharder = DynamicEmbeddingCollectionSharder(
  qcomm_codecs_registry=qcomm_codecs_registry,
  fused_params=fused_params,
  use_index_dedup=True,
)

const = DynamicEmbParameterConstraints(
  sharding_types=[
    ShardingType.ROW_WISE.value, # dynamicemb embedding table only support to be sharded in row-wise.
  ],
  use_dynamicemb=True, # indicate using dynamicemb.
  dynamicemb_options=DynamicEmbTableOptions(
    global_hbm_for_values=total_hbm_need * cache_ratio
    if caching
    else total_hbm_need,
    initializer_args=DynamicEmbInitializerArgs(
        mode=DynamicEmbInitializerMode.NORMAL
    ),
    score_strategy=DynamicEmbScoreStrategy.STEP,
    caching=caching,
    training=training,
  ),
)

dict_const["user_id"] = const

topology = Topology(
  local_world_size=get_local_size(),
  world_size=dist.get_world_size(),
  compute_device=device.type,
  hbm_cap=hbm_cap,
  ddr_cap=ddr_cap,
  intra_host_bw=intra_host_bw,
  inter_host_bw=inter_host_bw,
)

# Same usage of  torchrec's EmbeddingEnumerator
enumerator = DynamicEmbeddingEnumerator(
  topology=topology,
  constraints=dict_const,
)

# Almost same usage of  torchrec's EmbeddingShardingPlanner, except to input eb_configs, as dynamicemb need EmbeddingConfig info to help to plan. 
planner = DynamicEmbeddingShardingPlanner(
  eb_configs=eb_configs,
  topology=topology,
  constraints=dict_const,
  batch_size=batch_size,
  enumerator=enumerator,
  storage_reservation=HeuristicalStorageReservation(percentage=0.05),
  debug=True,
)

# get plan for all ranks.
# ShardingPlan is a dict, mapping table name to ParameterSharding/DynamicEmbParameterSharding.
plan: ShardingPlan = planner.collective_plan(ec, [sharder], dist.GroupMember.WORLD)

dmp = DistributedModelParallel(
  module=ec,
  device=device,
  # pyre-ignore
  sharders=[sharder],
  plan=plan,
)
# fmt: on
# ---- end of the seed's code ------------------------------------------------------------------------------


def user_batch(step: int) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """This rank's batch: 1-3 user ids per sample out of 64 arbitrary 32-bit ids, and a target per id
    (+1 for even ids, -1 for odd) that the sum of the id's embedding should learn."""
    generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    users = torch.randint(0, 2**32, (64,), generator=torch.Generator().manual_seed(3))
    lengths = torch.randint(1, 4, (batch_size,), generator=generator)
    ids = users[torch.randint(0, len(users), (int(lengths.sum()),), generator=generator)]
    features = KeyedJaggedTensor(keys=["user_id"], values=ids, lengths=lengths)
    return features.to(device), (1.0 - 2.0 * (ids % 2)).to(device)


def loss_of(features: KeyedJaggedTensor, targets: torch.Tensor) -> torch.Tensor:
    return (dmp(features)["user_id"].values().sum(-1) - targets).square().mean()


losses = []
for step in range(30):
    loss = loss_of(*user_batch(step))
    loss.backward()  # the fused Adam of the sharder updates the dynamic rows here
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)
    losses.append(global_loss.item() / dist.get_world_size())

features, targets = user_batch(10_000)
dmp.eval()
with torch.no_grad():
    dumped = dmp(features)["user_id"].values()
box = [str(args.out_dir / "dump")]
dist.broadcast_object_list(box, src=0)
DynamicEmbDump(box[0], dmp, optim=True)
dmp.train()
loss_of(features, targets).backward()  # one more step changes the rows of these ids
dmp.eval()
with torch.no_grad():
    changed = dmp(features)["user_id"].values()
    DynamicEmbLoad(box[0], dmp, optim=True)
    reloaded = dmp(features)["user_id"].values()

report = {
    "world_size": dist.get_world_size(),
    "losses": losses,
    "sharding_type": plan.plan[""]["user_id"].sharding_type,
    "changed_after_dump": not torch.equal(changed, dumped),
    "reload_equal": torch.equal(reloaded, dumped),
}
(args.out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
# Every rank leaves its collectives together: a rank that tore down gloo while its peer still had work in flight
# was seen to abort at exit ("terminate called without an active exception").
dist.barrier()
dist.destroy_process_group()
exit_without_teardown()
