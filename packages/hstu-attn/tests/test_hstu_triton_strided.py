"""The Triton kernels read q, k, v and grad_out in place, whatever their token and head strides (issue 16).

An HSTU layer splits one `[L, 4 * H * D]` projection into u, v, q, k views (token stride 4 * H * D); the kernels
take each tensor's token and head strides as arguments instead of copying such views to contiguous tensors. These
tests check that strided views give exactly the results of contiguous copies (same kernels, same tiles, so the
same bits; on a GPU the fp32 atomics of dQ may add in another order, hence a tolerance there) and that the API
and the public function make no copy of such views. On CPU they run under `TRITON_INTERPRET=1` at tiny sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from hstu_attn import hstu_attn_varlen_func
from hstu_attn.triton import api, hstu_attn_triton_backward, hstu_attn_triton_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LENGTHS = (5, 0, 19, 1)  # odd lengths and an empty sequence
TARGETS = (2, 0, 3, 1)
HEADS, DIM = 2, 32
WIDTH = HEADS * DIM
PATHS = {  # backward variants: dQ by fp32 atomics, by the dQ kernel, deterministic (dQ kernel, fixed config)
    "atomic_dq": dict(atomic_dq=True, deterministic=False),
    "dq_kernel": dict(atomic_dq=False, deterministic=False),
    "deterministic": dict(atomic_dq=None, deterministic=True),
}


def _offsets(lengths: tuple[int, ...]) -> Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64, device=DEVICE)


def _options(lengths: tuple[int, ...] = LENGTHS, targets: tuple[int, ...] = TARGETS) -> dict:
    return dict(
        alpha=1.0 / DIM**0.5,
        scale=1.0 / max(max(lengths), 1),
        causal=True,
        num_targets=torch.tensor(targets, dtype=torch.int64, device=DEVICE),
        contextual_seq_len=0,
        max_attn_len=0,
        rab=None,
        position_weights=None,
        time_weights=None,
        timestamps=None,
        time_bucket_divisor=1.0,
    )


def _split_views(dtype: torch.dtype, seed: int, tokens: int = sum(LENGTHS)) -> tuple[Tensor, ...]:
    """q, k, v `[L, H, D]` split from one `[L, 4 * H * D]` tensor (token stride 4 * H * D), and grad_out
    `[L, H, D]` sliced from an `[L, 2 * H * D]` tensor (token stride 2 * H * D)."""
    gen = torch.Generator().manual_seed(seed)
    uvqk = torch.randn(tokens, 4 * WIDTH, generator=gen).to(DEVICE, dtype)
    grads = torch.randn(tokens, 2 * WIDTH, generator=gen).to(DEVICE, dtype)
    _, v, q, k = (t.view(-1, HEADS, DIM) for t in uvqk.split(WIDTH, dim=-1))
    grad_out = grads[:, WIDTH:].view(-1, HEADS, DIM)
    return q, k, v, grad_out


def _run(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, path: dict, lengths=LENGTHS, targets=TARGETS):
    """[out, dq, dk, dv] of the Triton forward and backward."""
    options = _options(lengths, targets)
    max_len = max(max(lengths), 1)
    out = hstu_attn_triton_forward(q, k, v, _offsets(lengths), max_len, **options)
    dq, dk, dv, *_ = hstu_attn_triton_backward(grad_out, q, k, v, _offsets(lengths), max_len, **options, **path)
    return [out, dq, dk, dv]


def _assert_same(got: list[Tensor], expected: list[Tensor], exact: bool) -> None:
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        assert a.is_contiguous(), f"{name} is not a contiguous tensor (strides {a.stride()})"
        if exact:
            assert torch.equal(a, b), (
                f"{name} from strided inputs differs from contiguous inputs: {(a - b).abs().max()}"
            )
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_views_match_contiguous_copies(dtype: torch.dtype, path: str) -> None:
    q, k, v, grad_out = _split_views(dtype, seed=1)
    assert q.stride() == (4 * WIDTH, DIM, 1) and grad_out.stride() == (2 * WIDTH, DIM, 1)
    strided = _run(q, k, v, grad_out, PATHS[path])
    copies = _run(q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous(), PATHS[path])
    atomic_on_gpu = DEVICE == "cuda" and path == "atomic_dq"
    _assert_same(strided, copies, exact=not atomic_on_gpu)
    assert all(t.abs().sum() > 0 for t in strided), "a result is all zeros: the test would not see a wrong read"


def test_head_major_and_non_unit_last_dim_layouts_match_contiguous_copies() -> None:
    """Head stride L * D (a `[H, L, D]` tensor transposed) is read in place; a last dim with stride H (a
    `[L, D, H]` tensor transposed) is copied by the API and gives the same results too."""
    gen = torch.Generator().manual_seed(2)
    tokens = sum(LENGTHS)
    head_major = torch.randn(HEADS, tokens, DIM, generator=gen).to(DEVICE).transpose(0, 1)
    last_strided = torch.randn(tokens, DIM, HEADS, generator=gen).to(DEVICE).transpose(1, 2)
    k, v, grad_out = (torch.randn(tokens, HEADS, DIM, generator=gen).to(DEVICE) for _ in range(3))
    assert head_major.stride() == (DIM, tokens * DIM, 1) and last_strided.stride(-1) == HEADS
    for q in (head_major, last_strided):
        path = PATHS["dq_kernel"]
        _assert_same(_run(q, k, v, grad_out, path), _run(q.contiguous(), k, v, grad_out, path), exact=True)


def test_split_views_of_empty_batches() -> None:
    """All-empty sequences and a batch of no tokens: zero outputs and gradients, contiguous, no launch issue."""
    q, k, v, grad_out = _split_views(torch.float32, seed=3, tokens=0)
    results = _run(q, k, v, grad_out, PATHS["atomic_dq"], lengths=(0, 0), targets=(0, 0))
    assert [tuple(t.shape) for t in results] == [(0, HEADS, DIM)] * 4


def test_public_function_gradients_through_split_views_match_copies() -> None:
    """hstu_attn_varlen_func on split views: the output and the gradient of the `[L, 4 * H * D]` projection
    equal those of contiguous copies of the views (bf16, causal, targets)."""
    gen = torch.Generator().manual_seed(4)
    uvqk = torch.randn(sum(LENGTHS), 4 * WIDTH, generator=gen).to(DEVICE, torch.bfloat16)
    grad = torch.randn(sum(LENGTHS), HEADS, DIM, generator=gen).to(DEVICE, torch.bfloat16)
    results = []
    for copy in (False, True):
        leaf = uvqk.clone().requires_grad_()
        _, v, q, k = (t.view(-1, HEADS, DIM) for t in leaf.split(WIDTH, dim=-1))
        if copy:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = hstu_attn_varlen_func(
            q, k, v, _offsets(LENGTHS), max(LENGTHS), num_targets=_options()["num_targets"], backend="triton"
        )
        out.backward(grad)
        results.append((out.detach(), leaf.grad))
    (out, grad_uvqk), (out_copy, grad_copy) = results
    assert torch.equal(out, out_copy), "outputs differ"
    exact = DEVICE == "cpu"  # max_seq_len < 2048: dQ by fp32 atomics, whose order varies on a GPU
    torch.testing.assert_close(grad_uvqk, grad_copy, rtol=0 if exact else 1e-2, atol=0 if exact else 1e-2)


class _CopyCounter(TorchDispatchMode):
    """Records every copy, clone or cast whose source shares storage with one of `watched`."""

    def __init__(self, *watched: Tensor) -> None:
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in watched}
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        sources = {aten.copy_.default: 1, aten.clone.default: 0, aten._to_copy.default: 0}
        index = sources.get(func)
        if index is not None and args[index].untyped_storage().data_ptr() in self.storages:
            self.copies.append(f"{func}{tuple(args[index].shape)}")
        return func(*args, **(kwargs or {}))


@contextmanager
def _kernels_stubbed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Kernel launches do nothing: only the host code around them runs (and is watched for copies)."""
    for tuned in (api._forward, api._backward_dkdv, api._backward_dq):
        monkeypatch.setattr(tuned, "launch", lambda *args, **kwargs: None)
    monkeypatch.setattr(api, "launch_config", lambda *args, **kwargs: None)
    yield


