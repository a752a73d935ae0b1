"""Python entry points of the Triton backend: argument preparation and kernel launches.

`hstu_attn.interface` validates user input and calls these two functions; they assume shapes are consistent
(q, k `[L, H, Dqk]`, v `[L, H, Dv]` on one CUDA device, or on CPU under `TRITON_INTERPRET=1`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
from torch import Tensor

from hstu_attn.triton import configs
from hstu_attn.triton.backward import hstu_attn_backward_dkdv_kernel, hstu_attn_backward_dq_kernel

__all__ = ["SUPPORTED_HEAD_DIMS", "hstu_attn_triton_backward", "hstu_attn_triton_forward"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class _Launch:
    """Everything the kernels share: prepared tensors, strides, scalars and compile-time flags."""

    num_sequences: int
    num_heads: int
    dqk: int
    dv: int
    batch_order: Tensor | None
    rab: Tensor | None
    rab_strides: tuple[int, int, int, int]
    position_weights: Tensor | None
    time_weights: Tensor | None
    timestamps: Tensor | None
    scalars: dict[str, float | int]
    flags: dict[str, object]


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _broadcast_stride(t: Tensor, dim: int) -> int:
    return 0 if t.shape[dim] == 1 else t.stride(dim)


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"Triton HSTU attention supports float32, bfloat16 and float16 inputs; got {q.dtype}")
    for name, dim in (("Dqk", q.shape[2]), ("Dv", v.shape[2])):
        if dim not in SUPPORTED_HEAD_DIMS:
            raise NotImplementedError(
                f"Triton HSTU attention supports head dims {SUPPORTED_HEAD_DIMS}; got {name}={dim}"
            )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _length_order(seq_offsets: Tensor) -> Tensor | None:
    """Sequence indices, longest first (int32, on device, no host synchronization)."""
    if seq_offsets.numel() <= 2:
        return None
    lengths = seq_offsets[1:] - seq_offsets[:-1]
    return torch.argsort(lengths, descending=True).to(torch.int32)


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
    num_heads, dqk, dv = q.shape[1], q.shape[2], v.shape[2]
    rab_strides = (0, 0, 0, 0)
    if rab is not None:
        rab = _last_dim_contiguous(rab)
        rab_strides = (_broadcast_stride(rab, 0), _broadcast_stride(rab, 1), rab.stride(2), rab.stride(3))
    if time_weights is not None and timestamps is None:
        raise ValueError("time_weights needs timestamps ([L], one per token)")
    num_buckets = 0 if time_weights is None else time_weights.shape[1]
    inv_divisor = float(np.float32(1.0) / np.float32(time_bucket_divisor)) if time_weights is not None else 1.0
    interpret = configs.INTERPRET
    flags = {
        "DQK": dqk,
        "DV": dv,
        "CAUSAL": bool(causal),
        "HAS_TARGETS": num_targets is not None,
        "HAS_CONTEXT": contextual_seq_len > 0,
        "HAS_WINDOW": max_attn_len > 0,
        "HAS_RAB": rab is not None,
        "HAS_POS": position_weights is not None,
        "HAS_TIME": time_weights is not None,
        "FAST_SILU": (not interpret) and q.dtype in (torch.bfloat16, torch.float16),
        "UPCAST_DOT": interpret and q.dtype == torch.bfloat16,
        "INPUT_PRECISION": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
    }
    batch_order = _length_order(seq_offsets) if sort_by_length else None
    flags["HAS_ORDER"] = batch_order is not None
    scalars = {
        "num_heads": num_heads,
        "max_seq_len": max_seq_len,
        "alpha": float(alpha),
        "scale": float(scale),
        "contextual_seq_len": int(contextual_seq_len),
        "max_attn_len": int(max_attn_len),
        "pos_reach": 0 if position_weights is None else (position_weights.shape[1] - 1) // 2,
        "num_buckets": num_buckets,
        "inv_divisor": inv_divisor,
        "AUTOTUNE_SEQ_LEN": configs.autotune_seq_len(max_seq_len),
    }
    return _Launch(
        num_sequences=seq_offsets.numel() - 1,
        num_heads=num_heads,
        dqk=dqk,
        dv=dv,
        batch_order=batch_order,
        rab=rab,
        rab_strides=rab_strides,
        position_weights=None if position_weights is None else _last_dim_contiguous(position_weights),
        time_weights=None if time_weights is None else _last_dim_contiguous(time_weights),
        timestamps=None if timestamps is None else timestamps.contiguous(),
        scalars=scalars,
        flags=flags,
    )


def _table_stride(table: Tensor | None) -> int:
    return 0 if table is None else _broadcast_stride(table, 0)


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
    sort_by_length: bool = True,
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
        sort_by_length: schedule the longest sequences first (one small device-side argsort).
    """
    _check(q, k, v)
    num_tokens = q.shape[0]
    out = torch.empty((num_tokens, q.shape[1], v.shape[2]), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or max_seq_len <= 0:
        return out
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
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
    programs = launch.num_sequences * launch.num_heads

    def grid(meta: dict[str, int]) -> tuple[int]:
        return (programs * triton.cdiv(max_seq_len, meta["BLOCK_M"]),)

    configs.forward[grid](
        q,
        k,
        v,
        out,
        seq_offsets,
        num_targets,
        launch.batch_order,
        launch.rab,
        launch.position_weights,
        launch.time_weights,
        launch.timestamps,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        *launch.rab_strides,
        _table_stride(launch.position_weights),
        _table_stride(launch.time_weights),
        **launch.scalars,
        **launch.flags,
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
    sort_by_length: bool = True,
    atomic_dq: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of `hstu_attn_triton_forward` (same arguments) w.r.t. q, k, v, rab and the bias tables.

    Returns `(dq, dk, dv, drab, dposition_weights, dtime_weights)`, each None when its input is None (drab also
    when `rab_requires_grad` is False). `deterministic=True` gives bitwise-reproducible results: dQ comes from a
    second kernel instead of fp32 atomics, and the bias gradients are reduced from per-program partials (for a
    position table that scratch holds `B * H * ceil(N / BLOCK_N) * (2N - 1)` fp32 values).
    `atomic_dq=False` also selects the separate dQ kernel without the rest of the deterministic mode.
    """
    _check(q, k, v)
    num_tokens = q.shape[0]
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    has_rab_grad = rab is not None and rab_requires_grad
    drab = torch.zeros_like(rab) if has_rab_grad else None
    dposition = None if position_weights is None else torch.zeros_like(position_weights)
    dtime = None if time_weights is None else torch.zeros_like(time_weights)
    if num_tokens == 0 or max_seq_len <= 0:
        return dq, dk, dv, drab, dposition, dtime

    grad_out = _last_dim_contiguous(grad_out)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
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
    programs = num_sequences * num_heads
    atomic_dq = atomic_dq and not deterministic
    fixed = configs.deterministic_config(max(launch.dqk, launch.dv)) if deterministic else None
    num_key_programs = 0 if fixed is None else programs * triton.cdiv(max_seq_len, fixed["BLOCK_N"])

    # Accumulation targets of the dk/dv kernel.
    dq_accumulator = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic_dq else None
    drab_target, drab_atomic, drab_strides = None, False, (0, 0, 0, 0)
    if has_rab_grad:
        assert rab is not None
        broadcast = (rab.shape[0] == 1 and num_sequences > 1) or (rab.shape[1] == 1 and num_heads > 1)
        if not broadcast:
            drab_target = drab
            drab_strides = (drab.stride(0), drab.stride(1), drab.stride(2), drab.stride(3))
        elif deterministic:
            drab_target = torch.zeros(
                (num_sequences, num_heads, rab.shape[2], rab.shape[3]), dtype=torch.float32, device=q.device
            )
            drab_strides = drab_target.stride()
        else:
            drab_target = torch.zeros(rab.shape, dtype=torch.float32, device=q.device)
            drab_atomic = True
            drab_strides = (
                _broadcast_stride(drab_target, 0),
                _broadcast_stride(drab_target, 1),
                drab_target.stride(2),
                drab_target.stride(3),
            )
    dpos_target, dpos_stride = None, 0
    if position_weights is not None:
        if deterministic:
            dpos_target = torch.zeros((num_key_programs, 2 * max_seq_len - 1), dtype=torch.float32, device=q.device)
            dpos_stride = dpos_target.stride(0)
        else:
            dpos_target = torch.zeros(position_weights.shape, dtype=torch.float32, device=q.device)
            dpos_stride = _broadcast_stride(dpos_target, 0)
    dtime_target, dtime_stride = None, 0
    if time_weights is not None:
        if deterministic:
            dtime_target = torch.zeros((num_key_programs, time_weights.shape[1]), dtype=torch.float32, device=q.device)
            dtime_stride = dtime_target.stride(0)
        else:
            dtime_target = torch.zeros(time_weights.shape, dtype=torch.float32, device=q.device)
            dtime_stride = _broadcast_stride(dtime_target, 0)

    dq_target = dq_accumulator if atomic_dq else dq
    common_flags = dict(launch.flags)
    dkdv_args = (
        q,
        k,
        v,
        grad_out,
        dk,
        dv,
        dq_accumulator,
        seq_offsets,
        num_targets,
        launch.batch_order,
        launch.rab,
        drab_target,
        launch.position_weights,
        dpos_target,
        launch.time_weights,
        dtime_target,
        launch.timestamps,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        grad_out.stride(0),
        grad_out.stride(1),
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        dq_target.stride(0),
        dq_target.stride(1),
        *launch.rab_strides,
        *drab_strides,
        _table_stride(launch.position_weights),
        dpos_stride,
        _table_stride(launch.time_weights),
        dtime_stride,
    )
    dkdv_flags = {
        **common_flags,
        "HAS_DRAB": has_rab_grad,
        "DRAB_ATOMIC": drab_atomic,
        "ATOMIC_DQ": atomic_dq,
        "DETERMINISTIC": deterministic,
        "NUM_BUCKETS_P2": triton.next_power_of_2(max(launch.scalars["num_buckets"], 1)),
    }

    def key_grid(meta: dict[str, int]) -> tuple[int]:
        return (programs * triton.cdiv(max_seq_len, meta["BLOCK_N"]),)

    def query_grid(meta: dict[str, int]) -> tuple[int]:
        return (programs * triton.cdiv(max_seq_len, meta["BLOCK_M"]),)

    if fixed is None:
        configs.backward_dkdv[key_grid](*dkdv_args, **launch.scalars, **dkdv_flags)
    else:
        hstu_attn_backward_dkdv_kernel[key_grid(fixed)](*dkdv_args, **launch.scalars, **dkdv_flags, **fixed)

    if atomic_dq:
        assert dq_accumulator is not None
        dq = dq_accumulator.to(q.dtype)
    else:
        dq_args = (
            q,
            k,
            v,
            grad_out,
            dq,
            seq_offsets,
            num_targets,
            launch.batch_order,
            launch.rab,
            launch.position_weights,
            launch.time_weights,
            launch.timestamps,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            grad_out.stride(0),
            grad_out.stride(1),
            dq.stride(0),
            dq.stride(1),
            *launch.rab_strides,
            _table_stride(launch.position_weights),
            _table_stride(launch.time_weights),
        )
        if fixed is None:
            configs.backward_dq[query_grid](*dq_args, **launch.scalars, **common_flags)
        else:
            hstu_attn_backward_dq_kernel[query_grid(fixed)](*dq_args, **launch.scalars, **common_flags, **fixed)

    if has_rab_grad and drab_target is not drab:
        assert drab is not None and drab_target is not None and rab is not None
        reduced = drab_target
        if deterministic:
            if rab.shape[1] == 1:
                reduced = reduced.sum(dim=1, keepdim=True)
            if rab.shape[0] == 1:
                reduced = reduced.sum(dim=0, keepdim=True)
        drab.copy_(reduced)
    if position_weights is not None:
        assert dposition is not None and dpos_target is not None
        if deterministic:
            dposition.copy_(
                _fold_position_partials(dpos_target, num_sequences, num_heads, position_weights.shape, max_seq_len)
            )
        else:
            dposition.copy_(dpos_target)
    if time_weights is not None:
        assert dtime is not None and dtime_target is not None
        if deterministic:
            per_head = dtime_target.view(num_sequences, num_heads, -1, time_weights.shape[1]).sum(dim=(0, 2))
            dtime.copy_(per_head.sum(dim=0, keepdim=True) if time_weights.shape[0] == 1 else per_head)
        else:
            dtime.copy_(dtime_target)
    return dq, dk, dv, drab, dposition, dtime


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
