"""Python entry points of the Triton backend: argument preparation and kernel launches.

`hstu_attn.interface` validates user input and calls these two functions; they assume shapes are consistent
(q, k `[L, H, Dqk]`, v `[L, H, Dv]` on one CUDA device, or on CPU under `TRITON_INTERPRET=1`). The per-call host
work is kept small (no host synchronization, few tensor operations): short jagged batches take only tens of
microseconds on the GPU.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hstu_attn.triton.backward import hstu_attn_backward_dkdv_kernel, hstu_attn_backward_dq_kernel
from hstu_attn.triton.configs import (
    BACKWARD_CANDIDATES,
    FORWARD_CANDIDATES,
    INTERPRET,
    LaunchConfig,
    TunedKernel,
    deterministic_config,
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


def _contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


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
        "INPUT_PRECISION": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
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
    q, k, v = _contiguous(q), _contiguous(k), _contiguous(v)
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
        (q, k, v, out, *launch.tensors, *launch.table_strides),
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
    num_tokens = q.shape[0]
    has_rab_grad = rab is not None and rab_requires_grad
    if num_tokens == 0 or max_seq_len <= 0:
        return (
            torch.zeros_like(q),
            torch.zeros_like(k),
            torch.zeros_like(v),
            torch.zeros_like(rab) if rab is not None and rab_requires_grad else None,
            None if position_weights is None else torch.zeros_like(position_weights),
            None if time_weights is None else torch.zeros_like(time_weights),
        )
    grad_out, q, k, v = _contiguous(grad_out), _contiguous(q), _contiguous(k), _contiguous(v)
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
    num_sequences, num_heads = launch.num_sequences, launch.num_heads
    if atomic_dq is None:
        atomic_dq = max_seq_len < _DQ_KERNEL_MIN_SEQ_LEN
    atomic_dq = atomic_dq and not deterministic
    fixed = deterministic_config(launch.head_dim) if deterministic else None
    key_programs = 0 if fixed is None else num_sequences * num_heads * -(-max_seq_len // fixed.block_n)
    device = q.device

    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=device) if atomic_dq else torch.empty_like(q)

    # Gradient targets of the bias terms: final tensors, fp32 atomic accumulators or per-program partials.
    drab = drab_target = None
    drab_atomic = False
    drab_strides: tuple[int, ...] = (0, 0, 0, 0)
    if has_rab_grad:
        assert rab is not None
        drab = torch.zeros_like(rab)
        broadcast = (rab.shape[0] == 1 and num_sequences > 1) or (rab.shape[1] == 1 and num_heads > 1)
        if not broadcast:
            drab_target = drab
            drab_strides = drab.stride()
        elif deterministic:
            drab_target = torch.zeros((num_sequences, num_heads, *rab.shape[2:]), dtype=torch.float32, device=device)
            drab_strides = drab_target.stride()
        else:
            drab_target = torch.zeros(rab.shape, dtype=torch.float32, device=device)
            drab_atomic = True
            drab_strides = (
                _broadcast_stride(drab_target, 0),
                _broadcast_stride(drab_target, 1),
                drab_target.stride(2),
                drab_target.stride(3),
            )
    dpos_target, dpos_stride = None, 0
    if position_weights is not None:
        shape = (key_programs, 2 * max_seq_len - 1) if deterministic else tuple(position_weights.shape)
        dpos_target = torch.zeros(shape, dtype=torch.float32, device=device)
        dpos_stride = dpos_target.stride(0) if deterministic else _broadcast_stride(dpos_target, 0)
    dtime_target, dtime_stride = None, 0
    if time_weights is not None:
        shape = (key_programs, time_weights.shape[1]) if deterministic else tuple(time_weights.shape)
        dtime_target = torch.zeros(shape, dtype=torch.float32, device=device)
        dtime_stride = dtime_target.stride(0) if deterministic else _broadcast_stride(dtime_target, 0)

    seq_offsets_, num_targets_, batch_order, rab_, position_weights_, time_weights_, timestamps_ = launch.tensors
    dkdv_args = (
        q,
        k,
        v,
        grad_out,
        dk,
        dv,
        dq if atomic_dq else None,
        seq_offsets_,
        num_targets_,
        batch_order,
        rab_,
        drab_target,
        position_weights_,
        dpos_target,
        time_weights_,
        dtime_target,
        timestamps_,
        *launch.table_strides[:4],
        *drab_strides,
        launch.table_strides[4],
        dpos_stride,
        launch.table_strides[5],
        dtime_stride,
    )
    dkdv_kwargs = {
        **launch.scalars,
        **launch.flags,
        "HAS_DRAB": has_rab_grad,
        "DRAB_ATOMIC": drab_atomic,
        "ATOMIC_DQ": atomic_dq,
        "DETERMINISTIC": deterministic,
        "NUM_BUCKETS_P2": next_power_of_two(max(launch.scalars["num_buckets"], 1)),
    }
    key_grid = _key_grid(launch, max_seq_len)
    if fixed is None:
        _backward_dkdv.launch(
            (*launch.key, has_rab_grad, drab_atomic, atomic_dq),
            launch.head_dim,
            key_grid,
            dkdv_args,
            dkdv_kwargs,
            accumulators=(dq if atomic_dq else None, drab_target if drab_atomic else None, dpos_target, dtime_target),
        )
    else:
        _launch_fixed(hstu_attn_backward_dkdv_kernel, fixed, key_grid, dkdv_args, dkdv_kwargs)

    if atomic_dq:
        dq = dq.to(q.dtype)
    else:
        dq_args = (
            q,
            k,
            v,
            grad_out,
            dq,
            *launch.tensors,
            *launch.table_strides,
        )
        dq_kwargs = {**launch.scalars, **launch.flags}
        query_grid = _query_grid(launch, max_seq_len)
        if fixed is None:
            _backward_dq.launch(launch.key, launch.head_dim, query_grid, dq_args, dq_kwargs)
        else:
            _launch_fixed(hstu_attn_backward_dq_kernel, fixed, query_grid, dq_args, dq_kwargs)

    if has_rab_grad and drab_target is not drab:
        assert rab is not None and drab is not None and drab_target is not None
        reduced = drab_target
        if deterministic and rab.shape[1] == 1:
            reduced = reduced.sum(dim=1, keepdim=True)
        if deterministic and rab.shape[0] == 1:
            reduced = reduced.sum(dim=0, keepdim=True)
        drab.copy_(reduced)
    dposition = dtime = None
    if position_weights is not None:
        assert dpos_target is not None
        if deterministic:
            dpos_target = _fold_position_partials(
                dpos_target, num_sequences, num_heads, position_weights.shape, max_seq_len
            )
        dposition = dpos_target.to(position_weights.dtype)
    if time_weights is not None:
        assert dtime_target is not None
        if deterministic:
            per_head = dtime_target.view(num_sequences, num_heads, -1, time_weights.shape[1]).sum(dim=(0, 2))
            dtime_target = per_head.sum(dim=0, keepdim=True) if time_weights.shape[0] == 1 else per_head
        dtime = dtime_target.to(time_weights.dtype)
    return dq, dk, dv, drab, dposition, dtime


def _launch_fixed(
    kernel: Any, config: LaunchConfig, grid: Callable[[LaunchConfig], tuple[int]], args: tuple, kwargs: dict
) -> None:
    kernel[grid(config)](*args, **kwargs, **config.meta())


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
