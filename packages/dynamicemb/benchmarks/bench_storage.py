"""Rows per second gathered from and scattered to each storage tier of a dynamic table, on the CPU.

Tiers: ``host table`` (the built-in :class:`KeyValueTable` with its rows in host memory, as behind
``caching=True``), ``dict`` (:class:`PyDictStorage`), ``rocksdb`` (:class:`RocksDBStorage` in a
fresh directory under ``--dir``, local disk) and ``redis`` (:class:`RedisStorage` on a
``redis-server`` this script starts on a loopback port). Each tier first holds ``--store-rows``
rows of ``--dim`` fp32 columns (plus ``--state-dim`` optimizer columns); then ``--batch`` distinct
random stored keys are

- ``gather``: read (``find``; the rows are checked against what was written),
- ``scatter``: overwritten with new rows and scores (``insert``),

median of ``--repeats`` calls (the tiers take turns, so load from other processes of a shared
machine falls on all of them alike). ``train_step``: a table of ``--dim`` with SGD whose device cache (here
host memory: this is the CPU) holds 10% of ``--store-rows`` and the tier the rest, one training
lookup + update of ``--batch`` distinct keys drawn uniformly from ``--store-rows`` ids, after
warm-up steps that fill the tier (about 90% of the keys of a step miss the cache); for RocksDB and
Redis also with the tier behind a :class:`WriteBehindStorage` (evicted rows written by a
background thread, at most one step's rows queued).

    python packages/dynamicemb/benchmarks/bench_storage.py            # writes results/storage_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from benchmark_support import git_commit

from dynamicemb import (
    DynamicEmbeddingTable,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbScoreStrategy,
    DynamicEmbTableOptions,
)
from dynamicemb.storage import PyDictStorage, RedisStorage, RocksDBStorage, Storage, WriteBehindStorage
from dynamicemb.storage.key_value_store import KeyValueTable
from dynamicemb.storage.redis_server import LocalRedisServer

HERE = Path(__file__).resolve().parent
CPU = torch.device("cpu")
TIERS = ["host table", "dict", "rocksdb", "redis"]

__all__ = ["storage_section"]


def _host_table(value_dim: int, rows: int) -> KeyValueTable:
    capacity = 1 << max(rows * 2 - 1, 1).bit_length()  # load factor <= 0.5
    return KeyValueTable(
        dim=value_dim,
        value_dim=value_dim,
        dtype=torch.float32,
        device=CPU,
        init_capacity=capacity,
        max_capacity=capacity,
        bucket_capacity=128,
        max_load_factor=0.5,
        score_strategy=DynamicEmbScoreStrategy.CUSTOMIZED,
        device_budget_bytes=0,
        new_rows=lambda n: torch.zeros(n, value_dim),
    )


def _tiers(args: argparse.Namespace, value_dim: int, stack: ExitStack) -> Iterator[tuple[str, Callable[[], Storage]]]:
    """``(tier, make)``: ``make()`` returns an empty storage of the tier, closed with ``stack``."""
    servers: list[LocalRedisServer] = []
    prefixes = itertools.count()

    def rocksdb() -> Storage:
        directory = tempfile.mkdtemp(prefix="bench-rocksdb-", dir=args.dir)
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        storage = RocksDBStorage(directory, value_dim)
        stack.callback(storage.close)  # callbacks run last first: closed, then removed
        return storage

    def redis() -> Storage:
        if not servers:
            servers.append(stack.enter_context(LocalRedisServer()))
        return RedisStorage(value_dim, port=servers[0].port, prefix=f"bench-{next(prefixes)}")

    makers: dict[str, Callable[[], Storage]] = {
        "host table": lambda: _host_table(value_dim, args.store_rows),
        "dict": lambda: PyDictStorage(value_dim),
        "rocksdb": rocksdb,
        "redis": redis,
    }
    for tier in args.tiers:
        yield tier, makers[tier]


def _closed_with(stack: ExitStack, storage: WriteBehindStorage) -> Storage:
    """``storage``, closed (its queue written) when ``stack`` closes, before the store it wraps."""
    stack.callback(storage.close)
    return storage


def _fill(storage: Storage, keys: torch.Tensor, value_dim: int, chunk: int = 65536) -> None:
    for start in range(0, keys.numel(), chunk):
        part = keys[start : start + chunk]
        storage.insert(part, part.float().unsqueeze(1).expand(-1, value_dim).contiguous(), torch.zeros_like(part))


def _gather_scatter(storage: Storage, args: argparse.Namespace, value_dim: int) -> dict[str, Callable[[], object]]:
    """Fill ``storage``, check a gather, and return the timed calls by op."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randperm(args.store_rows * 4, generator=generator)[: args.store_rows] * 7919
    _fill(storage, keys, value_dim)
    batch = keys[torch.randperm(args.store_rows, generator=generator)[: args.batch]]
    values, found = storage.find(batch)
    if not bool(found.all()) or not torch.equal(values[:, 0], batch.float()):
        raise RuntimeError(f"{type(storage).__name__}: rows read back differ from the rows written")
    rows = torch.randn(args.batch, value_dim, generator=generator)
    scores = torch.ones(args.batch, dtype=torch.int64)
    return {"gather": lambda: storage.find(batch), "scatter": lambda: storage.insert(batch, rows, scores)}


