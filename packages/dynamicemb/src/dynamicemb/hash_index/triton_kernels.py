"""Triton kernels of the bucketed hash index (layout: :mod:`dynamicemb.hash_index.layout`).

``lookup_kernel`` finds keys (read-only probing, optional score update). ``find_or_insert_kernel``
finds each key and inserts the absent ones at the first free slot of their probe sequence, in one
launch, lock-free: a lane claims a slot by a compare-and-swap of the 32-bit word holding four slots'
state bytes (free -> ``BUSY``), writes key, score and epoch, then publishes the digest with an atomic
xor (release). A lane that sees a ``BUSY`` slot in its probe sequence retries on the next pass,
because that slot may be receiving its own key from a duplicate lane; as free slots never come back
within a call, a lane that finds no free slot and no copy of its key can defer it safely. The kernels
of :mod:`dynamicemb.hash_index.triton_grouped_eviction` then place the deferred keys, one program per
bucket, over the lowest-score entries the call has not touched.

The find-or-insert kernel runs in two phases. The lookup probes ``[BLOCK, GROUP]`` tiles of digests, as
``lookup_kernel`` does, and writes its slots and found flags to memory. After a barrier, the insertion reads them
back one lane per thread and keeps every per-lane value in a one-dimensional ``[BLOCK]`` layout (its probe reads
four state bytes per 32-bit word): an atomic's returned value is only reliable in the thread that issued it, and
reductions produce layouts that replicate a lane across threads (triton-lang/triton#7402), so no value of the
tile phase may reach an atomic. ``BLOCK`` must be at least the number of threads of a program.

"""

from __future__ import annotations

import triton
import triton.language as tl

# Mirrors of dynamicemb.hash_index.layout (Triton kernels cannot read Python module globals).
EMPTY: tl.constexpr = tl.constexpr(0)
TOMBSTONE: tl.constexpr = tl.constexpr(1)
BUSY: tl.constexpr = tl.constexpr(2)
FIRST_DIGEST: tl.constexpr = tl.constexpr(3)
NO_SLOT: tl.constexpr = tl.constexpr(9223372036854775807)
DEFERRED: tl.constexpr = tl.constexpr(-2)

# Score modes (how a call sets the score of a key it touches).
SCORE_NONE: tl.constexpr = tl.constexpr(0)
SCORE_VALUE: tl.constexpr = tl.constexpr(1)  # assign the scalar ``score_value``
SCORE_ADD: tl.constexpr = tl.constexpr(2)  # add ``score_ptr[i]`` (LFU counts; a new key starts at it)
SCORE_PER_KEY: tl.constexpr = tl.constexpr(3)  # assign ``score_ptr[i]``


@triton.jit
def _fmix64(keys):
    """murmur3 fmix64 of int64 keys, as uint64 (layout.hash_keys)."""
    h = keys.to(tl.uint64, bitcast=True)
    h ^= h >> 33
    h *= 0xFF51AFD7ED558CCD
    h ^= h >> 33
    h *= 0xC4CEB9FE1A85EC53
    h ^= h >> 33
    return h


