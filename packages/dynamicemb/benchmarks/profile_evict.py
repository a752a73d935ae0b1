"""Profile of ``insert_and_evict`` at load factor 1.0 on the GPU: where the time of one call goes.

The setup of ``bench_table.py`` (a 16M-slot TIMESTAMP table, bucket 128, filled to load factor 1.0, 1M new
keys per call, the table restored between calls); the calls run under ``torch.profiler`` and the device time
of each kernel / op inside the calls (with the compaction of the evicted entries, which runs when
they are read) is printed (the restores are outside the profiled ranges) and written to
``<out>/profile_evict.json``. Usage on a CUDA machine, from the repository root:

    python packages/dynamicemb/benchmarks/profile_evict.py --out /tmp/profile
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_table import benchmark_table, cuda_median_ms, fill, random_keys, restore, snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".")
    parser.add_argument("--capacity-log2", type=int, default=24)
    parser.add_argument("--keys", type=int, default=1 << 20)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--evict-warps", type=int, nargs="*", default=[1, 2, 4], help="warps of the eviction kernel")
    args = parser.parse_args()

    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(10)
    table = benchmark_table(1 << args.capacity_log2, device)
    fill(table, 1.0, generator)
    saved = snapshot(table)
    fresh = random_keys(args.keys, generator, device)
    from dynamicemb.hash_index import triton_backend

    default_warps = triton_backend._EVICT_WARPS
    by_warps = {}
    for warps in args.evict_warps:
        triton_backend._EVICT_WARPS = warps
        by_warps[warps] = cuda_median_ms(lambda: table.insert_and_evict(fresh).evicted(), lambda: restore(table, saved))
        print(f"insert_and_evict, {args.keys} keys, load factor {table.load_factor():.4f}, eviction kernel with "
              f"{warps} warps: median {by_warps[warps]:.3f} ms")  # fmt: skip
    triton_backend._EVICT_WARPS = default_warps
    median = cuda_median_ms(lambda: table.insert_and_evict(fresh).evicted(), lambda: restore(table, saved))

    for _ in range(3):  # warm-up outside the profile
        restore(table, saved)
        table.insert_and_evict(fresh).evicted()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            restore(table, saved)
            torch.cuda.synchronize()
            with record_function("insert_and_evict_call"):
                table.insert_and_evict(fresh).evicted()
                torch.cuda.synchronize()
    events = prof.key_averages()
    table_text = events.table(sort_by="device_time_total", row_limit=30)
    print(table_text)
    rows = [
        {
            "name": e.key,
            "count": e.count,
            "device_ms_per_call": e.device_time_total / 1000 / args.calls,
            "cpu_ms_per_call": e.cpu_time_total / 1000 / args.calls,
        }
        for e in events
        if e.device_time_total > 0 or e.key == "insert_and_evict_call"
    ]
    rows.sort(key=lambda r: -r["device_ms_per_call"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile_evict.json"), "w") as f:
        record = {"median_ms": median, "median_ms_by_evict_warps": by_warps, "rows": rows}
        json.dump({**record, "device": torch.cuda.get_device_name()}, f, indent=1)


if __name__ == "__main__":
    main()
