"""The deterministic backward of the CUTLASS backend (`deterministic=True`; csrc/bwd_kernel.cuh's DqTurns): each key
block's dQ tile is added in a fixed order, so dq, dk, dv (and a per-head rab's gradient) repeat their bits.

GPU only, skipped without CUDA or the built library. Every test checks with the profiler that the CUTLASS (SM80-style)
backward kernel ran, not the Triton one, and judges the gradients against the fp32 reference as test_cutlass_gpu.py
does (its helpers, loaded here): within 2x (relative L2) / 4x (relative max) of the error of the reference run in the
input dtype. Inputs that the deterministic CUTLASS backward does not take (the fused relative bias, a rab shared by the
heads that needs its gradient) run the Triton backward, also checked by kernel name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import test_cutlass_gpu as _base  # a sibling test file: tests/conftest.py puts this folder on sys.path
import torch
from torch.profiler import ProfilerActivity, profile

from hstu_attn import KernelBackend, hstu_attn_reference, hstu_attn_varlen_func
from hstu_attn.cutlass import hstu_attn_cutlass_backward

pytestmark = _base.pytestmark
LENGTHS, MASKS = _base.LENGTHS, _base.MASKS
CUTLASS_BWD = re.compile(r"hstu_attn_bwd_kernel[<I]")  # the SM80-style backward, demangled or not
HOPPER_BWD = re.compile(r"hstu_attn_bwd_sm90_kernel")


def _backward_kernels(fn: Callable[[], Any]) -> tuple[Any, set[str]]:
    """fn()'s result and the names of the CUDA kernels it launched whose name says backward."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    return result, {event.name for event in prof.events() if "bwd" in event.name or "backward" in event.name}


def _assert_cutlass_ran(names: set[str]) -> None:
    if not names:
        pytest.skip("the profiler recorded no CUDA kernels (CUPTI unavailable?): cannot tell which backward ran")
    assert any(CUTLASS_BWD.search(name) for name in names), f"the CUTLASS backward did not run: {sorted(names)}"
    assert not any(HOPPER_BWD.search(name) for name in names), f"the Hopper backward ran: {sorted(names)}"


def _gradients(inputs, offsets, max_seq_len, grad_out, backend=None, **kwargs) -> list[torch.Tensor]:
    """Gradients of the leaves `inputs` (q, k, v and optionally rab) through backend (None: the reference)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    q, k, v, *rab = leaves
    rab_kwarg = dict(rab=rab[0]) if rab else {}
    if backend is None:
        out = hstu_attn_reference(q, k, v, offsets, max_seq_len, **rab_kwarg, **kwargs)
    else:
        out = hstu_attn_varlen_func(q, k, v, offsets, max_seq_len, backend=backend, deterministic=True,
                                    **rab_kwarg, **kwargs)  # fmt: skip
    out.backward(grad_out)
    return [leaf.grad for leaf in leaves]


def _check_deterministic(lengths, *, heads=2, dim=128, dtype=torch.bfloat16, offsets_dtype=torch.int64,
                         rab_heads=0, runs=3, **options) -> None:  # fmt: skip
    """`runs` deterministic CUTLASS backwards on fresh inputs: the CUTLASS kernel ran, every run has the first's bits,
    and the gradients are within the reference's error bounds."""
    q, k, v, offsets = _base._inputs(lengths, heads, dim, dtype, offsets_dtype=offsets_dtype, seed=len(options) + dim)
    max_seq_len = options.pop("max_seq_len", max(lengths, default=0))
    targets = options.pop("targets", None)
    kwargs = dict(num_targets=None if targets is None else torch.tensor(targets, device="cuda"), **options)
    inputs = [q, k, v]
    if rab_heads:
        inputs.append(torch.randn(len(lengths), rab_heads, max_seq_len, max_seq_len, device="cuda").to(dtype))
    grad_out = torch.randn(q.shape, device="cuda").to(dtype)
    first, names = _backward_kernels(
        lambda: _gradients(inputs, offsets, max_seq_len, grad_out, KernelBackend.CUTLASS, **kwargs)
    )
    _assert_cutlass_ran(names)
    for run in range(1, runs):
        again = _gradients(inputs, offsets, max_seq_len, grad_out, KernelBackend.CUTLASS, **kwargs)
        for name, a, b in zip(("dq", "dk", "dv", "drab"), first, again):
            assert torch.equal(a, b), f"{name} of run {run} differs from run 0's bits"
    fp32 = [t.float() for t in inputs]
    want = _gradients(fp32, offsets, max_seq_len, grad_out.float(), **kwargs)
    low = _gradients(inputs, offsets, max_seq_len, grad_out, **kwargs)
    for name, got, w, lo in zip(("dq", "dk", "dv", "drab"), first, want, low):
        assert got.dtype == dtype and got.shape == w.shape, name
        if name == "drab":  # only the valid pairs are defined: the reference's zeros elsewhere
            valid = w != 0
            got, w, lo = got[valid], w[valid], lo[valid]
        low_max, low_l2 = _base._errors(lo.float(), w)
        err_max, err_l2 = _base._errors(got.float(), w)
        assert err_l2 <= 2.0 * low_l2 + 1e-4, f"{name}: relative L2 error {err_l2:.3g} > 2 x {low_l2:.3g}"
        assert err_max <= 4.0 * low_max + 1e-3, f"{name}: relative max error {err_max:.3g} > 4 x {low_max:.3g}"


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("mask", MASKS.keys())
def test_deterministic_backward_masks_repeat_and_match_reference(mask: str, dim: int) -> None:
    """Every mask option on odd, 1-token, empty and multi-block sequences (key blocks that skip query blocks pass
    their turn too)."""
    _check_deterministic(LENGTHS, dim=dim, **_base._mask_options(mask))


