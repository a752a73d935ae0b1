"""The tile spans of the Triton kernels cover every valid (query, key) pair exactly once.

A probe kernel walks the spans that `query_block_column_ranges` (forward / dQ) and `key_block_row_ranges`
(dK/dV) return, clipping masked tiles at their span end as the real kernels do, and counts each visit of a pair.
Every pair that `hstu_attn_valid_mask` allows must be visited once, no pair twice, and the unmasked interior
spans may only hold valid pairs.
"""

from __future__ import annotations

import random

import pytest
import torch
import triton
import triton.language as tl

from hstu_attn.reference import hstu_attn_valid_mask
from hstu_attn.triton.masks import key_block_row_ranges, query_block_column_ranges

INTERIOR = 1000  # visits from unmasked spans count this much, masked ones count 1
WIDTH = 128


@triton.jit
def _probe_query_blocks(
    visits,
    n,
    u,
    c,
    w,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    ctx_end, lo, full_lo, full_hi, hi, diag_lo, diag_hi = query_block_column_ranges(
        m0, n, u, c, w, BLOCK_M, BLOCK_N, CAUSAL, HAS_CONTEXT, HAS_WINDOW
    )
    rows = m0 + tl.arange(0, BLOCK_M)
    starts = (0, lo, full_lo, full_hi, diag_lo)
    ends = (ctx_end, full_lo, full_hi, hi, diag_hi)
    for span in tl.static_range(5):
        for n0 in range(starts[span], ends[span], BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            inside = (rows[:, None] < n) & (cols[None, :] < n)
            if span != 2:
                inside = inside & (cols[None, :] < ends[span])
            count = tl.full([BLOCK_M, BLOCK_N], 1000 if span == 2 else 1, tl.int32)
            tl.atomic_add(visits + rows[:, None] * 128 + cols[None, :], count, mask=inside)


@triton.jit
def _probe_key_blocks(
    visits,
    n,
    u,
    c,
    w,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    ctx_end, lo, full_lo, full_hi, hi = key_block_row_ranges(
        n0, n, u, c, w, BLOCK_M, BLOCK_N, CAUSAL, HAS_CONTEXT, HAS_WINDOW
    )
    cols = n0 + tl.arange(0, BLOCK_N)
    starts = (0, lo, full_lo, full_hi)
    ends = (ctx_end, full_lo, full_hi, hi)
    for span in tl.static_range(4):
        for m0 in range(starts[span], ends[span], BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            inside = (rows[:, None] < n) & (cols[None, :] < n)
            if span != 2:
                inside = inside & (rows[:, None] < ends[span])
            count = tl.full([BLOCK_M, BLOCK_N], 1000 if span == 2 else 1, tl.int32)
            tl.atomic_add(visits + rows[:, None] * 128 + cols[None, :], count, mask=inside)


def _random_cases(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        n = rng.randint(1, 60)
        cases.append(
            dict(
                n=n,
                t=rng.choice([0, 0, n, rng.randint(0, n)]),
                c=rng.choice([0, 0, rng.randint(1, n)]),
                w=rng.choice([0, 0, rng.randint(1, n)]),
                causal=rng.random() < 0.5,
                block_m=rng.choice([16, 32]),
                block_n=rng.choice([16, 32]),
            )
        )
    return cases


@pytest.mark.parametrize("side", ["query_blocks", "key_blocks"])
def test_spans_cover_each_valid_pair_once(side: str) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for case in _random_cases(150, seed=1 if side == "query_blocks" else 2):
        n, block_m, block_n = case["n"], case["block_m"], case["block_n"]
        valid = hstu_attn_valid_mask(
            n,
            causal=case["causal"],
            num_targets=case["t"],
            contextual_seq_len=case["c"],
            max_attn_len=case["w"],
            device=device,
        )
        visits = torch.zeros(WIDTH, WIDTH, dtype=torch.int32, device=device)
        probe, blocks = (
            (_probe_query_blocks, triton.cdiv(n, block_m))
            if side == "query_blocks"
            else (_probe_key_blocks, triton.cdiv(n, block_n))
        )
        probe[(blocks,)](
            visits,
            n,
            n - case["t"],
            case["c"],
            case["w"],
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            CAUSAL=case["causal"],
            HAS_CONTEXT=case["c"] > 0,
            HAS_WINDOW=case["w"] > 0,
        )
        counts = visits[:n, :n]
        total = counts % INTERIOR + counts // INTERIOR
        assert bool((total[valid] == 1).all()), f"a valid pair is missed or visited twice: {case}"
        assert bool((total <= 1).all()), f"a pair is visited twice: {case}"
        assert bool((counts[~valid] < INTERIOR).all()), f"an unmasked span holds an invalid pair: {case}"
        assert int(visits.sum()) == int(counts.sum()), f"a visit fell outside the sequence: {case}"
