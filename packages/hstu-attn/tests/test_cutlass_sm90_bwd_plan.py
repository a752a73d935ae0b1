"""The tile plan of the Hopper CUTLASS backward (`csrc/bwd_sm90_kernel.cuh`, 128 keys x 64 query rows), on the CPU.

Each CTA owns one 128-key block `[n0, n0 + 128)` of a sequence; its producer loads, and its consumers walk, the query
blocks `m_block` from `m_block_begin` (`n0 / 64` under a causal mask without contextual rows, else 0) to the sequence
end, skipping those whose key range `[column_begin(m0), column_end(m0, 64))` (`csrc/mask.cuh`) misses the key block.
This file mirrors those lines in Python (a drift guard checks that the C++ still reads so; test_cutlass_sm90_plan.py
guards the mask.cuh lines and provides the mask mirrors and cases) and checks, against `hstu_attn_valid_mask`, for
every mask option and lengths around the tile sizes:

- every query block that holds a valid pair with the key block is visited (no dK, dV or dQ contribution dropped);
- no visited query block starts at or past the sequence end;
- a tile that skips the per-element mask (`tile_all_valid` and its query rows inside the sequence) holds only valid
  pairs, no query row and no key past the sequence end: TMA tiles that reach into the next sequence (or past L) are
  always masked, so finite.cuh's path sees every tile with invalid pairs or a neighbour's rows.
"""

from __future__ import annotations

from pathlib import Path

import test_cutlass_sm90_plan as _fwd_plan  # a sibling test file: tests/conftest.py puts this folder on sys.path
import torch

from hstu_attn.reference import hstu_attn_valid_mask

BLOCK_M, BLOCK_N = 64, 128  # BwdSm90Traits::kBlockM, kBlockN
CSRC = Path(__file__).resolve().parents[1] / "csrc"

# The C++ lines mirrored below: if one changes, update the mirror with it.
MIRRORED = [
    "static constexpr int kWarpgroups = 2;",
    "static constexpr int kBlockM = 64;",
    "static constexpr int kBlockN = 64 * kWarpgroups;",
    "const int m_block_begin = (mask.causal && mask.contextual == 0) ? n0 / kBlockM : 0;",
    "const int m_block_end = (length + kBlockM - 1) / kBlockM;",
    "return !(n0 >= mask.column_end(m0, kBlockM) || n0 + kBlockN <= mask.column_begin(m0));",
    "if (!sm90_bwd_visits<kBlockM, kBlockN>(b.mask, m_block * kBlockM, b.n0)) continue;",  # producer
    "if (!sm90_bwd_visits<kBlockM, kBlockN>(mask, m0, n0)) continue;",  # consumers
    "const bool all_valid = mask.tile_all_valid(m0, n0, kBlockN) && m0 + kBlockM <= length;",
]


def _all_valid(m0: int, n0: int, n: int, u: int, w: int, causal: bool) -> bool:
    """The consumers' all_valid: SequenceMask::tile_all_valid(m0, n0, 128) and the query rows inside the sequence."""
    return _fwd_plan._tile_all_valid(m0, n0, u, w, causal, columns=BLOCK_N) and m0 + BLOCK_M <= n


def _visited_query_blocks(n0: int, n: int, u: int, c: int, w: int, causal: bool) -> list[int]:
    """The query blocks the CTA of key block n0 walks (the kernel's loop bounds and skip test)."""
    begin = n0 // BLOCK_M if causal and c == 0 else 0
    end = (n + BLOCK_M - 1) // BLOCK_M
    return [
        m_block
        for m_block in range(begin, end)
        if not (
            n0 >= _fwd_plan._column_end(m_block * BLOCK_M, n, u, c, causal, rows=BLOCK_M)
            or n0 + BLOCK_N <= _fwd_plan._column_begin(m_block * BLOCK_M, u, c, w)
        )
    ]


def test_mirrored_cpp_lines_unchanged() -> None:
    source = " ".join((CSRC / "bwd_sm90_kernel.cuh").read_text().split())
    missing = [line for line in MIRRORED if " ".join(line.split()) not in source]
    assert not missing, f"csrc/bwd_sm90_kernel.cuh no longer holds the lines this file mirrors: {missing}"


def test_query_block_plan_covers_every_valid_pair() -> None:
    for n, t, c, w, causal in _fwd_plan._cases():
        u = n - t
        case = dict(n=n, num_targets=t, contextual_seq_len=c, max_attn_len=w, causal=causal)
        valid = hstu_attn_valid_mask(n, causal=causal, num_targets=t, contextual_seq_len=c, max_attn_len=w)
        for n0 in range(0, n, BLOCK_N):
            columns = valid[:, n0 : n0 + BLOCK_N]
            visited = _visited_query_blocks(n0, n, u, c, w, causal)
            needed = {int(i) // BLOCK_M for i in torch.nonzero(columns.any(1)).flatten()}
            assert needed <= set(visited), f"n0={n0}: query blocks {sorted(needed - set(visited))} dropped: {case}"
            assert all(m_block * BLOCK_M < n for m_block in visited), f"n0={n0}: visits past n: {case}"
            for m_block in visited:
                m0 = m_block * BLOCK_M
                if _all_valid(m0, n0, n, u, w, causal):
                    assert max(m0 + BLOCK_M, n0 + BLOCK_N) <= n, f"unmasked tile ({m0}, {n0}) reaches past n: {case}"
                    tile = valid[m0 : m0 + BLOCK_M, n0 : n0 + BLOCK_N]
                    assert tile.all(), f"unmasked tile ({m0}, {n0}) holds invalid pairs: {case}"
