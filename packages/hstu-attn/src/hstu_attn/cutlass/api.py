"""The CUTLASS/CuTe forward and backward kernels called on torch tensors, and what they support."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from hstu_attn.cutlass import _library

__all__ = [
    "CUTLASS_BACKWARD_HEAD_DIMS",
    "CUTLASS_DTYPES",
    "CUTLASS_HEAD_DIMS",
    "cutlass_available",
    "cutlass_unsupported",
    "hstu_attn_cutlass_backward",
    "hstu_attn_cutlass_forward",
]

CUTLASS_HEAD_DIMS = (64, 128, 256)
CUTLASS_BACKWARD_HEAD_DIMS = (64, 128)
CUTLASS_DTYPES = (torch.bfloat16, torch.float16)
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}


def cutlass_available() -> bool:
    """Whether the compiled library is present and loads with the ABI this package expects."""
    return not isinstance(_library.load(), str)


def cutlass_unsupported(q: Tensor, v: Tensor, *, has_rab: bool, has_relative_bias: bool) -> str | None:
    """Why the CUTLASS backend cannot take these inputs (a sentence), or None when it can."""
    library = _library.load()
    if isinstance(library, str):
        return library
    if q.dtype not in CUTLASS_DTYPES:
        return f"the CUTLASS backend supports bfloat16 and float16; got {q.dtype}"
    if q.shape[2] != v.shape[2] or q.shape[2] not in CUTLASS_HEAD_DIMS:
        return f"the CUTLASS backend supports Dqk == Dv in {CUTLASS_HEAD_DIMS}; got Dqk={q.shape[2]}, Dv={v.shape[2]}"
    if has_rab or has_relative_bias:
        return "the CUTLASS backend has no rab or relative_bias yet; use backend=KernelBackend.TRITON"
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
    return x if x.stride(2) == 1 else x.contiguous()


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
) -> Tensor:
    """Forward on the compiled kernels. q, k, v `[L, H, D]` (bf16/fp16, D in 64/128/256, one CUDA device),
    `seq_offsets [B+1]`, `num_targets [B]` or None (int32/int64, already validated); `scale` = 1 / scaling_seqlen.

    Returns `[L, H, D]` in q's dtype.
    """
    _check_same_layout(q=q, k=k, v=v)
    library = _library.load()
    if isinstance(library, str):
        raise NotImplementedError(library)
    q, k, v = _rows(q), _rows(k), _rows(v)
    seq_offsets = seq_offsets.contiguous()
    num_targets = None if num_targets is None else num_targets.contiguous()
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    params = _library.FwdParams(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(),
        **_strides(q=q, k=k, v=v, o=out),
        **_common_fields(q, seq_offsets, num_targets, max_seq_len, alpha, scale, causal, contextual_seq_len,
                         max_attn_len),
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
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward on the compiled kernels: `(dq, dk, dv)`, each `[L, H, D]` in q's dtype. Takes what
    :func:`hstu_attn_cutlass_forward` takes plus `grad_out [L, H, D]`; D must be in `CUTLASS_BACKWARD_HEAD_DIMS`.
    dq is summed in fp32 (atomics over key blocks) and cast once at the end.
    """
    _check_same_layout(q=q, k=k, v=v, grad_out=grad_out)
    library = _library.load()
    if isinstance(library, str):
        raise NotImplementedError(library)
    grad_out, q, k, v = _rows(grad_out), _rows(q), _rows(k), _rows(v)
    seq_offsets = seq_offsets.contiguous()
    num_targets = None if num_targets is None else num_targets.contiguous()
    dq_accum = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk, dv = torch.empty_like(k, memory_format=torch.contiguous_format), torch.empty_like(v)
    params = _library.BwdParams(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), dout=grad_out.data_ptr(), dq_accum=dq_accum.data_ptr(),
        dk=dk.data_ptr(), dv=dv.data_ptr(),
        **_strides(q=q, k=k, v=v, do=grad_out, dq=dq_accum, dk=dk, dv=dv),
        **_common_fields(q, seq_offsets, num_targets, max_seq_len, alpha, scale, causal, contextual_seq_len,
                         max_attn_len),
    )  # fmt: skip
    if q.shape[0] > 0:
        _launch(library, "backward", params, q.device)
    return dq_accum.to(q.dtype), dk, dv


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
