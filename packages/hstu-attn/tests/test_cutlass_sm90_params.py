"""The params that the Python side hands the library (CPU: a stand-in library and a captured launch): the Hopper
forward's and backward's TMA descriptors span `num_tokens` = L rows of q, k, v (and dout), the strides of views are
passed as they are, and the deterministic backward gets its zeroed dQ counters; which backward backend=CUTLASS runs."""

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


def test_deterministic_backward_passes_zeroed_counters_per_query_block(
    launches: list[_library.BwdParams], monkeypatch: pytest.MonkeyPatch
) -> None:
    """deterministic=True: int32 counters [B, H, ceil(N / 64)], zero, on q's device; without it none."""
    q, k, v, grad_out = (torch.randn(17, 3, 64).to(torch.bfloat16) for _ in range(4))
    offsets = torch.tensor([0, 5, 5, 17])
    counters: list[torch.Tensor] = []
    make_counters = api._dq_semaphore
    monkeypatch.setattr(api, "_dq_semaphore", lambda *args: counters.append(make_counters(*args)) or counters[-1])
    hstu_attn_cutlass_backward(grad_out, q, k, v, offsets, 130, **OPTIONS, deterministic=True)
    hstu_attn_cutlass_backward(grad_out, q, k, v, offsets, 130, **OPTIONS)
    deterministic, atomic = launches
    assert len(counters) == 1 and counters[0].shape == (3, 3, 3)  # 3 sequences, 3 heads, ceil(130 / 64)
    assert counters[0].dtype == torch.int32 and not counters[0].any() and counters[0].device == q.device
    assert deterministic.dq_semaphore == counters[0].data_ptr() and deterministic.dq_semaphore_stride == 3
    assert atomic.dq_semaphore is None and atomic.dq_semaphore_stride == 0


def test_deterministic_backward_refuses_atomic_sums_naming_them(launches: list[_library.BwdParams]) -> None:
    q, k, v, grad_out = (torch.randn(7, 2, 64).to(torch.bfloat16) for _ in range(4))
    offsets = torch.tensor([0, 7])
    shared_rab = torch.randn(1, 1, 7, 7).to(torch.bfloat16)
    with pytest.raises(NotImplementedError, match="a rab shared by the heads"):
        hstu_attn_cutlass_backward(grad_out, q, k, v, offsets, 7, **OPTIONS, rab=shared_rab, deterministic=True)
    # without its gradient the shared rab is only read: taken
    hstu_attn_cutlass_backward(
        grad_out, q, k, v, offsets, 7, **OPTIONS, rab=shared_rab, rab_requires_grad=False, deterministic=True
    )
    per_head = torch.randn(1, 2, 7, 7).to(torch.bfloat16)
    hstu_attn_cutlass_backward(grad_out, q, k, v, offsets, 7, **OPTIONS, rab=per_head, deterministic=True)
    assert len(launches) == 2 and all(params.dq_semaphore is not None for params in launches)


@pytest.mark.parametrize(
    ("dim", "rab_heads", "rab_grad", "fused", "deterministic", "takes"),
    [
        (128, 0, False, False, True, True),
        (64, 2, True, False, True, True),  # per-head rab
        (64, 1, True, False, True, False),  # shared rab with its gradient: Triton
        (64, 1, False, False, True, True),  # shared rab, no gradient wanted
        (64, 0, False, True, True, False),  # fused relative bias: Triton
        (64, 0, False, True, False, True),
        (64, 1, True, False, False, True),
        (256, 0, False, False, False, False),  # no CUTLASS backward for head dim 256
    ],
)
def test_cutlass_backward_routing(dim, rab_heads, rab_grad, fused, deterministic, takes) -> None:
    from hstu_attn.interface import _cutlass_backward_takes

    q = torch.empty(5, 2, dim)
    rab = torch.empty(1, rab_heads, 5, 5) if rab_heads else None
    assert _cutlass_backward_takes(q, rab, rab_grad, fused, deterministic) is takes
