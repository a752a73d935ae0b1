"""Throughput of the dynamicemb hash-table index, beside ``index_select`` on the same rows.

GPU (default): a 16M-slot table (bucket 128, TIMESTAMP) at load factor 0.5 and 1.0, values fp32
``[capacity, dim]`` indexed by slot, 1M keys per call:

- ``find``: 1M present keys -> slots, then the value rows gathered by slot;
- ``find_or_insert``: 1M distinct keys, half present and half new (at load factor 1.0 each new key
  evicts), then the value rows gathered; the table is restored before every timed repetition;
- ``insert_and_evict``: 1M new keys (at load factor 0.5 they take free slots, at 1.0 each evicts one
  entry); the evicted rows are read out (``gather_rows``) and the new rows written in (``scatter_rows``,
  skipping refused keys), as ``KeyValueTable.insert_and_evict`` does on the device; restored before
  every repetition;
- ``baseline``: ``values.index_select(0, slots)`` of the same 1M rows, in the same run.

Each row reports the whole operation with the Triton row kernels (``gkeys_per_s``), with torch ops
moving the rows (``gkeys_per_s_index_select``: ``index_select``, and for insert_and_evict a boolean
mask then ``index_copy_``) and the index operation alone (``index_gkeys_per_s``). Medians of
CUDA-event timings.

CPU (``--device cpu``): the torch backend on one thread, 32k keys per call into a 1M-slot table at
load factor 0.5.

Fixed cost of a call (``find_or_insert_call`` rows, ``--call-sizes``, default 64K, 256K and 1M keys;
``--only-call-sizes`` skips the rest): one ``find_or_insert`` of distinct keys, half present, into the
table at load factor 0.5; ``ms`` from CUDA events (an idle device to the call's last kernel) and
``host_ms`` the wall-clock time of the call (see :func:`bench_call_sizes`).

Writes ``results/<device>.json``; ``--readme`` rebuilds ``README.md`` from every results file.
If ``bench_train_step.py`` sits beside this file its ``run_train_step_benchmark`` rows are added.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from dynamicemb.hash_index import DynamicEmbScoreStrategy, ScoredHashTable, create_hash_table

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CHUNK = 1 << 20


def random_keys(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(-(2**63), 2**63 - 1, (n,), generator=generator, device=device, dtype=torch.int64)


def snapshot(table: ScoredHashTable) -> dict[str, torch.Tensor]:
    storage = table._storage
    return {name: getattr(storage, name).clone() for name in ("keys", "scores", "digests", "epochs", "size")}


def restore(table: ScoredHashTable, saved: dict[str, torch.Tensor]) -> None:
    storage = table._storage
    for name, tensor in saved.items():
        getattr(storage, name).copy_(tensor)


def cuda_median_ms(fn: Callable[[], object], setup: Callable[[], None] | None = None, reps: int = 20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(reps + 3):
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def fill(table: ScoredHashTable, load_factor: float, generator: torch.Generator) -> torch.Tensor:
    """Insert random keys until the table reaches ``load_factor``; returns the resident keys."""
    device = table.device
    target = int(load_factor * table.capacity)
    if load_factor < 1.0:
        remaining = target
        while remaining > 0:
            table.find_or_insert(random_keys(min(CHUNK, remaining), generator, device))
            remaining = target - table.size()
    else:
        for _ in range(8 * -(-table.capacity // CHUNK)):
            if table.size() >= 0.999 * table.capacity:
                break
            table.find_or_insert(random_keys(CHUNK, generator, device))
    return table.export_batch(0, table.capacity)[0]


def benchmark_table(capacity: int, device: torch.device) -> ScoredHashTable:
    """The benchmarked table: ``capacity`` slots (fixed, no growth), buckets of 128, TIMESTAMP scores."""
    return create_hash_table(
        init_capacity=capacity,
        max_capacity=capacity,
        bucket_capacity=128,
        score_strategy=DynamicEmbScoreStrategy.TIMESTAMP,
        device=device,
    )


def gkeys(n: int, ms: float) -> float:
    return n / (ms * 1e-3) / 1e9


def bench_gpu(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    for load_factor in (0.5, 1.0):
        rows += bench_load_factor(load_factor, args)
        torch.cuda.empty_cache()
    return rows


def bench_load_factor(load_factor: float, args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(int(load_factor * 10))
    capacity, n = 1 << args.capacity_log2, args.keys
    table = benchmark_table(capacity, device)
    resident = fill(table, load_factor, generator)
    saved = snapshot(table)
    present = resident[torch.randperm(resident.numel(), device=device, generator=generator)[:n]]
    fresh = random_keys(n, generator, device)
    assert not bool(table.find(fresh)[1].any())
    mixed = torch.cat([present[: n // 2], fresh[: n - n // 2]])
    mixed = mixed[torch.randperm(n, device=device, generator=generator)]
    slots, found = table.find(present)
    assert bool(found.all())
    common = {"load_factor": round(table.load_factor(), 4), "keys": n, "capacity": capacity}
    rows: list[dict] = []
    for dim in args.dims:
        rows += bench_dim(table, saved, dim, common, present, mixed, fresh, slots)
    return rows


def bench_dim(
    table: ScoredHashTable,
    saved: dict[str, torch.Tensor],
    dim: int,
    common: dict,
    present: torch.Tensor,
    mixed: torch.Tensor,
    fresh: torch.Tensor,
    slots: torch.Tensor,
) -> list[dict]:
    from dynamicemb.storage.row_moves import gather_rows, scatter_rows

    n = present.numel()
    values = torch.randn(table.capacity, dim, device=table.device)
    common = {"dim": dim, **common}
    base_ms = cuda_median_ms(lambda: values.index_select(0, slots))
    baseline = gkeys(n, base_ms)
    gather_ms = cuda_median_ms(lambda: gather_rows(values, slots))
    rows = [
        {"op": "index_select", **common, "ms": base_ms, "gkeys_per_s": baseline, "baseline": baseline},
        {"op": "gather_rows", **common, "ms": gather_ms, "gkeys_per_s": gkeys(n, gather_ms), "baseline": baseline},
    ]

    def reset() -> None:
        restore(table, saved)

    def timed(op: str, index_fn, gather_fn, select_fn) -> None:
        index_ms = cuda_median_ms(index_fn, reset)
        total_ms = cuda_median_ms(gather_fn, reset)
        select_ms = cuda_median_ms(select_fn, reset)
        rows.append(
            {
                "op": op,
                **common,
                "ms": total_ms,
                "gkeys_per_s": gkeys(n, total_ms),
                "gkeys_per_s_index_select": gkeys(n, select_ms),
                "index_gkeys_per_s": gkeys(n, index_ms),
                "baseline": baseline,
            }
        )

    timed(
        "find",
        lambda: table.find(present),
        lambda: gather_rows(values, table.find(present)[0]),
        lambda: values.index_select(0, table.find(present)[0]),
    )
    timed(
        "find_or_insert",
        lambda: table.find_or_insert(mixed),
        lambda: gather_rows(values, table.find_or_insert(mixed).slots),
        lambda: values.index_select(0, table.find_or_insert(mixed).slots.clamp_min(0)),
    )
    new_rows = torch.randn(n, dim, device=table.device)

    def evict_and_move() -> torch.Tensor:
        result = table.insert_and_evict(fresh)
        evicted_rows = gather_rows(values, result.evicted_slots)
        scatter_rows(values, result.slots, new_rows)
        return evicted_rows

    def evict_and_move_torch() -> torch.Tensor:
        result = table.insert_and_evict(fresh)
        evicted_rows = values.index_select(0, result.evicted_slots)
        placed = result.slots >= 0
        values.index_copy_(0, result.slots[placed], new_rows[placed])
        return evicted_rows

    # The evicted entries are the point of insert_and_evict: the index-only time includes their compaction
    # (find_or_insert's rows leave it out: a training lookup never reads them, so it never runs).
    timed("insert_and_evict", lambda: table.insert_and_evict(fresh).evicted(), evict_and_move, evict_and_move_torch)
    return rows


def _time_call(
    fn: Callable[[], object], reset: Callable[[], None], device: torch.device, reps: int
) -> tuple[float, float]:
    """``(ms, host_ms)`` medians of one call: CUDA-event time (wall-clock on the CPU) and the wall-clock
    time the host spends in the call."""
    host: list[float] = []

    def call() -> None:
        start = time.perf_counter()
        fn()
        host.append((time.perf_counter() - start) * 1e3)

    if device.type == "cuda":
        return cuda_median_ms(call, reset, reps=reps), statistics.median(host[3:])
    for _ in range(reps):
        reset()
        call()
    return statistics.median(host), statistics.median(host)


def bench_call_sizes(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """The fixed cost of one ``find_or_insert`` call (issue 21: <= 0.15 ms at about 100K keys on an
    H100/H200): for each size in ``args.call_sizes``, distinct keys, half present and half new, into
    a table of ``2**args.capacity_log2`` slots at load factor 0.5 (restored before every repetition);
    ``find_or_insert_call_per_key_scores`` is the same call with a score per key and
    ``unique_keys=True``, as ``KeyValueTable`` makes it in training.
    ``ms``: CUDA-event time from an idle device to the end of the call's last kernel (so it includes
    the host's launch time when the host is the slower side); ``host_ms``: wall-clock time of the call
    alone (launches and any synchronization inside it). On the CPU: the torch backend, wall-clock."""
    generator = torch.Generator(device=device).manual_seed(5)
    capacity = 1 << args.capacity_log2
    table = (
        benchmark_table(capacity, device)
        if device.type == "cuda"
        else create_hash_table(init_capacity=capacity, max_capacity=capacity, device=device, backend="torch")
    )
    resident = fill(table, 0.5, generator)
    saved = snapshot(table)
    load_factor = round(table.load_factor(), 4)
    rows = []
    for n in args.call_sizes:
        present = resident[torch.randperm(resident.numel(), device=device, generator=generator)[: n // 2]]
        keys = torch.cat([present, random_keys(n - present.numel(), generator, device)])
        keys = keys[torch.randperm(n, device=device, generator=generator)]
        scores = torch.full_like(keys, 1 << 40)
        variants = {
            "find_or_insert_call": lambda keys=keys: table.find_or_insert(keys),
            # As KeyValueTable calls it in training: a score per key, keys known to be distinct.
            "find_or_insert_call_per_key_scores": lambda keys=keys, scores=scores: table.find_or_insert(
                keys, scores, unique_keys=True
            ),
        }
        for op, fn in variants.items():
            ms, host_ms = _time_call(fn, lambda: restore(table, saved), device, args.reps)
            rows.append(
                {
                    "op": op,
                    "keys": n,
                    "capacity": capacity,
                    "load_factor": load_factor,
                    "dim": None,
                    "ms": ms,
                    "host_ms": host_ms,
                    "gkeys_per_s": gkeys(n, ms),
                }
            )
    return rows


def bench_cpu(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    capacity, n = 1 << 20, 32768
    table = create_hash_table(init_capacity=capacity, max_capacity=capacity, device="cpu", backend="torch")
    resident = fill(table, 0.5, generator)
    saved = snapshot(table)
    present = resident[torch.randperm(resident.numel(), generator=generator)[:n]]
    mixed = torch.cat([present[: n // 2], random_keys(n - n // 2, generator, torch.device("cpu"))])

    def median_ms(fn, setup=None, reps=15) -> tuple[float, float]:
        """Medians of wall-clock and of this process's CPU time (the machine may be shared)."""
        wall, cpu = [], []
        for i in range(reps + 2):
            if setup is not None:
                setup()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            if i >= 2:
                wall.append((time.perf_counter() - start) * 1e3)
                cpu.append((time.process_time() - start_cpu) * 1e3)
        return statistics.median(wall), statistics.median(cpu)

    common = {
        "dim": None,
        "load_factor": round(table.load_factor(), 4),
        "keys": n,
        "capacity": capacity,
        "threads": 1,
        "machine_load_average": os.getloadavg()[0],
    }
    rows = []
    for op, fn, setup in [
        ("find", lambda: table.find(present), None),
        ("find_or_insert", lambda: table.find_or_insert(mixed), lambda: restore(table, saved)),
    ]:
        wall_ms, cpu_ms = median_ms(fn, setup)
        rows.append({"op": op, **common, "ms": wall_ms, "cpu_ms": cpu_ms, "gkeys_per_s": gkeys(n, wall_ms)})
    return rows


