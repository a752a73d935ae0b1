"""The CUTLASS entry points name a tensor whose dtype or shape the compiled kernels cannot read (runs on CPU: the
checks come before the library is loaded)."""

from __future__ import annotations

import pytest
import torch

from hstu_attn.cutlass import hstu_attn_cutlass_backward, hstu_attn_cutlass_forward

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