@pytest.mark.parametrize("path", list(PATHS))
def test_api_makes_no_copy_of_split_views(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    q, k, v, grad_out = _split_views(torch.float32, seed=5)
    with _kernels_stubbed(monkeypatch), _CopyCounter(q, grad_out) as counter:
        _run(q, k, v, grad_out, PATHS[path])
    assert counter.copies == [], f"the Triton API copied its strided inputs: {counter.copies}"


def test_public_function_makes_no_copy_of_split_views(monkeypatch: pytest.MonkeyPatch) -> None:
    uvqk = torch.randn(sum(LENGTHS), 4 * WIDTH, device=DEVICE, requires_grad=True)
    _, v, q, k = (t.view(-1, HEADS, DIM) for t in uvqk.split(WIDTH, dim=-1))
    with _kernels_stubbed(monkeypatch), _CopyCounter(uvqk) as counter:
        out = hstu_attn_varlen_func(q, k, v, _offsets(LENGTHS), max(LENGTHS), backend="triton")
        out.backward(torch.ones_like(out))
    assert counter.copies == [], f"hstu_attn_varlen_func copied q, k or v: {counter.copies}"


def test_copy_counter_sees_the_copy_of_a_non_unit_last_dim(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter above is not blind: a q whose last dim has stride H must be copied, and is seen."""
    q = torch.randn(sum(LENGTHS), DIM, HEADS, device=DEVICE).transpose(1, 2)
    k = v = grad_out = torch.randn(sum(LENGTHS), HEADS, DIM, device=DEVICE)
    with _kernels_stubbed(monkeypatch), _CopyCounter(q) as counter:
        _run(q, k, v, grad_out, PATHS["dq_kernel"])
    assert len(counter.copies) == 2, f"expected one copy of q in the forward and one in the backward: {counter.copies}"
