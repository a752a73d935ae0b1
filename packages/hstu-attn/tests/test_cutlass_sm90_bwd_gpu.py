"""The Hopper backward of the CUTLASS backend (`csrc/bwd_sm90_kernel.cuh`: TMA, wgmma) against the PyTorch reference.

GPU only: skipped unless the device is sm_90 (H100/H200) and `libhstu_attn_cutlass.so` is built with sm_90a code.
The backward takes that kernel for head dims 64 and 128 without rab (with or without the fused relative bias),
non-deterministic, only with `HSTU_ATTN_CUTLASS_SM90=1` (opt-in until these tests pass on the current code); every
test here checks with the profiler
which backward kernel ran, so a dispatch that falls back to the SM80 kernel fails instead of passing unnoticed.
dq, dk, dv are judged by test_cutlass_gpu.py's own helpers (loaded here): the kernel's error against the fp32
reference (`hstu_attn_reference_backward` through autograd) may exceed the error of the reference run in the input
dtype by at most 2x (relative L2) / 4x (relative max); the non-finite containment test is test_cutlass_gpu.py's,
run on the Hopper backward.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import test_cutlass_sm90_gpu as _sm90  # a sibling test file: tests/conftest.py puts this folder on sys.path
import torch

from hstu_attn import KernelBackend, hstu_attn_reference, hstu_attn_varlen_func
from hstu_attn.cutlass import hstu_attn_cutlass_backward

_base, _sm90_env = _sm90._base, _sm90._sm90_env
pytestmark = _sm90.pytestmark
LENGTHS, MASKS = _base.LENGTHS, _base.MASKS
# Kernel names as the profiler reports them, demangled (`hstu_attn_bwd_kernel<...>`) or not (`...kernelI...`).
SM90_BWD = re.compile(r"hstu_attn_bwd_sm90_kernel")
SM80_BWD = re.compile(r"hstu_attn_bwd_kernel[<I]")


def _backward_kernels(fn: Callable[[], Any]) -> tuple[Any, set[str]]:
    """fn()'s result and the names of the CUTLASS backward kernels it launched."""
    return _sm90._kernels_launched(fn, "hstu_attn_bwd")


def _assert_ran(names: set[str], kernel: re.Pattern[str]) -> None:
    _sm90._assert_launched(names, kernel, (SM90_BWD, SM80_BWD), "backward")


def _check_sm90_backward(lengths, **kwargs) -> None:
    """_base._check_backward (fresh inputs, dq/dk/dv judged against the reference) with the Hopper backward."""
    with _sm90_env("1"):
        _, names = _backward_kernels(lambda: _base._check_backward(lengths, **kwargs))
    _assert_ran(names, SM90_BWD)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mask", MASKS.keys())
def test_sm90_backward_masks_match_reference(mask: str, dtype: torch.dtype, dim: int) -> None:
    """Every mask option, both dtypes and head dims, on odd, 1-token, empty and multi-tile sequences."""
    _check_sm90_backward(LENGTHS, dtype=dtype, dim=dim, **_base._mask_options(mask))


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_sm90_backward_offset_dtypes(dim: int, offsets_dtype: torch.dtype) -> None:
    _check_sm90_backward(LENGTHS, dim=dim, offsets_dtype=offsets_dtype, targets=_base._targets(LENGTHS), heads=3)


@pytest.mark.parametrize("dim", [64, 128])
def test_sm90_backward_short_empty_and_padded_batches(dim: int) -> None:
    """max_seq_len above the longest sequence, single tokens, only empty sequences, lengths around the tiles (64 query
    rows, 128 keys)."""
    _check_sm90_backward(LENGTHS, dim=dim, max_seq_len=1000)
    _check_sm90_backward((1, 1, 1), heads=1, dim=dim)
    _check_sm90_backward((63, 65, 127, 128, 129, 191, 255, 257), dim=dim, causal=False)
    _check_sm90_backward((63, 64, 65, 1, 127), dim=dim, contextual_seq_len=65, targets=(5, 3, 1, 0, 60))
    with _sm90_env("1"):  # only empty sequences: nothing to launch, all-empty gradients
        _base._check_backward((0, 0), dim=dim)


def test_sm90_backward_long_jagged_batch() -> None:
    gen = torch.Generator().manual_seed(5)
    lengths = tuple(torch.randint(1, 2049, (4,), generator=gen).tolist())
    _check_sm90_backward(lengths, heads=2, dim=128, targets=tuple(min(n, 9) for n in lengths), max_seq_len=2048)


