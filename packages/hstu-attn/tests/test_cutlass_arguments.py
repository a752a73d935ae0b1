"""The CUTLASS entry points name a tensor whose dtype or shape the compiled kernels cannot read (runs on CPU: the
checks come before the library is loaded); which options the backend refuses (rab and the fused relative bias are
taken, timestamps of a dtype the kernels cannot read are not), with a stand-in for the loaded library; the rab gradient
buffers; the ctypes mirror of the C ABI structs."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from hstu_attn import KernelBackend, RelativeBias, hstu_attn_varlen_func
from hstu_attn.cutlass import _library, cutlass_unsupported, hstu_attn_cutlass_backward, hstu_attn_cutlass_forward
from hstu_attn.cutlass.api import _bias_strides, _rab_gradient_target

OPTIONS = dict(alpha=0.1, scale=0.1, causal=True, num_targets=None, contextual_seq_len=0, max_attn_len=0)


def _qkv(dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    return [torch.randn(7, 2, 64).to(dtype) for _ in range(3)]


def test_forward_names_a_float32_q() -> None:
    with pytest.raises(ValueError, match=r"bfloat16 or float16; q is torch\.float32"):
        hstu_attn_cutlass_forward(*_qkv(torch.float32), torch.tensor([0, 7]), 7, **OPTIONS)


def test_backward_names_a_grad_out_of_another_dtype_or_shape() -> None:
    offsets = torch.tensor([0, 7])
    with pytest.raises(ValueError, match="grad_out must have q's dtype and shape"):
        hstu_attn_cutlass_backward(torch.randn(7, 2, 64), *_qkv(), offsets, 7, **OPTIONS)
    with pytest.raises(ValueError, match=r"got torch.bfloat16, \(7, 2, 32\)"):
        hstu_attn_cutlass_backward(torch.randn(7, 2, 32).bfloat16(), *_qkv(), offsets, 7, **OPTIONS)


def test_forward_names_a_v_of_another_shape() -> None:
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match="v must have q's dtype and shape"):
        hstu_attn_cutlass_forward(q, k, torch.randn(5, 2, 64).bfloat16(), torch.tensor([0, 7]), 7, **OPTIONS)


def _rab(heads: int, n: int = 7, sequences: int = 1, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(sequences, heads, n, n).to(dtype)


def test_forward_and_backward_name_a_rab_of_another_dtype() -> None:
    offsets = torch.tensor([0, 7])
    with pytest.raises(ValueError, match=r"rab must have q's dtype torch\.bfloat16; got torch\.float16"):
        hstu_attn_cutlass_forward(*_qkv(), offsets, 7, **OPTIONS, rab=_rab(2, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"rab must have q's dtype torch\.bfloat16; got torch\.float32"):
        hstu_attn_cutlass_backward(_qkv()[0], *_qkv(), offsets, 7, **OPTIONS, rab=_rab(2, dtype=torch.float32))


@pytest.mark.parametrize(
    "shape",
    [(1, 3, 7, 7), (2, 2, 7, 7), (1, 2, 6, 7), (1, 2, 7, 6), (2, 7, 7)],
    ids=["heads", "sequences", "rows", "columns", "three_dims"],
)
def test_forward_names_a_rab_of_another_shape(shape: tuple[int, ...]) -> None:
    rab = torch.zeros(shape, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"rab must be \[B=1, H=2 or 1, >=7, >=7\]; got"):
        hstu_attn_cutlass_forward(*_qkv(), torch.tensor([0, 7]), 7, **OPTIONS, rab=rab)


class _LoadedLibrary:
    """Stands for a loaded libhstu_attn_cutlass.so: `cutlass_unsupported` only asks whether it loaded."""


@pytest.fixture
def library_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_library, "load", lambda: _LoadedLibrary())


@pytest.mark.usefixtures("library_loaded")
def test_rab_and_relative_bias_are_supported_and_unreadable_timestamps_refused_naming_why() -> None:
    q, _, v = _qkv()
    cuda = "the CUTLASS backend needs CUDA tensors; got cpu"
    assert cutlass_unsupported(q, v, has_rab=False) == cuda
    assert cutlass_unsupported(q, v, has_rab=True) == cuda  # rab is not the reason
    times = torch.arange(7)
    bias = RelativeBias(position_weights=torch.zeros(2, 15), time_weights=torch.zeros(1, 4), timestamps=times)
    assert cutlass_unsupported(q, v, has_rab=True, relative_bias=bias) == cuda  # nor is the relative bias
    bias.timestamps = times.to(torch.int16)
    reason = cutlass_unsupported(q, v, has_rab=False, relative_bias=bias)
    assert reason is not None and "timestamps of dtype int32, int64" in reason and "torch.int16" in reason
    # timestamps that no time table reads are not looked at
    bias = RelativeBias(position_weights=torch.zeros(2, 15), timestamps=times.to(torch.int16))
    assert cutlass_unsupported(q, v, has_rab=False, relative_bias=bias) == cuda
    assert "bfloat16 and float16" in cutlass_unsupported(q.float(), v.float(), has_rab=True)


@pytest.mark.usefixtures("library_loaded")
def test_backend_cutlass_with_rab_or_relative_bias_reaches_the_device_check() -> None:
    """Through hstu_attn_varlen_func: a rab and a fused relative bias pass the support check (CPU tensors then fail
    the CUDA one); int16 timestamps raise NotImplementedError naming them."""
    q, k, v = _qkv()
    offsets = torch.tensor([0, 7])
    with pytest.raises(NotImplementedError, match="needs CUDA tensors"):
        hstu_attn_varlen_func(q, k, v, offsets, 7, rab=_rab(1), backend=KernelBackend.CUTLASS)
    bias = RelativeBias(position_weights=torch.zeros(2, 15, dtype=torch.bfloat16))
    with pytest.raises(NotImplementedError, match="needs CUDA tensors"):
        hstu_attn_varlen_func(q, k, v, offsets, 7, relative_bias=bias, backend=KernelBackend.CUTLASS)
    bias = RelativeBias(time_weights=torch.zeros(1, 4), timestamps=torch.arange(7, dtype=torch.int16))
    with pytest.raises(NotImplementedError, match=r"timestamps of dtype .* got torch\.int16"):
        hstu_attn_varlen_func(q, k, v, offsets, 7, relative_bias=bias, backend=KernelBackend.CUTLASS)


def test_rab_gradient_buffer_per_head_or_shared() -> None:
    """A per-head rab's gradient is stored in its dtype; a rab shared by H > 1 heads gets an fp32 buffer that
    every head adds into (head stride 0), as HstuAttnBwdParams.drab_atomic says."""
    per_head, atomic = _rab_gradient_target(_rab(3, sequences=2), 3)
    assert not atomic and per_head.shape == (2, 3, 7, 7) and per_head.dtype == torch.bfloat16
    assert not per_head.any()
    shared, atomic = _rab_gradient_target(_rab(1, sequences=2), 3)
    assert atomic and shared.shape == (2, 1, 7, 7) and shared.dtype == torch.float32 and not shared.any()
    assert _bias_strides("drab", shared) == {"drab_batch_stride": 49, "drab_head_stride": 0, "drab_row_stride": 7}
    one_head, atomic = _rab_gradient_target(_rab(1), 1)
    assert not atomic and one_head.dtype == torch.bfloat16
    assert _rab_gradient_target(None, 3) == (None, False)


def test_bias_strides_of_a_strided_view() -> None:
    """A rab view with padded rows keeps its row stride (the kernels take it); a missing rab has zero strides."""
    rab = torch.zeros(2, 3, 9, 12)[:, :, :7, :7]
    assert _bias_strides("rab", rab) == {"rab_batch_stride": 324, "rab_head_stride": 108, "rab_row_stride": 12}
    assert _bias_strides("rab", None) == {"rab_batch_stride": 0, "rab_head_stride": 0, "rab_row_stride": 0}


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_ctypes_params_mirror_the_c_header(tmp_path: Path) -> None:
    """FwdParams/BwdParams have the size and every field offset of csrc/hstu_attn_cutlass.h's structs (compiled here
    with the host C compiler), so the library's ABI check cannot pass with fields out of place."""
    header_dir = Path(__file__).resolve().parents[1] / "csrc"
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "hstu_attn_cutlass.h"', "int main(void) {"]
    expected = []
    structs = (
        (_library.FwdParams, "HstuAttnFwdParams"),
        (_library.BwdParams, "HstuAttnBwdParams"),
        (_library.RelativeBiasParams, "HstuAttnRelativeBias"),
    )
    for struct, c_name in structs:
        lines.append(f'printf("size %zu\\n", sizeof({c_name}));')
        expected.append(f"size {ctypes.sizeof(struct)}")
        for name, field_type in struct._fields_:
            lines.append(f'printf("{name} %zu\\n", offsetof({c_name}, {name}));')
            expected.append(f"{name} {getattr(struct, name).offset}")
            if field_type is _library.RelativeBiasParams:  # nested: its size here, its fields checked on their own
                lines.append(f'printf("sizeof_{name} %zu\\n", sizeof((({c_name}*)0)->{name}));')
                expected.append(f"sizeof_{name} {ctypes.sizeof(field_type)}")
    lines.append("return 0; }")
    (tmp_path / "layout.c").write_text("\n".join(lines))
    subprocess.run(["cc", f"-I{header_dir}", "layout.c", "-o", "layout"], cwd=tmp_path, check=True)
    printed = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True).stdout.split()
    assert [" ".join(pair) for pair in zip(printed[::2], printed[1::2])] == expected
