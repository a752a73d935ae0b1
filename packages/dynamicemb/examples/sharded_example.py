"""A sharded dynamic embedding in TorchRec, step by step (the flow of dynamicemb's user guide).

Launch on GPUs (NCCL) or CPU processes (gloo)::

    torchrun --nproc_per_node 2 packages/dynamicemb/examples/sharded_example.py
    python packages/dynamicemb/examples/sharded_example.py --nproc 2      # spawns gloo processes

Steps: an ``EmbeddingCollection`` on the meta device -> ``DynamicEmbeddingCollectionSharder``
(fused Adam, index dedup) -> ``DynamicEmbParameterConstraints`` with ``DynamicEmbTableOptions``
-> ``Topology`` -> ``DynamicEmbeddingEnumerator`` -> ``DynamicEmbeddingShardingPlanner``
-> ``collective_plan`` -> ``DistributedModelParallel`` -> training with a dense optimizer for the
head -> evaluation -> sharded dump, load into a fresh model, incremental dump. Exits non-zero if
the loss does not fall or the reloaded model differs.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import DataType

import dynamicemb
from dynamicemb.distributed import DynamicEmbeddingCollectionSharder
from dynamicemb.planner import (
    DynamicEmbeddingEnumerator,
    DynamicEmbeddingShardingPlanner,
    DynamicEmbParameterConstraints,
)


class ClickModel(nn.Module):
    """Embeds a sequence of user ids and predicts a click per id with a linear head."""

    def __init__(self, embeddings: nn.Module, dim: int, device: torch.device) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.head = nn.Linear(dim, 1, device=device)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(self.embeddings(features)["user_id"].values()).squeeze(1)


def make_batch(
    args: argparse.Namespace, step: int, rank: int, device: torch.device
) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """Zipf-distributed user ids (``2 * args.num_embeddings`` possible ids, so the table must grow
    and evict) and a label per id that the model can learn: whether the id is even."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.randint(1, 2 * args.seq_len, (args.batch_size,), generator=generator)
    ranks = torch.rand(int(lengths.sum()), generator=generator)
    ids = (2 * args.num_embeddings * ranks.pow(3)).long()  # a heavy head of small ids
    labels = (ids % 2 == 0).float()
    features = KeyedJaggedTensor(keys=["user_id"], values=ids, lengths=lengths)
    return features.to(device), labels.to(device)


def build_model(args: argparse.Namespace, device: torch.device, backend: str) -> DistributedModelParallel:
    # 1. The collection of logical tables, on the meta device: nothing is allocated yet.
    #    num_embeddings is the whole table (all shards together).
    eb_configs = [
        EmbeddingConfig(
            name="user_id",
            embedding_dim=args.embedding_dim,
            num_embeddings=args.num_embeddings,
            feature_names=["user_id"],
            data_type=DataType.FP32,
        )
    ]
    ec = EmbeddingCollection(tables=eb_configs, device=torch.device("meta"))
    model = ClickModel(ec, args.embedding_dim, device)  # the dense head lives on the real device

    # 2. The sharder: fused optimizer and output dtype in fused_params, all-to-all precision, dedup.
    fused_params = {
        "optimizer": EmbOptimType.ADAM,
        "learning_rate": args.learning_rate,
        "beta1": 0.9,
        "beta2": 0.999,
        "weight_decay": 0.0,
        "eps": 1e-8,
        "output_dtype": SparseType.FP32,
        "prefetch_pipeline": False,
    }
    qcomm_codecs_registry = (
        get_qcomm_codecs_registry(QCommsConfig(forward_precision=CommType.FP32, backward_precision=CommType.FP32))
        if backend == "nccl"
        else None
    )
    sharder = DynamicEmbeddingCollectionSharder(
        qcomm_codecs_registry=qcomm_codecs_registry, fused_params=fused_params, use_index_dedup=True
    )

    # 3. Per-table options through the planner's constraints: this table is dynamic, row-wise.
    bytes_per_value = 4 * 3 * args.embedding_dim  # embedding + Adam's two moments, float32
    total_hbm_need = bytes_per_value * args.num_embeddings
    constraints = {
        "user_id": DynamicEmbParameterConstraints(
            sharding_types=[ShardingType.ROW_WISE.value],
            use_dynamicemb=True,
            dynamicemb_options=dynamicemb.DynamicEmbTableOptions(
                global_hbm_for_values=int(total_hbm_need * args.cache_ratio) if args.caching else total_hbm_need,
                initializer_args=dynamicemb.DynamicEmbInitializerArgs(
                    mode=dynamicemb.DynamicEmbInitializerMode.NORMAL, std_dev=0.05
                ),
                score_strategy=dynamicemb.DynamicEmbScoreStrategy.STEP,
                caching=args.caching,
                training=True,
            ),
        )
    }

    # 4. The machine, the enumerator and the planner; one plan for every rank.
    world_size = dist.get_world_size()
    topology = Topology(
        world_size=world_size,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
        compute_device=device.type,
        hbm_cap=torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
    )
    enumerator = DynamicEmbeddingEnumerator(topology=topology, constraints=constraints)
    planner = DynamicEmbeddingShardingPlanner(
        eb_configs=eb_configs,
        topology=topology,
        constraints=constraints,
        batch_size=args.batch_size,
        enumerator=enumerator,
        storage_reservation=HeuristicalStorageReservation(percentage=0.05),
        debug=False,
    )
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    if dist.get_rank() == 0:
        memory = planner.dynamic_table_memory["user_id"]
        mib = 2**20
        print(
            f"plan: user_id row-wise over {world_size} ranks, {memory.shard_capacity} slots per shard, "
            f"{memory.device_bytes / mib:.1f} MiB device + {memory.host_bytes / mib:.1f} MiB host per shard"
        )

    # 5. DistributedModelParallel shards the collection with the plan; the head is data-parallel.
    return DistributedModelParallel(module=model, device=device, sharders=[sharder], plan=plan)