@pytest.mark.parametrize("dim", [64, 128])
def test_sm90_backward_strided_heads_view(dim: int) -> None:
    """q, k, v, grad_out as views of one packed [L, H, 4D] tensor (row stride 4HD), called directly."""
    lengths = (100, 0, 33)
    packed = torch.randn(sum(lengths), 2, 4 * dim, device="cuda").to(torch.bfloat16)
    q, k, v, grad_out = packed.split(dim, dim=2)
    offsets = torch.tensor([0, 100, 100, 133], device="cuda")
    options = dict(alpha=0.125, scale=0.01, causal=True, num_targets=None, contextual_seq_len=0, max_attn_len=0)
    with _sm90_env("1"):
        grads, names = _backward_kernels(
            lambda: hstu_attn_cutlass_backward(grad_out, q, k, v, offsets, 100, **options)[:3]
        )
    _assert_ran(names, SM90_BWD)
    leaves = [t.float().clone().requires_grad_() for t in (q, k, v)]
    hstu_attn_reference(*leaves, offsets, 100, alpha=0.125, scaling_seqlen=100).backward(grad_out.float())
    for name, got, leaf in zip("qkv", grads, leaves):
        assert got.shape == leaf.shape and _base._errors(got.float(), leaf.grad)[1] < 2e-2, f"d{name}"


def _varlen_grads(inputs, grad_out: torch.Tensor, offsets: torch.Tensor, max_seq_len: int, **options):
    """dq, dk, dv of backend=CUTLASS for `inputs` (q, k, v) and the output gradient `grad_out`."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = hstu_attn_varlen_func(*leaves, offsets, max_seq_len, backend=KernelBackend.CUTLASS, **options)
    out.backward(grad_out)
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mask", ["causal", "everything_noncausal", "alpha_scaling"])
def test_sm90_env_switch_agrees_with_sm80_backward(mask: str, dtype: torch.dtype, dim: int) -> None:
    """HSTU_ATTN_CUTLASS_SM90=0 (and unset) runs the SM80 backward, =1 the Hopper one; both agree within rounding."""
    q, k, v, offsets = _base._inputs(LENGTHS, 2, dim, dtype, seed=13)
    grad_out = torch.randn(q.shape, device="cuda").to(dtype)
    options = _base._mask_options(mask)
    targets = options.pop("targets", None)
    options["num_targets"] = None if targets is None else torch.tensor(targets, device="cuda")

    def backward() -> list[torch.Tensor]:
        return _varlen_grads((q, k, v), grad_out, offsets, max(LENGTHS), **options)

    with _sm90_env("0"):
        sm80, sm80_names = _backward_kernels(backward)
    with _sm90_env(None):  # the default while the Hopper backward is opt-in
        _, default_names = _backward_kernels(backward)
    with _sm90_env("1"):
        sm90, sm90_names = _backward_kernels(backward)
    _assert_ran(sm80_names, SM80_BWD)
    _assert_ran(default_names, SM80_BWD)
    _assert_ran(sm90_names, SM90_BWD)
    eps = torch.finfo(dtype).eps
    for name, got, want in zip("qkv", sm90, sm80):
        assert torch.isfinite(got).all(), f"non-finite d{name}"
        scale = want.float().abs().max().item()
        torch.testing.assert_close(
            got.float(), want.float(), rtol=8 * eps, atol=8 * eps * scale, msg=lambda m, name=name: f"d{name}: {m}"
        )


# Table layouts of the fused relative bias (test_cutlass_gpu's _bias: 0 heads is no such table).
RELATIVE = {
    "position_and_time": dict(),
    "position_only": dict(time_heads=0),
    "time_only_per_head": dict(position_heads=0, time_heads=2),
    "shared_tables_clamped": dict(position_heads=1, time_heads=1, reach=5, num_buckets=8),
}


def _check_sm90_relative(lengths, **kwargs) -> None:
    """_base._check_relative (forward and backward with the fused relative bias: out, dq, dk, dv and both tables'
    gradients judged against the reference), with the Hopper forward and the Hopper backward both required to run."""
    with _sm90_env("1"):
        _, names = _sm90._kernels_launched(lambda: _base._check_relative(lengths, **kwargs), "hstu_attn_")
    _sm90._assert_ran({name for name in names if "hstu_attn_fwd" in name}, _sm90.SM90_KERNEL)
    _assert_ran({name for name in names if "hstu_attn_bwd" in name}, SM90_BWD)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("tables", RELATIVE.keys())
def test_sm90_relative_bias(tables: str, dtype: torch.dtype, dim: int) -> None:
    """The fused relative bias on the Hopper forward and backward, every table layout, with targets."""
    _check_sm90_relative(LENGTHS, dim=dim, dtype=dtype, targets=_base._targets(LENGTHS), **RELATIVE[tables])


@pytest.mark.parametrize(
    "options",
    [dict(causal=False), dict(contextual_seq_len=3), dict(max_attn_len=7), dict(num_buckets=3000, divisor=0.004)],
    ids=["noncausal", "contextual", "window", "time_sums_in_global_memory"],
)
def test_sm90_relative_bias_masks_and_edges(options: dict) -> None:
    """Mask options and more time buckets than the backward's shared sums hold, then lengths 1 and empty sequences."""
    _check_sm90_relative(LENGTHS, dim=128, **options)
    _check_sm90_relative((1, 0, 1, 3), heads=1, position_heads=1, time_heads=1)


