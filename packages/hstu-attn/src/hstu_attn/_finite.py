"""`check_finite=True` of `hstu_attn_varlen_func`: name the input and the first token that holds inf or nan.

These checks read tensor values (a host synchronization each), so they run only when asked for, inside the custom
op (opaque to `torch.compile`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hstu_attn._jagged import sequence_lengths
from hstu_attn.reference import valid_masks

_PREFIX = "hstu_attn_varlen_func(check_finite=True)"


def _first_bad(x: Tensor) -> tuple[int, ...] | None:
    """Index of the first non-finite entry of `x` (row-major), or None when every entry is finite."""
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return None
    return tuple(int(i) for i in bad.nonzero()[0])


def check_finite_tokens(name: str, x: Tensor, seq_offsets: Tensor) -> None:
    """Raise ValueError naming `name` and the first token (sequence, position, head) of jagged `x [L, H, D]` that
    holds inf or nan."""
    index = _first_bad(x)
    if index is None:
        return
    token, head = index[0], index[1]
    offsets = seq_offsets.detach().to(device="cpu", dtype=torch.int64)
    sequence = int(torch.searchsorted(offsets, token, right=True)) - 1
    position = token - int(offsets[sequence])
    raise ValueError(
        f"{_PREFIX}: {name} holds {x[index].item()} at token {token} (sequence {sequence}, position {position}, "
        f"head {head})"
    )


def check_finite_rab(
    rab: Tensor,
    seq_offsets: Tensor,
    num_targets: Tensor | None,
    *,
    causal: bool,
    contextual_seq_len: int,
    max_attn_len: int,
) -> None:
    """Raise ValueError naming the first entry of `rab [B, H or 1, N, N]` at an attended pair that is inf or nan.

    Entries at pairs no row attends (padding, masked pairs) never reach the result and are not checked.
    """
    valid = valid_masks(
        sequence_lengths(seq_offsets),
        num_targets,
        rab.shape[-1],
        causal=causal,
        contextual_seq_len=contextual_seq_len,
        max_attn_len=max_attn_len,
    )
    index = _first_bad(rab.masked_fill(~valid.unsqueeze(1), 0))
    if index is not None:
        sequence, head, row, column = index
        raise ValueError(
            f"{_PREFIX}: rab holds {rab[index].item()} at sequence {sequence}, head {head}, query position {row}, "
            f"key position {column} (a pair that is attended)"
        )


def check_finite_table(name: str, table: Tensor) -> None:
    """Raise ValueError naming `name` and the first entry `[row, column]` of a bias table that is inf or nan."""
    index = _first_bad(table)
    if index is not None:
        raise ValueError(f"{_PREFIX}: {name} holds {table[index].item()} at entry {list(index)}")
