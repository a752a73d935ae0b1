"""The CUTLASS/CuTe forward and backward kernels called on torch tensors, and what they support."""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

from hstu_attn.cutlass import _library
from hstu_attn.relative_bias import RelativeBias

__all__ = [
    "CUTLASS_BACKWARD_HEAD_DIMS",
    "CUTLASS_DTYPES",
    "CUTLASS_HEAD_DIMS",
    "CUTLASS_TIMESTAMP_DTYPES",
    "cutlass_available",
    "cutlass_unsupported",
    "hstu_attn_cutlass_backward",
    "hstu_attn_cutlass_forward",
]

CUTLASS_HEAD_DIMS = (64, 128, 256)
CUTLASS_BACKWARD_HEAD_DIMS = (64, 128)
CUTLASS_DTYPES = (torch.bfloat16, torch.float16)
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}
# HstuAttnTimestampDtype of csrc/hstu_attn_cutlass.h.
_TIMESTAMP_DTYPE_CODES = {
    torch.int32: 0,
    torch.int64: 1,
    torch.float32: 2,
    torch.float64: 3,
    torch.float16: 4,
    torch.bfloat16: 5,
}
CUTLASS_TIMESTAMP_DTYPES = tuple(_TIMESTAMP_DTYPE_CODES)


def cutlass_available() -> bool:
    """Whether the compiled library is present and loads with the ABI this package expects."""
    return not isinstance(_library.load(), str)


def cutlass_unsupported(
    q: Tensor, v: Tensor, *, has_rab: bool, relative_bias: RelativeBias | None = None
) -> str | None:
    """Why the CUTLASS backend cannot take these inputs (a sentence), or None when it can.

    A materialized `rab` is supported (`has_rab` never makes it refuse), and so is the fused `relative_bias`, alone or
    beside rab, with timestamps of a dtype in `CUTLASS_TIMESTAMP_DTYPES`.
    """
    library = _library.load()
    if isinstance(library, str):
        return library
    if q.dtype not in CUTLASS_DTYPES:
        return f"the CUTLASS backend supports bfloat16 and float16; got {q.dtype}"
    if q.shape[2] != v.shape[2] or q.shape[2] not in CUTLASS_HEAD_DIMS:
        return f"the CUTLASS backend supports Dqk == Dv in {CUTLASS_HEAD_DIMS}; got Dqk={q.shape[2]}, Dv={v.shape[2]}"
    # (a relative_bias that is no RelativeBias is named by the argument checks that follow)
    has_times = isinstance(relative_bias, RelativeBias) and relative_bias.time_weights is not None
    timestamps = relative_bias.timestamps if has_times else None
    if timestamps is not None and timestamps.dtype not in CUTLASS_TIMESTAMP_DTYPES:
        return (
            f"the CUTLASS backend takes relative_bias.timestamps of dtype int32, int64, float32, float64, float16 or "
            f"bfloat16; got {timestamps.dtype}"
        )
    if not q.is_cuda:
        return f"the CUTLASS backend needs CUDA tensors; got {q.device}"
    return None


def _check_same_layout(**tensors: Tensor) -> None:
    """The compiled kernels read every tensor as q's dtype and [L, H, D] shape: say which one differs."""
    (first_name, first), *others = tensors.items()
    if first.dtype not in CUTLASS_DTYPES:
        raise ValueError(f"the CUTLASS kernels take bfloat16 or float16; {first_name} is {first.dtype}")
    for name, tensor in others:
        if tensor.dtype != first.dtype or tensor.shape != first.shape:
            raise ValueError(
                f"{name} must have {first_name}'s dtype and shape ({first.dtype}, {tuple(first.shape)}); "
                f"got {tensor.dtype}, {tuple(tensor.shape)}"
            )


