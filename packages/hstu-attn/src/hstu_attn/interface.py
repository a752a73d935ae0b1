"""`hstu_attn_varlen_func`: the public HSTU attention function, one entry point for every backend.

Layering: public function (static checks) -> `torch.library` custom ops `hstu_attn::forward` /
`hstu_attn::backward` (value checks, backend dispatch; opaque to `torch.compile`, with fake implementations and
autograd registered) -> the reference or the Triton kernels. In eager mode the public function calls the same
forward and backward bodies through a `torch.autograd.Function` instead of the custom op: the op's Python dispatch
(argument binding, default filling, redispatch) costs tens of microseconds per call, as much as a short kernel.
"""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from hstu_attn._finite import check_finite_rab, check_finite_table, check_finite_tokens
from hstu_attn._validation import check_arguments, check_offsets_and_targets
from hstu_attn.backend import TRITON_ENTRY_POINTS, KernelBackend, resolve_backend
from hstu_attn.cutlass import CUTLASS_BACKWARD_HEAD_DIMS, hstu_attn_cutlass_backward, hstu_attn_cutlass_forward
from hstu_attn.reference import hstu_attn_reference, hstu_attn_reference_backward
from hstu_attn.relative_bias import RelativeBias

__all__ = ["hstu_attn_varlen_func"]

# The `time_bucket_divisor` handed to the custom op when there is no relative bias: the op's schema takes a float in
# every call, and without bias tables no backend reads it. It equals `RelativeBias`'s default divisor.
_UNUSED_TIME_BUCKET_DIVISOR = 0.301


def hstu_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    *,
    alpha: float | None = None,
    causal: bool = True,
    num_targets: Tensor | None = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    scaling_seqlen: int | None = None,
    rab: Tensor | None = None,
    relative_bias: RelativeBias | None = None,
    backend: KernelBackend | str = KernelBackend.AUTO,
    deterministic: bool = False,
    check_finite: bool = False,
) -> Tensor:
    """Jagged HSTU attention: `O = (SiLU(alpha * q k^T + bias) * valid / scaling_seqlen) v` per sequence.

    The valid mask (causal, targets, contextual prefix, local window) is defined in `hstu_attn.reference`. Every
    backend selects the valid pairs instead of multiplying by the mask: an inf or nan in q, k, v, rab or the
    gradient of the output at a token that a row may not attend never reaches that row's output or the gradients
    computed from it; a row that does attend it gets NaN.

    Args:
        q, k: `[L, H, Dqk]`; v: `[L, H, Dv]`; one dtype among float32, bfloat16, float16 (float64: PYTORCH or AUTO
            only); all inputs on one device.
        seq_offsets: `[B+1]` int32/int64; starts at 0, non-decreasing, ends at L.
        max_seq_len: N >= the longest sequence; the padded size of `rab` and the default `scaling_seqlen`.
        alpha: scale of `q k^T`; default `1 / sqrt(Dqk)`.
        causal: False makes history attention bidirectional (targets still see only history and themselves).
        num_targets: `[B]` int32/int64 with `0 <= num_targets[b] <= length[b]`, or None (no targets).
        contextual_seq_len: length of the contextual prefix (>= 0).
        max_attn_len: local window (>= 0; 0 = unlimited).
        scaling_seqlen: divisor of the attention weights (> 0); default `max_seq_len` (1 when max_seq_len is 0).
        rab: `[B, H or 1, N, N]` bias of q's dtype, or None.
        relative_bias: learnable position/time bias tables (`RelativeBias`), or None.
        backend: a `KernelBackend` (or its string value). CUTLASS (forward for head dims 64/128/256, backward for
            64/128; head dim 256, and deterministic backwards with a fused relative bias or a rab shared by the
            heads, run the Triton kernels) raises NotImplementedError when the library is not built or does not
            support the inputs.
        deterministic: make the backward deterministic (every gradient repeats its bits: no floating-point atomics,
            or sums in a fixed order); ignored by PYTORCH.
        check_finite: raise ValueError naming the tensor (q, k, v, rab at an attended pair, a bias table; in the
            backward grad_out) and its first token (sequence index, position, head) holding inf or nan. Off by
            default: it reads the inputs on the host (one synchronization per tensor).

    Returns:
        `[L, H, Dv]` in q's dtype; differentiable w.r.t. q, k, v, rab and the relative-bias tables.
    """
    backend = backend if isinstance(backend, KernelBackend) else KernelBackend(backend)
    check_arguments(
        q, k, v, seq_offsets, max_seq_len, alpha=alpha, num_targets=num_targets,
        contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len, scaling_seqlen=scaling_seqlen,
        rab=rab, relative_bias=relative_bias, backend=backend,
    )  # fmt: skip
    inputs = (
        q,
        k,
        v,
        seq_offsets,
        num_targets,
        rab,
        None if relative_bias is None else relative_bias.position_weights,
        None if relative_bias is None else relative_bias.time_weights,
        None if relative_bias is None else relative_bias.timestamps,
        max_seq_len,
        1.0 / math.sqrt(q.shape[2]) if alpha is None else float(alpha),
        max(max_seq_len, 1) if scaling_seqlen is None else scaling_seqlen,
        causal,
        contextual_seq_len,
        max_attn_len,
        _UNUSED_TIME_BUCKET_DIVISOR if relative_bias is None else relative_bias.time_bucket_divisor,
        backend.value,
        deterministic,
        check_finite,
    )
    if torch.compiler.is_compiling():
        return _hstu_attn_forward(*inputs)
    return _EagerAttention.apply(*inputs[:_TENSOR_INPUTS], inputs[_TENSOR_INPUTS:])


