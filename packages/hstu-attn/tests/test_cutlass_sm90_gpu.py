"""The Hopper forward of the CUTLASS backend (`csrc/fwd_sm90_kernel.cuh`: TMA, wgmma) against the PyTorch reference.

GPU only: skipped unless the device is sm_90 (H100/H200) and `libhstu_attn_cutlass.so` is built (with sm_90a code, as
the default `80;90a` build has). The forward takes that kernel for head dims 64 and 128 without rab (with or without
the fused relative bias) unless `HSTU_ATTN_CUTLASS_SM90=0` (the tests here set =1 explicitly); every test here
checks with the profiler which forward kernel ran, so a dispatch that falls back to the SM80 kernel
fails instead of passing unnoticed. Errors are judged as in test_cutlass_gpu.py (whose input and judging helpers this
file loads): the kernel's error against the fp32 reference may exceed the error of the reference run in the input
dtype by at most 2x (relative L2) / 4x (relative max). The relative-bias cases are in test_cutlass_sm90_bwd_gpu.py,
which checks the forward and the backward kernel of each call.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import test_cutlass_gpu as _base  # a sibling test file: tests/conftest.py puts this folder on sys.path
import torch
from torch.profiler import ProfilerActivity, profile

from hstu_attn import KernelBackend, hstu_attn_reference, hstu_attn_varlen_func
from hstu_attn.cutlass import cutlass_available, hstu_attn_cutlass_forward

SM90_ENV = "HSTU_ATTN_CUTLASS_SM90"
# Kernel names as the profiler reports them, demangled (`hstu_attn_fwd_kernel<...>`) or not (`...kernelI...`).
SM90_KERNEL = re.compile(r"hstu_attn_fwd_sm90_kernel")
SM80_KERNEL = re.compile(r"hstu_attn_fwd_kernel[<I]")


def _is_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _is_sm90() or not cutlass_available(),
        reason="needs an sm_90 GPU (H100/H200) and libhstu_attn_cutlass.so built with sm_90a code "
        "(HSTU_ATTN_BUILD_CUDA=1, HSTU_ATTN_CUDA_ARCHS including 90a)",
    ),
]


LENGTHS, MASKS = _base.LENGTHS, _base.MASKS


@contextmanager
def _sm90_env(value: str | None) -> Iterator[None]:
    """HSTU_ATTN_CUTLASS_SM90 set to `value` (None: unset) for the block; the library reads it on every call."""
    old = os.environ.get(SM90_ENV)
    if value is None:
        os.environ.pop(SM90_ENV, None)
    else:
        os.environ[SM90_ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SM90_ENV, None)
        else:
            os.environ[SM90_ENV] = old


def _kernels_launched(fn: Callable[[], Any], prefix: str) -> tuple[Any, set[str]]:
    """fn()'s result and the names of the CUDA kernels it launched whose name holds `prefix` (profiler events)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    names = {event.name for event in prof.events() if prefix in event.name}
    return result, names


def _forward_kernels(fn: Callable[[], Any]) -> tuple[Any, set[str]]:
    """fn()'s result and the names of the hstu forward kernels it launched."""
    return _kernels_launched(fn, "hstu_attn_fwd")


def _assert_launched(
    names: set[str], kernel: re.Pattern[str], pair: tuple[re.Pattern[str], re.Pattern[str]], what: str
) -> None:
    """`kernel`, one of the two patterns of `pair`, ran and the other did not (skip when the profiler saw nothing)."""
    if not names:
        pytest.skip(f"the profiler recorded no CUDA kernels (CUPTI unavailable?): cannot tell which {what} ran")
    assert any(kernel.search(name) for name in names), f"expected {kernel.pattern}, the {what} launched {names}"
    other = pair[1] if kernel is pair[0] else pair[0]
    assert not any(other.search(name) for name in names), f"the {what} also launched {sorted(names)}"


def _assert_ran(names: set[str], kernel: re.Pattern[str]) -> None:
    _assert_launched(names, kernel, (SM90_KERNEL, SM80_KERNEL), "forward")


def _check_sm90_forward(lengths, **kwargs) -> None:
    """_base._check_forward (fresh inputs, judged against the reference) on the Hopper kernel, which must run."""
    with _sm90_env("1"):
        _, names = _forward_kernels(lambda: _base._check_forward(lengths, **kwargs))
    _assert_ran(names, SM90_KERNEL)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mask", MASKS.keys())
