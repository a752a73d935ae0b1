"""Python entry points of the Triton backend: argument preparation and kernel launches.

`hstu_attn.interface` validates user input and calls these two functions; they assume shapes are consistent
(q, k `[L, H, Dqk]`, v `[L, H, Dv]` on one CUDA device, or on CPU under `TRITON_INTERPRET=1`). q, k, v and
grad_out are read in place with any token and head strides (e.g. the u/v/q/k views split from one
`[L, 4 * H * D]` projection); only a tensor whose last dim is not unit-stride is copied. Outputs and gradients
are new contiguous tensors. The per-call host work is kept small (no host synchronization, few tensor
operations): short jagged batches take only tens of microseconds on the GPU.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hstu_attn.triton.backward_dkdv import hstu_attn_backward_dkdv_kernel
from hstu_attn.triton.backward_dq import hstu_attn_backward_dq_kernel
from hstu_attn.triton.configs import (
    BACKWARD_CANDIDATES,
    FORWARD_CANDIDATES,
    INTERPRET,
    LaunchConfig,
    TunedKernel,
    deterministic_config,
    launch_config,
    next_power_of_two,
)
from hstu_attn.triton.forward import hstu_attn_forward_kernel

__all__ = ["SUPPORTED_HEAD_DIMS", "hstu_attn_triton_backward", "hstu_attn_triton_forward"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The separate dQ kernel beats fp32 atomics on long sequences; atomics save a launch on short ones.
_DQ_KERNEL_MIN_SEQ_LEN = 2048

_forward = TunedKernel(hstu_attn_forward_kernel, FORWARD_CANDIDATES)
_backward_dkdv = TunedKernel(hstu_attn_backward_dkdv_kernel, BACKWARD_CANDIDATES)
_backward_dq = TunedKernel(hstu_attn_backward_dq_kernel, FORWARD_CANDIDATES)


@dataclass
class _Launch:
    """What every kernel of one call shares: prepared tensors, scalars, compile-time flags, the tuning key."""

    num_sequences: int
    num_heads: int
    head_dim: int
    tensors: tuple  # seq_offsets, num_targets, batch_order, rab, position_weights, time_weights, timestamps
    table_strides: tuple[int, int, int, int, int, int]  # rab b/h/m/n, position row, time row
    scalars: dict
    flags: dict
    key: tuple


def _float32(x: float) -> float:
    """`x` rounded to the nearest float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _input_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input precision for fp32 operands (other dtypes ignore it): TF32 where
    `torch.backends.cuda.matmul.allow_tf32` allows it, else three TF32 products ("tf32x3", close to fp32 accuracy
    on tensor cores). Full-IEEE fp32 dots lower to unrolled FMAs: at head dim 128 the dK/dV kernel took over 190 s
    to compile on an H100's host (and over 7 minutes here for sm_90), so the interpreter alone keeps "ieee"."""
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee" if INTERPRET or dtype != torch.float32 else "tf32x3"


def _contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _unit_last(t: Tensor) -> Tensor:
    """`t` itself when its last dim is unit-stride (the kernels take the other strides as arguments), else a
    contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _token_strides(*tensors: Tensor) -> tuple[int, ...]:
    """(token stride, head stride) of each `[L, H, D]` tensor, flattened: the kernels' stride arguments."""
    return tuple(stride for t in tensors for stride in (t.stride(0), t.stride(1)))


def _broadcast_stride(t: Tensor, dim: int) -> int:
    return 0 if t.shape[dim] == 1 else t.stride(dim)


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"Triton HSTU attention supports float32, bfloat16 and float16 inputs; got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] not in SUPPORTED_HEAD_DIMS or v.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(
            f"Triton HSTU attention supports head dims {SUPPORTED_HEAD_DIMS}; got Dqk={q.shape[2]}, Dv={v.shape[2]}"
        )