def _check_finite_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    num_targets: Tensor | None,
    rab: Tensor | None,
    position_weights: Tensor | None,
    time_weights: Tensor | None,
    causal: bool,
    contextual_seq_len: int,
    max_attn_len: int,
) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_finite_tokens(name, tensor, seq_offsets)
    if rab is not None:
        check_finite_rab(
            rab, seq_offsets, num_targets, causal=causal, contextual_seq_len=contextual_seq_len,
            max_attn_len=max_attn_len,
        )  # fmt: skip
    tables = {"relative_bias.position_weights": position_weights, "relative_bias.time_weights": time_weights}
    for name, table in tables.items():
        if table is not None:
            check_finite_table(name, table)


def _relative_bias(
    position_weights: Tensor | None, time_weights: Tensor | None, timestamps: Tensor | None, divisor: float
) -> RelativeBias | None:
    if position_weights is None and time_weights is None:
        return None
    return RelativeBias(position_weights, time_weights, timestamps, divisor)


def _concrete_backend(backend: str, q: Tensor, v: Tensor) -> KernelBackend:
    resolved = resolve_backend(KernelBackend(backend), q, v.shape[2])
    if resolved is KernelBackend.TRITON and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"the TRITON backend needs CUDA tensors (got {q.device}); set TRITON_INTERPRET=1 to run the Triton "
            "interpreter on CPU, or use backend=KernelBackend.PYTORCH"
        )
    return resolved


def _import_triton_kernels() -> ModuleType:
    try:
        kernels = importlib.import_module("hstu_attn.triton")
        missing = [name for name in TRITON_ENTRY_POINTS if not hasattr(kernels, name)]
        if missing:
            raise ImportError(f"hstu_attn.triton does not define {', '.join(missing)}")
    except ImportError as error:
        raise ImportError(
            f"backend=KernelBackend.TRITON needs the Triton kernels (hstu_attn.triton) and triton itself: {error}"
        ) from error
    return kernels


def _triton_options(
    num_targets: Tensor | None,
    rab: Tensor | None,
    position_weights: Tensor | None,
    time_weights: Tensor | None,
    timestamps: Tensor | None,
    alpha: float,
    scaling_seqlen: int,
    causal: bool,
    contextual_seq_len: int,
    max_attn_len: int,
    time_bucket_divisor: float,
) -> dict:
    return {
        "alpha": alpha,
        "scale": 1.0 / scaling_seqlen,
        "causal": causal,
        "num_targets": num_targets,
        "contextual_seq_len": contextual_seq_len,
        "max_attn_len": max_attn_len,
        "rab": rab,
        "position_weights": position_weights,
        "time_weights": time_weights,
        "timestamps": timestamps,
        "time_bucket_divisor": time_bucket_divisor,
    }