def test_sm90_forward_masks_match_reference(mask: str, dtype: torch.dtype, dim: int) -> None:
    """Every mask option, both dtypes and head dims, on odd, 1-token, empty and multi-tile sequences."""
    _check_sm90_forward(LENGTHS, dtype=dtype, dim=dim, **_base._mask_options(mask))


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_sm90_forward_offset_dtypes(dim: int, offsets_dtype: torch.dtype) -> None:
    _check_sm90_forward(LENGTHS, dim=dim, offsets_dtype=offsets_dtype, targets=_base._targets(LENGTHS), heads=3)


@pytest.mark.parametrize("dim", [64, 128])
def test_sm90_forward_short_empty_and_padded_batches(dim: int) -> None:
    """max_seq_len above the longest sequence, single tokens, only empty sequences, lengths around the tile sizes."""
    _check_sm90_forward(LENGTHS, dim=dim, max_seq_len=1000)
    _check_sm90_forward((1, 1, 1), heads=1, dim=dim)
    _check_sm90_forward((63, 65, 127, 128, 129, 191, 255, 257), dim=dim, causal=False)
    with _sm90_env("1"):  # only empty sequences: nothing to launch, an all-empty output
        _base._check_forward((0, 0), dim=dim)


def test_sm90_forward_long_jagged_batch() -> None:
    gen = torch.Generator().manual_seed(5)
    lengths = tuple(torch.randint(1, 2049, (6,), generator=gen).tolist())
    _check_sm90_forward(lengths, heads=4, dim=128, targets=tuple(min(n, 9) for n in lengths), max_seq_len=2048)


@pytest.mark.parametrize("dim", [64, 128])
def test_sm90_forward_strided_heads_view(dim: int) -> None:
    """q, k, v as views of one packed [L, H, 3D] tensor (row stride 3HD), as an HSTU layer produces them."""
    lengths = (100, 0, 33, 200)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    packed = torch.randn(sum(lengths), 2, 3 * dim, device="cuda").to(torch.bfloat16)
    q, k, v = packed.split(dim, dim=2)
    options = dict(causal=True, num_targets=None, contextual_seq_len=0, max_attn_len=0)
    with _sm90_env("1"):
        got, names = _forward_kernels(
            lambda: hstu_attn_cutlass_forward(q, k, v, offsets, 200, alpha=0.125, scale=0.01, **options)
        )
    _assert_ran(names, SM90_KERNEL)
    want = hstu_attn_reference(q.float(), k.float(), v.float(), offsets, 200, alpha=0.125, scaling_seqlen=100)
    low = hstu_attn_reference(q, k, v, offsets, 200, alpha=0.125, scaling_seqlen=100)
    assert _base._errors(got.float(), want)[1] <= 2.0 * _base._errors(low.float(), want)[1] + 1e-4


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mask", ["causal", "everything_noncausal", "alpha_scaling"])
def test_sm90_env_switch_agrees_with_sm80_forward(mask: str, dtype: torch.dtype, dim: int) -> None:
    """HSTU_ATTN_CUTLASS_SM90=0 runs the SM80 kernel, =1 and unset (the default) the Hopper one; both agree within
    rounding."""
    q, k, v, offsets = _base._inputs(LENGTHS, 2, dim, dtype, seed=11)
    options = _base._mask_options(mask)
    targets = options.pop("targets", None)
    options["num_targets"] = None if targets is None else torch.tensor(targets, device="cuda")

    def forward() -> torch.Tensor:
        return hstu_attn_varlen_func(q, k, v, offsets, max(LENGTHS), backend=KernelBackend.CUTLASS, **options)

    with _sm90_env("0"):
        sm80, sm80_names = _forward_kernels(forward)
    with _sm90_env(None):  # the default: the Hopper kernel
        _, default_names = _forward_kernels(forward)
    _assert_ran(default_names, SM90_KERNEL)
    with _sm90_env("1"):
        sm90, sm90_names = _forward_kernels(forward)
    _assert_ran(sm80_names, SM80_KERNEL)
    _assert_ran(sm90_names, SM90_KERNEL)
    assert torch.isfinite(sm90).all()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(sm90.float(), sm80.float(), rtol=4 * eps, atol=4 * eps * sm80.float().abs().max().item())


