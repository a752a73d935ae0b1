"""Where the grouped eviction kernel spends its time: variants of it timed on the same input (GPU only).

The setup of ``bench_table.py`` (16M slots, bucket 128, TIMESTAMP, load factor 1.0, 1M new keys). The lookup
and the insertion run once; then, from the same saved state each time, the placing kernel and one variant of
the eviction kernel. The variants switch parts of the kernel off, so most of them are not correct
eviction: they exist to find the expensive part. Prints a table and writes ``<out>/evict_variants.json``.

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
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "packages" / "dynamicemb" / "benchmarks"))

from bench_table import benchmark_table, fill, random_keys  # noqa: E402

from dynamicemb.table import triton_backend  # noqa: E402
from dynamicemb.table.triton_grouped_eviction import _rank_among, place_deferred_kernel  # noqa: E402
from dynamicemb.table.triton_kernels import FIRST_DIGEST, _coordinates, _take_lowest, evict_kernel  # noqa: E402


@triton.jit
def evict_variant_kernel(
    segment_buckets_ptr,
    num_segments_ptr,
    counts_ptr,
    starts_ptr,
    grouped_lanes_ptr,
    grouped_keys_ptr,
    slots_ptr,
    num_evicted_ptr,
    evicted_keys_ptr,
    evicted_slots_ptr,
    evicted_scores_ptr,
    keys_ptr,
    digests_ptr,
    scores_ptr,
    epochs_ptr,
    num_buckets,
    score,
    epoch,
    BUCKET: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    CHUNK: tl.constexpr,
    GUARD: tl.constexpr,
    DEDUP: tl.constexpr,
    PICK: tl.constexpr,
    COUNTER: tl.constexpr,
    SCATTER_SLOTS: tl.constexpr,
    TABLE_WRITES: tl.constexpr,
    ROW_WRITES: tl.constexpr,
    ATOMIC_SEM: tl.constexpr,
    KEY_SWAP: tl.constexpr,
):
    pid = tl.program_id(0)
    go = True
    if GUARD:
        go = pid < tl.load(num_segments_ptr)
    if go:
        bucket = tl.load(segment_buckets_ptr + pid).to(tl.int64)
        count = tl.load(counts_ptr + bucket)
        start = tl.load(starts_ptr + bucket)
        cols = tl.arange(0, BUCKET)
        lanes = tl.arange(0, CHUNK)
        first_slot = bucket * BUCKET
        held_scores = tl.load(scores_ptr + first_slot + cols)
        available = (tl.load(digests_ptr + first_slot + cols).to(tl.int32) >= FIRST_DIGEST) & (
            tl.load(epochs_ptr + first_slot + cols) != epoch
        )
        for chunk in range(0, count, CHUNK):
            idx = chunk + lanes
            live = idx < count
            lane = tl.load(grouped_lanes_ptr + start + idx, mask=live, other=0).to(tl.int64)
            key = tl.load(grouped_keys_ptr + start + idx, mask=live, other=0)
            _, _, digest = _coordinates(key, num_buckets, NUM_GROUPS)
            earlier_slot = tl.full([CHUNK], -1, tl.int64)
            if DEDUP:
                twin = live[:, None] & live[None, :] & (key[:, None] == key[None, :])
                first_twin = tl.min(tl.where(twin, lanes[None, :], CHUNK), axis=1)
            else:
                first_twin = lanes
            head = live & (earlier_slot < 0) & (first_twin == lanes)
            rank = _rank_among(head, lanes)
            victim_col = tl.full([CHUNK], BUCKET, tl.int32)
            victim_score = tl.zeros([CHUNK], tl.int64)
            if PICK:
                picks = tl.minimum(tl.sum(head.to(tl.int32), axis=0), tl.sum(available.to(tl.int32), axis=0))
                for j in range(0, picks):
                    lowest, col, available = _take_lowest(available, held_scores, cols, BUCKET)
                    victim_col = tl.where(head & (rank == j), col, victim_col)
                    victim_score = tl.where(head & (rank == j), lowest, victim_score)
            else:
                victim_col = tl.where(head, rank, victim_col)
            won = head & (victim_col < BUCKET) & (score >= victim_score)
            victim = first_slot + victim_col
            if KEY_SWAP == 1:
                victim_key = tl.atomic_xchg(keys_ptr + victim, key, mask=won, sem="relaxed")
            elif KEY_SWAP == 2:
                victim_key = tl.load(keys_ptr + victim, mask=won, other=0, cache_modifier=".cg")
            elif KEY_SWAP == 3:
                victim_key = tl.load(keys_ptr + victim, mask=won, other=0, volatile=True)
            else:
                victim_key = tl.load(keys_ptr + victim, mask=won, other=0)
            if ROW_WRITES:
                # Whole bucket rows: each column takes the key of the lane that won it, if any.
                taken = (cols[:, None] == victim_col[None, :]) & won[None, :]
                is_taken = tl.max(taken.to(tl.int32), axis=1) > 0
                row_keys = tl.load(keys_ptr + first_slot + cols)
                new_key = tl.sum(tl.where(taken, key[None, :], 0), axis=1)
                new_digest = tl.sum(tl.where(taken, digest[None, :], 0), axis=1)
                row_digests = tl.load(digests_ptr + first_slot + cols).to(tl.int32)
                row_epochs = tl.load(epochs_ptr + first_slot + cols)
                tl.store(keys_ptr + first_slot + cols, tl.where(is_taken, new_key, row_keys))
                tl.store(scores_ptr + first_slot + cols, tl.where(is_taken, score, held_scores))
                tl.store(epochs_ptr + first_slot + cols, tl.where(is_taken, epoch, row_epochs))
                tl.store(digests_ptr + first_slot + cols, tl.where(is_taken, new_digest, row_digests).to(tl.uint8))
            else:
                if (TABLE_WRITES & 1) and (KEY_SWAP != 1):
                    tl.store(keys_ptr + victim, key, mask=won)
                if TABLE_WRITES & 2:
                    tl.store(scores_ptr + victim, tl.full([CHUNK], score, tl.int64), mask=won)
                if TABLE_WRITES & 4:
                    tl.store(epochs_ptr + victim, tl.full([CHUNK], epoch, tl.int32), mask=won)
                if TABLE_WRITES & 8:
                    tl.store(digests_ptr + victim, digest.to(tl.uint8), mask=won)
            if SCATTER_SLOTS:
                tl.store(slots_ptr + lane, tl.where(won, victim, -1), mask=head)
                if DEDUP:
                    tl.debug_barrier()
                    follower = live & ~head
                    copier = follower & (earlier_slot < 0)
                    twin_lane = tl.load(grouped_lanes_ptr + start + chunk + first_twin, mask=copier, other=0).to(
                        tl.int64
                    )
                    twin_slot = tl.load(slots_ptr + twin_lane, mask=copier, other=-1)
                    tl.store(slots_ptr + lane, tl.where(copier, twin_slot, earlier_slot), mask=follower)
            else:
                tl.store(grouped_lanes_ptr + start + idx, tl.where(won, victim, -1).to(tl.int32), mask=live)
            if COUNTER:
                won_count = tl.sum(won.to(tl.int32), axis=0)
                if won_count > 0:
                    base = tl.atomic_add(num_evicted_ptr, won_count.to(tl.int64), sem=ATOMIC_SEM)
                    out = base + _rank_among(won, lanes)
                    tl.store(evicted_keys_ptr + out, victim_key, mask=won)
                    tl.store(evicted_slots_ptr + out, victim, mask=won)
                    tl.store(evicted_scores_ptr + out, victim_score, mask=won)
            else:
                out = start + idx
                tl.store(evicted_keys_ptr + out, victim_key, mask=won)
                tl.store(evicted_slots_ptr + out, victim, mask=won)
                tl.store(evicted_scores_ptr + out, victim_score, mask=won)


FULL = {"GUARD": True, "DEDUP": True, "PICK": True, "COUNTER": True, "SCATTER_SLOTS": True, "TABLE_WRITES": 15,
        "ROW_WRITES": False, "ATOMIC_SEM": "acq_rel", "KEY_SWAP": 0}  # fmt: skip
VARIANTS = {
    "library kernel": None,
    "copy of it": {},
    "2 warps": {"num_warps": 2},
    "no table writes": {"TABLE_WRITES": 0},
    "table writes: keys only": {"TABLE_WRITES": 1},
    "victim key by atomic exchange": {"KEY_SWAP": 1},
    "victim key by atomic exchange, 2 warps": {"KEY_SWAP": 1, "num_warps": 2},
    "victim key load .cg": {"KEY_SWAP": 2},
    "victim key load .cg, 2 warps": {"KEY_SWAP": 2, "num_warps": 2},
    "victim key load volatile": {"KEY_SWAP": 3},
    "exchange + relaxed counter": {"KEY_SWAP": 1, "ATOMIC_SEM": "relaxed"},
    "exchange + relaxed counter, 2 warps": {"KEY_SWAP": 1, "ATOMIC_SEM": "relaxed", "num_warps": 2},
    "exchange + no counter": {"KEY_SWAP": 1, "COUNTER": False},
    "exchange + no counter, 2 warps": {"KEY_SWAP": 1, "COUNTER": False, "num_warps": 2},
    ".cg + relaxed counter, 2 warps": {"KEY_SWAP": 2, "ATOMIC_SEM": "relaxed", "num_warps": 2},
    "exchange + relaxed counter, no table writes but keys": {"KEY_SWAP": 1, "ATOMIC_SEM": "relaxed", "TABLE_WRITES": 1},
    "old evict_kernel (contiguous contenders)": {"old": True},
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

    def run(variant: dict | None) -> float:
        library = variant is None
        variant = dict(variant or {})
        warps = variant.pop("num_warps", 1)
        exact = variant.pop("exact_grid", False)
        old = variant.pop("old", False)
        segment_buckets = sorted_segments if variant.pop("sorted", False) else deferred.segment_buckets
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
            num_evicted = torch.zeros(1, dtype=torch.int64, device=device)
            evicted_flags = torch.zeros(n, dtype=torch.int8, device=device)
            evicted = torch.empty(3, n, dtype=torch.int64, device=device)
            if old:
                starts_at_sorted = starts.long()[sorted_segments[:segments].long()]
                counts_at_sorted = deferred.counts.long()[sorted_segments[:segments].long()]
                per_key_scores = torch.full_like(fresh, update.value)
                placed = torch.empty_like(fresh)
                flags = torch.empty(n, dtype=torch.int8, device=device)
            torch.cuda.synchronize()
            start_event.record()
            grid = (segments if exact else segment_buckets.numel(),)
            common = (
                segment_buckets, deferred.num_segments, deferred.counts, starts, grouped_lanes, grouped_keys, slots,
                num_evicted, evicted[0], evicted[1], evicted[2], storage.keys, storage.digests, storage.scores,
                storage.epochs, storage.num_buckets, update.value, epoch,
            )  # fmt: skip
            if old:
                evict_kernel[(segments,)](
                    sorted_segments, starts_at_sorted, counts_at_sorted, grouped_keys, per_key_scores, placed,
                    flags, evicted[0], evicted[1], storage.keys, storage.digests, storage.scores, storage.epochs,
                    storage.num_buckets, epoch, BUCKET=128, NUM_GROUPS=8, CHUNK=16, num_warps=1,
                )  # fmt: skip
            elif library:  # the library kernel flags its evicted entries instead of counting them
                library_args = (*common[:7], evicted_flags, *common[8:])
                triton_backend.evict_grouped_kernel[grid](
                    *library_args, BUCKET=128, NUM_GROUPS=8, CHUNK=16, num_warps=1
                )
            else:
                evict_variant_kernel[grid](
                    *common, BUCKET=128, NUM_GROUPS=8, CHUNK=16, num_warps=warps, **{**FULL, **variant}
                )
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