def _rows(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_rab(rab: Tensor, q: Tensor, num_sequences: int, max_seq_len: int) -> None:
    """rab must be `[B, H or 1, >= N, >= N]` in q's dtype on q's device: say what differs."""
    heads = q.shape[1]
    if rab.dtype != q.dtype:
        raise ValueError(f"rab must have q's dtype {q.dtype}; got {rab.dtype}")
    if (
        rab.dim() != 4
        or rab.shape[0] != num_sequences
        or rab.shape[1] not in (1, heads)
        or min(rab.shape[2:]) < max_seq_len
    ):
        raise ValueError(
            f"rab must be [B={num_sequences}, H={heads} or 1, >={max_seq_len}, >={max_seq_len}]; got {tuple(rab.shape)}"
        )
    if rab.device != q.device:
        raise ValueError(f"rab must be on q's device {q.device}; got {rab.device}")


def _float32(x: float) -> float:
    """`x` rounded to the nearest float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclass
class _KernelRelativeBias:
    """The fused relative bias as the kernels read it: fp32 contiguous tables `[Hb, width]` and contiguous timestamps
    `[L]` on q's device (None when absent; they must outlive the launch), and the params that point at them."""

    position: Tensor | None
    time: Tensor | None
    timestamps: Tensor | None
    params: _library.RelativeBiasParams

    def gradient_buffers(self) -> tuple[Tensor | None, Tensor | None]:
        """Zeroed fp32 buffers shaped and strided like the fp32 tables, which the backward kernel adds into."""
        position = None if self.position is None else torch.zeros_like(self.position)
        return position, None if self.time is None else torch.zeros_like(self.time)


def _check_relative_bias(bias: RelativeBias, q: Tensor) -> None:
    """The tables must have 1 or H rows, and they and the timestamps `[L]` of a supported dtype must be on q's
    device: say what differs."""
    bias.check_num_heads(q.shape[1])
    for name in ("position_weights", "time_weights", "timestamps"):
        tensor = getattr(bias, name)
        if tensor is not None and tensor.device != q.device:
            raise ValueError(f"relative_bias.{name} must be on q's device {q.device}; got {tensor.device}")
    if bias.time_weights is None:
        return
    assert bias.timestamps is not None  # RelativeBias.__post_init__
    if bias.timestamps.dtype not in CUTLASS_TIMESTAMP_DTYPES:
        raise ValueError(
            f"relative_bias.timestamps must be one of {CUTLASS_TIMESTAMP_DTYPES} for the CUTLASS kernels; got "
            f"{bias.timestamps.dtype}"
        )
    if tuple(bias.timestamps.shape) != (q.shape[0],):
        raise ValueError(f"relative_bias.timestamps must be [L] = [{q.shape[0]}]; got {tuple(bias.timestamps.shape)}")


def _fp32_table(table: Tensor | None) -> Tensor | None:
    return None if table is None else table.detach().to(torch.float32).contiguous()


def _kernel_relative_bias(bias: RelativeBias | None, q: Tensor) -> _KernelRelativeBias:
    """The checked `relative_bias` (or None: all-zero params, no bias) prepared for the kernels."""
    if bias is None:
        return _KernelRelativeBias(None, None, None, _library.RelativeBiasParams())
    _check_relative_bias(bias, q)
    position, time = _fp32_table(bias.position_weights), _fp32_table(bias.time_weights)
    timestamps = None if time is None or bias.timestamps is None else bias.timestamps.contiguous()
    params = _library.RelativeBiasParams(
        position_weights=None if position is None else position.data_ptr(),
        time_weights=None if time is None else time.data_ptr(),
        timestamps=None if timestamps is None else timestamps.data_ptr(),
        position_head_stride=0 if position is None or position.shape[0] == 1 else position.stride(0),
        time_head_stride=0 if time is None or time.shape[0] == 1 else time.stride(0),
        position_reach=bias.max_relative_distance,
        num_time_buckets=bias.num_time_buckets,
        timestamps_dtype=0 if timestamps is None else _TIMESTAMP_DTYPE_CODES[timestamps.dtype],
        # the reference divides by the divisor the way PyTorch's CUDA kernel does: times its fp32 reciprocal
        inv_time_bucket_divisor=1.0 / _float32(bias.time_bucket_divisor),
    )
    return _KernelRelativeBias(position, time, timestamps, params)


def _bias_strides(name: str, bias: Tensor | None) -> dict[str, int]:
    """`{name}_batch/head/row_stride` of a `[B, H or 1, N, N]` bias (head stride 0 when shared by the heads)."""
    if bias is None:
        return {f"{name}_{kind}_stride": 0 for kind in ("batch", "head", "row")}
    head_stride = 0 if bias.shape[1] == 1 else bias.stride(1)
    return {
        f"{name}_batch_stride": bias.stride(0),
        f"{name}_head_stride": head_stride,
        f"{name}_row_stride": bias.stride(2),
    }


def hstu_attn_cutlass_forward(
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
    rab: Tensor | None = None,
    relative_bias: RelativeBias | None = None,
) -> Tensor:
    """Forward on the compiled kernels. q, k, v `[L, H, D]` (bf16/fp16, D in 64/128/256, one CUDA device),
    `seq_offsets [B+1]`, `num_targets [B]` or None (int32/int64, already validated); `scale` = 1 / scaling_seqlen;
    `rab [B, H or 1, >= N, >= N]` in q's dtype (indexed by in-sequence positions, added to alpha q k^T) or None;
    `relative_bias` (tables `[1 or H, width]`, any floating dtype, read as fp32; timestamps `[L]` of a dtype in
    `CUTLASS_TIMESTAMP_DTYPES`) computed inside the kernel and added beside rab, or None.

    Returns `[L, H, D]` in q's dtype.
    """
    _check_same_layout(q=q, k=k, v=v)
    if rab is not None:
        _check_rab(rab, q, seq_offsets.numel() - 1, max_seq_len)
    fused = _kernel_relative_bias(relative_bias, q)
    library = _library.load()
    if isinstance(library, str):
        raise NotImplementedError(library)
    q, k, v = _rows(q), _rows(k), _rows(v)
    rab = None if rab is None else _rows(rab)
    seq_offsets = seq_offsets.contiguous()
    num_targets = None if num_targets is None else num_targets.contiguous()
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    params = _library.FwdParams(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(),
        rab=None if rab is None else rab.data_ptr(), **_bias_strides("rab", rab),
        **_strides(q=q, k=k, v=v, o=out),
        **_common_fields(q, seq_offsets, num_targets, max_seq_len, alpha, scale, causal, contextual_seq_len,
                         max_attn_len),
        relative_bias=fused.params, num_tokens=q.shape[0],
    )  # fmt: skip
    if q.shape[0] > 0:
        _launch(library, "forward", params, q.device)
    return out


def hstu_attn_cutlass_backward(
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
    rab: Tensor | None = None,
    rab_requires_grad: bool = True,
    relative_bias: RelativeBias | None = None,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Backward on the compiled kernels: `(dq, dk, dv, drab, dposition_weights, dtime_weights)`, dq/dk/dv `[L, H, D]`
    in q's dtype. Takes what :func:`hstu_attn_cutlass_forward` takes plus `grad_out [L, H, D]`; D must be in
    `CUTLASS_BACKWARD_HEAD_DIMS`. dq is summed in fp32 (atomics over key blocks) and cast once at the end.

    drab is rab's gradient, shaped like rab in its dtype (zero at invalid pairs and past each sequence's end), or None
    without rab or with `rab_requires_grad=False`. A per-head rab's gradient is stored by the kernel once per entry; a
    rab shared by the heads (`[B, 1, N, N]`, H > 1) gets the sum over heads, added with fp32 atomics into an fp32
    `[B, 1, N, N]` buffer (the Triton backend's non-deterministic scheme; so its bits may vary between runs) and cast.

    dposition_weights / dtime_weights are the relative-bias tables' gradients in their shapes and dtypes (None without
    that table): the sum of dS over the valid pairs of each column (and over heads for a shared row), summed per CTA in
    shared memory, added with fp32 atomics into fp32 buffers (bits may vary between runs) and cast.

    `deterministic=True` adds each key block's dQ in a fixed order instead (plain loads and stores in turn, one int32
    counter per sequence, head and 64-row query block), so every result repeats its bits; the SM80-style kernel runs
    (not the Hopper one). It raises NotImplementedError beside a fused relative bias or a shared rab that needs its
    gradient, whose sums stay atomic (`hstu_attn_varlen_func` runs the Triton backward for those).
    """
    _check_same_layout(q=q, k=k, v=v, grad_out=grad_out)
    if rab is not None:
        _check_rab(rab, q, seq_offsets.numel() - 1, max_seq_len)
    fused = _kernel_relative_bias(relative_bias, q)
    library = _library.load()
    if isinstance(library, str):
        raise NotImplementedError(library)
    grad_out, q, k, v = _rows(grad_out), _rows(q), _rows(k), _rows(v)
    rab = None if rab is None else _rows(rab)
    drab_target, drab_atomic = _rab_gradient_target(rab if rab_requires_grad else None, q.shape[1])
    if deterministic and (relative_bias is not None or drab_atomic):
        raise NotImplementedError(
            "the deterministic CUTLASS backward has no fixed-order sum for "
            + ("the relative-bias tables' gradients" if relative_bias is not None else "a rab shared by the heads")
            + " (hstu_attn_varlen_func(..., deterministic=True) runs the Triton backward for it)"
        )
    dq_semaphore = _dq_semaphore(seq_offsets.numel() - 1, q.shape[1], max_seq_len, q.device) if deterministic else None
    seq_offsets = seq_offsets.contiguous()
    num_targets = None if num_targets is None else num_targets.contiguous()
    dq_accum = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk, dv = torch.empty_like(k, memory_format=torch.contiguous_format), torch.empty_like(v)
    dposition, dtime = fused.gradient_buffers()
    params = _library.BwdParams(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), dout=grad_out.data_ptr(), dq_accum=dq_accum.data_ptr(),
        dk=dk.data_ptr(), dv=dv.data_ptr(),
        rab=None if rab is None else rab.data_ptr(), **_bias_strides("rab", rab),
        drab=None if drab_target is None else drab_target.data_ptr(), **_bias_strides("drab", drab_target),
        drab_atomic=drab_atomic,
        **_strides(q=q, k=k, v=v, do=grad_out, dq=dq_accum, dk=dk, dv=dv),
        **_common_fields(q, seq_offsets, num_targets, max_seq_len, alpha, scale, causal, contextual_seq_len,
                         max_attn_len),
        relative_bias=fused.params,
        dposition_weights=None if dposition is None else dposition.data_ptr(),
        dtime_weights=None if dtime is None else dtime.data_ptr(), num_tokens=q.shape[0],
        dq_semaphore=None if dq_semaphore is None else dq_semaphore.data_ptr(),
        dq_semaphore_stride=0 if dq_semaphore is None else dq_semaphore.shape[-1],
    )  # fmt: skip
    if q.shape[0] > 0:
        _launch(library, "backward", params, q.device)
    drab = None if drab_target is None else drab_target.to(q.dtype)  # rab has q's dtype (_check_rab)
    table_grads = _cast_table_gradients(relative_bias, dposition, dtime)
    return dq_accum.to(q.dtype), dk, dv, drab, *table_grads


def _dq_semaphore(num_sequences: int, num_heads: int, max_seq_len: int, device: torch.device) -> Tensor:
    """Zeroed int32 counters `[B, H, ceil(N / 64)]` of the deterministic dQ (one per 64-row query block)."""
    return torch.zeros(num_sequences, num_heads, max(1, -(-max_seq_len // 64)), dtype=torch.int32, device=device)


def _cast_table_gradients(
    bias: RelativeBias | None, dposition: Tensor | None, dtime: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """The fp32 table gradients in their tables' dtypes (None for an absent table)."""
    if bias is None:
        return None, None
    return (
        None if dposition is None or bias.position_weights is None else dposition.to(bias.position_weights.dtype),
        None if dtime is None or bias.time_weights is None else dtime.to(bias.time_weights.dtype),
    )


