"""Training processes to be killed mid-save, forked from one process that imported torch once.

Run as ``python crash_worker.py``: it imports everything, prints ``READY``, then reads one JSON
command per line from stdin and forks a child for each, printing ``{"pid": ...}``. A child trains
a tiny model and checkpoints after every step until it is killed (or after ``max_steps``); it
first resumes from the newest complete checkpoint under ``root``, if any. Children are reaped
automatically. Commands:

- ``{"mode": "single", "root": DIR}``: a dynamic item table (standalone
  ``DynamicEmbeddingCollection``, fused Adam) and a dense head (Adam); every step
  ``save_step(DIR/steps, keep_last=2)`` and ``save(DIR/latest)`` (replacing the previous one).
- ``{"mode": "dist", "root": DIR, "rank": r, "world_size": 2, "port": P}``: rank ``r`` of a gloo
  world: a DDP linear layer and a row-sharded DTensor table (Adam); every step ``save_step(DIR/steps,
  keep_last=2)``.
- ``{"mode": "sharded", ...}`` (as ``dist``): a ``DistributedModelParallel`` over a dynamic item table
  sharded by dynamicemb and a row-wise static table (fused row-wise AdaGrad), a DDP head (Adam);
  every step ``save_step(DIR/steps, keep_last=2)``, with ``"asynchronous": true`` asynchronously
  (training goes on while the files are written; ``end <step>`` then means the call returned).

Each checkpoint's extra state holds a digest of what was saved (``step``, the dense weight, the
tables), so a test can tell a checkpoint whose files come from different moments; a resumed run checks
what it loaded against it (a mismatch is an error). A child appends
``begin <step>`` to ``DIR/progress.<mode>.<rank>`` before the step's saves and ``end <step>`` after
(``sharded`` also ``checked-at-world-<W> <step>`` once what it resumed from matched its digest).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.model_parallel import DistributedModelParallel, get_unwrapped_module
from torchrec.distributed.planner import Topology
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import gr_checkpoint
from dynamicemb import DynamicEmbeddingCollection, DynamicEmbOptimizerArgs, DynamicEmbOptimizerType
from dynamicemb.distributed import DynamicEmbeddingCollectionSharder, find_sharded_modules
from dynamicemb.planner import DynamicEmbeddingShardingPlanner, DynamicEmbParameterConstraints

ROWS, DIM = 8, 3
SHARDED_DIM = 4  # TorchRec's tables need a multiple of 4
SHARDED_TABLES = [
    EmbeddingConfig(name="item_table", embedding_dim=SHARDED_DIM, num_embeddings=64, feature_names=["item"]),
    EmbeddingConfig(name="category_table", embedding_dim=SHARDED_DIM, num_embeddings=16, feature_names=["category"]),
]


class Single(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = DynamicEmbeddingCollection(
            tables=[EmbeddingConfig(name="items", embedding_dim=DIM, num_embeddings=512, feature_names=["item"])],
            optimizer=DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.05),
        )
        self.head = nn.Linear(DIM, 1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(self.embeddings(features)["item"].values()).sum()


class Dist(nn.Module):
    """``dense``: DDP; ``table``: ``[ROWS, DIM]`` split by rows over the ranks (a DTensor)."""

    def __init__(self, dense: nn.Module, table: torch.Tensor) -> None:
        super().__init__()
        self.dense = dense
        self.table = nn.Parameter(table)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        local = self.table.to_local() if isinstance(self.table, DTensor) else self.table
        return self.dense(inputs).sum() + local.square().sum()


def single_digest(model: Single) -> dict[str, Any]:
    """What a checkpoint of ``Single`` must hold, as exact values."""
    (table,) = model.embeddings.dynamic_embedding_tables().values()
    rows = sorted((k, e.tolist()) for keys, embs, _, _ in table.export() for k, e in zip(keys.tolist(), embs))
    return {"head": model.head.weight.detach().clone(), "rows": json.dumps(rows)}


def _batch(step: int) -> KeyedJaggedTensor:
    ids = torch.randint(0, 1 << 40, (6,), generator=torch.Generator().manual_seed(step))
    return KeyedJaggedTensor.from_lengths_sync(keys=["item"], values=ids, lengths=torch.tensor([3, 3]))


def _resume(root: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The extra state of the newest complete checkpoint, loaded into ``model``, ``optimizer`` (``{"step": 0}``)."""
    latest = gr_checkpoint.latest_checkpoint(root / "steps")
    return {"step": 0} if latest is None else gr_checkpoint.load(latest, model, optimizer)


def _check(what: str, loaded: torch.Tensor, saved: torch.Tensor) -> None:
    if not torch.equal(loaded, saved):
        raise AssertionError(f"after resuming, {what} differs from the digest saved with it")


def _progress(root: Path, name: str, event: str, step: int) -> None:
    with open(root / f"progress.{name}", "a") as file:
        file.write(f"{event} {step}\n")


def run_single(root: Path, max_steps: int) -> None:
    torch.manual_seed(0)
    model = Single()
    optimizer = torch.optim.Adam(model.head.parameters(), lr=0.01)
    resumed = _resume(root, model, optimizer)
    if resumed["step"]:
        _check("the head", model.head.weight, resumed["head"])
        if single_digest(model)["rows"] != resumed["rows"]:
            raise AssertionError("after resuming, the table differs from the digest saved with it")
    step = resumed["step"]
    while step < max_steps:
        step += 1
        optimizer.zero_grad()
        model(_batch(step)).backward()
        optimizer.step()
        extra = {"step": step, **single_digest(model)}
        _progress(root, "single.0", "begin", step)
        gr_checkpoint.save_step(root / "steps", step, model, optimizer, extra_state=extra, keep_last=2)
        gr_checkpoint.save(root / "latest", model, optimizer, extra_state=extra, step=step)
        _progress(root, "single.0", "end", step)


