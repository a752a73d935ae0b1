"""Eviction of deferred keys without a sort.

The find-or-insert kernel (``LIST_DEFERRED``) leaves ``DEFERRED`` in the slots of lanes whose bucket was
full, counts them per bucket (``counts [num_buckets]``) and lists every bucket that has some
(``segment_buckets``, ``num_segments``). Then, all on the device:

1. After an inclusive ``cumsum`` of the counts (``ends``), ``place_deferred_kernel`` writes each
   deferred lane into its bucket's range of ``grouped`` (a counting sort; lanes of one bucket land
   in any order). It leaves ``ends[b]`` at the start of bucket ``b``'s range.
2. ``evict_grouped_kernel`` places each listed bucket in one program: program ``p`` of ``P`` takes
   the listed buckets ``p, p + P, ...`` (the host launches a fixed number of programs, enough to fill
   the device, without reading ``num_segments``; with nothing listed they return at once). Each
   deduplicates its bucket's lanes (equal keys share a slot), gives the distinct keys the entries the call has not
   touched, lowest score first, writes each lane's slot, and writes each evicted entry at its lane's
   position in ``grouped``, flagged in ``evicted``.

Calls with per-key scores (LFU counts, caller scores; the keys are distinct) use
``evict_ranked_kernel`` instead: the same grouping, then each bucket's contenders ranked by descending
score and key take the entries ranked by ascending score, without a sort.

The host compacts the flagged entries. With one score for the call, the order of the evicted
entries, and which of several contenders wins when a bucket has fewer evictable entries than
contenders, depend on thread scheduling (the ranked kernel settles the latter by key).
"""

from __future__ import annotations

import triton
import triton.language as tl

from dynamicemb.hash_index.triton_kernels import DEFERRED, FIRST_DIGEST, _claim_victims, _coordinates, _take_lowest