def _rab_gradient_target(rab: Tensor | None, num_heads: int) -> tuple[Tensor | None, bool]:
    """The zeroed buffer the backward kernel writes rab's gradient into, and whether it adds with atomics: rab's
    shape and dtype for a per-head rab (or H == 1), else fp32 `[B, 1, N, N]` that every head adds into."""
    if rab is None:
        return None, False
    if rab.shape[1] == num_heads:
        return torch.zeros(rab.shape, dtype=rab.dtype, device=rab.device), False
    return torch.zeros(rab.shape, dtype=torch.float32, device=rab.device), True


def _strides(**tensors: Tensor) -> dict[str, int]:
    return {
        f"{name}_{kind}_stride": t.stride(axis)
        for name, t in tensors.items()
        for axis, kind in ((0, "row"), (1, "head"))
    }


def _common_fields(
    q: Tensor, seq_offsets: Tensor, num_targets: Tensor | None, max_seq_len: int, alpha: float, scale: float,
    causal: bool, contextual_seq_len: int, max_attn_len: int,
) -> dict[str, object]:  # fmt: skip
    """The params fields that forward and backward share (sequence layout, mask, scales)."""
    return {
        "seq_offsets": seq_offsets.data_ptr(),
        "num_targets": None if num_targets is None else num_targets.data_ptr(),
        "num_sequences": seq_offsets.numel() - 1, "num_heads": q.shape[1], "head_dim": q.shape[2],
        "max_seq_len": max_seq_len, "dtype": _DTYPE_CODES[q.dtype], "offsets_int64": seq_offsets.dtype == torch.int64,
        "targets_int64": num_targets is not None and num_targets.dtype == torch.int64, "causal": causal,
        "contextual_seq_len": contextual_seq_len, "max_attn_len": max_attn_len, "alpha": alpha, "inv_scaling": scale,
    }  # fmt: skip


def _launch(library: ctypes.CDLL, direction: str, params: ctypes.Structure, device: torch.device) -> None:
    stream = torch.cuda.current_stream(device).cuda_stream
    with torch.cuda.device(device):
        status = getattr(library, f"hstu_attn_cutlass_{direction}")(ctypes.byref(params), ctypes.c_void_p(stream))
    if status != 0:
        message = library.hstu_attn_cutlass_status_string(status).decode()
        raise RuntimeError(f"hstu-attn CUTLASS {direction} failed (status {status}): {message}")