def test_sm90_not_taken_with_rab_or_head_dim_256() -> None:
    """rab and head dim 256 stay on the SM80 forward (the Hopper kernel has neither)."""
    q, k, v, offsets = _base._inputs((70, 5), 2, 64, torch.bfloat16, seed=3)
    rab = torch.randn(2, 2, 70, 70, device="cuda").to(torch.bfloat16)
    with _sm90_env("1"):
        _, names = _forward_kernels(
            lambda: hstu_attn_varlen_func(q, k, v, offsets, 70, backend=KernelBackend.CUTLASS, rab=rab)
        )
        _assert_ran(names, SM80_KERNEL)
        q, k, v, offsets = _base._inputs((70, 5), 2, 256, torch.bfloat16, seed=3)
        _, names = _forward_kernels(lambda: hstu_attn_varlen_func(q, k, v, offsets, 70, backend=KernelBackend.CUTLASS))
        _assert_ran(names, SM80_KERNEL)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_sm90_next_sequence_stays_out(causal: bool, dim: int) -> None:
    """TMA tiles reach past a sequence's end into the next sequence's tokens: those rows must never contribute. With
    every token of the other sequences nan/inf in q, k and v, each sequence's output equals its own run alone."""
    lengths = (70, 1, 129, 64, 33)
    q, k, v, offsets = _base._inputs(lengths, 2, dim, torch.bfloat16, seed=9)
    bounds = offsets.tolist()
    options = dict(causal=causal, backend=KernelBackend.CUTLASS)
    with _sm90_env("1"):
        for b, n in enumerate(lengths):
            lo, hi = bounds[b], bounds[b + 1]
            poisoned = [t.clone() for t in (q, k, v)]
            for i, t in enumerate(poisoned):
                t[:lo] = float("nan") if i % 2 else float("inf")
                t[hi:] = float("-inf") if i % 2 else float("nan")
            got, names = _forward_kernels(
                lambda inputs=poisoned: hstu_attn_varlen_func(*inputs, offsets, max(lengths), **options)
            )
            _assert_ran(names, SM90_KERNEL)
            alone = hstu_attn_varlen_func(
                q[lo:hi], k[lo:hi], v[lo:hi], torch.tensor([0, n], device="cuda"), max(lengths), **options
            )
            assert torch.isfinite(got[lo:hi]).all(), f"sequence {b}: a neighbour's non-finite token leaked in"
            torch.testing.assert_close(got[lo:hi], alone, msg=lambda m, b=b: f"sequence {b}: {m}")


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mask", MASKS.keys())
def test_sm90_masked_non_finite_stays_out(mask: str, dtype: torch.dtype, tensor: str, dim: int) -> None:
    """nan/inf/-inf in q, k or v at one token per sequence (head 0): every (token, head) output row that may not
    depend on it equals the clean run and is finite; every row that does is non-finite (test_cutlass_gpu.py's plan).
    q and k reach the output through the scores (an invalid pair's score is selected away, never multiplied), v
    through finite.cuh's zeroing and NaN bitmap in masked tiles."""
    seed = list(MASKS).index(mask) + _base.POISONED.index(tensor)
    options = _base._poison_options(mask)
    heads = 2
    q, k, v, offsets = _base._inputs(LENGTHS, heads, dim, dtype, seed=seed)
    inputs = {"q": q, "k": k, "v": v}
    poisons, reached = _base._poison_plan(tensor, options, seed, heads)
    poisoned = dict(inputs, **{tensor: inputs[tensor].clone()})
    for token, value in poisons:
        poisoned[tensor][token, 0, 5] = value
    if options.get("num_targets") is not None:
        options["num_targets"] = torch.tensor(options["num_targets"], device="cuda")

    def forward(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        q, k, v = (tensors[name] for name in "qkv")
        out = hstu_attn_varlen_func(q, k, v, offsets, max(LENGTHS), backend=KernelBackend.CUTLASS, **options)
        return out.float().cpu()

    with _sm90_env("1"):
        want, _ = _forward_kernels(lambda: forward(inputs))
        got, names = _forward_kernels(lambda: forward(poisoned))
    _assert_ran(names, SM90_KERNEL)
    kept = ~reached["out"]
    assert torch.isfinite(want).all(), "the clean run is not finite"
    assert torch.isfinite(got[kept]).all(), f"a non-finite {tensor} entry leaked to a row that may not see it"
    torch.testing.assert_close(got[kept], want[kept])
    assert not torch.isfinite(got).all(dim=-1)[reached["out"]].any(), f"a row that sees a non-finite {tensor} is finite"
