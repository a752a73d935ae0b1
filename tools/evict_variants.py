"""Where the grouped eviction kernel spends its time: dynamicemb's own kernels timed on the same input
under different launch arguments (GPU only).

The setup of ``bench_table.py`` (16M slots, bucket 128, TIMESTAMP, load factor 1.0, 1M new keys). The lookup
and the insertion run once; then, from the same saved state each time, the placing kernel and the eviction
kernel of :mod:`dynamicemb.hash_index.triton_grouped_eviction` (``evict_grouped_kernel``) launched with the
arguments of one variant: warps per program, lanes per chunk (``CHUNK``), a grid of exactly the listed
buckets, of the whole list or the library's fixed one (32 programs per SM, each looping over listed buckets),
the buckets in listed or sorted order; and the per-key-score ``evict_ranked_kernel`` of the same module on
the same grouped keys (every key given the call's score). Every variant is
correct eviction. Prints a table and writes ``<out>/evict_variants.json``.

Variants that changed the kernel's code (key swap by a load and a store, one global counter for the
evicted entries, no table writes) were timed by an earlier copy of the kernel; their results are in
``packages/dynamicemb/benchmarks/results/profiles/NVIDIA_H100_80GB_HBM3-evict-variants.json``.

    python tools/evict_variants.py --out /tmp/variants
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "packages" / "dynamicemb" / "benchmarks"))

from bench_table import benchmark_table, fill, random_keys  # noqa: E402

from dynamicemb.hash_index import triton_backend  # noqa: E402
from dynamicemb.hash_index.triton_grouped_eviction import (  # noqa: E402
    evict_grouped_kernel,
    evict_ranked_kernel,
    place_deferred_kernel,
)

# Launch arguments of the library's eviction (triton_backend._evict_grouped); a variant overrides some.
LIBRARY = {"num_warps": triton_backend._EVICT_WARPS, "CHUNK": 16, "grid": "persistent", "sorted": False}
VARIANTS = {
    "library launch": {},
    "2 warps": {"num_warps": 2},
    "4 warps": {"num_warps": 4},
    "CHUNK 8": {"CHUNK": 8},
    "CHUNK 32": {"CHUNK": 32},
    "grid of exactly the listed buckets": {"grid": "exact"},
    "grid of the whole bucket list": {"grid": "whole list"},
    "buckets in sorted order": {"sorted": True},
    "per-key-score evict_ranked_kernel": {"ranked": True},
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(10)
    table = benchmark_table(1 << 24, device)
    fill(table, 1.0, generator)
    fresh = random_keys(1 << 20, generator, device)
    storage = table._storage
    n = fresh.numel()

    # Lookup and insertion once (as KeyValueTable.insert_and_evict does), then save everything.
    update = table._insert_update(fresh, None)
    epoch = table._next_epoch()
    slots, flags = table._launch_lookup(storage, fresh, update, epoch, report_full=True)
    deferred = triton_backend._DeferredBuckets.allocate(storage, fresh)
    table._launch_insert(storage, fresh, flags, slots, update, epoch, defer_full=True, deferred=deferred)
    torch.cuda.synchronize()
    segments = int(deferred.num_segments.item())
    saved = {name: getattr(storage, name).clone() for name in ("keys", "scores", "digests", "epochs", "size")}
    saved_slots = slots.clone()
    sorted_segments = deferred.segment_buckets.clone()
    sorted_segments[:segments] = torch.sort(deferred.segment_buckets[:segments]).values
    print(f"{segments} buckets with deferred keys, {int((slots == -2).sum())} deferred keys")

    def run(variant: dict) -> float:
        launch = {**LIBRARY, **variant}
        ranked = launch.pop("ranked", False)
        segment_buckets = sorted_segments if launch["sorted"] else deferred.segment_buckets
        times = []
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for rep in range(args.reps + 2):
            for name, tensor in saved.items():
                getattr(storage, name).copy_(tensor)
            slots.copy_(saved_slots)
            starts = torch.cumsum(deferred.counts, 0, dtype=torch.int32)
            grouped_lanes = torch.empty(n, dtype=torch.int32, device=device)
            grouped_keys = torch.empty_like(fresh)
            place_deferred_kernel[(triton.cdiv(n, 1024),)](
                fresh, slots, n, starts, grouped_lanes, grouped_keys, storage.num_buckets, NUM_GROUPS=8, BLOCK=1024
            )
            evicted_flags = torch.zeros(n, dtype=torch.int8, device=device)
            evicted = torch.empty(3, n, dtype=torch.int64, device=device)
            per_key_scores = torch.full_like(fresh, update.value)
            torch.cuda.synchronize()
            start_event.record()
            grid = {
                "exact": (segments,),
                "whole list": (segment_buckets.numel(),),
                "persistent": (min(segment_buckets.numel(), triton_backend._eviction_programs(device)),),
            }[launch["grid"]]
            if ranked:
                evict_ranked_kernel[grid](
                    segment_buckets, deferred.num_segments, deferred.counts, starts, grouped_lanes, grouped_keys,
                    per_key_scores, slots, evicted_flags, evicted[0], evicted[1], evicted[2], storage.keys,
                    storage.digests, storage.scores, storage.epochs, storage.num_buckets, epoch, BUCKET=128,
                    NUM_GROUPS=8, CHUNK=launch["CHUNK"], num_warps=launch["num_warps"],
                )  # fmt: skip
            else:
                evict_grouped_kernel[grid](
                    segment_buckets, deferred.num_segments, deferred.counts, starts, grouped_lanes, grouped_keys,
                    slots, evicted_flags, evicted[0], evicted[1], evicted[2], storage.keys, storage.digests,
                    storage.scores, storage.epochs, storage.num_buckets, update.value, epoch, BUCKET=128,
                    NUM_GROUPS=8, CHUNK=launch["CHUNK"], num_warps=launch["num_warps"],
                )  # fmt: skip
            end_event.record()
            torch.cuda.synchronize()
            if rep >= 2:
                times.append(start_event.elapsed_time(end_event))
        return statistics.median(times)

    rows = []
    for name, variant in VARIANTS.items():
        ms = run(variant)
        rows.append({"variant": name, "evict_kernel_ms": ms})
        print(f"{name:48s} {ms:8.3f} ms", flush=True)
    os.makedirs(args.out, exist_ok=True)
    record = {
        "rows": rows,
        "segments": segments,
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "commit": args.commit,
        "command": "python tools/evict_variants.py --out $OUT",
    }
    with open(os.path.join(args.out, "evict_variants.json"), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
