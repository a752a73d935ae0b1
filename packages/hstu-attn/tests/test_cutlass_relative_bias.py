"""The CUTLASS backend's Python side of the fused relative bias, on CPU: the checks of the direct entry points (they run
before the library is loaded), the params that describe the tables and timestamps to the kernels, and the gradient
buffers the backward kernel adds into and their cast to the tables' dtypes."""

from __future__ import annotations

import ctypes
import re
import struct
from pathlib import Path

import pytest
import torch

from hstu_attn import RelativeBias
from hstu_attn.cutlass import CUTLASS_TIMESTAMP_DTYPES, hstu_attn_cutlass_backward, hstu_attn_cutlass_forward
from hstu_attn.cutlass.api import _TIMESTAMP_DTYPE_CODES, _cast_table_gradients, _kernel_relative_bias

OPTIONS = dict(alpha=0.1, scale=0.1, causal=True, num_targets=None, contextual_seq_len=0, max_attn_len=0)


def _qkv() -> list[torch.Tensor]:
    return [torch.randn(7, 2, 64).to(torch.bfloat16) for _ in range(3)]


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def test_timestamp_codes_are_the_c_enum() -> None:
    """The timestamp type codes the params carry are HstuAttnTimestampDtype's values in the C header, one per dtype
    the backend takes."""
    header = (Path(__file__).resolve().parents[1] / "csrc" / "hstu_attn_cutlass.h").read_text()
    enum = {name: int(value) for name, value in re.findall(r"HSTU_ATTN_TIMESTAMPS_(\w+) = (\d+)", header)}
    names = {torch.int32: "INT32", torch.int64: "INT64", torch.float32: "FP32", torch.float64: "FP64"}
    names |= {torch.float16: "FP16", torch.bfloat16: "BF16"}
    assert {dtype: enum[name] for dtype, name in names.items()} == _TIMESTAMP_DTYPE_CODES
    assert len(enum) == len(names) and set(CUTLASS_TIMESTAMP_DTYPES) == set(names)


@pytest.mark.parametrize("timestamps_dtype", CUTLASS_TIMESTAMP_DTYPES, ids=str)
def test_params_of_per_head_position_and_shared_time_tables(timestamps_dtype: torch.dtype) -> None:
    """Tables become fp32 contiguous copies the params point at, with head stride = width per head and 0 for a
    shared row; reach = M - 1, bucket count, timestamp type code and the fp32 reciprocal of the divisor."""
    q = _qkv()[0]
    position = torch.randn(2, 9, dtype=torch.bfloat16)
    time = torch.randn(5, 1, dtype=torch.float64).t()  # [1, 5], a transposed (non-contiguous) view
    timestamps = torch.arange(7).to(timestamps_dtype)
    bias = RelativeBias(position, time, timestamps, time_bucket_divisor=0.3)
    fused = _kernel_relative_bias(bias, q)
    assert fused.position.dtype == fused.time.dtype == torch.float32
    assert fused.position.is_contiguous() and fused.time.is_contiguous()
    assert torch.equal(fused.position, position.float()) and torch.equal(fused.time, time.float())
    params = fused.params
    assert params.position_weights == fused.position.data_ptr() and params.time_weights == fused.time.data_ptr()
    assert params.timestamps == fused.timestamps.data_ptr() and fused.timestamps.dtype == timestamps_dtype
    assert (params.position_head_stride, params.time_head_stride) == (9, 0)
    assert (params.position_reach, params.num_time_buckets) == (4, 5)
    assert params.timestamps_dtype == _TIMESTAMP_DTYPE_CODES[timestamps_dtype]
    assert params.inv_time_bucket_divisor == _float32(1.0 / _float32(0.3))


def test_params_of_a_position_table_alone_and_of_no_bias() -> None:
    """Without a time table the timestamps are neither kept nor pointed at; no bias gives all-zero params."""
    q = _qkv()[0]
    bias = RelativeBias(position_weights=torch.randn(1, 3), timestamps=torch.arange(7))
    fused = _kernel_relative_bias(bias, q)
    assert fused.time is None and fused.timestamps is None
    params = fused.params
    assert params.time_weights is None and params.timestamps is None and params.num_time_buckets == 0
    assert params.position_head_stride == 0 and params.position_reach == 1
    empty = _kernel_relative_bias(None, q).params
    assert bytes(empty) == bytes(ctypes.sizeof(empty))


def test_gradient_buffers_and_their_cast() -> None:
    """Zeroed fp32 buffers shaped like the tables (None for an absent one), cast back to each table's dtype."""
    q = _qkv()[0]
    bias = RelativeBias(position_weights=torch.randn(2, 5, dtype=torch.float16))
    fused = _kernel_relative_bias(bias, q)
    dposition, dtime = fused.gradient_buffers()
    assert dtime is None and dposition.dtype == torch.float32 and dposition.shape == (2, 5) and not dposition.any()
    assert dposition.stride() == fused.position.stride()
    dposition += 0.5
    cast_position, cast_time = _cast_table_gradients(bias, dposition, dtime)
    assert cast_time is None and cast_position.dtype == torch.float16 and torch.all(cast_position == 0.5)
    assert _cast_table_gradients(None, None, None) == (None, None)


@pytest.mark.parametrize("entry", ["forward", "backward"])
def test_entry_points_name_a_table_with_the_wrong_row_count(entry: str) -> None:
    bias = RelativeBias(position_weights=torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"position_weights has 3 rows; expected 1 \(shared\) or 2"):
        _call(entry, bias)


@pytest.mark.parametrize("entry", ["forward", "backward"])
def test_entry_points_name_timestamps_of_another_dtype_or_length(entry: str) -> None:
    bias = RelativeBias(time_weights=torch.zeros(1, 4), timestamps=torch.arange(7, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"relative_bias\.timestamps must be one of .* got torch\.int16"):
        _call(entry, bias)
    bias = RelativeBias(time_weights=torch.zeros(1, 4), timestamps=torch.arange(8))
    with pytest.raises(ValueError, match=r"relative_bias\.timestamps must be \[L\] = \[7\]; got \(8,\)"):
        _call(entry, bias)


def test_entry_points_name_a_table_on_another_device() -> None:
    bias = RelativeBias(time_weights=torch.zeros(1, 4, device="meta"), timestamps=torch.arange(7))
    with pytest.raises(ValueError, match=r"relative_bias\.time_weights must be on q's device cpu; got meta"):
        _call("forward", bias)


def _call(entry: str, bias: RelativeBias) -> None:
    q, k, v = _qkv()
    offsets = torch.tensor([0, 7])
    if entry == "forward":
        hstu_attn_cutlass_forward(q, k, v, offsets, 7, **OPTIONS, relative_bias=bias)
    else:
        hstu_attn_cutlass_backward(q, q, k, v, offsets, 7, **OPTIONS, relative_bias=bias)
