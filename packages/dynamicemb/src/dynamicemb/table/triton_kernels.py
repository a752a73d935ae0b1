"""Triton kernels of the bucketed table (layout: :mod:`dynamicemb.table.layout`).

``lookup_kernel`` finds keys (read-only probing, optional score update). ``insert_kernel`` inserts
the keys a lookup did not find, lock-free: a lane claims a slot by a compare-and-swap of the 32-bit
word holding four slots' state bytes (free -> ``BUSY``), writes key, score and epoch, then publishes
the digest with an atomic xor (release). A lane that sees a ``BUSY`` slot in its probe sequence
retries on the next pass, because that slot may be receiving its own key from a duplicate lane;
together with claims that succeed only on a slot still in the state the lane chose it in, this
keeps one copy of each key however many lanes carry it.

``gather_rows_kernel`` copies value rows by slot (see :mod:`dynamicemb.table.gather`).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Mirrors of dynamicemb.table.layout (Triton kernels cannot read Python module globals).
EMPTY: tl.constexpr = tl.constexpr(0)
TOMBSTONE: tl.constexpr = tl.constexpr(1)
BUSY: tl.constexpr = tl.constexpr(2)
FIRST_DIGEST: tl.constexpr = tl.constexpr(3)
NO_SLOT: tl.constexpr = tl.constexpr(9223372036854775807)

# Score modes (how a call sets the score of a key it touches).
SCORE_NONE: tl.constexpr = tl.constexpr(0)
SCORE_VALUE: tl.constexpr = tl.constexpr(1)  # assign the scalar ``score_value``
SCORE_ADD: tl.constexpr = tl.constexpr(2)  # add ``score_ptr[i]`` (LFU counts; a new key starts at it)
SCORE_PER_KEY: tl.constexpr = tl.constexpr(3)  # assign ``score_ptr[i]``


@triton.jit
def _coordinates(keys, num_buckets, NUM_GROUPS: tl.constexpr):
    """murmur3 fmix64 of the keys -> (bucket, first probed group, digest), as in layout.py."""
    h = keys.to(tl.uint64, bitcast=True)
    h ^= h >> 33
    h *= 0xFF51AFD7ED558CCD
    h ^= h >> 33
    h *= 0xC4CEB9FE1A85EC53
    h ^= h >> 33
    bucket = h.to(tl.int64, bitcast=True) & (num_buckets - 1)
    group = (h >> 32).to(tl.int64, bitcast=True) & (NUM_GROUPS - 1)
    top = (h >> 56).to(tl.int32)
    digest = tl.where(top < FIRST_DIGEST, top + FIRST_DIGEST, top)
    return bucket, group, digest


@triton.jit
def _call_scores(offs, live, score_ptr, score_value, SCORE_MODE: tl.constexpr, BLOCK: tl.constexpr):
    if (SCORE_MODE == SCORE_PER_KEY) or (SCORE_MODE == SCORE_ADD):  # noqa: SIM109 (Triton has no `in`)
        scores = tl.load(score_ptr + offs, mask=live, other=0)
    else:
        scores = tl.full([BLOCK], score_value, tl.int64)
    return scores


@triton.jit
def lookup_kernel(
    query_ptr,
    n,
    keys_ptr,
    digests_ptr,
    scores_ptr,
    epochs_ptr,
    out_slots_ptr,
    out_found_ptr,
    num_buckets,
    score_ptr,
    score_value,
    epoch,
    SCORE_MODE: tl.constexpr,
    MARK_EPOCH: tl.constexpr,
    BUCKET: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Slots ``[n]`` (-1 if absent) and found flags of ``n`` keys; updates found keys' scores."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    key = tl.load(query_ptr + offs, mask=live, other=0)
    bucket, group, digest = _coordinates(key, num_buckets, NUM_GROUPS)
    cols = tl.arange(0, GROUP)
    slot = tl.full([BLOCK], -1, tl.int64)
    active = live
    r = 0
    while (r < NUM_GROUPS) & (tl.max(active.to(tl.int32), axis=0) > 0):
        first = bucket * BUCKET + ((group + r) & (NUM_GROUPS - 1)) * GROUP
        pos = first[:, None] + cols[None, :]
        scan = active[:, None]
        dig = tl.load(digests_ptr + pos, mask=scan, other=EMPTY).to(tl.int32)
        match = scan & (dig == digest[:, None])
        held = tl.load(keys_ptr + pos, mask=match, other=0)
        hit = tl.min(tl.where(match & (held == key[:, None]), pos, NO_SLOT), axis=1)
        slot = tl.where(hit != NO_SLOT, hit, slot)
        ended = tl.max((dig == EMPTY).to(tl.int32), axis=1) > 0
        active = active & (hit == NO_SLOT) & ~ended
        r += 1
    found = slot >= 0
    at = tl.maximum(slot, 0)
    if SCORE_MODE != SCORE_NONE:
        score = _call_scores(offs, live, score_ptr, score_value, SCORE_MODE, BLOCK)
        if SCORE_MODE == SCORE_ADD:
            tl.atomic_add(scores_ptr + at, score, mask=found)
        else:
            tl.store(scores_ptr + at, score, mask=found)
    if MARK_EPOCH:
        tl.store(epochs_ptr + at, tl.full([BLOCK], epoch, tl.int32), mask=found)
    tl.store(out_slots_ptr + offs, slot, mask=live)
    tl.store(out_found_ptr + offs, found.to(tl.int8), mask=live)


@triton.jit
def insert_kernel(
    query_ptr,
    n,
    found_ptr,
    slots_ptr,
    evicted_ptr,
    evicted_keys_ptr,
    evicted_scores_ptr,
    keys_ptr,
    digests_ptr,
    words_ptr,
    scores_ptr,
    epochs_ptr,
    size_ptr,
    num_buckets,
    score_ptr,
    score_value,
    epoch,
    SCORE_MODE: tl.constexpr,
    EVICT: tl.constexpr,
    BUCKET: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Insert the keys with ``found == 0`` (a lookup with ``MARK_EPOCH`` ran before), writing their
    slots (-1: refused) and, per lane, the entry it evicted. Per-key score modes need distinct keys."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    key = tl.load(query_ptr + offs, mask=live, other=0)
    bucket, group, digest = _coordinates(key, num_buckets, NUM_GROUPS)
    found_before = tl.load(found_ptr + offs, mask=live, other=1) != 0
    slot = tl.load(slots_ptr + offs, mask=live, other=-1)
    score = _call_scores(offs, live, score_ptr, score_value, SCORE_MODE, BLOCK)
    cols = tl.arange(0, GROUP)
    evicted = tl.zeros([BLOCK], tl.int1)
    evicted_key = tl.zeros([BLOCK], tl.int64)
    evicted_score = tl.zeros([BLOCK], tl.int64)
    pending = live & ~found_before
    while tl.max(pending.to(tl.int32), axis=0) > 0:
        hit_slot = tl.full([BLOCK], NO_SLOT, tl.int64)
        free_slot = tl.full([BLOCK], NO_SLOT, tl.int64)
        victim = tl.full([BLOCK], NO_SLOT, tl.int64)
        victim_score = tl.full([BLOCK], NO_SLOT, tl.int64)
        busy = tl.zeros([BLOCK], tl.int1)
        scanning = pending
        r = 0
        while (r < NUM_GROUPS) & (tl.max(scanning.to(tl.int32), axis=0) > 0):
            first = bucket * BUCKET + ((group + r) & (NUM_GROUPS - 1)) * GROUP
            pos = first[:, None] + cols[None, :]
            scan = scanning[:, None]
            dig = tl.load(digests_ptr + pos, mask=scan, other=EMPTY, volatile=True).to(tl.int32)
            match = scan & (dig == digest[:, None])
            held = tl.load(keys_ptr + pos, mask=match, other=0, volatile=True)
            hit = tl.min(tl.where(match & (held == key[:, None]), pos, NO_SLOT), axis=1)
            hit_slot = tl.minimum(hit_slot, hit)
            busy = busy | (tl.max((scan & (dig == BUSY)).to(tl.int32), axis=1) > 0)
            free = tl.min(tl.where(scan & (dig <= TOMBSTONE), pos, NO_SLOT), axis=1)
            free_slot = tl.where(free_slot == NO_SLOT, free, free_slot)
            if EVICT:
                # Candidates to evict only while no free slot is known: entries untouched this call.
                want = scan & (free_slot == NO_SLOT)[:, None] & (dig >= FIRST_DIGEST)
                touched = tl.load(epochs_ptr + pos, mask=want, other=epoch, volatile=True) == epoch
                held_score = tl.load(scores_ptr + pos, mask=want, other=0, volatile=True)
                ranked = tl.where(want & ~touched, held_score, NO_SLOT)
                low = tl.min(ranked, axis=1)
                low_slot = tl.min(tl.where((ranked == low[:, None]) & want & ~touched, pos, NO_SLOT), axis=1)
                better = (low_slot != NO_SLOT) & (
                    (victim == NO_SLOT) | (low < victim_score) | ((low == victim_score) & (low_slot < victim))
                )
                victim = tl.where(better, low_slot, victim)
                victim_score = tl.where(better, low, victim_score)
            ended = tl.max((scan & (dig == EMPTY)).to(tl.int32), axis=1) > 0
            scanning = scanning & (hit == NO_SLOT) & ~ended
            r += 1

        # A duplicate lane inserted this key already (duplicates share the call's scalar score).
        dup = pending & (hit_slot != NO_SLOT)
        slot = tl.where(dup, hit_slot, slot)
        pending = pending & ~dup

        trying = pending & ~busy
        use_free = free_slot != NO_SLOT
        target = tl.where(use_free, free_slot, victim)
        refused = trying & ((target == NO_SLOT) | (~use_free & (score < victim_score)))
        slot = tl.where(refused, -1, slot)
        pending = pending & ~refused
        attempt = trying & ~refused

        # Claim: CAS the target's state byte from the state it was chosen in to BUSY.
        safe_target = tl.where(attempt, target, bucket * BUCKET)
        word_ptr = words_ptr + (safe_target >> 2)
        shift = ((safe_target & 3) * 8).to(tl.int32)
        word = tl.load(word_ptr, volatile=True)
        state = (word >> shift) & 0xFF
        valid = attempt & tl.where(use_free, state <= TOMBSTONE, state >= FIRST_DIGEST)
        claimed_word = (word & ~(0xFF << shift)) | (BUSY << shift)
        # Lanes without a valid claim swap a word for itself: no effect on memory.
        seen = tl.atomic_cas(word_ptr, tl.where(valid, word, 0), tl.where(valid, claimed_word, 0))
        won = valid & (seen == word)
        # The entry may have been replaced by one of this call's keys since it was chosen.
        stolen = won & ~use_free & (tl.load(epochs_ptr + safe_target, mask=won, other=0, volatile=True) == epoch)
        tl.atomic_xor(word_ptr, (state ^ BUSY) << shift, mask=stolen)
        won = won & ~stolen
        replaced = won & ~use_free
        old_key = tl.load(keys_ptr + safe_target, mask=replaced, other=0, volatile=True)
        old_score = tl.load(scores_ptr + safe_target, mask=replaced, other=0, volatile=True)
        evicted_key = tl.where(replaced, old_key, evicted_key)
        evicted_score = tl.where(replaced, old_score, evicted_score)
        evicted = evicted | replaced
        tl.store(keys_ptr + safe_target, key, mask=won)
        tl.store(scores_ptr + safe_target, score, mask=won)
        tl.store(epochs_ptr + safe_target, tl.full([BLOCK], epoch, tl.int32), mask=won)
        tl.atomic_xor(word_ptr, (digest ^ BUSY) << shift, mask=won)
        grown = tl.sum((won & use_free).to(tl.int64), axis=0)
        if grown > 0:
            tl.atomic_add(size_ptr, grown)
        slot = tl.where(won, target, slot)
        pending = pending & ~won
    tl.store(slots_ptr + offs, slot, mask=live)
    tl.store(evicted_ptr + offs, evicted.to(tl.int8), mask=live)
    tl.store(evicted_keys_ptr + offs, evicted_key, mask=live)
    tl.store(evicted_scores_ptr + offs, evicted_score, mask=live)


@triton.jit
def gather_rows_kernel(
    values_ptr,
    slots_ptr,
    out_ptr,
    n,
    dim,
    values_stride,
    out_stride,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``out[i] = values[slots[i]]`` for ``n`` rows of ``dim`` elements; rows of slot -1 are zeros."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = rows < n
    slot = tl.load(slots_ptr + rows, mask=live, other=-1)
    hit = slot >= 0
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        in_row = (cols < dim)[None, :]
        row = tl.load(values_ptr + slot[:, None] * values_stride + cols[None, :], mask=hit[:, None] & in_row, other=0)
        tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], row, mask=live[:, None] & in_row)
