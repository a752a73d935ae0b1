"""`layer_norm_gate`: `dropout(LayerNorm(attn) * u)` in one Triton kernel forward and one backward.

In eager mode the call is an `autograd.Function`; under `torch.compile` it goes through the custom ops
`hstu_attn::layer_norm_gate_forward` / `hstu_attn::layer_norm_gate_backward`, which the compiler keeps opaque.
Both run the same launches (`hstu_attn.norm_gate.launch`, imported on first use so that importing hstu_attn does
not need Triton).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from hstu_attn.backend import TRITON_DTYPES

__all__ = ["MAX_WIDTH", "layer_norm_gate", "layer_norm_gate_supported", "norm_gate_triton_available"]

MAX_WIDTH = 8192  # whole rows per program (`launch`): the sm_90 backward spills registers at 16384


# Looked up once without importing Triton (`import hstu_attn` must not load it, nor torch._dynamo, which would);
# a read of a module-level bool is also what torch.compile traces as a constant.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def norm_gate_triton_available() -> bool:
    """Whether Triton is installed in this environment (found, not imported: a broken install raises its
    ImportError at the first fused call)."""
    return _TRITON_INSTALLED


def layer_norm_gate_supported(attn: Tensor, u: Tensor) -> bool:
    """Whether `layer_norm_gate` runs on these inputs here: CUDA tensors (or CPU under `TRITON_INTERPRET=1`) of one
    dtype among float32/bfloat16/float16, width at most `MAX_WIDTH`, and Triton importable."""
    on_device = attn.is_cuda or (attn.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return (
        on_device
        and attn.dtype in TRITON_DTYPES
        and u.dtype == attn.dtype
        and attn.dim() == 2
        and attn.shape[-1] <= MAX_WIDTH
        and norm_gate_triton_available()
    )


def layer_norm_gate(
    attn: Tensor,
    u: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    """`dropout(LayerNorm(attn; weight, bias, eps) * u, dropout_p)`, fused (see `layer_norm_gate_reference`).

    attn, u: `[L, W]`, one dtype (float32, bfloat16 or float16), on one CUDA device (or CPU under
    `TRITON_INTERPRET=1`); any row stride (u may be a column slice of a wider matrix), column stride 1 or the input
    is copied. weight, bias: `[W]` (any floating dtype, e.g. float32 master weights under autocast) or None.
    Returns `[L, W]` in attn's dtype. LayerNorm statistics and the product are computed in float32 and rounded
    once. Dropout applies when `training` and `dropout_p > 0`: the mask comes from Philox with a seed drawn from
    torch's generator of attn's device (one int64 per call), and the backward regenerates it from that seed.
    Saved for backward: attn, u, the per-row mean and 1/std (`[L]` float32) and the seed; no mask, no normalized
    activation.
    """
    _check(attn, u, weight, bias, dropout_p)
    attn, u = _row_major(attn), _row_major(u)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    p = float(dropout_p) if training else 0.0
    seed = torch.randint(2**62, (1,), dtype=torch.int64, device=attn.device) if p > 0.0 else None
    if torch.compiler.is_compiling():
        return _forward_op(attn, u, weight, bias, seed, float(eps), p)[0]
    return _LayerNormGate.apply(attn, u, weight, bias, seed, float(eps), p)


def _check(attn: Tensor, u: Tensor, weight: Tensor | None, bias: Tensor | None, dropout_p: float) -> None:
    if attn.dim() != 2 or u.shape != attn.shape:
        raise ValueError(f"layer_norm_gate needs attn and u of one shape [L, W], got {list(attn.shape)} and "
                         f"{list(u.shape)}")  # fmt: skip
    if attn.dtype not in TRITON_DTYPES or u.dtype != attn.dtype:
        raise ValueError(f"layer_norm_gate needs attn and u of one dtype among float32/bfloat16/float16, got "
                         f"{attn.dtype} and {u.dtype}")  # fmt: skip
    if u.device != attn.device:
        raise ValueError(f"layer_norm_gate needs attn and u on one device, got {attn.device} and {u.device}")
    if not (attn.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"layer_norm_gate runs Triton kernels: it needs CUDA tensors (got {attn.device}), or "
                         "TRITON_INTERPRET=1 on CPU; use layer_norm_gate_reference otherwise")  # fmt: skip
    if attn.shape[1] > MAX_WIDTH:
        raise ValueError(f"layer_norm_gate holds whole rows per program: width {attn.shape[1]} > {MAX_WIDTH}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and (param.shape != attn.shape[1:] or param.device != attn.device):
            raise ValueError(f"layer_norm_gate {name} must be [W] = {list(attn.shape[1:])} on {attn.device}, got "
                             f"{list(param.shape)} on {param.device}")  # fmt: skip
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"layer_norm_gate dropout_p must be in [0, 1], got {dropout_p}")


def _row_major(tensor: Tensor) -> Tensor:
    """The tensor if its columns are adjacent (any row stride), else a contiguous copy."""
    return tensor if tensor.stride(1) == 1 or tensor.shape[1] <= 1 else tensor.contiguous()


def _launch() -> ModuleType:
    return importlib.import_module("hstu_attn.norm_gate.launch")


def _backward_values(
    grad: Tensor, saved: tuple[Tensor | None, ...], p: float
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    attn, u, weight, bias, mean, rstd, seed = saved
    assert attn is not None and u is not None and mean is not None and rstd is not None
    return _launch().backward(_row_major(grad), attn, u, weight, bias, mean, rstd, seed, p)


class _LayerNormGate(torch.autograd.Function):
    """Eager autograd of `layer_norm_gate`: inputs `(attn, u, weight, bias, seed, eps, p)`, output y."""

    @staticmethod
    def forward(
        ctx: Any,
        attn: Tensor,
        u: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        seed: Tensor | None,
        eps: float,
        p: float,
    ) -> Tensor:
        y, mean, rstd = _launch().forward(attn, u, weight, bias, seed, eps, p)
        ctx.save_for_backward(attn, u, weight, bias, mean, rstd, seed)
        ctx.p = p
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        return (*_backward_values(grad, ctx.saved_tensors, ctx.p), None, None, None)


@torch.library.custom_op("hstu_attn::layer_norm_gate_forward", mutates_args=())
def _forward_op(
    attn: Tensor, u: Tensor, weight: Tensor | None, bias: Tensor | None, seed: Tensor | None, eps: float, p: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _launch().forward(_row_major(attn), _row_major(u), weight, bias, seed, eps, p)


@_forward_op.register_fake
def _forward_op_fake(attn: Tensor, *_: object) -> tuple[Tensor, Tensor, Tensor]:
    rows = attn.shape[0]
    return (
        attn.new_empty(attn.shape),
        attn.new_empty(rows, dtype=torch.float32),
        attn.new_empty(rows, dtype=torch.float32),
    )


@torch.library.custom_op("hstu_attn::layer_norm_gate_backward", mutates_args=())
def _backward_op(
    grad: Tensor,
    attn: Tensor,
    u: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    seed: Tensor | None,
    p: float,
) -> list[Tensor]:
    """[dattn, du], then dweight and dbias for those given."""
    grads = _backward_values(grad, (_row_major(attn), _row_major(u), weight, bias, mean, rstd, seed), p)
    return [g for g in grads if g is not None]


@_backward_op.register_fake
def _backward_op_fake(
    grad: Tensor, attn: Tensor, u: Tensor, weight: Tensor | None, bias: Tensor | None, *_: object
) -> list[Tensor]:
    grads = [attn.new_empty(attn.shape), u.new_empty(u.shape)]
    return grads + [param.new_empty(param.shape) for param in (weight, bias) if param is not None]


def _setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
    attn, u, weight, bias, seed, _eps, p = inputs
    ctx.save_for_backward(attn, u, weight, bias, output[1], output[2], seed)
    ctx.p = p


def _op_backward(ctx: Any, grad: Tensor, _grad_mean: Tensor | None, _grad_rstd: Tensor | None) -> tuple:
    attn, u, weight, bias, mean, rstd, seed = ctx.saved_tensors
    grads = iter(_backward_op(grad, attn, u, weight, bias, mean, rstd, seed, ctx.p))
    dattn, du = next(grads), next(grads)
    dweight = next(grads) if weight is not None else None
    dbias = next(grads) if bias is not None else None
    return dattn, du, dweight, dbias, None, None, None


_forward_op.register_autograd(_op_backward, setup_context=_setup_context)