def _forward_values(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    num_targets: Tensor | None,
    rab: Tensor | None,
    position_weights: Tensor | None,
    time_weights: Tensor | None,
    timestamps: Tensor | None,
    max_seq_len: int,
    alpha: float,
    scaling_seqlen: int,
    causal: bool,
    contextual_seq_len: int,
    max_attn_len: int,
    time_bucket_divisor: float,
    backend: str,
    deterministic: bool,
    check_finite: bool,
) -> Tensor:
    check_offsets_and_targets(seq_offsets, q.shape[0], max_seq_len, num_targets)
    if check_finite:
        _check_finite_inputs(
            q, k, v, seq_offsets, num_targets, rab, position_weights, time_weights, causal, contextual_seq_len,
            max_attn_len,
        )  # fmt: skip
    concrete = _concrete_backend(backend, q, v)
    if concrete is KernelBackend.TRITON:
        out = _import_triton_kernels().hstu_attn_triton_forward(
            q, k, v, seq_offsets, max_seq_len,
            **_triton_options(
                num_targets, rab, position_weights, time_weights, timestamps, alpha, scaling_seqlen, causal,
                contextual_seq_len, max_attn_len, time_bucket_divisor,
            ),
        )  # fmt: skip
    elif concrete is KernelBackend.CUTLASS:
        out = hstu_attn_cutlass_forward(
            q, k, v, seq_offsets, max_seq_len, alpha=alpha, scale=1.0 / scaling_seqlen, causal=causal,
            num_targets=num_targets, contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len, rab=rab,
            relative_bias=_relative_bias(position_weights, time_weights, timestamps, time_bucket_divisor),
        )  # fmt: skip
    else:
        out = hstu_attn_reference(
            q, k, v, seq_offsets, max_seq_len, alpha=alpha, causal=causal, num_targets=num_targets,
            contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len, scaling_seqlen=scaling_seqlen,
            rab=rab, relative_bias=_relative_bias(position_weights, time_weights, timestamps, time_bucket_divisor),
        )  # fmt: skip
    return out.contiguous()


_hstu_attn_forward = torch.library.custom_op("hstu_attn::forward", _forward_values, mutates_args=())


@_hstu_attn_forward.register_fake
def _hstu_attn_forward_fake(q: Tensor, k: Tensor, v: Tensor, *args: object) -> Tensor:
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2]))


def _backward_values(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    num_targets: Tensor | None,
    rab: Tensor | None,
    position_weights: Tensor | None,
    time_weights: Tensor | None,
    timestamps: Tensor | None,
    max_seq_len: int,
    alpha: float,
    scaling_seqlen: int,
    causal: bool,
    contextual_seq_len: int,
    max_attn_len: int,
    time_bucket_divisor: float,
    backend: str,
    deterministic: bool,
    check_finite: bool,
    rab_needs_grad: bool,
) -> list[Tensor]:
    """Gradients `[dq, dk, dv]`, then d_rab (if rab is given and `rab_needs_grad`), d_position_weights and
    d_time_weights (for the tables given)."""
    if check_finite:
        check_finite_tokens("grad_out", grad_out, seq_offsets)
    concrete = _concrete_backend(backend, q, v)
    fused_bias = position_weights is not None or time_weights is not None
    if concrete is KernelBackend.CUTLASS and _cutlass_backward_takes(q, rab, rab_needs_grad, fused_bias, deterministic):
        all_grads = hstu_attn_cutlass_backward(
            grad_out, q, k, v, seq_offsets, max_seq_len, alpha=alpha, scale=1.0 / scaling_seqlen, causal=causal,
            num_targets=num_targets, contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len, rab=rab,
            rab_requires_grad=rab_needs_grad,
            relative_bias=_relative_bias(position_weights, time_weights, timestamps, time_bucket_divisor),
            deterministic=deterministic,
        )  # fmt: skip
    elif concrete in (KernelBackend.TRITON, KernelBackend.CUTLASS):  # CUTLASS: see _cutlass_backward_takes
        all_grads = _import_triton_kernels().hstu_attn_triton_backward(
            grad_out, q, k, v, seq_offsets, max_seq_len,
            **_triton_options(
                num_targets, rab, position_weights, time_weights, timestamps, alpha, scaling_seqlen, causal,
                contextual_seq_len, max_attn_len, time_bucket_divisor,
            ),
            deterministic=deterministic,
            rab_requires_grad=rab_needs_grad,
        )  # fmt: skip
    else:
        all_grads = hstu_attn_reference_backward(
            grad_out, q, k, v, seq_offsets, max_seq_len, alpha=alpha, causal=causal, num_targets=num_targets,
            contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len, scaling_seqlen=scaling_seqlen,
            rab=rab, relative_bias=_relative_bias(position_weights, time_weights, timestamps, time_bucket_divisor),
        )  # fmt: skip
    dq, dk, dv, *optional_grads = all_grads
    grads = [dq, dk, dv]
    optional_inputs = {
        "rab": rab if rab_needs_grad else None,
        "position_weights": position_weights,
        "time_weights": time_weights,
    }
    for (name, given), grad in zip(optional_inputs.items(), optional_grads):
        if given is not None:
            if grad is None:
                raise RuntimeError(f"the {concrete.value} backward returned no gradient for the given {name}")
            grads.append(grad)
    return [grad.contiguous() for grad in grads]


