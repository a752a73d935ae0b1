"""The tile plan of the Hopper CUTLASS forward (`csrc/fwd_sm90_kernel.cuh`, 128 query rows x 64 keys), on the CPU.

`sm90_block` gives each (sequence, 128-row query block) the key blocks `[n_block_begin, n_block_end)` from
`SequenceMask::column_begin` / `column_end` (`csrc/mask.cuh`); the producer loads and the consumers walk exactly
those. This file mirrors those few lines in Python (a drift guard checks that the C++ still reads so) and checks,
against `hstu_attn_valid_mask`, for every mask option and lengths around the tile sizes:

- every key block that holds a valid pair of the query block is visited (nothing is dropped);
- no visited key block starts at or past the sequence end (no load wholly inside the next sequence);
- a tile that skips the per-element mask (`tile_all_valid`) holds only valid pairs for the rows inside the
  sequence and no key past its end, so the kernel's finite.cuh path (taken by masked tiles only) still sees every
  tile whose keys reach into the next sequence, whose non-finite V rows it must zero;
- the mirrored per-element rule `SequenceMask::valid` equals the reference mask.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from hstu_attn.reference import hstu_attn_valid_mask

BLOCK_M, BLOCK_N = 128, 64  # FwdSm90Traits::kBlockM, kBlockN
CSRC = Path(__file__).resolve().parents[1] / "csrc"

# The C++ lines mirrored below: if one changes, update the mirror with it.
MIRRORED = {
    "mask.cuh": [
        "if (window > 0 && contextual == 0) return max(0, min(m0, history) - window);",
        "int end = min(m0 + rows, length);",
        "if (!causal || m0 < contextual) end = max(end, history);",
        "return window == 0 && last_column < history && (!causal || last_column < m0);",
        "bool attends = diagonal || (history_column && (!causal || j < row_position));",
        "if (window > 0) attends = attends && (diagonal || abs(row_position - j) <= window);",
        "if (contextual > 0) attends = attends || (history_column && (i < contextual || j < contextual));",
    ],
    "fwd_sm90_kernel.cuh": [
        "static constexpr int kBlockN = 64;",
        "static constexpr int kBlockM = 64 * kWarpgroups;",
        "static constexpr int kWarpgroups = 2;",
        "b.n_block_begin = b.mask.column_begin(b.m0) / kBlockN;",
        "b.n_block_end = (b.mask.column_end(b.m0, kBlockM) + kBlockN - 1) / kBlockN;",
        "for (int n_block = b.n_block_end - 1; n_block >= b.n_block_begin; --n_block) {",
    ],
}


def _column_begin(m0: int, u: int, c: int, w: int) -> int:
    return max(0, min(m0, u) - w) if w > 0 and c == 0 else 0


def _column_end(m0: int, n: int, u: int, c: int, causal: bool, rows: int = BLOCK_M) -> int:
    """SequenceMask::column_end(m0, rows)."""
    end = min(m0 + rows, n)
    if not causal or m0 < c:
        end = max(end, u)
    return min(end, n)


def _tile_all_valid(m0: int, n0: int, u: int, w: int, causal: bool, columns: int = BLOCK_N) -> bool:
    """SequenceMask::tile_all_valid(m0, n0, columns)."""
    last_column = n0 + columns - 1
    return w == 0 and last_column < u and (not causal or last_column < m0)


def _mirrored_valid(n: int, u: int, c: int, w: int, causal: bool) -> torch.Tensor:
    """SequenceMask::valid over [n, n] (i, j < n)."""
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    diagonal = i == j
    history_column = j < u
    row_position = torch.minimum(i, torch.tensor(u))
    attends = diagonal | (history_column & (j < row_position if causal else torch.ones_like(diagonal)))
    if w > 0:
        attends = attends & (diagonal | ((row_position - j).abs() <= w))
    if c > 0:
        attends = attends | (history_column & ((i < c) | (j < c)))
    return attends


def _cases() -> list[tuple[int, int, int, int, bool]]:
    """(n, num_targets, contextual_seq_len, max_attn_len, causal): edges around the tiles, then random ones."""
    lengths = (1, 2, 63, 64, 65, 127, 128, 129, 191, 192, 255, 256, 257, 300, 513)
    cases = []
    for n in lengths:
        for t, c, w, causal in (
            (0, 0, 0, True), (0, 0, 0, False), (min(n, 7), 0, 0, True), (min(n, 20), 0, 0, False), (n, 0, 0, True),
            (0, 5, 0, True), (min(n, 20), 70, 0, True), (0, 0, 40, True), (0, 0, 100, False),
            (min(n, 20), 3, 64, True), (min(n, 20), 3, 64, False), (0, 0, 1, True), (min(n, 9), n + 5, 0, False),
        ):  # fmt: skip
            cases.append((n, t, c, w, causal))
    rng = random.Random(90)
    for _ in range(150):
        n = rng.randint(1, 700)
        cases.append((n, rng.randint(0, n), rng.choice((0, 0, 1, 5, 64, 130)), rng.choice((0, 0, 1, 17, 64, 200)),
                      rng.random() < 0.5))  # fmt: skip
    return cases


@pytest.mark.parametrize(("file", "lines"), MIRRORED.items())
def test_mirrored_cpp_lines_unchanged(file: str, lines: list[str]) -> None:
    source = " ".join((CSRC / file).read_text().split())
    missing = [line for line in lines if " ".join(line.split()) not in source]
    assert not missing, f"csrc/{file} no longer holds the lines this file mirrors: {missing}"


def test_key_block_plan_covers_every_valid_pair() -> None:
    for n, t, c, w, causal in _cases():
        u = n - t
        case = dict(n=n, num_targets=t, contextual_seq_len=c, max_attn_len=w, causal=causal)
        valid = hstu_attn_valid_mask(n, causal=causal, num_targets=t, contextual_seq_len=c, max_attn_len=w)
        assert torch.equal(_mirrored_valid(n, u, c, w, causal), valid), f"SequenceMask::valid differs: {case}"
        for m0 in range(0, n, BLOCK_M):
            rows = valid[m0 : m0 + BLOCK_M]
            begin = _column_begin(m0, u, c, w) // BLOCK_N
            end = (_column_end(m0, n, u, c, causal) + BLOCK_N - 1) // BLOCK_N
            visited = set(range(begin, end))
            needed = {int(j) // BLOCK_N for j in torch.nonzero(rows.any(0)).flatten()}
            assert needed <= visited, f"m0={m0}: key blocks {sorted(needed - visited)} dropped: {case}"
            assert visited and max(visited) * BLOCK_N < n, f"m0={m0}: visits {sorted(visited)} past n: {case}"
            for n_block in visited:
                n0 = n_block * BLOCK_N
                if _tile_all_valid(m0, n0, u, w, causal):
                    assert n0 + BLOCK_N <= n, f"unmasked tile ({m0}, {n0}) reaches past the end: {case}"
                    assert rows[:, n0 : n0 + BLOCK_N].all(), f"unmasked tile ({m0}, {n0}) holds invalid pairs: {case}"