@triton.jit
def _coordinates(keys, num_buckets, NUM_GROUPS: tl.constexpr):
    """murmur3 fmix64 of the keys -> (bucket, first probed group, digest), as in layout.py."""
    h = _fmix64(keys)
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
def _find(
    key,
    bucket,
    group,
    digest,
    live,
    keys_ptr,
    digests_ptr,
    BUCKET: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The slot holding each ``live`` lane's key, or -1: a read-only probe over ``[BLOCK, GROUP]`` tiles of
    digests (a lane stops at its key or at the first group with an ``EMPTY`` slot)."""
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
    return slot


# Scalars that change from call to call are not specialized (no variant for 1 or multiples of 16), so
# the kernels compiled when a table is created (``TritonHashTable.warm_up``) serve every later call.
@triton.jit(do_not_specialize=["n", "num_buckets", "score_value"])
def lookup_kernel(
    query_ptr,
    n,
    keys_ptr,
    digests_ptr,
    scores_ptr,
    out_slots_ptr,
    out_found_ptr,
    num_buckets,
    score_ptr,
    score_value,
    SCORE_MODE: tl.constexpr,
    BUCKET: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Slots ``[n]`` (-1 if absent) and found flags (int8) of ``n`` keys; updates found keys' scores."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    key = tl.load(query_ptr + offs, mask=live, other=0)
    bucket, group, digest = _coordinates(key, num_buckets, NUM_GROUPS)
    slot = _find(key, bucket, group, digest, live, keys_ptr, digests_ptr, BUCKET, GROUP, NUM_GROUPS, BLOCK)
    found = slot >= 0
    if SCORE_MODE != SCORE_NONE:
        _update_found_scores(
            offs, live, found, tl.maximum(slot, 0), scores_ptr, score_ptr, score_value, SCORE_MODE, BLOCK
        )
    tl.store(out_slots_ptr + offs, slot, mask=live)
    tl.store(out_found_ptr + offs, found.to(tl.int8), mask=live)


@triton.jit
def _update_found_scores(
    offs, live, found, at, scores_ptr, score_ptr, score_value, SCORE_MODE: tl.constexpr, BLOCK: tl.constexpr
):
    """Sets (or, with ``SCORE_ADD``, adds to) the scores of the found keys' slots ``at``."""
    score = _call_scores(offs, live, score_ptr, score_value, SCORE_MODE, BLOCK)
    if SCORE_MODE == SCORE_ADD:
        tl.atomic_add(scores_ptr + at, score, mask=found)
    else:
        tl.store(scores_ptr + at, score, mask=found)


@triton.jit
def _probe(
    key,
    bucket,
    group,
    digest,
    pending,
    words_ptr,
    keys_ptr,
    BUCKET: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One walk of the ``pending`` lanes' probe sequences, reading the state bytes four per 32-bit word:
    ``(slot holding the key, first free slot, whether a BUSY slot was seen)``, ``NO_SLOT`` for none.
    A lane stops at its key or at the first group with an ``EMPTY`` slot."""
    hit_slot = tl.full([BLOCK], NO_SLOT, tl.int64)
    free_slot = tl.full([BLOCK], NO_SLOT, tl.int64)
    busy = tl.zeros([BLOCK], tl.int1)
    scanning = pending
    r = 0
    while (r < NUM_GROUPS) & (tl.max(scanning.to(tl.int32), axis=0) > 0):
        first = bucket * BUCKET + ((group + r) & (NUM_GROUPS - 1)) * GROUP
        ended = tl.zeros([BLOCK], tl.int1)
        for w in tl.static_range(GROUP // 4):
            word = tl.load(words_ptr + (first >> 2) + w, mask=scanning, other=0, volatile=True)
            for b in tl.static_range(4):
                pos = first + (4 * w + b)
                dig = (word >> (8 * b)) & 0xFF
                match = scanning & (dig == digest)
                held = tl.load(keys_ptr + pos, mask=match, other=0, volatile=True)
                hit_slot = tl.where(match & (held == key) & (hit_slot == NO_SLOT), pos, hit_slot)
                busy = busy | (scanning & (dig == BUSY))
                free_slot = tl.where(scanning & (dig <= TOMBSTONE) & (free_slot == NO_SLOT), pos, free_slot)
                ended = ended | (scanning & (dig == EMPTY))
        scanning = scanning & (hit_slot == NO_SLOT) & ~ended
        r += 1
    return hit_slot, free_slot, busy


@triton.jit(do_not_specialize=["n", "num_buckets", "score_value", "epoch"])
def find_or_insert_kernel(
    query_ptr,
    n,
    existed_ptr,
    slots_ptr,
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
    counts_ptr,
    segment_buckets_ptr,
    num_segments_ptr,
    SCORE_MODE: tl.constexpr,
    DEFER_FULL: tl.constexpr,
    LIST_DEFERRED: tl.constexpr,
    BUCKET: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Find each of ``n`` keys and insert the absent ones at the first free slot of their probe
    sequence, in one launch. Writes ``slots [n]`` and ``existed [n]`` (int8: 1 where the key was in
    the table before this call). Present keys get the call's score and ``epoch``; inserted ones get
    their score and ``-epoch``, the mark that tells a duplicate lane meeting the key later in the same
    call that it is new (the eviction kernels treat both marks as touched). A key whose bucket has no
    free slot gets slot ``DEFERRED`` (``DEFER_FULL``, for the eviction kernels) or ``-1`` (refused).
    Per-key score modes need distinct keys. With ``LIST_DEFERRED`` the deferred lanes are also
    counted per bucket for the grouped eviction (see :func:`list_deferred_buckets`); the three
    pointers are unused otherwise."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    key = tl.load(query_ptr + offs, mask=live, other=0)
    bucket, group, digest = _coordinates(key, num_buckets, NUM_GROUPS)
    # Phase 1, the lookup: tile reads of the digests. A hit on a slot marked -epoch is a key another lane
    # inserted in this call: not found here, phase 2 meets it as a duplicate.
    hit = _find(key, bucket, group, digest, live, keys_ptr, digests_ptr, BUCKET, GROUP, NUM_GROUPS, BLOCK)
    at = tl.maximum(hit, 0)
    found = (hit >= 0) & (tl.load(epochs_ptr + at, mask=hit >= 0, other=0, volatile=True) != -epoch)
    if SCORE_MODE != SCORE_NONE:
        _update_found_scores(offs, live, found, at, scores_ptr, score_ptr, score_value, SCORE_MODE, BLOCK)
    tl.store(epochs_ptr + at, tl.full([BLOCK], epoch, tl.int32), mask=found)
    tl.store(slots_ptr + offs, tl.where(found, hit, -1), mask=live)
    tl.store(existed_ptr + offs, found.to(tl.int8), mask=live)
    # Phase 2, the insertion, one lane per thread: its inputs are read back from memory after a barrier, so
    # that no value of the tile reductions' layouts (which replicate a lane across threads) reaches an atomic.
    tl.debug_barrier()
    pending = live & (tl.load(existed_ptr + offs, mask=live, other=1, volatile=True) == 0)
    slot = tl.load(slots_ptr + offs, mask=live, other=-1, volatile=True)
    score = _call_scores(offs, live, score_ptr, score_value, SCORE_MODE, BLOCK)
    hit_slot, free_slot, busy = _probe(
        key, bucket, group, digest, pending, words_ptr, keys_ptr, BUCKET, GROUP, NUM_GROUPS, BLOCK
    )
    while tl.max(pending.to(tl.int32), axis=0) > 0:
        # A duplicate lane inserted this key already (duplicates share the call's scalar score).
        dup = pending & (hit_slot != NO_SLOT)
        slot = tl.where(dup, hit_slot, slot)
        pending = pending & ~dup

        trying = pending & ~busy
        full = trying & (free_slot == NO_SLOT)
        if DEFER_FULL:
            slot = tl.where(full, DEFERRED, slot)
        else:
            slot = tl.where(full, -1, slot)
        pending = pending & ~full
        attempt = trying & ~full

        # Claim: CAS the target's state byte from free to BUSY, then publish the digest.
        target = tl.where(attempt, free_slot, bucket * BUCKET)
        word_ptr = words_ptr + (target >> 2)
        shift = ((target & 3) * 8).to(tl.int32)
        word = tl.load(word_ptr, volatile=True)
        valid = attempt & (((word >> shift) & 0xFF) <= TOMBSTONE)
        claimed_word = (word & ~(0xFF << shift)) | (BUSY << shift)
        # Lanes without a valid claim swap a word for itself: no effect on memory.
        seen = tl.atomic_cas(word_ptr, tl.where(valid, word, 0), tl.where(valid, claimed_word, 0))
        won = valid & (seen == word)
        tl.store(keys_ptr + target, key, mask=won)
        tl.store(scores_ptr + target, score, mask=won)
        tl.store(epochs_ptr + target, tl.full([BLOCK], -epoch, tl.int32), mask=won)
        tl.atomic_xor(word_ptr, (digest ^ BUSY) << shift, mask=won)
        grown = tl.sum(won.to(tl.int64), axis=0)
        if grown > 0:
            tl.atomic_add(size_ptr, grown)
        slot = tl.where(won, target, slot)
        pending = pending & ~won
        # Lanes that lost their claim or saw a BUSY slot walk again (free slots never come back
        # within a call, so a lane that finds neither its key nor room can defer it safely).
        hit_slot, free_slot, busy = _probe(
            key, bucket, group, digest, pending, words_ptr, keys_ptr, BUCKET, GROUP, NUM_GROUPS, BLOCK
        )
    tl.store(slots_ptr + offs, slot, mask=live)
    if LIST_DEFERRED:
        list_deferred_buckets(
            bucket, live & (slot == DEFERRED), counts_ptr, segment_buckets_ptr, num_segments_ptr, BLOCK
        )


@triton.jit
def list_deferred_buckets(bucket, deferred, counts_ptr, segment_buckets_ptr, num_segments_ptr, BLOCK: tl.constexpr):
    """``counts[b]`` += the ``deferred`` lanes of bucket ``b``; the lane that brings a bucket's first
    count appends ``b`` to ``segment_buckets`` (``num_segments`` counts them). ``bucket`` and
    ``deferred`` are ``[BLOCK]``, one lane per thread or more (an atomic's result is read only by
    the thread that issued it)."""
    before = tl.atomic_add(counts_ptr + bucket, tl.full([BLOCK], 1, tl.int32), mask=deferred)
    opens = deferred & (before == 0)
    opened = tl.sum(opens.to(tl.int32), axis=0)
    if opened > 0:
        base = tl.atomic_add(num_segments_ptr, opened.to(tl.int64))
        rank = tl.cumsum(opens.to(tl.int32), axis=0) - 1
        tl.store(segment_buckets_ptr + base + rank, bucket.to(tl.int32), mask=opens)


@triton.jit
def _take_lowest(available, held_scores, cols, BUCKET: tl.constexpr):
    """The lowest-score available column (lowest column on ties): ``(score, column, available without it)``."""
    lowest = tl.min(tl.where(available, held_scores, NO_SLOT), axis=0)
    col = tl.min(tl.where(available & (held_scores == lowest), cols, BUCKET), axis=0)
    return lowest, col, available & (cols != col)


@triton.jit
def _claim_victims(victim, won, key, score, digest, epoch, keys_ptr, scores_ptr, epochs_ptr, digests_ptr):
    """Where ``won``, slot ``victim`` takes ``key`` with its score, the call's epoch and its digest;
    returns the keys the slots held (undefined where not ``won``). The key is swapped by one
    exchange at L2: a load then a store of the same slot cost about 2x more on an H100."""
    victim_key = tl.atomic_xchg(keys_ptr + victim, key, mask=won, sem="relaxed")
    tl.store(scores_ptr + victim, score, mask=won)
    tl.store(epochs_ptr + victim, tl.full(victim.shape, epoch, tl.int32), mask=won)
    tl.store(digests_ptr + victim, digest.to(tl.uint8), mask=won)
    return victim_key
