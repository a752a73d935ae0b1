"""Input checks of `hstu_attn_varlen_func`, with errors that name the problem.

`check_arguments` looks only at shapes, dtypes, devices and Python scalars, so `torch.compile` traces it without a
graph break. `check_offsets_and_targets` reads tensor values (one host sync on CUDA) and runs inside the custom op;
by default it checks each offsets tensor once (see `set_value_checks`), so the layers of a model that share one
offsets tensor pay one sync per batch, and repeated calls on the same batch none.
"""

from __future__ import annotations

import os
import weakref
from collections import deque

import torch
from torch import Tensor

from hstu_attn.backend import TRITON_DTYPES, TRITON_HEAD_DIMS, KernelBackend
from hstu_attn.cutlass import cutlass_unsupported
from hstu_attn.relative_bias import RelativeBias

FLOATING_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _check_device(name: str, tensor: Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but q is on {device}; all inputs must share one device")


def check_arguments(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    *,
    alpha: float | None,
    num_targets: Tensor | None,
    contextual_seq_len: int,
    max_attn_len: int,
    scaling_seqlen: int | None,
    rab: Tensor | None,
    relative_bias: RelativeBias | None,
    backend: KernelBackend,
) -> None:
    """Raise TypeError/ValueError/NotImplementedError on any input `hstu_attn_varlen_func` cannot take.

    The checks run in a fixed order (the first failing one raises): tensor types, q/k/v shapes, dtypes and devices,
    backend support, offsets, scalar options, num_targets, rab, relative_bias.
    """
    _check_tensor_types(q=q, k=k, v=v, seq_offsets=seq_offsets)
    _check_qkv_shapes(q, k, v)
    _check_qkv_dtypes_and_devices(q, k, v)
    _check_backend_support(q, v, rab, relative_bias, backend)
    num_sequences = _check_seq_offsets(seq_offsets, q.device)
    _check_scalar_options(max_seq_len, alpha, contextual_seq_len, max_attn_len, scaling_seqlen)
    if num_targets is not None:
        _check_num_targets(num_targets, num_sequences, q.device)
    if rab is not None:
        _check_rab(rab, q, num_sequences, max_seq_len)
    if relative_bias is not None:
        _check_relative_bias(relative_bias, q)


def _check_tensor_types(**tensors: Tensor) -> None:
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")


def _check_qkv_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be 3-D jagged tensors [L, H, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q [L, H, Dqk]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be [L, H, Dv] with q's L and H; got q {tuple(q.shape)}, v {tuple(v.shape)}")


def _check_qkv_dtypes_and_devices(q: Tensor, k: Tensor, v: Tensor) -> None:
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.dtype not in FLOATING_DTYPES:
        raise TypeError(f"q, k, v dtype {q.dtype} is not supported; use float32, bfloat16, float16 or float64")
    _check_device("k", k, q.device)
    _check_device("v", v, q.device)


def _check_backend_support(
    q: Tensor, v: Tensor, rab: Tensor | None, relative_bias: RelativeBias | None, backend: KernelBackend
) -> None:
    """The dtypes, head dims and options that an explicitly chosen CUTLASS or TRITON backend cannot take."""
    if backend is KernelBackend.CUTLASS:
        reason = cutlass_unsupported(q, v, has_rab=rab is not None, relative_bias=relative_bias)
        if reason is not None:
            raise NotImplementedError(f"{reason} (or use backend=KernelBackend.TRITON, PYTORCH or AUTO)")
    if backend is KernelBackend.TRITON:
        if q.dtype not in TRITON_DTYPES:
            raise TypeError(f"the TRITON backend supports float32, bfloat16 and float16; got {q.dtype}")
        for name, dim in (("Dqk", q.shape[2]), ("Dv", v.shape[2])):
            if dim not in TRITON_HEAD_DIMS:
                raise ValueError(
                    f"the TRITON backend supports head dims {TRITON_HEAD_DIMS}; got {name}={dim} "
                    "(use backend=KernelBackend.PYTORCH or AUTO for other sizes)"
                )


def _check_seq_offsets(seq_offsets: Tensor, device: torch.device) -> int:
    """Shape, dtype and device of `seq_offsets` (its values are checked in the op); returns B, the sequence count."""
    if seq_offsets.dim() != 1 or seq_offsets.numel() < 1:
        raise ValueError(f"seq_offsets must be 1-D [B+1] with B >= 0; got shape {tuple(seq_offsets.shape)}")
    if seq_offsets.dtype not in INDEX_DTYPES:
        raise TypeError(f"seq_offsets must be int32 or int64; got {seq_offsets.dtype}")
    _check_device("seq_offsets", seq_offsets, device)
    return seq_offsets.numel() - 1


def _check_scalar_options(
    max_seq_len: int, alpha: float | None, contextual_seq_len: int, max_attn_len: int, scaling_seqlen: int | None
) -> None:
    if max_seq_len < 0:
        raise ValueError(f"max_seq_len must be >= 0; got {max_seq_len}")
    if alpha is not None and not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a Python float or None; got {type(alpha).__name__}")
    if contextual_seq_len < 0:
        raise ValueError(f"contextual_seq_len must be >= 0; got {contextual_seq_len}")
    if max_attn_len < 0:
        raise ValueError(f"max_attn_len must be >= 0 (0 = unlimited); got {max_attn_len}")
    if scaling_seqlen is not None and scaling_seqlen <= 0:
        raise ValueError(f"scaling_seqlen must be > 0 (or None for max_seq_len); got {scaling_seqlen}")


def _check_num_targets(num_targets: Tensor, num_sequences: int, device: torch.device) -> None:
    if num_targets.dim() != 1 or num_targets.numel() != num_sequences:
        raise ValueError(
            f"num_targets must be 1-D [B] = [{num_sequences}] (one count per sequence); "
            f"got shape {tuple(num_targets.shape)}"
        )
    if num_targets.dtype not in INDEX_DTYPES:
        raise TypeError(f"num_targets must be int32 or int64; got {num_targets.dtype}")
    _check_device("num_targets", num_targets, device)


def _check_rab(rab: Tensor, q: Tensor, num_sequences: int, max_seq_len: int) -> None:
    expected = f"[B, H or 1, N, N] = [{num_sequences}, {q.shape[1]} or 1, {max_seq_len}, {max_seq_len}]"
    if rab.dim() != 4 or rab.shape[0] != num_sequences or rab.shape[2:] != (max_seq_len, max_seq_len):
        raise ValueError(f"rab must have shape {expected}; got {tuple(rab.shape)}")
    if rab.shape[1] not in (1, q.shape[1]):
        raise ValueError(f"rab must have shape {expected}; got {rab.shape[1]} heads")
    if rab.dtype != q.dtype:
        raise TypeError(f"rab must have q's dtype {q.dtype}; got {rab.dtype}")
    _check_device("rab", rab, q.device)


def _check_relative_bias(relative_bias: RelativeBias, q: Tensor) -> None:
    if not isinstance(relative_bias, RelativeBias):
        raise TypeError(f"relative_bias must be a hstu_attn.RelativeBias; got {type(relative_bias).__name__}")
    relative_bias.check_num_heads(q.shape[1])
    for name in ("position_weights", "time_weights", "timestamps"):
        tensor = getattr(relative_bias, name)
        if tensor is not None:
            _check_device(f"relative_bias.{name}", tensor, q.device)
    if relative_bias.timestamps is not None and relative_bias.timestamps.shape[0] != q.shape[0]:
        raise ValueError(
            f"relative_bias.timestamps must have one entry per token [L] = [{q.shape[0]}]; "
            f"got {tuple(relative_bias.timestamps.shape)}"
        )


VALUE_CHECK_MODES = ("new", "always", "off")
_CHECKED_CAPACITY = 8


class _ValueChecks:
    """Which value checks have passed: one record per recently checked (offsets, targets, L, N) combination.

    A record holds weak references and the tensors' version counters, so an in-place change of a checked tensor, or
    a new tensor at a reused address, is checked again.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._records: deque[tuple] = deque(maxlen=_CHECKED_CAPACITY)

    @staticmethod
    def _matches(record: tuple, offsets: Tensor, targets: Tensor | None, num_tokens: int, max_seq_len: int) -> bool:
        offsets_ref, offsets_version, targets_ref, targets_version, tokens, longest_allowed = record
        if offsets_ref() is not offsets or offsets_version != offsets._version:
            return False
        if tokens != num_tokens or longest_allowed > max_seq_len:
            return False
        if targets is None:
            return targets_ref is None
        return targets_ref is not None and targets_ref() is targets and targets_version == targets._version

    def needed(self, offsets: Tensor, targets: Tensor | None, num_tokens: int, max_seq_len: int) -> bool:
        if self.mode == "off":
            return False
        if self.mode == "always":
            return True
        return not any(self._matches(r, offsets, targets, num_tokens, max_seq_len) for r in self._records)

    def passed(self, offsets: Tensor, targets: Tensor | None, num_tokens: int, max_seq_len: int) -> None:
        targets_ref = None if targets is None else weakref.ref(targets)
        targets_version = None if targets is None else targets._version
        self._records.append(
            (weakref.ref(offsets), offsets._version, targets_ref, targets_version, num_tokens, max_seq_len)
        )


def _mode_from_environment() -> str:
    mode = os.environ.get("HSTU_ATTN_VALUE_CHECKS", "new")
    if mode not in VALUE_CHECK_MODES:
        raise ValueError(f"HSTU_ATTN_VALUE_CHECKS must be one of {VALUE_CHECK_MODES}; got {mode!r}")
    return mode


_value_checks = _ValueChecks(_mode_from_environment())


def set_value_checks(mode: str) -> str:
    """Choose when `hstu_attn_varlen_func` checks the values of `seq_offsets` and `num_targets`; returns the old mode.

    "new" (default; environment `HSTU_ATTN_VALUE_CHECKS`): once per offsets/targets tensor (a tensor changed in
    place counts as new), one device-to-host read each time. "always": on every call (debugging). "off": never.
    The checks on shapes, dtypes and devices always run; they read no values.
    """
    if mode not in VALUE_CHECK_MODES:
        raise ValueError(f"value-check mode must be one of {VALUE_CHECK_MODES}; got {mode!r}")
    previous, _value_checks.mode = _value_checks.mode, mode
    return previous


def check_offsets_and_targets(
    seq_offsets: Tensor, num_tokens: int, max_seq_len: int, num_targets: Tensor | None
) -> None:
    """Check the values of `seq_offsets` (and `num_targets`) against the inputs (one host sync), unless the same
    tensors already passed for these sizes (see `set_value_checks`)."""
    if not _value_checks.needed(seq_offsets, num_targets, num_tokens, max_seq_len):
        return
    _check_values(seq_offsets, num_tokens, max_seq_len, num_targets)
    _value_checks.passed(seq_offsets, num_targets, num_tokens, max_seq_len)


def _check_values(seq_offsets: Tensor, num_tokens: int, max_seq_len: int, num_targets: Tensor | None) -> None:
    offsets = seq_offsets.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    longest = lengths.max() if lengths.numel() else offsets.new_zeros(())
    facts = [offsets[0], offsets[-1], lengths.min() if lengths.numel() else offsets.new_zeros(()), longest]
    if num_targets is not None:
        targets = num_targets.to(torch.int64)
        facts.append((targets < 0).any().to(torch.int64))
        facts.append((targets > lengths).any().to(torch.int64))
    first, last, shortest, longest_value, *target_facts = torch.stack(facts).tolist()
    if first != 0:
        raise ValueError(f"seq_offsets must start at 0; got seq_offsets[0] = {first}")
    if shortest < 0:
        raise ValueError("seq_offsets must be non-decreasing; found a negative sequence length")
    if last != num_tokens:
        raise ValueError(f"seq_offsets[-1] must equal the number of tokens L = {num_tokens}; got {last}")
    if longest_value > max_seq_len:
        raise ValueError(f"max_seq_len = {max_seq_len} is smaller than the longest sequence ({longest_value})")
    if target_facts and target_facts[0]:
        raise ValueError("num_targets must be >= 0")
    if target_facts and target_facts[1]:
        raise ValueError("num_targets must not exceed its sequence's length (0 <= num_targets[b] <= length[b])")