@triton.jit(do_not_specialize=["n", "num_buckets"])
def place_deferred_kernel(
    query_ptr,
    slots_ptr,
    n,
    ends_ptr,
    grouped_lanes_ptr,
    grouped_keys_ptr,
    num_buckets,
    NUM_GROUPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Writes each deferred lane's index and key into ``grouped_lanes`` / ``grouped_keys`` inside
    its bucket's range, decrementing ``ends[b]`` (the inclusive prefix sum of the counts) down to
    the range's start."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    deferred = live & (tl.load(slots_ptr + offs, mask=live, other=0) == DEFERRED)
    key = tl.load(query_ptr + offs, mask=deferred, other=0)
    bucket, _, _ = _coordinates(key, num_buckets, NUM_GROUPS)
    end = tl.atomic_add(ends_ptr + bucket, tl.full([BLOCK], -1, tl.int32), mask=deferred)
    tl.store(grouped_lanes_ptr + (end - 1), offs.to(tl.int32), mask=deferred)
    tl.store(grouped_keys_ptr + (end - 1), key, mask=deferred)


@triton.jit
def _rank_among(selected, lanes):
    """For each lane, how many ``selected`` lanes come before it (a masked row sum of a
    ``[CHUNK, CHUNK]`` tile: no scan through shared memory)."""
    before = selected[None, :] & (lanes[None, :] < lanes[:, None])
    return tl.sum(before.to(tl.int32), axis=1)


@triton.jit(do_not_specialize=["num_buckets", "score", "epoch"])
def evict_grouped_kernel(
    segment_buckets_ptr,
    num_segments_ptr,
    counts_ptr,
    starts_ptr,
    grouped_lanes_ptr,
    grouped_keys_ptr,
    slots_ptr,
    evicted_ptr,
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
):
    """Each listed bucket is placed by one program (program ``p`` of ``P`` takes the listed buckets
    ``p, p + P, ...``); the program owns the bucket, so no atomics on it.

    The bucket's lanes are taken ``CHUNK`` at a time. A lane whose key an earlier chunk placed
    (found by reading the bucket back; a bucket rarely gets more than one chunk), or an earlier lane
    of the same chunk holds, gets that key's slot. The other lanes
    (one per distinct key) take the entries not touched by this call in ascending (score, column)
    order, picked by successive minimum searches over the bucket held in registers; a key whose
    call score is lower than its entry's, or that finds no entry left, is refused (slot -1)."""
    for segment in range(tl.program_id(0), tl.load(num_segments_ptr), tl.num_programs(0)):
        bucket = tl.load(segment_buckets_ptr + segment).to(tl.int64)
        count = tl.load(counts_ptr + bucket)
        start = tl.load(starts_ptr + bucket)
        cols = tl.arange(0, BUCKET)
        lanes = tl.arange(0, CHUNK)
        first_slot = bucket * BUCKET
        held_scores = tl.load(scores_ptr + first_slot + cols)
        available = (tl.load(digests_ptr + first_slot + cols).to(tl.int32) >= FIRST_DIGEST) & (
            tl.abs(tl.load(epochs_ptr + first_slot + cols)) != epoch
        )
        for chunk in range(0, count, CHUNK):
            idx = chunk + lanes
            live = idx < count
            lane = tl.load(grouped_lanes_ptr + start + idx, mask=live, other=0).to(tl.int64)
            key = tl.load(grouped_keys_ptr + start + idx, mask=live, other=0)
            _, _, digest = _coordinates(key, num_buckets, NUM_GROUPS)
            earlier_slot = tl.full([CHUNK], -1, tl.int64)
            if chunk > 0:
                tl.debug_barrier()  # the previous chunk's stores to the bucket are visible below
                for c in range(0, BUCKET):  # one slot at a time: few registers for a rare path
                    at = first_slot + c
                    same = (tl.load(digests_ptr + at).to(tl.int32) == digest) & (tl.load(keys_ptr + at) == key)
                    earlier_slot = tl.where(same, at, earlier_slot)
            twin = live[:, None] & live[None, :] & (key[:, None] == key[None, :])
            first_twin = tl.min(tl.where(twin, lanes[None, :], CHUNK), axis=1)
            head = live & (earlier_slot < 0) & (first_twin == lanes)
            rank = _rank_among(head, lanes)
            picks = tl.minimum(tl.sum(head.to(tl.int32), axis=0), tl.sum(available.to(tl.int32), axis=0))
            victim_col = tl.full([CHUNK], BUCKET, tl.int32)
            victim_score = tl.zeros([CHUNK], tl.int64)
            for j in range(0, picks):
                lowest, col, available = _take_lowest(available, held_scores, cols, BUCKET)
                victim_col = tl.where(head & (rank == j), col, victim_col)
                victim_score = tl.where(head & (rank == j), lowest, victim_score)
            won = head & (victim_col < BUCKET) & (score >= victim_score)
            victim = first_slot + victim_col
            call_score = tl.full([CHUNK], score, tl.int64)
            victim_key = _claim_victims(
                victim, won, key, call_score, digest, epoch, keys_ptr, scores_ptr, epochs_ptr, digests_ptr
            )
            # Heads publish their slot (or -1) in ``slots``; after the barrier their twins copy it.
            tl.store(slots_ptr + lane, tl.where(won, victim, -1), mask=head)
            tl.debug_barrier()
            follower = live & ~head
            copier = follower & (earlier_slot < 0)
            twin_lane = tl.load(grouped_lanes_ptr + start + chunk + first_twin, mask=copier, other=0).to(tl.int64)
            twin_slot = tl.load(slots_ptr + twin_lane, mask=copier, other=-1)
            tl.store(slots_ptr + lane, tl.where(copier, twin_slot, earlier_slot), mask=follower)
            # The evicted entries go where their lane sits in ``grouped`` (flagged in ``evicted``): one
            # counter for all programs would serialize them on its address.
            out = start + idx
            tl.store(evicted_ptr + out, won.to(tl.int8), mask=live)
            tl.store(evicted_keys_ptr + out, victim_key, mask=won)
            tl.store(evicted_slots_ptr + out, victim, mask=won)
            tl.store(evicted_scores_ptr + out, victim_score, mask=won)


@triton.jit
def _available_rank(scores_ptr, digests_ptr, epochs_ptr, first_slot, held_scores, cols, epoch, BUCKET: tl.constexpr):
    """For each column of the bucket, how many available entries (occupied, not touched by this call)
    come before it in ascending (score, column) order: the rank at which it would be picked."""
    rank = tl.zeros([BUCKET], tl.int32)
    for c in range(0, BUCKET):  # one slot at a time, read before the program writes the bucket
        other = tl.load(scores_ptr + first_slot + c)
        usable = (tl.load(digests_ptr + first_slot + c).to(tl.int32) >= FIRST_DIGEST) & (
            tl.abs(tl.load(epochs_ptr + first_slot + c)) != epoch
        )
        before = usable & ((other < held_scores) | ((other == held_scores) & (c < cols)))
        rank += before.to(tl.int32)
    return rank


@triton.jit
def _contender_rank(
    grouped_lanes_ptr, grouped_keys_ptr, lane_scores_ptr, start, count, key, score, CHUNK: tl.constexpr
):
    """For each lane (``key``, ``score`` of one chunk), how many of the bucket's ``count`` contenders
    come before it in descending score, then ascending key order (keys are distinct)."""
    lanes = tl.arange(0, CHUNK)
    rank = tl.zeros([CHUNK], tl.int32)
    for other_chunk in range(0, count, CHUNK):
        idx = other_chunk + lanes
        live = idx < count
        lane = tl.load(grouped_lanes_ptr + start + idx, mask=live, other=0).to(tl.int64)
        other_key = tl.load(grouped_keys_ptr + start + idx, mask=live, other=0)
        other_score = tl.load(lane_scores_ptr + lane, mask=live, other=0)
        higher = other_score[None, :] > score[:, None]
        tie = (other_score[None, :] == score[:, None]) & (other_key[None, :] < key[:, None])
        rank += tl.sum((live[None, :] & (higher | tie)).to(tl.int32), axis=1)
    return rank


@triton.jit(do_not_specialize=["num_buckets", "epoch"])
def evict_ranked_kernel(
    segment_buckets_ptr,
    num_segments_ptr,
    counts_ptr,
    starts_ptr,
    grouped_lanes_ptr,
    grouped_keys_ptr,
    lane_scores_ptr,
    slots_ptr,
    evicted_ptr,
    evicted_keys_ptr,
    evicted_slots_ptr,
    evicted_scores_ptr,
    keys_ptr,
    digests_ptr,
    scores_ptr,
    epochs_ptr,
    num_buckets,
    epoch,
    BUCKET: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Per-key scores (``lane_scores [N]``, by lane; the keys of the call are distinct): each listed
    bucket placed by one program as in :func:`evict_grouped_kernel`, no sort. The bucket's
    contenders, ranked by descending score then ascending key, take the entries not touched by this
    call ranked by ascending (score, column): the contender of rank ``r`` gets the entry of rank
    ``r`` if its score is at least the entry's, else it is refused (slot -1), as is every contender
    ranked beyond the available entries. Outputs as :func:`evict_grouped_kernel`'s."""
    for segment in range(tl.program_id(0), tl.load(num_segments_ptr), tl.num_programs(0)):
        bucket = tl.load(segment_buckets_ptr + segment).to(tl.int64)
        count = tl.load(counts_ptr + bucket)
        start = tl.load(starts_ptr + bucket)
        cols = tl.arange(0, BUCKET)
        lanes = tl.arange(0, CHUNK)
        first_slot = bucket * BUCKET
        held_scores = tl.load(scores_ptr + first_slot + cols)
        available = (tl.load(digests_ptr + first_slot + cols).to(tl.int32) >= FIRST_DIGEST) & (
            tl.abs(tl.load(epochs_ptr + first_slot + cols)) != epoch
        )
        entry_rank = _available_rank(scores_ptr, digests_ptr, epochs_ptr, first_slot, held_scores, cols, epoch, BUCKET)
        picks = tl.minimum(count, tl.sum(available.to(tl.int32), axis=0))
        for chunk in range(0, count, CHUNK):
            idx = chunk + lanes
            live = idx < count
            lane = tl.load(grouped_lanes_ptr + start + idx, mask=live, other=0).to(tl.int64)
            key = tl.load(grouped_keys_ptr + start + idx, mask=live, other=0)
            score = tl.load(lane_scores_ptr + lane, mask=live, other=0)
            rank = _contender_rank(
                grouped_lanes_ptr, grouped_keys_ptr, lane_scores_ptr, start, count, key, score, CHUNK
            )
            match = available[None, :] & (entry_rank[None, :] == rank[:, None])
            victim_col = tl.min(tl.where(match, cols[None, :], BUCKET), axis=1)
            victim_score = tl.sum(tl.where(match, held_scores[None, :], 0), axis=1)  # at most one match
            won = live & (rank < picks) & (score >= victim_score)
            victim = first_slot + victim_col
            _, _, digest = _coordinates(key, num_buckets, NUM_GROUPS)
            victim_key = _claim_victims(
                victim, won, key, score, digest, epoch, keys_ptr, scores_ptr, epochs_ptr, digests_ptr
            )
            tl.store(slots_ptr + lane, tl.where(won, victim, -1), mask=live)
            out = start + idx
            tl.store(evicted_ptr + out, won.to(tl.int8), mask=live)
            tl.store(evicted_keys_ptr + out, victim_key, mask=won)
            tl.store(evicted_slots_ptr + out, victim, mask=won)
            tl.store(evicted_scores_ptr + out, victim_score, mask=won)