def _prepare(
    q: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    *,
    alpha: float,
    scale: float,
    causal: bool,
    num_targets: Tensor | None,
    contextual_seq_len: int,
    max_attn_len: int,
    rab: Tensor | None,
    position_weights: Tensor | None,
    time_weights: Tensor | None,
    timestamps: Tensor | None,
    time_bucket_divisor: float,
    sort_by_length: bool,
) -> _Launch:
    num_sequences = seq_offsets.shape[0] - 1
    num_heads, dqk, dv = q.shape[1], q.shape[2], v.shape[2]
    rab_strides = (0, 0, 0, 0)
    if rab is not None:
        rab = rab if rab.stride(-1) == 1 else rab.contiguous()
        rab_strides = (_broadcast_stride(rab, 0), _broadcast_stride(rab, 1), rab.stride(2), rab.stride(3))
    pos_reach, pos_stride = 0, 0
    if position_weights is not None:
        position_weights = _contiguous(position_weights)
        pos_reach, pos_stride = (position_weights.shape[1] - 1) // 2, _broadcast_stride(position_weights, 0)
    num_buckets, time_stride, inv_divisor = 0, 0, 1.0
    if time_weights is not None:
        if timestamps is None:
            raise ValueError("time_weights needs timestamps ([L], one per token)")
        time_weights, timestamps = _contiguous(time_weights), _contiguous(timestamps)
        num_buckets, time_stride = time_weights.shape[1], _broadcast_stride(time_weights, 0)
        # the reference divides by the divisor the way PyTorch's CUDA kernel does: times its fp32 reciprocal
        inv_divisor = _float32(1.0 / _float32(time_bucket_divisor))
    batch_order = None
    if sort_by_length and num_sequences > 1:
        batch_order = torch.argsort(seq_offsets[1:] - seq_offsets[:-1], descending=True).to(torch.int32)
    low_precision = q.dtype != torch.float32
    flags = {
        "DQK": dqk,
        "DV": dv,
        "CAUSAL": bool(causal),
        "HAS_TARGETS": num_targets is not None,
        "HAS_CONTEXT": contextual_seq_len > 0,
        "HAS_WINDOW": max_attn_len > 0,
        "HAS_ORDER": batch_order is not None,
        "HAS_RAB": rab is not None,
        "HAS_POS": position_weights is not None,
        "HAS_TIME": time_weights is not None,
        "FAST_SILU": low_precision and not INTERPRET,
        "UPCAST_DOT": INTERPRET and q.dtype == torch.bfloat16,
        "INPUT_PRECISION": _input_precision(q.dtype),
    }
    scalars = {
        "num_heads": num_heads,
        "max_seq_len": max_seq_len,
        "alpha": float(alpha),
        "scale": float(scale),
        "contextual_seq_len": int(contextual_seq_len),
        "max_attn_len": int(max_attn_len),
        "pos_reach": pos_reach,
        "num_buckets": num_buckets,
        "inv_divisor": inv_divisor,
    }
    key = (
        next_power_of_two(max(max_seq_len, 16)),
        min(next_power_of_two(num_sequences * num_heads), 1024),
        q.dtype,
        tuple(flags.values()),
    )
    return _Launch(
        num_sequences=num_sequences,
        num_heads=num_heads,
        head_dim=max(dqk, dv),
        tensors=(seq_offsets, num_targets, batch_order, rab, position_weights, time_weights, timestamps),
        table_strides=(*rab_strides, pos_stride, time_stride),
        scalars=scalars,
        flags=flags,
        key=key,
    )


