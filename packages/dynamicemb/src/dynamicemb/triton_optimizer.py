"""The fused optimizer as one Triton kernel: each program reads rows of the value tensor by slot,
applies the update of :meth:`dynamicemb.optimizer.FusedOptimizer.update_` and writes them back in
place, so a step costs one read and one write of the touched rows.

The arithmetic is the torch path's, in float32 whatever the storage dtype; tests compare the two.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dynamicemb.optimizer import DynamicEmbOptimizerType, FusedOptimizer
from dynamicemb.triton_launch import BoundKernel, num_programs

__all__ = ["fused_update_triton_"]

_ROWS = 16
_CODES = {
    DynamicEmbOptimizerType.SGD: 0,
    DynamicEmbOptimizerType.ADAM: 1,
    DynamicEmbOptimizerType.ADAMW: 2,
    DynamicEmbOptimizerType.ADAGRAD: 3,
    DynamicEmbOptimizerType.ROWWISE_ADAGRAD: 4,
}


@triton.jit  # type: ignore[misc]
def _gradient(  # type: ignore[no-untyped-def]
    grads_ptr, rows, cols, mask, grads_stride, w, max_gradient, weight_decay, OPT: tl.constexpr, CLIP: tl.constexpr
):
    g = tl.load(grads_ptr + rows[:, None] * grads_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if CLIP:
        g = tl.minimum(tl.maximum(g, -max_gradient), max_gradient)
    if OPT != 2:
        g = g + weight_decay * w
    return g


@triton.jit  # type: ignore[misc]
def _fused_update_kernel(  # type: ignore[no-untyped-def]
    values_ptr,
    slots_ptr,
    grads_ptr,
    n,
    dim,
    values_stride,
    grads_stride,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    max_gradient,
    step_size,
    bias2_sqrt,
    OPT: tl.constexpr,
    CLIP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = rows < n
    slot = tl.load(slots_ptr + rows, mask=live, other=0)
    base = values_ptr + slot * values_stride
    out_ty = values_ptr.dtype.element_ty
    if OPT == 4:
        # Row-wise AdaGrad: the accumulator grows by the row mean of g^2 before any weight moves.
        total = tl.zeros((ROWS,), dtype=tl.float32)
        for start in range(0, dim, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = live[:, None] & (cols < dim)[None, :]
            w = tl.load(base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            g = _gradient(grads_ptr, rows, cols, mask, grads_stride, w, max_gradient, weight_decay, OPT, CLIP)
            total += tl.sum(g * g, axis=1)
        accumulator = tl.load(base + dim, mask=live, other=0.0).to(tl.float32) + total / dim
        tl.store(base + dim, accumulator.to(out_ty), mask=live)
        denom = tl.sqrt(accumulator) + eps
        for start in range(0, dim, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = live[:, None] & (cols < dim)[None, :]
            w = tl.load(base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            g = _gradient(grads_ptr, rows, cols, mask, grads_stride, w, max_gradient, weight_decay, OPT, CLIP)
            tl.store(base[:, None] + cols[None, :], (w - lr * g / denom[:, None]).to(out_ty), mask=mask)
    else:
        for start in range(0, dim, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = live[:, None] & (cols < dim)[None, :]
            w_ptr = base[:, None] + cols[None, :]
            w = tl.load(w_ptr, mask=mask, other=0.0).to(tl.float32)
            g = _gradient(grads_ptr, rows, cols, mask, grads_stride, w, max_gradient, weight_decay, OPT, CLIP)
            if OPT == 0:
                w = w - lr * g
            elif OPT == 3:
                accumulator = tl.load(w_ptr + dim, mask=mask, other=0.0).to(tl.float32) + g * g
                tl.store(w_ptr + dim, accumulator.to(out_ty), mask=mask)
                w = w - lr * g / (tl.sqrt(accumulator) + eps)
            else:
                if OPT == 2:
                    w = w * (1.0 - lr * weight_decay)
                m = tl.load(w_ptr + dim, mask=mask, other=0.0).to(tl.float32)
                v = tl.load(w_ptr + 2 * dim, mask=mask, other=0.0).to(tl.float32)
                m = m + (1.0 - beta1) * (g - m)
                v = v * beta2 + (1.0 - beta2) * g * g
                tl.store(w_ptr + dim, m.to(out_ty), mask=mask)
                tl.store(w_ptr + 2 * dim, v.to(out_ty), mask=mask)
                w = w - step_size * m / (tl.sqrt(v) / bias2_sqrt + eps)
            tl.store(w_ptr, w.to(out_ty), mask=mask)


# Launched without Triton's per-call argument binding after each variant's first launch.
_FUSED_UPDATE = BoundKernel(_fused_update_kernel)


def fused_update_triton_(
    values: torch.Tensor, slots: torch.Tensor, grads: torch.Tensor, optimizer: FusedOptimizer, step: int
) -> None:
    """Update ``values [C, dim + state_dim]`` in place at distinct ``slots [M]`` with ``grads [M, dim]`` (float32)."""
    n = slots.numel()
    if n == 0:
        return
    if values.stride(1) != 1 or grads.stride(1) != 1:
        raise ValueError("fused_update_triton_ needs row-major values and gradients")
    args = optimizer.args
    dim = optimizer.dim
    block_d = min(triton.next_power_of_2(dim), 128)
    _FUSED_UPDATE(
        num_programs(n, _ROWS),
        values,
        slots,
        grads,
        n,
        dim,
        values.stride(0),
        grads.stride(0),
        args.learning_rate,
        args.beta1,
        args.beta2,
        args.eps,
        args.weight_decay,
        args.max_gradient,
        args.learning_rate / (1.0 - args.beta1**step),
        math.sqrt(1.0 - args.beta2**step),
        OPT=_CODES[args.optimizer],
        CLIP=args.gradient_clipping,
        ROWS=_ROWS,
        BLOCK_D=block_d,
    )
