"""The params that the Python side hands the library (CPU: a stand-in library and a captured launch): the Hopper
forward's and backward's TMA descriptors span `num_tokens` = L rows of q, k, v (and dout) (C ABI version 6), and the
strides of views are passed as they are."""

from __future__ import annotations

import pytest
import torch

from hstu_attn.cutlass import _library, api, hstu_attn_cutlass_backward, hstu_attn_cutlass_forward

OPTIONS = dict(alpha=0.1, scale=0.1, causal=True, num_targets=None, contextual_seq_len=0, max_attn_len=0)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[_library.FwdParams]:
    """The params of every forward launch, which does not happen (no library, no GPU needed)."""
    captured: list[_library.FwdParams] = []
    monkeypatch.setattr(_library, "load", lambda: object())
    monkeypatch.setattr(api, "_launch", lambda library, direction, params, device: captured.append(params))
    return captured


def test_forward_params_carry_num_tokens_and_view_strides(launches: list[_library.FwdParams]) -> None:
    lengths, heads, dim = (5, 0, 12), 3, 64
    packed = torch.randn(sum(lengths), heads, 3 * dim).to(torch.bfloat16)
    q, k, v = packed.split(dim, dim=2)
    offsets = torch.tensor([0, 5, 5, 17])
    out = hstu_attn_cutlass_forward(q, k, v, offsets, 12, **OPTIONS)
    assert out.shape == (17, heads, dim) and len(launches) == 1
    params = launches[0]
    assert params.num_tokens == 17 and params.num_heads == heads and params.head_dim == dim
    assert (params.q_row_stride, params.q_head_stride) == (heads * 3 * dim, 3 * dim)
    assert params.k - params.q == dim * 2 and params.v - params.q == 2 * dim * 2  # bytes into the packed rows
    assert (params.o_row_stride, params.o_head_stride) == (heads * dim, dim)


def test_forward_of_no_tokens_launches_nothing(launches: list[_library.FwdParams]) -> None:
    q, k, v = (torch.randn(0, 2, 128).to(torch.float16) for _ in range(3))
    out = hstu_attn_cutlass_forward(q, k, v, torch.tensor([0, 0]), 0, **OPTIONS)
    assert out.shape == (0, 2, 128) and launches == []


def test_backward_params_carry_num_tokens_and_view_strides(launches: list[_library.BwdParams]) -> None:
    lengths, heads, dim = (5, 0, 12), 2, 128
    packed = torch.randn(sum(lengths), heads, 4 * dim).to(torch.float16)
    q, k, v, grad_out = packed.split(dim, dim=2)
    offsets = torch.tensor([0, 5, 5, 17])
    dq, dk, dv, *_ = hstu_attn_cutlass_backward(grad_out, q, k, v, offsets, 12, **OPTIONS)
    assert dq.shape == dk.shape == dv.shape == (17, heads, dim) and len(launches) == 1
    params = launches[0]
    assert params.num_tokens == 17 and params.num_heads == heads and params.head_dim == dim
    assert (params.q_row_stride, params.q_head_stride) == (heads * 4 * dim, 4 * dim)
    assert (params.do_row_stride, params.do_head_stride) == (heads * 4 * dim, 4 * dim)
    assert params.dout - params.q == 3 * dim * 2  # bytes into the packed rows