def _train_step(make: Callable[[], Storage], tier: str, args: argparse.Namespace) -> Callable[[], object]:
    """A table over the tier, warmed up until its keys fill the tier; returns one training step."""
    sgd = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.SGD, learning_rate=0.01)
    options = DynamicEmbTableOptions(
        max_capacity=1 << max(args.store_rows * 2 - 1, 1).bit_length(),
        global_hbm_for_values=_cache_rows(args) * args.dim * 4,
        caching=tier == "host table",
        external_storage=None if tier == "host table" else make(),
    )
    table = DynamicEmbeddingTable(
        name="t", dim=args.dim, num_embeddings=args.store_rows, options=options, optimizer=sgd
    )
    generator = torch.Generator().manual_seed(1)

    def step() -> None:
        keys = torch.randperm(args.store_rows, generator=generator)[: args.batch]
        embeddings, handle = table.lookup(keys, training=True)
        table.apply_gradients(handle, torch.ones_like(embeddings))

    for _ in range(max(2 * args.store_rows // args.batch, 1)):
        step()
    return step


def _cache_rows(args: argparse.Namespace) -> int:
    return max(args.store_rows // 10, 128)


def _interleaved_medians(calls: dict[tuple[str, str], Callable[[], object]], repeats: int) -> dict:
    """Median milliseconds of each call, the calls taking turns (load from other processes of a
    shared machine then falls on every tier alike); one untimed round first."""
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for round_ in range(repeats + 1):
        for key, call in calls.items():
            begin = time.perf_counter()
            call()
            if round_:
                times[key].append((time.perf_counter() - begin) * 1e3)
    return {key: statistics.median(values) for key, values in times.items()}


def run(args: argparse.Namespace) -> list[dict]:
    value_dim = args.dim + args.state_dim
    with ExitStack() as stack:
        calls: dict[tuple[str, str], Callable[[], object]] = {}
        for tier, make in _tiers(args, value_dim, stack):
            for op, call in _gather_scatter(make(), args, value_dim).items():
                calls[tier, op] = call
            if args.dim == value_dim:
                calls[tier, "train_step"] = _train_step(make, tier, args)
            if args.dim == value_dim and tier in ("rocksdb", "redis"):
                behind = f"{tier}, write-behind"
                # At most one step of evictions waits, so the timed steps also pay for the writes.
                calls[behind, "train_step"] = _train_step(
                    lambda m=make: _closed_with(stack, WriteBehindStorage(m(), max_pending_rows=args.batch)),
                    behind,
                    args,
                )
        medians = _interleaved_medians(calls, args.repeats)
    results = []
    for (tier, op), ms in medians.items():
        row = {"tier": tier, "op": op, "ms": ms, "rows_per_s": args.batch / ms * 1e3}
        row.update(dim=args.dim, value_dim=value_dim, batch=args.batch, store_rows=args.store_rows)
        if op == "train_step":
            row["cache_rows"] = _cache_rows(args)
        print(f"{tier:>10} {op:>10} {ms:>10.2f} ms {row['rows_per_s'] / 1e3:>10.1f} krows/s")
        results.append(row)
    return results


def storage_section(rows: list[dict]) -> list[str]:
    """README lines for ``results/storage_*.json`` (called by ``bench_table.py --readme``)."""
    first = rows[0]
    lines = [
        f"## Storage tiers, {first['device']} ({first['date']}, commit {first['commit']})",
        "",
        f"`bench_storage.py`: {first['batch']} distinct random keys per call into a tier holding "
        f"{first['store_rows']} rows of {first['value_dim']} fp32 columns (dim {first['dim']}); `train_step` is a "
        "lookup + SGD update of a table whose cache holds 10% of the rows and the tier the rest. Load average "
        f"of the shared machine during the run: {first['machine_load_average']:.1f}.",
        "",
        "| tier | op | ms | thousand rows/s | MB/s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        megabytes = row["rows_per_s"] * row["value_dim"] * 4 / 1e6
        lines.append(
            f"| {row['tier']} | {row['op']} | {row['ms']:.2f} | {row['rows_per_s'] / 1e3:.1f} | {megabytes:.1f} |"
        )
    commands = sorted({row["command"] for row in rows if row.get("command")})
    return [*lines, "", *[f"Command: `{command}`" for command in commands], ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiers", nargs="+", choices=TIERS, default=TIERS)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--state-dim", type=int, default=0, help="optimizer state columns per row (Adam: 2 * dim)")
    parser.add_argument("--store-rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the RocksDB directories go (default: the temp folder)")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "storage_cpu.json")
    args = parser.parse_args()
    if args.batch > args.store_rows:
        raise SystemExit(f"--batch {args.batch} exceeds --store-rows {args.store_rows}")
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    rows = run(args)
    meta = {
        "device": "cpu",
        "date": datetime.date.today().isoformat(),
        "commit": args.commit or git_commit(),
        "machine_load_average": (load_before + os.getloadavg()[0]) / 2,
        "command": " ".join(["python packages/dynamicemb/benchmarks/bench_storage.py", *sys.argv[1:]]),
    }
    for row in rows:
        row.update(meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