def run_dist(root: Path, rank: int, world_size: int, port: int, max_steps: int) -> None:
    _init_world(rank, world_size, port)
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    dense = nn.Linear(4, 2)
    model = Dist(DistributedDataParallel(dense), distribute_tensor(torch.randn(ROWS, DIM), mesh, [Shard(0)]))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, foreach=False)
    resumed = _resume(root, model, optimizer)
    if resumed["step"]:  # loaded by 2 ranks into DTensor shards and a DDP module
        _check("the dense weight", dense.weight, resumed["dense"])
        _check("the table", model.table.full_tensor(), resumed["table"])
    step = resumed["step"]
    while step < max_steps:
        step += 1
        optimizer.zero_grad()
        model(torch.randn(3, 4, generator=torch.Generator().manual_seed(100 * rank + step))).backward()
        optimizer.step()
        table = model.table.full_tensor().detach().clone()
        extra = {"step": step, "dense": dense.weight.detach().clone(), "table": table}
        _progress(root, f"dist.{rank}", "begin", step)
        gr_checkpoint.save_step(root / "steps", step, model, optimizer, extra_state=extra, keep_last=2)
        _progress(root, f"dist.{rank}", "end", step)


def _init_world(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))


class Ranker(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ec = EmbeddingCollection(tables=SHARDED_TABLES, device=torch.device("meta"))
        self.head = nn.Linear(SHARDED_DIM, 1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        out = self.ec(features)
        return self.head(torch.cat([out["item"].values(), out["category"].values()])).sum()


def _sharded_model() -> DistributedModelParallel:
    """DMP over a dynamic item table (sharded by dynamicemb) and a row-wise static table (fused row-wise
    AdaGrad); the head is wrapped in DDP by DMP."""
    torch.manual_seed(0)
    world_size = dist.get_world_size()
    constraints = {
        "item_table": DynamicEmbParameterConstraints(use_dynamicemb=True),
        "category_table": DynamicEmbParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value]),
    }
    topology = Topology(world_size=world_size, local_world_size=world_size, compute_device="cpu")
    sharder = DynamicEmbeddingCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05}
    )
    model = Ranker()
    planner = DynamicEmbeddingShardingPlanner(eb_configs=SHARDED_TABLES, topology=topology, constraints=constraints)
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    return DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=[sharder])


def sharded_digest(model: DistributedModelParallel) -> dict[str, Any]:
    """Collective: every rank's dynamic rows, the whole static table and the head, as exact values."""
    (module,) = find_sharded_modules(model).values()
    (table,) = module.dynamic_embedding_tables().values()
    rows = [(k, e.tolist()) for keys, embs, _, _ in table.export() for k, e in zip(keys.tolist(), embs)]
    static = [
        (shard.metadata.shard_offsets[0] + i, row)
        for shard in model.state_dict()["ec.embeddings.category_table.weight"].local_shards()
        for i, row in enumerate(shard.tensor.tolist())
    ]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (rows, static))
    head = get_unwrapped_module(model).head.weight.detach().clone()
    return {
        "dynamic": json.dumps(sorted(r for rows, _ in gathered for r in rows)),
        "static": json.dumps(sorted(r for _, static in gathered for r in static)),
        "head": head,
    }


def run_sharded(root: Path, rank: int, world_size: int, port: int, max_steps: int, asynchronous: bool) -> None:
    _init_world(rank, world_size, port)
    model = _sharded_model()
    optimizer = torch.optim.Adam(dict(in_backward_optimizer_filter(model.named_parameters())).values(), lr=0.01)
    resumed = _resume(root, model, optimizer)
    if resumed["step"]:  # loaded by 2 ranks: dynamic shards, ShardedTensor rows, the DDP head
        digest = sharded_digest(model)
        _check("the head", digest["head"], resumed["head"])
        if (digest["dynamic"], digest["static"]) != (resumed["dynamic"], resumed["static"]):
            raise AssertionError("after resuming, the tables differ from the digest saved with them")
        _progress(root, f"sharded.{rank}", f"checked-at-world-{world_size}", resumed["step"])
    step = resumed["step"]
    while step < max_steps:
        step += 1
        optimizer.zero_grad()
        ids = torch.randint(0, 1 << 40, (5,), generator=torch.Generator().manual_seed(100 * rank + step))
        categories = ids % 16
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["item", "category"], values=torch.cat([ids, categories]), lengths=torch.tensor([2, 3, 3, 2])
        )
        model(features).backward()
        optimizer.step()
        extra = {"step": step, **sharded_digest(model)}
        _progress(root, f"sharded.{rank}", "begin", step)
        gr_checkpoint.save_step(
            root / "steps", step, model, optimizer, extra_state=extra, keep_last=2, asynchronous=asynchronous
        )
        _progress(root, f"sharded.{rank}", "end", step)
    gr_checkpoint.wait_for_saves()


def _child(command: dict[str, Any]) -> None:
    root, max_steps = Path(command["root"]), int(command.get("max_steps", 10**6))
    if command["mode"] == "single":
        run_single(root, max_steps)
    elif command["mode"] == "dist":
        run_dist(root, command["rank"], command["world_size"], command["port"], max_steps)
    else:
        asynchronous = bool(command.get("asynchronous", False))
        run_sharded(root, command["rank"], command["world_size"], command["port"], max_steps, asynchronous)


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed children are reaped without waiting
    print("READY", flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = 0
            try:
                _child(command)
            except BaseException as error:  # reported in the child's error file
                (Path(command["root"]) / f"error.{os.getpid()}").write_text(f"{type(error).__name__}: {error}")
                code = 1
            finally:
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)


if __name__ == "__main__":
    main()