def train_step_rows(device: torch.device, dims: list[int]) -> list[dict]:
    """Rows of ``bench_train_step.run_train_step_benchmark`` (another module's benchmark: a failure
    there is reported and leaves the table rows intact)."""
    if not (HERE / "bench_train_step.py").exists():
        print("note: bench_train_step.py is not there yet: no training-step rows")
        return []
    sys.path.insert(0, str(HERE))
    try:
        from bench_train_step import run_train_step_benchmark

        return run_train_step_benchmark(device, dims)
    except Exception:
        print("note: the training-step benchmark failed; no training-step rows:")
        traceback.print_exc()
        return []


def print_table(rows: list[dict]) -> None:
    print(
        f"{'op':18s} {'dim':>4s} {'lf':>6s} {'ms':>8s} {'Gkeys/s':>8s} {'w/ index_select':>15s} "
        f"{'index only':>10s} {'baseline':>8s}"
    )
    for row in rows:
        if "gkeys_per_s" not in row:
            print(json.dumps(row))
            continue

        def fmt(key: str, row=row) -> str:
            value = row.get(key)
            return "-" if value is None else f"{value:.3f}"

        print(
            f"{row['op']:18s} {row.get('dim') or '-'!s:>4s} {row.get('load_factor', '-')!s:>6s} "
            f"{row['ms']:8.3f} {row['gkeys_per_s']:8.3f} {fmt('gkeys_per_s_index_select'):>15s} "
            f"{fmt('index_gkeys_per_s'):>10s} {fmt('baseline'):>8s}"
        )