@pytest.mark.parametrize(
    "timestamps_dtype",
    [torch.int32, torch.int64, torch.float32, torch.float64, torch.float16, torch.bfloat16],
    ids=["int32", "int64", "fp32", "fp64", "fp16", "bf16"],
)
def test_sm90_relative_bias_timestamp_dtypes(timestamps_dtype: torch.dtype) -> None:
    """t_j - t_i in the timestamps' dtype, as test_cutlass_gpu's test_relative_bias_timestamp_dtypes on SM80."""
    max_gap = 3 if timestamps_dtype in (torch.float16, torch.bfloat16) else 5000
    options = dict(timestamps_dtype=timestamps_dtype, max_gap=max_gap, divisor=0.1)
    _check_sm90_relative(LENGTHS, dim=64, position_heads=0, time_heads=2, **options)


def test_sm90_relative_bias_low_precision_tables() -> None:
    """bf16 and fp16 tables (their gradients cast to their dtype)."""
    _check_sm90_relative(LENGTHS, dim=128, table_dtype=torch.bfloat16)
    _check_sm90_relative(LENGTHS, dim=64, dtype=torch.float16, table_dtype=torch.float16, causal=False)


def test_sm90_backward_not_taken_with_rab_head_dim_256_or_deterministic() -> None:
    """rab and deterministic=True stay on the SM80 backward (its deterministic dQ order); head dim 256 runs the
    Triton backward (neither CUTLASS backward kernel)."""
    q, k, v, offsets = _base._inputs((70, 5), 2, 64, torch.bfloat16, seed=3)
    grad_out = torch.randn(q.shape, device="cuda").to(torch.bfloat16)
    rab = torch.randn(2, 2, 70, 70, device="cuda").to(torch.bfloat16)
    with _sm90_env("1"):
        _, names = _backward_kernels(lambda: _varlen_grads((q, k, v), grad_out, offsets, 70, rab=rab))
        _assert_ran(names, SM80_BWD)
        _, names = _backward_kernels(lambda: _varlen_grads((q, k, v), grad_out, offsets, 70, deterministic=True))
        _assert_ran(names, SM80_BWD)
        q, k, v, offsets = _base._inputs((70, 5), 2, 256, torch.bfloat16, seed=3)
        grad_out = torch.randn(q.shape, device="cuda").to(torch.bfloat16)
        _, names = _backward_kernels(lambda: _varlen_grads((q, k, v), grad_out, offsets, 70))
        assert not any(SM90_BWD.search(n) or SM80_BWD.search(n) for n in names), sorted(names)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_sm90_backward_next_sequence_stays_out(causal: bool, dim: int) -> None:
    """TMA tiles reach past a sequence's end into the next sequence's tokens: with every token of the other sequences
    nan/inf in q, k, v and grad_out, each sequence's dq, dk, dv are finite and equal its own run alone."""
    lengths = (70, 1, 129, 64, 33)
    q, k, v, offsets = _base._inputs(lengths, 2, dim, torch.bfloat16, seed=9)
    grad_out = torch.randn(q.shape, device="cuda").to(torch.bfloat16)
    bounds = offsets.tolist()
    with _sm90_env("1"):
        for b, n in enumerate(lengths):
            lo, hi = bounds[b], bounds[b + 1]
            poisoned = [t.clone() for t in (q, k, v, grad_out)]
            for i, t in enumerate(poisoned):
                t[:lo] = float("nan") if i % 2 else float("inf")
                t[hi:] = float("-inf") if i % 2 else float("nan")
            got, names = _backward_kernels(
                lambda p=poisoned: _varlen_grads(p[:3], p[3], offsets, max(lengths), causal=causal)
            )
            _assert_ran(names, SM90_BWD)
            alone = _varlen_grads(
                (q[lo:hi], k[lo:hi], v[lo:hi]), grad_out[lo:hi], torch.tensor([0, n], device="cuda"), max(lengths),
                causal=causal,
            )  # fmt: skip
            for name, g, a in zip("qkv", got, alone):
                assert torch.isfinite(g[lo:hi]).all(), f"sequence {b}: a neighbour's non-finite token reached d{name}"
                torch.testing.assert_close(
                    g[lo:hi].float(), a.float(), **_base._run_to_run_tolerance(f"d{name}", torch.bfloat16),
                    msg=lambda m, b=b, name=name: f"sequence {b}, d{name}: {m}",
                )  # fmt: skip


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("tensor", _base.POISONED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mask", MASKS.keys())
def test_sm90_backward_masked_non_finite_stays_out(mask: str, dtype: torch.dtype, tensor: str, dim: int) -> None:
    """test_cutlass_gpu.py's containment test on the Hopper backward: nan/inf/-inf in q, k, v or grad_out at one token
    per sequence (head 0); every (token, head) of dq, dk, dv that cannot depend on it equals the clean run and is
    finite, every one that does is non-finite (masked tiles: q/dO entries zeroed in the pipeline stage before dK/dV,
    the dV NaN bitmap, dQ from a zeroed copy of K)."""
    with _sm90_env("1"):
        _, names = _backward_kernels(lambda: _base.test_masked_non_finite_values_stay_out(mask, dtype, tensor, dim))
    _assert_ran(names, SM90_BWD)
