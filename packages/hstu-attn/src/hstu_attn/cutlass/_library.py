"""Finding and binding `libhstu_attn_cutlass.so` (built from `csrc/` with HSTU_ATTN_BUILD_CUDA=1) through ctypes.

The library has a C ABI (`csrc/hstu_attn_cutlass.h`); `FwdParams`, `BwdParams` and `RelativeBiasParams` mirror its
`HstuAttnFwdParams`, `HstuAttnBwdParams` and `HstuAttnRelativeBias` field by field, and the library's ABI version and
struct sizes are checked when it is loaded.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

ABI_VERSION = 7
LIBRARY_NAME = "libhstu_attn_cutlass.so"
LIBRARY_ENV = "HSTU_ATTN_CUTLASS_LIB"
BUILD_HINT = (
    "build it with `HSTU_ATTN_BUILD_CUDA=1 pip install --no-build-isolation -e packages/hstu-attn` (needs nvcc and "
    "`pip install nvidia-cutlass==4.2.0.0`, or CUTLASS_INCLUDE_DIR), or point HSTU_ATTN_CUTLASS_LIB at a built "
    f"{LIBRARY_NAME}"
)


class RelativeBiasParams(ctypes.Structure):
    """`HstuAttnRelativeBias` of `csrc/hstu_attn_cutlass.h` (the fused relative bias; NULL tables: none)."""

    _fields_ = [
        ("position_weights", ctypes.c_void_p),
        ("time_weights", ctypes.c_void_p),
        ("timestamps", ctypes.c_void_p),
        ("position_head_stride", ctypes.c_int64),
        ("time_head_stride", ctypes.c_int64),
        ("position_reach", ctypes.c_int32),
        ("num_time_buckets", ctypes.c_int32),
        ("timestamps_dtype", ctypes.c_int32),
        ("inv_time_bucket_divisor", ctypes.c_float),
    ]


class FwdParams(ctypes.Structure):
    """`HstuAttnFwdParams` of `csrc/hstu_attn_cutlass.h`."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("seq_offsets", ctypes.c_void_p),
        ("num_targets", ctypes.c_void_p),
        ("rab", ctypes.c_void_p),
        *((name, ctypes.c_int64) for t in "qkvo" for name in (f"{t}_row_stride", f"{t}_head_stride")),
        *((f"rab_{kind}_stride", ctypes.c_int64) for kind in ("batch", "head", "row")),
        ("num_sequences", ctypes.c_int32),
        ("num_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("max_seq_len", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("offsets_int64", ctypes.c_int32),
        ("targets_int64", ctypes.c_int32),
        ("causal", ctypes.c_int32),
        ("contextual_seq_len", ctypes.c_int32),
        ("max_attn_len", ctypes.c_int32),
        ("alpha", ctypes.c_float),
        ("inv_scaling", ctypes.c_float),
        ("relative_bias", RelativeBiasParams),
        ("num_tokens", ctypes.c_int64),
    ]


class BwdParams(ctypes.Structure):
    """`HstuAttnBwdParams` of `csrc/hstu_attn_cutlass.h`."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("q", "k", "v", "dout")),
        ("dq_accum", ctypes.c_void_p),
        *((name, ctypes.c_void_p) for name in ("dk", "dv", "seq_offsets", "num_targets", "rab", "drab")),
        *(
            (name, ctypes.c_int64)
            for t in ("q", "k", "v", "do", "dq", "dk", "dv")
            for name in (f"{t}_row_stride", f"{t}_head_stride")
        ),
        *((f"{t}_{kind}_stride", ctypes.c_int64) for t in ("rab", "drab") for kind in ("batch", "head", "row")),
        *(
            (name, ctypes.c_int32)
            for name in (
                "num_sequences",
                "num_heads",
                "head_dim",
                "max_seq_len",
                "dtype",
                "offsets_int64",
                "targets_int64",
                "causal",
                "contextual_seq_len",
                "max_attn_len",
                "drab_atomic",
            )
        ),
        ("alpha", ctypes.c_float),
        ("inv_scaling", ctypes.c_float),
        ("relative_bias", RelativeBiasParams),
        ("dposition_weights", ctypes.c_void_p),
        ("dtime_weights", ctypes.c_void_p),
        ("num_tokens", ctypes.c_int64),
        ("dq_semaphore", ctypes.c_void_p),
        ("dq_semaphore_stride", ctypes.c_int64),
    ]


def _candidates() -> list[Path]:
    """Where the library may be: $HSTU_ATTN_CUTLASS_LIB, next to this file, or `hstu_attn/cutlass/` under a
    sys.path entry (an editable scikit-build-core install puts it in site-packages, the sources elsewhere)."""
    paths = [Path(__file__).with_name(LIBRARY_NAME)]
    paths += [Path(entry) / "hstu_attn" / "cutlass" / LIBRARY_NAME for entry in sys.path if entry]
    explicit = os.environ.get(LIBRARY_ENV)
    return ([Path(explicit)] if explicit else []) + paths


@functools.cache
def load() -> ctypes.CDLL | str:
    """The loaded library, or a string saying why it is not available (not built, wrong ABI, load error)."""
    explicit = os.environ.get(LIBRARY_ENV)
    if explicit and not Path(explicit).is_file():
        return f"{LIBRARY_ENV}={explicit} is not a file; {BUILD_HINT}"
    found = next((path for path in _candidates() if path.is_file()), None)
    if found is None:
        return f"CUTLASS backend not built yet: {LIBRARY_NAME} was not found; {BUILD_HINT}"
    try:
        library = ctypes.CDLL(str(found))
    except OSError as error:
        return f"{found} did not load ({error}); rebuild it: {BUILD_HINT}"
    version = library.hstu_attn_cutlass_abi_version()
    if version != ABI_VERSION:
        return f"{found} has ABI version {version} but this hstu_attn expects {ABI_VERSION}: rebuild it: {BUILD_HINT}"
    sizes = (library.hstu_attn_cutlass_fwd_params_size(), library.hstu_attn_cutlass_bwd_params_size())
    expected = (ctypes.sizeof(FwdParams), ctypes.sizeof(BwdParams))
    if sizes != expected:
        return f"{found} has params of {sizes} bytes but this hstu_attn expects {expected}: rebuild it: {BUILD_HINT}"
    library.hstu_attn_cutlass_forward.argtypes = [ctypes.POINTER(FwdParams), ctypes.c_void_p]
    library.hstu_attn_cutlass_forward.restype = ctypes.c_int
    library.hstu_attn_cutlass_backward.argtypes = [ctypes.POINTER(BwdParams), ctypes.c_void_p]
    library.hstu_attn_cutlass_backward.restype = ctypes.c_int
    library.hstu_attn_cutlass_status_string.argtypes = [ctypes.c_int]
    library.hstu_attn_cutlass_status_string.restype = ctypes.c_char_p
    return library