def _sharded_section(rows: list[dict]) -> list[str]:
    """``bench_sharded.py`` rows: lookup + backward of one row-wise sharded table, per world size and
    value memory (speedup against 1 GPU with the same value memory)."""
    first = rows[0]
    lines = [
        f"## Sharded lookup + backward, {first['device']} ({first['date']}, commit {first['commit']})",
        "",
        f"`bench_sharded.py`: dim {first['dim']}, {first['optimizer']}, {first['ids_per_rank_per_step']} ids per "
        "rank per step; ms/step is the median step where mean and max are given (older runs: the mean).",
        "",
        "| value rows in | GPUs | ms/step | mean | max | million ids/s | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mean, worst = (f"{row[key]:.1f}" if key in row else "-" for key in ("mean_ms_per_step", "max_ms_per_step"))
        lines.append(
            f"| {row.get('value_memory', '?')} memory | {row['world_size']} | {row['ms_per_step']:.1f} | {mean} "
            f"| {worst} | {row['global_mids_per_s']:.2f} | {row['speedup_vs_baseline']:.2f} |"
        )
    notes = sorted({row["note"] for row in rows if row.get("note")})
    commands = sorted({row["command"] for row in rows if row.get("command")})
    extra = [f"Note: {note}" for note in notes] + [f"Command: `{command}`" for command in commands]
    return lines + [""] + extra + ([""] if extra else [])


def _value_store_section(rows: list[dict]) -> list[str]:
    """``bench_value_store.py`` rows: value rows read and written in device and pinned host memory."""
    first = rows[0]
    lines = [
        f"## Value rows by tier, {first['device']} ({first['date']}, commit {first['commit']})",
        "",
        f"`bench_value_store.py`: {first['rows']} distinct random slots of a {first['capacity']}-row store, rows of "
        f"{first['row_dim']} fp32 columns; `host, kernel` reaches pinned host memory from one Triton kernel, "
        "`host, copy` selects the rows on the host and copies them.",
        "",
        "| store | op | columns | ms | GB/s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['store']} | {row['op']} | {row['columns']} | {row['ms']:.3f} | {row['gbytes_per_s']:.1f} |"
        )
    return [*lines, ""]


def write_readme() -> None:
    lines = [
        "# dynamicemb benchmarks",
        "",
        "Written by `bench_table.py --readme` from `results/*.json`; see the docstring of",
        "`bench_table.py` for what each operation includes. Billion keys per second (Gkeys/s), 1M keys",
        "per call on the GPU; `baseline` is `index_select` of the same rows on a plain tensor in the same",
        "run; `w/ index_select` is the same operation with torch ops moving the rows (`index_select`;",
        "for insert_and_evict also a boolean mask and `index_copy_` for the new rows);",
        "`index only` leaves out the values. The `cpu` file is the torch backend on one thread, 32k keys",
        "per call into a 1M-slot table, measured on a shared 2-core machine (its load average is in the",
        "JSON; the CPU time of the process is given beside the wall-clock time).",
        "",
        "Targets (H100, dim 128): find >= 1.5 and find_or_insert >= 1.0 Gkeys/s at load factor 0.5,",
        "insert_and_evict >= 0.5 at load factor 1.0.",
        "",
        "Each section is the newest run on that device; earlier runs (other commits) are kept in",
        "`results/runs/`, profiles of `insert_and_evict` in `results/profiles/`.",
        "",
    ]
    for path in sorted(RESULTS.glob("*.json")):
        rows = json.loads(path.read_text())
        if not rows:
            continue
        first = rows[0]
        if path.name.startswith("sharded_"):
            lines += _sharded_section(rows)
            continue
        if path.name.startswith("value_store_"):
            lines += _value_store_section(rows)
            continue
        if path.name.startswith("storage_"):
            from bench_storage import storage_section  # beside this file

            lines += storage_section(rows)
            continue
        lines += [f"## {first['device']} ({first['date']}, commit {first['commit']})", ""]
        lines += [
            "| op | dim | load factor | ms | Gkeys/s | w/ index_select | index only | baseline |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            if "gkeys_per_s" not in row:
                continue
            ms = f"{row['ms']:.3f}" + (f" (CPU time {row['cpu_ms']:.1f})" if "cpu_ms" in row else "")
            cells = [row["op"], row.get("dim") or "-", row.get("load_factor", "-"), ms]
            for key in ("gkeys_per_s", "gkeys_per_s_index_select", "index_gkeys_per_s", "baseline"):
                cells.append("-" if row.get(key) is None else f"{row[key]:.3f}")
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        others = [row for row in rows if "gkeys_per_s" not in row]
        if others:
            lines += ["", "Other rows:", ""] + [f"- `{json.dumps(row)}`" for row in others]
        lines.append("")
    (HERE / "README.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--keys", type=int, default=1 << 20)
    parser.add_argument("--capacity-log2", type=int, default=24)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-train-step", action="store_true")
    parser.add_argument("--readme", action="store_true", help="only rebuild README.md from results/")
    parser.add_argument(
        "--call-sizes",
        type=int,
        nargs="*",
        default=[1 << 16, 1 << 18, 1 << 20],
        help="keys per find_or_insert call for the fixed-cost rows (none: skip them)",
    )
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions of each fixed-cost row")
    parser.add_argument("--only-call-sizes", action="store_true", help="only the fixed-cost rows")
    args = parser.parse_args()
    if args.readme:
        write_readme()
        return
    device = torch.device(args.device)
    rows = []
    if args.device == "cuda":
        if not args.only_call_sizes:
            rows = bench_gpu(args)
            if not args.no_train_step:
                rows += train_step_rows(device, args.dims)
        device_name = torch.cuda.get_device_name()
    else:
        if not args.only_call_sizes:
            rows = bench_cpu(args)
        device_name = "cpu"
    if args.call_sizes:
        rows += bench_call_sizes(args, device)
    date = datetime.date.today().isoformat()
    for row in rows:
        row.setdefault("device", device_name)
        row.setdefault("date", date)
        row.setdefault("commit", args.commit)
    print_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{device_name.replace(' ', '_')}.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
