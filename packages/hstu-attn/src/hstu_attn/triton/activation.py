"""SiLU and its derivative, plus the matrix product wrapper shared by the HSTU attention kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh_approx(x):
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def silu(y, FAST: tl.constexpr):
    """`y * sigmoid(y)` in fp32. FAST uses one hardware tanh: `y sigmoid(y) = h (1 + tanh h)`, h = y / 2."""
    if FAST:
        h = 0.5 * y
        return h + h * _tanh_approx(h)
    else:
        return y * tl.sigmoid(y)


@triton.jit
def silu_and_grad(y, FAST: tl.constexpr):
    """(`silu(y)`, `silu'(y)`) in fp32, with `silu'(y) = sigmoid(y) (1 + y (1 - sigmoid(y)))`."""
    if FAST:
        h = 0.5 * y
        t = _tanh_approx(h)
        one_plus_t = 1.0 + t
        value = h * one_plus_t
        grad = 0.5 * one_plus_t * (1.0 + h - h * t)
    else:
        sig = tl.sigmoid(y)
        value = y * sig
        grad = sig * (1.0 + y * (1.0 - sig))
    return value, grad


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """`acc + a @ b` in fp32. UPCAST feeds fp32 operands (the CPU interpreter mishandles bf16 products)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
