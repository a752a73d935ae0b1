"""Sharded dynamic-table training throughput: lookup + backward (fused Adam) on 1 vs 2 GPUs.

One ``EmbeddingCollection`` table (dim 128, fp32, Adam, ``use_index_dedup=True``, HASH key
distribution; value rows in device memory, or in host memory with ``--value-memory host``) sharded
row-wise by ``DistributedModelParallel`` with the dynamicemb planner and sharder. Every rank feeds
the same per-rank batch size (weak scaling): ``--batch-size`` samples of ``--ids-per-sample`` ids
drawn from a skewed distribution over ``--id-space`` ids, all drawn and moved to the device before
the first step (each rank uses its share of the host's cores). A step is the forward (dedup, id
all-to-all, shard lookups with insertion, embedding all-to-all) and the backward (gradient
all-to-all, fused Adam on the owners' rows); ``--warmup`` steps fill the tables, then each of
``--steps`` steps is timed (CUDA events between steps, no host wait inside the loop), the slowest
rank counting for each step. ``ms_per_step`` is the median step: one-off costs such as the first
Triton compilation of the eviction kernels (when a table first fills) show in ``max_ms_per_step``
and ``mean_ms_per_step``, not in the median. Each world size runs in its own spawned processes
(NCCL on ``cuda:<rank>``; gloo on CPU for a smoke test). Prints a table and writes JSON rows
(``world_size``, ``ms_per_step``, ``global_mids_per_s``: million ids looked up and trained per
second over all ranks at the median step, ``value_memory``, ``device``, ``date``, ``commit``) to
``--out`` (default ``results/sharded_<device>.json`` on a GPU). ``--profile DIR`` writes each rank's
``torch.profiler`` operator table of a few extra steps.

    python packages/dynamicemb/benchmarks/bench_sharded.py --world-sizes 1 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from benchmark_support import git_commit

HERE = Path(__file__).resolve().parent


def _batch(args: argparse.Namespace, step: int, rank: int, device: torch.device) -> Any:
    from torchrec import KeyedJaggedTensor

    generator = torch.Generator().manual_seed(step * 1009 + rank)
    n = args.batch_size * args.ids_per_sample
    ids = (args.id_space * torch.rand(n, generator=generator).pow(args.skew)).long()
    lengths = torch.full((args.batch_size,), args.ids_per_sample, dtype=torch.int64)
    return KeyedJaggedTensor(keys=["ids"], values=ids, lengths=lengths).to(device)


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingCollection, EmbeddingConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import Topology

    from dynamicemb import DynamicEmbTableOptions
    from dynamicemb.distributed import DynamicEmbeddingCollectionSharder
    from dynamicemb.planner import (
        DynamicEmbeddingEnumerator,
        DynamicEmbeddingShardingPlanner,
        DynamicEmbParameterConstraints,
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # ranks share the host's cores
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    configs = [
        EmbeddingConfig(name="t", embedding_dim=args.dim, num_embeddings=args.num_embeddings, feature_names=["ids"])
    ]
    # Value rows: embedding + Adam's two moments, fp32; "device" gives the whole table's rows HBM.
    row_bytes = 3 * args.dim * 4
    hbm = args.num_embeddings * row_bytes if args.value_memory == "device" else 0
    options = DynamicEmbTableOptions(global_hbm_for_values=hbm)
    constraints = {"t": DynamicEmbParameterConstraints(use_dynamicemb=True, dynamicemb_options=options)}
    topology = Topology(world_size=world_size, local_world_size=world_size, compute_device=device.type)
    sharder = DynamicEmbeddingCollectionSharder(
        fused_params={"optimizer": EmbOptimType.ADAM, "learning_rate": 1e-3}, use_index_dedup=True
    )
    planner = DynamicEmbeddingShardingPlanner(
        eb_configs=configs,
        topology=topology,
        constraints=constraints,
        batch_size=args.batch_size,
        enumerator=DynamicEmbeddingEnumerator(topology=topology, constraints=constraints),
        debug=False,
    )
    module = EmbeddingCollection(tables=configs, device=torch.device("meta"))
    plan = planner.collective_plan(module, [sharder], dist.GroupMember.WORLD)
    model = DistributedModelParallel(module, device=device, sharders=[sharder], plan=plan)

    # Every batch is drawn and moved to the device before the first step, as a training pipeline
    # would prefetch it, so the steps time the model and not the input generator.
    indices = [
        *range(args.warmup + args.steps),
        *(10_000 + i for i in range(args.profile_steps if args.profile else 0)),
    ]
    inputs = {i: _batch(args, i, rank, device) for i in indices}

    def step(i: int) -> None:
        out = model(inputs[i])
        out["ids"].values().sum().backward()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    for i in range(args.warmup):
        step(i)
    sync()
    if args.profile is not None:
        _profile_steps(step, sync, args, rank, world_size, device)
    step_ms = _timed_steps(step, sync, args, device)
    # The slowest rank counts: per-step times are reduced with MAX before taking their median.
    per_step = torch.tensor(step_ms, dtype=torch.float64, device=device)
    dist.all_reduce(per_step, op=dist.ReduceOp.MAX)
    step_ms = per_step.tolist()
    table = next(iter(model.module.dynamic_embedding_tables().values()))
    sizes = [None] * world_size
    dist.all_gather_object(sizes, table.size())
    if rank == 0:
        median_ms = statistics.median(step_ms)
        ids_per_step = world_size * args.batch_size * args.ids_per_sample
        queue.put(
            {
                "bench": "sharded_lookup_backward",
                "world_size": world_size,
                "dim": args.dim,
                "optimizer": "adam",
                "use_index_dedup": True,
                "value_memory": args.value_memory,
                "ids_per_rank_per_step": args.batch_size * args.ids_per_sample,
                "id_space": args.id_space,
                "stored_keys": sum(sizes),
                "steps": args.steps,
                "ms_per_step": median_ms,
                "mean_ms_per_step": statistics.fmean(step_ms),
                "max_ms_per_step": max(step_ms),
                "global_mids_per_s": ids_per_step / median_ms / 1e3,
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            }
        )
    dist.destroy_process_group()


def _timed_steps(step: Any, sync: Any, args: argparse.Namespace, device: torch.device) -> list[float]:
    """Milliseconds of each of ``--steps`` steps. On CUDA, events recorded between steps on the current
    stream (no host wait inside the loop, so the host may run ahead as in training); on CPU, the
    wall clock."""
    sync()
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
        events[0].record()
        for i in range(args.steps):
            step(args.warmup + i)
            events[i + 1].record()
        sync()
        return [events[i].elapsed_time(events[i + 1]) for i in range(args.steps)]
    times = [time.perf_counter()]
    for i in range(args.steps):
        step(args.warmup + i)
        times.append(time.perf_counter())
    return [1e3 * (times[i + 1] - times[i]) for i in range(args.steps)]


def _profile_steps(
    step: Any, sync: Any, args: argparse.Namespace, rank: int, world_size: int, device: torch.device
) -> None:
    """Run ``--profile-steps`` extra steps under ``torch.profiler`` (before the timed ones) and write, per
    rank, the operator table sorted by self device time and by self CPU time to ``--profile``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for i in range(args.profile_steps):
            step(10_000 + i)
        sync()
    averages = prof.key_averages()
    tables = [f"world size {world_size}, rank {rank}, {args.profile_steps} steps, value memory {args.value_memory}"]
    if device.type == "cuda":
        tables += ["", "by self device time:", averages.table(sort_by="self_device_time_total", row_limit=30)]
    tables += ["", "by self CPU time:", averages.table(sort_by="self_cpu_time_total", row_limit=30)]
    args.profile.mkdir(parents=True, exist_ok=True)
    path = args.profile / f"sharded-{args.value_memory}-ws{world_size}-rank{rank}.txt"
    path.write_text("\n".join(tables) + "\n")
    if rank == 0:
        print(f"wrote {path}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--num-embeddings", type=int, default=1 << 22)
    parser.add_argument("--id-space", type=int, default=1 << 23)
    parser.add_argument("--skew", type=float, default=3.0, help="ids = id_space * u**skew (larger: a heavier head)")
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--ids-per-sample", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--value-memory",
        choices=["device", "host"],
        default="device",
        help="where the value rows live: device memory (global_hbm_for_values = the whole table) or host memory "
        "(global_hbm_for_values = 0, the options' default)",
    )
    parser.add_argument("--commit", default=None, help="commit to record (default: git rev-parse of this checkout)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None, help="folder for torch.profiler operator tables")
    parser.add_argument("--profile-steps", type=int, default=3)
    args = parser.parse_args()
    if torch.cuda.is_available() and max(args.world_sizes) > torch.cuda.device_count():
        raise SystemExit(f"{max(args.world_sizes)} GPUs asked for, {torch.cuda.device_count()} present")
    context = mp.get_context("spawn")
    rows = []
    for world_size in args.world_sizes:
        queue = context.Queue()
        mp.start_processes(
            _worker, args=(world_size, _free_port(), args, queue), nprocs=world_size, start_method="spawn"
        )
        rows.append(queue.get())
    date, commit = datetime.date.today().isoformat(), args.commit or git_commit()
    baseline = rows[0]
    for row in rows:
        speedup = row["global_mids_per_s"] / baseline["global_mids_per_s"]
        row.update(date=date, commit=commit, baseline_world_size=baseline["world_size"], speedup_vs_baseline=speedup)
    unit = "GPUs" if torch.cuda.is_available() else "ranks"
    print(f"{unit:>5} {'ms/step':>9} {'mean':>9} {'max':>9} {'M ids/s':>9} {'speedup':>8} {'keys':>10}")
    for row in rows:
        print(f"{row['world_size']:>5} {row['ms_per_step']:>9.2f} {row['mean_ms_per_step']:>9.2f} "
              f"{row['max_ms_per_step']:>9.2f} {row['global_mids_per_s']:>9.2f} "
              f"{row['speedup_vs_baseline']:>8.2f} {row['stored_keys']:>10}")  # fmt: skip
    out = args.out
    if out is None and torch.cuda.is_available():
        out = HERE / "results" / f"sharded_{rows[0]['device'].replace(' ', '_')}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