@pytest.mark.parametrize("dim", [64, 128])
def test_deterministic_backward_fp16_int32_offsets_and_sizes(dim: int) -> None:
    _check_deterministic(LENGTHS, dim=dim, dtype=torch.float16, offsets_dtype=torch.int32, heads=3)
    _check_deterministic(LENGTHS, dim=dim, max_seq_len=1000)  # more counters than query blocks
    _check_deterministic((1, 1, 1), dim=dim, heads=1)
    _check_deterministic((0, 0), dim=dim)


def test_deterministic_backward_long_sequences_many_key_blocks() -> None:
    """Up to 16 key blocks adding into one query block in turn, causal and not."""
    gen = torch.Generator().manual_seed(11)
    lengths = tuple(torch.randint(1, 2049, (4,), generator=gen).tolist())
    targets = tuple(min(n, 9) for n in lengths)
    _check_deterministic(lengths, heads=2, dim=128, targets=targets, max_seq_len=2048, runs=2)
    _check_deterministic(lengths, heads=2, dim=64, causal=False, max_seq_len=2048, runs=2)


@pytest.mark.parametrize("mask", ["causal", "everything_noncausal"])
def test_deterministic_backward_with_a_per_head_rab(mask: str) -> None:
    """A rab per head: its gradient is stored once per entry (no atomics), so it repeats too."""
    _check_deterministic(LENGTHS, dim=64, heads=2, rab_heads=2, **_base._mask_options(mask))


def test_deterministic_backward_ignores_the_hopper_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """HSTU_ATTN_CUTLASS_SM90=1 leaves the deterministic backward on the SM80-style kernel."""
    monkeypatch.setenv("HSTU_ATTN_CUTLASS_SM90", "1")
    _check_deterministic(LENGTHS, dim=128, runs=2)


def test_deterministic_shared_rab_gradient_runs_triton_and_direct_call_refuses() -> None:
    """A rab shared by 2 heads that needs its gradient: hstu_attn_varlen_func runs the Triton backward; the direct
    CUTLASS call says why it cannot."""
    lengths = (77, 0, 130)
    q, k, v, offsets = _base._inputs(lengths, 2, 64, torch.bfloat16, seed=4)
    rab = torch.randn(3, 1, 130, 130, device="cuda").to(torch.bfloat16)
    grad_out = torch.randn(q.shape, device="cuda").to(torch.bfloat16)
    _, names = _backward_kernels(lambda: _gradients([q, k, v, rab], offsets, 130, grad_out, KernelBackend.CUTLASS))
    if names:
        assert not any(CUTLASS_BWD.search(name) for name in names), f"CUTLASS ran: {sorted(names)}"
    with pytest.raises(NotImplementedError, match="a rab shared by the heads"):
        hstu_attn_cutlass_backward(
            grad_out, q, k, v, offsets, 130, alpha=0.125, scale=1 / 130, causal=True, num_targets=None,
            contextual_seq_len=0, max_attn_len=0, rab=rab, deterministic=True,
        )  # fmt: skip