def run(args: argparse.Namespace) -> int:
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = build_model(args, device, backend)
    dense_optimizer = torch.optim.Adam(model.module.head.parameters(), lr=args.learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()

    losses = []
    for step in range(args.steps):
        features, labels = make_batch(args, step, rank, device)
        loss = loss_fn(model(features), labels)
        dense_optimizer.zero_grad()
        loss.backward()  # the fused Adam updates the dynamic rows here
        dense_optimizer.step()
        losses.append(loss.item())
        if rank == 0 and step % max(1, args.steps // 5) == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5

    model.eval()
    features, labels = make_batch(args, 10_000, rank, device)
    with torch.no_grad():
        before = model(features)
        accuracy = ((before > 0).float() == labels).float().mean().item()

    folder = args.dump_dir or tempfile.mkdtemp(prefix="dynamicemb-example-")
    box = [folder]
    dist.broadcast_object_list(box, src=0)
    folder = box[0]
    dynamicemb.DynamicEmbDump(folder, model, optim=True)
    fresh = build_model(args, device, backend)
    fresh.module.head.load_state_dict(model.module.head.state_dict())
    dynamicemb.DynamicEmbLoad(folder, fresh, optim=True)
    fresh.eval()
    with torch.no_grad():
        same = torch.equal(fresh(features), before)

    model.train()
    thresholds = dynamicemb.get_score(model)
    features, labels = make_batch(args, 20_000, rank, device)
    loss_fn(model(features), labels).backward()
    rows, _ = dynamicemb.incremental_dump(model, thresholds["embeddings"]["user_id"])
    touched = rows["embeddings"]["user_id"][0].numel()

    verdicts = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, (same, touched))
    ok = last < first and all(v[0] for v in verdicts)
    if rank == 0:
        print(f"loss {first:.4f} -> {last:.4f}; eval accuracy {accuracy:.3f}")
        print(f"dump/load into a fresh model: {'identical' if all(v[0] for v in verdicts) else 'DIFFERENT'} ({folder})")
        print(f"incremental dump after one more step: {sum(v[1] for v in verdicts)} rows over {len(verdicts)} ranks")
        print("OK" if ok else "FAILED")
    dist.destroy_process_group()
    return 0 if ok else 1


def _spawned(local_rank: int, nproc: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    if run(args):
        raise SystemExit(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=0, help="spawn this many processes (without torchrun)")
    parser.add_argument("--backend", choices=["nccl", "gloo"], default=None, help="default: nccl with CUDA, else gloo")
    parser.add_argument("--num-embeddings", type=int, default=4096)
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--caching", action="store_true", help="a device cache in front of a host table")
    parser.add_argument("--cache-ratio", type=float, default=0.25)
    parser.add_argument("--dump-dir", default=None)
    args = parser.parse_args()
    if args.nproc:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(args.nproc, port, args), nprocs=args.nproc)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