def _query_grid(launch: _Launch, max_seq_len: int) -> Callable[[LaunchConfig], tuple[int]]:
    programs = launch.num_sequences * launch.num_heads
    return lambda config: (programs * ((max_seq_len + config.block_m - 1) // config.block_m),)


def _key_grid(launch: _Launch, max_seq_len: int) -> Callable[[LaunchConfig], tuple[int]]:
    programs = launch.num_sequences * launch.num_heads
    return lambda config: (programs * ((max_seq_len + config.block_n - 1) // config.block_n),)


def hstu_attn_triton_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    *,
    alpha: float,
    scale: float,
    causal: bool,
    num_targets: Tensor | None,
    contextual_seq_len: int,
    max_attn_len: int,
    rab: Tensor | None,
    position_weights: Tensor | None,
    time_weights: Tensor | None,
    timestamps: Tensor | None,
    time_bucket_divisor: float,
    sort_by_length: bool = False,
) -> Tensor:
    """Jagged HSTU attention forward: `out [L, H, Dv] = (SiLU(alpha q k^T + bias) * valid * scale) v`.

    Args:
        q, k: `[L, H, Dqk]`; v: `[L, H, Dv]` (float32, bfloat16 or float16; head dims 16..256, powers of two).
        seq_offsets: `[B+1]` int32/int64; max_seq_len: N >= every sequence length.
        alpha: scale of `q k^T`; scale: `1 / scaling_seqlen`.
        causal, num_targets `[B]` or None, contextual_seq_len, max_attn_len: the mask (see `hstu_attn.reference`).
        rab: `[B or 1, H or 1, >=N, >=N]` bias or None.
        position_weights `[Hb, 2M-1]`, time_weights `[Hb, NB]` with timestamps `[L]` and time_bucket_divisor:
            the fused relative bias (see `hstu_attn.relative_bias`), each optional.
        sort_by_length: also start the longest sequences first (a device-side argsort per call). Within each
            sequence the heaviest query blocks always start first.
    """
    _check(q, k, v)
    num_tokens = q.shape[0]
    out = torch.empty((num_tokens, q.shape[1], v.shape[2]), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or max_seq_len <= 0:
        return out
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    launch = _prepare(
        q,
        v,
        seq_offsets,
        max_seq_len,
        alpha=alpha,
        scale=scale,
        causal=causal,
        num_targets=num_targets,
        contextual_seq_len=contextual_seq_len,
        max_attn_len=max_attn_len,
        rab=rab,
        position_weights=position_weights,
        time_weights=time_weights,
        timestamps=timestamps,
        time_bucket_divisor=time_bucket_divisor,
        sort_by_length=sort_by_length,
    )
    _forward.launch(
        launch.key,
        launch.head_dim,
        _query_grid(launch, max_seq_len),
        (q, k, v, out, *_token_strides(q, k, v), *launch.tensors, *launch.table_strides),
        {**launch.scalars, **launch.flags},
    )
    return out


def hstu_attn_triton_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    *,
    alpha: float,
    scale: float,
    causal: bool,
    num_targets: Tensor | None,
    contextual_seq_len: int,
    max_attn_len: int,
    rab: Tensor | None,
    position_weights: Tensor | None,
    time_weights: Tensor | None,
    timestamps: Tensor | None,
    time_bucket_divisor: float,
    deterministic: bool,
    rab_requires_grad: bool = True,
    sort_by_length: bool = False,
    atomic_dq: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of `hstu_attn_triton_forward` (same arguments) w.r.t. q, k, v, rab and the bias tables.

    Returns `(dq, dk, dv, drab, dposition_weights, dtime_weights)`, each None when its input is None (drab also
    when `rab_requires_grad` is False). `deterministic=True` gives bitwise-reproducible results: dQ comes from a
    second kernel instead of fp32 atomics, and the bias gradients are reduced from per-program partials (for a
    position table that scratch holds `B * H * ceil(N / BLOCK_N) * (2N - 1)` fp32 values). `atomic_dq` picks
    fp32 atomics (True) or the separate dQ kernel (False) for dQ; by default atomics below max_seq_len 2048.
    """
    _check(q, k, v)
    has_rab_grad = rab is not None and rab_requires_grad
    if q.shape[0] == 0 or max_seq_len <= 0:
        return _zero_gradients(q, k, v, rab if has_rab_grad else None, position_weights, time_weights)
    grad_out, q, k, v = _unit_last(grad_out), _unit_last(q), _unit_last(k), _unit_last(v)
    launch = _prepare(
        q,
        v,
        seq_offsets,
        max_seq_len,
        alpha=alpha,
        scale=scale,
        causal=causal,
        num_targets=num_targets,
        contextual_seq_len=contextual_seq_len,
        max_attn_len=max_attn_len,
        rab=rab,
        position_weights=position_weights,
        time_weights=time_weights,
        timestamps=timestamps,
        time_bucket_divisor=time_bucket_divisor,
        sort_by_length=sort_by_length,
    )
    if atomic_dq is None:
        atomic_dq = max_seq_len < _DQ_KERNEL_MIN_SEQ_LEN
    plan = _BackwardPlan(
        launch=launch,
        max_seq_len=max_seq_len,
        deterministic=deterministic,
        atomic_dq=atomic_dq and not deterministic,
        has_rab_grad=has_rab_grad,
        fixed=deterministic_config(launch.head_dim) if deterministic else None,
    )
    grads = _allocate_gradients(plan, q, k, v, rab, position_weights, time_weights)
    _launch_dkdv(plan, grads, q, k, v, grad_out)
    if plan.atomic_dq:
        grads.dq = grads.dq.to(q.dtype)
    else:
        _launch_dq(plan, grads, q, k, v, grad_out)
    return _finish_gradients(plan, grads, rab, position_weights, time_weights)


@dataclass
class _BackwardPlan:
    """The choices of one backward call: how dQ is accumulated, whether a fixed (deterministic) config runs."""

    launch: _Launch
    max_seq_len: int
    deterministic: bool
    atomic_dq: bool  # dQ by fp32 atomics in the dK/dV kernel instead of the dQ kernel
    has_rab_grad: bool
    fixed: LaunchConfig | None  # the deterministic launch config; None: autotuned

    @property
    def key_programs(self) -> int:
        """Programs of the dK/dV kernel under the fixed config (the rows of per-program partials); 0 if tuned."""
        if self.fixed is None:
            return 0
        return self.launch.num_sequences * self.launch.num_heads * -(-self.max_seq_len // self.fixed.block_n)


@dataclass
class _Gradients:
    """Where the backward kernels write: dq (fp32 when accumulated by atomics), dk, dv, and for each bias term
    its target (the final tensor, an fp32 atomic accumulator or per-program partials) with the target's strides.
    `drab` is rab's final gradient; it is `drab_target` itself unless rab is broadcast over sequences or heads."""

    dq: Tensor
    dk: Tensor
    dv: Tensor
    drab: Tensor | None = None
    drab_target: Tensor | None = None
    drab_atomic: bool = False
    drab_strides: tuple[int, ...] = (0, 0, 0, 0)
    dpos_target: Tensor | None = None
    dpos_stride: int = 0
    dtime_target: Tensor | None = None
    dtime_stride: int = 0


def _zero_gradients(
    q: Tensor, k: Tensor, v: Tensor, rab: Tensor | None, position_weights: Tensor | None, time_weights: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of an empty batch: zeros shaped like each input that is not None."""
    return (
        torch.zeros_like(q),
        torch.zeros_like(k),
        torch.zeros_like(v),
        None if rab is None else torch.zeros_like(rab),
        None if position_weights is None else torch.zeros_like(position_weights),
        None if time_weights is None else torch.zeros_like(time_weights),
    )


def _allocate_gradients(
    plan: _BackwardPlan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rab: Tensor | None,
    position_weights: Tensor | None,
    time_weights: Tensor | None,
) -> _Gradients:
    device = q.device
    # contiguous whatever the inputs' strides (empty_like would keep a permuted dense layout)
    dk = torch.empty(k.shape, dtype=k.dtype, device=device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=device)
    dq_dtype = torch.float32 if plan.atomic_dq else q.dtype
    dq = (torch.zeros if plan.atomic_dq else torch.empty)(q.shape, dtype=dq_dtype, device=device)
    grads = _Gradients(dq=dq, dk=dk, dv=dv)
    if plan.has_rab_grad:
        assert rab is not None
        _allocate_rab_gradient(plan, grads, rab, device)
    if position_weights is not None:
        grads.dpos_target, grads.dpos_stride = _table_gradient_target(
            plan, position_weights, 2 * plan.max_seq_len - 1, device
        )
    if time_weights is not None:
        grads.dtime_target, grads.dtime_stride = _table_gradient_target(
            plan, time_weights, time_weights.shape[1], device
        )
    return grads


def _allocate_rab_gradient(plan: _BackwardPlan, grads: _Gradients, rab: Tensor, device: torch.device) -> None:
    """rab's gradient and the kernel's target for it: the gradient itself, per-(sequence, head) fp32 partials
    (deterministic, rab broadcast) or an fp32 atomic accumulator (rab broadcast)."""
    num_sequences, num_heads = plan.launch.num_sequences, plan.launch.num_heads
    grads.drab = torch.zeros_like(rab)
    broadcast = (rab.shape[0] == 1 and num_sequences > 1) or (rab.shape[1] == 1 and num_heads > 1)
    if not broadcast:
        grads.drab_target = grads.drab
        grads.drab_strides = grads.drab.stride()
    elif plan.deterministic:
        grads.drab_target = torch.zeros((num_sequences, num_heads, *rab.shape[2:]), dtype=torch.float32, device=device)
        grads.drab_strides = grads.drab_target.stride()
    else:
        grads.drab_target = torch.zeros(rab.shape, dtype=torch.float32, device=device)
        grads.drab_atomic = True
        grads.drab_strides = (
            _broadcast_stride(grads.drab_target, 0),
            _broadcast_stride(grads.drab_target, 1),
            grads.drab_target.stride(2),
            grads.drab_target.stride(3),
        )


def _table_gradient_target(
    plan: _BackwardPlan, table: Tensor, partial_columns: int, device: torch.device
) -> tuple[Tensor, int]:
    """fp32 target of a bias table's gradient and its row stride: per-program partial rows `[programs,
    partial_columns]` when deterministic, else an atomic accumulator shaped like the table."""
    shape = (plan.key_programs, partial_columns) if plan.deterministic else tuple(table.shape)
    target = torch.zeros(shape, dtype=torch.float32, device=device)
    return target, target.stride(0) if plan.deterministic else _broadcast_stride(target, 0)


def _launch_dkdv(plan: _BackwardPlan, grads: _Gradients, q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor) -> None:
    """dK, dV and the bias gradients (and dQ when `plan.atomic_dq`): one program per key block."""
    launch = plan.launch
    seq_offsets, num_targets, batch_order, rab, position_weights, time_weights, timestamps = launch.tensors
    dq_atomic = grads.dq if plan.atomic_dq else None
    args = (
        q,
        k,
        v,
        grad_out,
        grads.dk,
        grads.dv,
        dq_atomic,
        *_token_strides(q, k, v, grad_out),
        seq_offsets,
        num_targets,
        batch_order,
        rab,
        grads.drab_target,
        position_weights,
        grads.dpos_target,
        time_weights,
        grads.dtime_target,
        timestamps,
        *launch.table_strides[:4],
        *grads.drab_strides,
        launch.table_strides[4],
        grads.dpos_stride,
        launch.table_strides[5],
        grads.dtime_stride,
    )
    kwargs = {
        **launch.scalars,
        **launch.flags,
        "HAS_DRAB": plan.has_rab_grad,
        "DRAB_ATOMIC": grads.drab_atomic,
        "ATOMIC_DQ": plan.atomic_dq,
        "DETERMINISTIC": plan.deterministic,
        "NUM_BUCKETS_P2": next_power_of_two(max(launch.scalars["num_buckets"], 1)),
    }
    grid = _key_grid(launch, plan.max_seq_len)
    if plan.fixed is not None:
        launch_config(hstu_attn_backward_dkdv_kernel, plan.fixed, grid, args, kwargs)
        return
    drab_accumulator = grads.drab_target if grads.drab_atomic else None
    _backward_dkdv.launch(
        (*launch.key, plan.has_rab_grad, grads.drab_atomic, plan.atomic_dq),
        launch.head_dim,
        grid,
        args,
        kwargs,
        accumulators=(dq_atomic, drab_accumulator, grads.dpos_target, grads.dtime_target),
    )


def _launch_dq(plan: _BackwardPlan, grads: _Gradients, q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor) -> None:
    """dQ by the separate kernel: one program per query block, written once."""
    launch = plan.launch
    args = (q, k, v, grad_out, grads.dq, *_token_strides(q, k, v, grad_out), *launch.tensors, *launch.table_strides)
    kwargs = {**launch.scalars, **launch.flags}
    grid = _query_grid(launch, plan.max_seq_len)
    if plan.fixed is None:
        _backward_dq.launch(launch.key, launch.head_dim, grid, args, kwargs)
    else:
        launch_config(hstu_attn_backward_dq_kernel, plan.fixed, grid, args, kwargs)


def _finish_gradients(
    plan: _BackwardPlan,
    grads: _Gradients,
    rab: Tensor | None,
    position_weights: Tensor | None,
    time_weights: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Reduce the bias-gradient targets to the gradients of rab and the tables, in their dtypes."""
    num_sequences, num_heads = plan.launch.num_sequences, plan.launch.num_heads
    if plan.has_rab_grad and grads.drab_target is not grads.drab:
        assert rab is not None and grads.drab is not None and grads.drab_target is not None
        _reduce_rab_gradient(grads.drab, grads.drab_target, rab, plan.deterministic)
    dposition = dtime = None
    if position_weights is not None:
        assert grads.dpos_target is not None
        dpos = grads.dpos_target
        if plan.deterministic:
            dpos = _fold_position_partials(dpos, num_sequences, num_heads, position_weights.shape, plan.max_seq_len)
        dposition = dpos.to(position_weights.dtype)
    if time_weights is not None:
        assert grads.dtime_target is not None
        dtime_sum = grads.dtime_target
        if plan.deterministic:
            per_head = dtime_sum.view(num_sequences, num_heads, -1, time_weights.shape[1]).sum(dim=(0, 2))
            dtime_sum = per_head.sum(dim=0, keepdim=True) if time_weights.shape[0] == 1 else per_head
        dtime = dtime_sum.to(time_weights.dtype)
    return grads.dq, grads.dk, grads.dv, grads.drab, dposition, dtime


def _reduce_rab_gradient(drab: Tensor, drab_target: Tensor, rab: Tensor, deterministic: bool) -> None:
    """Write a broadcast rab's gradient into `drab`: summed over the broadcast dims of per-program partials
    (deterministic) or copied from the fp32 atomic accumulator."""
    reduced = drab_target
    if deterministic and rab.shape[1] == 1:
        reduced = reduced.sum(dim=1, keepdim=True)
    if deterministic and rab.shape[0] == 1:
        reduced = reduced.sum(dim=0, keepdim=True)
    drab.copy_(reduced)


def _fold_position_partials(
    partials: Tensor, num_sequences: int, num_heads: int, table_shape: torch.Size, max_seq_len: int
) -> Tensor:
    """Reduce per-program rows of unclamped distances `[B*H*blocks, 2N-1]` to the table gradient `[Hb, 2R+1]`.

    Column `d + N - 1` of a row holds distance d; table column `clamp(d, -R, R) + R`. Only slicing and sums,
    so the reduction is deterministic.
    """
    per_head = partials.view(num_sequences, num_heads, -1, partials.shape[1]).sum(dim=(0, 2))
    reach = (table_shape[1] - 1) // 2
    center = max_seq_len - 1
    folded = per_head.new_zeros((num_heads, table_shape[1]))
    if reach == 0:
        folded[:, 0] = per_head.sum(dim=1)
    elif reach >= center:
        folded[:, reach - center : reach + center + 1] = per_head
    else:
        folded[:, 0] = per_head[:, : center - reach + 1].sum(dim=1)
        folded[:, 2 * reach] = per_head[:, center + reach :].sum(dim=1)
        folded[:, 1 : 2 * reach] = per_head[:, center - reach + 1 : center + reach]
    return folded.sum(dim=0, keepdim=True) if table_shape[0] == 1 else folded
