"""Launches of the fused LayerNorm-gate-dropout kernels (imports Triton; `hstu_attn.norm_gate.ops` loads it lazily).

Block shapes: `BLOCK_W` is W rounded up to a power of two (at least 4; whole rows per program, W at most
`ops.MAX_WIDTH`); `BLOCK_L` rows fill about 4096 (forward) or 2048 (backward) fp32 values per program. The backward
runs at most 12 programs per streaming multiprocessor (2 under `TRITON_INTERPRET=1`, where each program costs
milliseconds), each summing dweight/dbias over its row blocks into a `[programs, W]` fp32 buffer that is summed
here (for W = 1024 on 132 SMs: 6.5 MB, against 3 x 2 bytes x L x W read by the kernel).
These shapes are chosen from register counts of the sm_90 compile (no spills for W up to 8192), not from GPU
timings.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from torch import Tensor

from hstu_attn.norm_gate.kernels import layer_norm_gate_backward_kernel, layer_norm_gate_forward_kernel

_FORWARD_ELEMENTS = 4096
_BACKWARD_ELEMENTS = 2048
_INTERPRETER_PROGRAMS = 2
# 12 backward programs per SM: a whole number of waves whether 2, 3, 4 or 6 of them fit on an SM at once
_PROGRAMS_PER_SM = 12


def _block_shape(width: int, elements: int) -> tuple[int, int, int]:
    """(BLOCK_L, BLOCK_W, num_warps) for rows of `width` values and about `elements` values per program."""
    block_w = max(triton.next_power_of_2(width), 4)  # whole groups of 4 columns: one Philox call each
    block_l = max(1, min(64, elements // block_w))
    values = block_l * block_w
    num_warps = 16 if values >= 8192 else 8 if values >= 4096 else 4  # rows wider than 4096 get more threads
    return block_l, block_w, num_warps


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _backward_programs(rows: int, block_l: int, device: torch.device) -> int:
    blocks = triton.cdiv(rows, block_l)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return min(blocks, _INTERPRETER_PROGRAMS)
    return min(blocks, _PROGRAMS_PER_SM * _multiprocessors(device.index if device.index is not None else 0))


def _dropout_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def forward(
    attn: Tensor, u: Tensor, weight: Tensor | None, bias: Tensor | None, seed: Tensor | None, eps: float, p: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(y `[L, W]` in attn's dtype, mean `[L]` fp32, rstd `[L]` fp32). attn and u have column stride 1;
    `seed` (`[1]` int64) is given exactly when dropout applies."""
    rows, width = attn.shape
    y = torch.empty((rows, width), dtype=attn.dtype, device=attn.device)
    mean = torch.empty(rows, dtype=torch.float32, device=attn.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=attn.device)
    if rows == 0:
        return y, mean, rstd
    block_l, block_w, num_warps = _block_shape(width, _FORWARD_ELEMENTS)
    layer_norm_gate_forward_kernel[(triton.cdiv(rows, block_l),)](
        attn, u, y, _or(weight, attn), _or(bias, attn), mean, rstd, _or(seed, mean),
        rows, width, attn.stride(0), u.stride(0), y.stride(0), eps, p, _dropout_scale(p),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, DROPOUT=seed is not None,
        BLOCK_L=block_l, BLOCK_W=block_w, num_warps=num_warps,
    )  # fmt: skip
    return y, mean, rstd


def backward(
    grad: Tensor,
    attn: Tensor,
    u: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    seed: Tensor | None,
    p: float,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(dattn `[L, W]` in attn's dtype, du `[L, W]` in u's dtype, dweight `[W]` or None, dbias `[W]` or None)."""
    rows, width = attn.shape
    device = attn.device
    dattn = torch.empty((rows, width), dtype=attn.dtype, device=device)
    du = torch.empty((rows, width), dtype=u.dtype, device=device)
    block_l, block_w, num_warps = _block_shape(width, _BACKWARD_ELEMENTS)
    programs = _backward_programs(rows, block_l, device) if rows else 0
    partial_weight = torch.zeros((programs, width), dtype=torch.float32, device=device) if weight is not None else None
    partial_bias = torch.zeros((programs, width), dtype=torch.float32, device=device) if bias is not None else None
    if programs:
        layer_norm_gate_backward_kernel[(programs,)](
            grad, attn, u, _or(weight, attn), _or(bias, attn), mean, rstd, _or(seed, mean), dattn, du,
            _or(partial_weight, mean), _or(partial_bias, mean),
            rows, width, grad.stride(0), attn.stride(0), u.stride(0), dattn.stride(0), du.stride(0),
            p, _dropout_scale(p),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, DROPOUT=seed is not None,
            BLOCK_L=block_l, BLOCK_W=block_w, num_warps=num_warps,
        )  # fmt: skip
    dweight = None if weight is None else partial_weight.sum(0).to(weight.dtype)  # type: ignore[union-attr]
    dbias = None if bias is None else partial_bias.sum(0).to(bias.dtype)  # type: ignore[union-attr]
    return dattn, du, dweight, dbias


def _or(tensor: Tensor | None, placeholder: Tensor) -> Tensor:
    """The tensor, or a placeholder pointer for a kernel argument that its constexpr flags leave unread."""
    return placeholder if tensor is None else tensor