def _cutlass_backward_takes(
    q: Tensor, rab: Tensor | None, rab_needs_grad: bool, fused_bias: bool, deterministic: bool
) -> bool:
    """Whether backend=CUTLASS runs its own backward (else Triton's): head dims 64/128, and when deterministic, no
    fused relative bias and no rab shared by several heads that needs its gradient (their sums are atomic there)."""
    if q.shape[2] not in CUTLASS_BACKWARD_HEAD_DIMS:
        return False
    shared_rab_grad = rab is not None and rab_needs_grad and rab.shape[1] != q.shape[1]
    return not deterministic or not (fused_bias or shared_rab_grad)


_hstu_attn_backward = torch.library.custom_op("hstu_attn::backward", _backward_values, mutates_args=())


@_hstu_attn_backward.register_fake
def _hstu_attn_backward_fake(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    num_targets: Tensor | None,
    rab: Tensor | None,
    position_weights: Tensor | None,
    time_weights: Tensor | None,
    timestamps: Tensor | None,
    *args: object,
) -> list[Tensor]:
    rab_needs_grad = args[-1]
    inputs = (q, k, v, rab if rab_needs_grad else None, position_weights, time_weights)
    return [tensor.new_empty(tensor.shape) for tensor in inputs if tensor is not None]


_TENSOR_INPUTS = 9  # q, k, v, seq_offsets, num_targets, rab, position_weights, time_weights, timestamps
_SCALAR_INPUTS = 10  # max_seq_len ... check_finite; index 5 of the inputs is rab


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs[:_TENSOR_INPUTS])
    ctx.scalars = inputs[_TENSOR_INPUTS:]


def _gradients(ctx: Any, grad_out: Tensor, backward: Any) -> tuple:
    q, k, v, seq_offsets, num_targets, rab, position_weights, time_weights, timestamps = ctx.saved_tensors
    rab_needs_grad = rab is not None and ctx.needs_input_grad[5]
    dq, dk, dv, *optional_grads = backward(
        grad_out, q, k, v, seq_offsets, num_targets, rab, position_weights, time_weights, timestamps, *ctx.scalars,
        rab_needs_grad,
    )  # fmt: skip
    supplied = iter(optional_grads)
    rab_slot = rab if rab_needs_grad else None
    drab, dposition, dtime = (
        next(supplied) if t is not None else None for t in (rab_slot, position_weights, time_weights)
    )
    return (dq, dk, dv, None, None, drab, dposition, dtime, None) + (None,) * _SCALAR_INPUTS


def _backward(ctx: Any, grad_out: Tensor) -> tuple:
    return _gradients(ctx, grad_out, _hstu_attn_backward)


_hstu_attn_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The custom op's forward and backward bodies without the op's dispatch (eager mode only). Takes the custom
    op's tensor inputs, then its scalar inputs as one tuple (fewer arguments for autograd to inspect per call)."""

    @staticmethod
    def forward(ctx: Any, *tensors_then_scalars: Any) -> Tensor:
        inputs = (*tensors_then_scalars[:_TENSOR_INPUTS], *tensors_then_scalars[_TENSOR_INPUTS])
        output = _forward_values(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        return _gradients(ctx, grad_out.contiguous(), _backward_values)[: _TENSOR_INPUTS + 1]
