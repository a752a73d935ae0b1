"""CUTLASS/CuTe backend against the PyTorch reference (GPU only; skipped without CUDA or without the built library).

The forward and the backward (head dims 64 and 128; 256 runs the Triton backward; deterministic=True:
test_cutlass_deterministic_gpu.py) run the
compiled kernels (`libhstu_attn_cutlass.so`), on every mask option, both offset dtypes, bf16 and fp16 (fp32 is
refused with a message), odd lengths, length 1 and empty sequences; with a materialized rab (per head or shared by
the heads) the same, plus rab's gradient; with the fused relative bias (position and log-bucketed time tables, shared
or per head, every timestamp dtype the kernels read, alone or beside a rab) the same, plus both table gradients.
Errors are judged as in test_hstu_triton.py: the kernel's error against the fp32 reference may exceed the error that
rounding the inputs causes by at most 2x (relative L2) / 4x (relative max) the error of the reference run in the input
dtype.
Non-finite containment is tested as in test_hstu_nan_containment.py: an inf/nan at a token a row may not attend never
reaches that row's output or gradients; the entries that do attend it come out non-finite.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
import torch
from torch import Tensor

from hstu_attn import KernelBackend, RelativeBias, hstu_attn_reference, hstu_attn_varlen_func
from hstu_attn.cutlass import cutlass_available, hstu_attn_cutlass_backward, hstu_attn_cutlass_forward
from hstu_attn.reference import hstu_attn_reference_backward, hstu_attn_valid_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not cutlass_available(),
        reason="needs CUDA and libhstu_attn_cutlass.so (HSTU_ATTN_BUILD_CUDA=1 build)",
    ),
]


@pytest.fixture(autouse=True)
def _sm80_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """This file tests the SM80-style kernels; on sm_90 the Hopper ones are the default, so they are switched off
    (test_cutlass_sm90_gpu.py and test_cutlass_sm90_bwd_gpu.py run these helpers with them on)."""
    monkeypatch.setenv("HSTU_ATTN_CUTLASS_SM90", "0")


# Odd lengths, length 1, empty sequences, one longer than several 128-row and 64-column tiles.
LENGTHS = (300, 1, 0, 77, 129, 64, 0, 513)


def _inputs(lengths, heads, dim, dtype, *, offsets_dtype=torch.int64, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim, device="cuda", generator=gen).to(dtype) for _ in range(3))
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=offsets_dtype)
    return q, k, v, offsets


def _errors(got: Tensor, want: Tensor) -> tuple[float, float]:
    if want.numel() == 0:
        return 0.0, 0.0
    diff = (got - want).float()
    return (
        diff.abs().max().item() / max(want.abs().max().item(), 1e-6),
        diff.norm().item() / max(want.norm().item(), 1e-6),
    )


def _check_forward(lengths, *, heads=2, dim=128, dtype=torch.bfloat16, offsets_dtype=torch.int64, **options):
    q, k, v, offsets = _inputs(lengths, heads, dim, dtype, offsets_dtype=offsets_dtype, seed=len(options) + dim)
    max_seq_len = options.pop("max_seq_len", max(lengths, default=0))
    targets = options.pop("targets", None)
    num_targets = None if targets is None else torch.tensor(targets, device="cuda", dtype=offsets_dtype)
    kwargs = dict(num_targets=num_targets, **options)
    got = hstu_attn_varlen_func(q, k, v, offsets, max_seq_len, backend=KernelBackend.CUTLASS, **kwargs)
    assert got.dtype == dtype and got.shape == (q.shape[0], heads, dim)
    assert torch.isfinite(got).all(), "non-finite output"
    want = hstu_attn_reference(q.float(), k.float(), v.float(), offsets, max_seq_len, **kwargs)
    low = hstu_attn_reference(q, k, v, offsets, max_seq_len, **kwargs)
    low_max, low_l2 = _errors(low.float(), want)
    err_max, err_l2 = _errors(got.float(), want)
    # Inputs are already in the low dtype, so the rounding error of the inputs is 0 here.
    assert err_l2 <= 2.0 * low_l2 + 1e-4, f"relative L2 error {err_l2:.3g} > 2 x {low_l2:.3g}"
    assert err_max <= 4.0 * low_max + 1e-3, f"relative max error {err_max:.3g} > 4 x {low_max:.3g}"


def _targets(lengths):
    return tuple(min(n, t) for n, t in zip(lengths, (7, 1, 0, 77, 3, 64, 0, 20)))


MASKS = {
    "causal": dict(),
    "noncausal": dict(causal=False),
    "targets": dict(targets=True),
    "targets_noncausal": dict(causal=False, targets=True),
    "contextual": dict(contextual_seq_len=5),
    "contextual_targets": dict(contextual_seq_len=70, targets=True),
    "window": dict(max_attn_len=40),
    "window_noncausal": dict(causal=False, max_attn_len=100),
    "everything_causal": dict(contextual_seq_len=3, max_attn_len=64, targets=True),
    "everything_noncausal": dict(causal=False, contextual_seq_len=3, max_attn_len=64, targets=True),
    "alpha_scaling": dict(alpha=0.3, scaling_seqlen=77),
}


def _mask_options(mask: str) -> dict:
    """MASKS[mask] as keyword arguments of the _check_* helpers: `targets=True` becomes LENGTHS' targets."""
    options = dict(MASKS[mask])
    if options.pop("targets", False):
        options["targets"] = _targets(LENGTHS)
    return options


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mask", MASKS.keys())
def test_forward_masks_match_reference(mask: str, dtype: torch.dtype) -> None:
    options = _mask_options(mask)
    _check_forward(LENGTHS, dtype=dtype, **options)


@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_forward_head_dims_and_offset_dtypes(dim: int, offsets_dtype: torch.dtype) -> None:
    _check_forward(LENGTHS, dim=dim, offsets_dtype=offsets_dtype, targets=_targets(LENGTHS), heads=3)


def test_forward_max_seq_len_above_longest_and_single_tokens() -> None:
    _check_forward(LENGTHS, max_seq_len=1000)
    _check_forward((1, 1, 1), heads=1, dim=64)
    _check_forward((0, 0), dim=64)


def test_forward_long_jagged_batch() -> None:
    gen = torch.Generator().manual_seed(4)
    lengths = tuple(torch.randint(1, 2049, (6,), generator=gen).tolist())
    _check_forward(lengths, heads=4, dim=128, targets=tuple(min(n, 9) for n in lengths), max_seq_len=2048)


def test_forward_strided_heads_view() -> None:
    """q, k, v as views of one packed [L, H, 3D] tensor (row stride 3HD), as an HSTU layer produces them."""
    lengths = (100, 0, 33)
    heads, dim = 2, 64
    packed = torch.randn(sum(lengths), heads, 3 * dim, device="cuda").to(torch.bfloat16)
    q, k, v = packed.split(dim, dim=2)
    offsets = torch.tensor([0, 100, 100, 133], device="cuda")
    got = hstu_attn_cutlass_forward(
        q, k, v, offsets, 100, alpha=0.125, scale=0.01, causal=True, num_targets=None, contextual_seq_len=0,
        max_attn_len=0,
    )  # fmt: skip
    want = hstu_attn_reference(q.float(), k.float(), v.float(), offsets, 100, alpha=0.125, scaling_seqlen=100)
    low = hstu_attn_reference(q, k, v, offsets, 100, alpha=0.125, scaling_seqlen=100)
    assert _errors(got.float(), want)[1] <= 2.0 * _errors(low.float(), want)[1] + 1e-4


def _check_backward(lengths, *, heads=2, dim=128, dtype=torch.bfloat16, offsets_dtype=torch.int64, **options):
    """Gradients of backend=CUTLASS against the fp32 reference, judged like the forward (see the module docstring)."""
    q, k, v, offsets = _inputs(lengths, heads, dim, dtype, offsets_dtype=offsets_dtype, seed=len(options) + dim + 7)
    max_seq_len = options.pop("max_seq_len", max(lengths, default=0))
    targets = options.pop("targets", None)
    num_targets = None if targets is None else torch.tensor(targets, device="cuda", dtype=offsets_dtype)
    kwargs = dict(num_targets=num_targets, **options)
    grad_out = torch.randn(q.shape[0], heads, dim, device="cuda").to(dtype)

    def grads(backend, inputs, grad):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        if backend is None:
            out = hstu_attn_reference(*leaves, offsets, max_seq_len, **kwargs)
        else:
            out = hstu_attn_varlen_func(*leaves, offsets, max_seq_len, backend=backend, **kwargs)
        out.backward(grad)
        return [leaf.grad for leaf in leaves]

    got = grads(KernelBackend.CUTLASS, (q, k, v), grad_out)
    want = grads(None, (q.float(), k.float(), v.float()), grad_out.float())
    low = grads(None, (q, k, v), grad_out)
    for name, g, w, lo in zip("qkv", got, want, low):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert torch.isfinite(g).all(), f"non-finite d{name}"
        low_max, low_l2 = _errors(lo.float(), w)
        err_max, err_l2 = _errors(g.float(), w)
        assert err_l2 <= 2.0 * low_l2 + 1e-4, f"d{name}: relative L2 error {err_l2:.3g} > 2 x {low_l2:.3g}"
        assert err_max <= 4.0 * low_max + 1e-3, f"d{name}: relative max error {err_max:.3g} > 4 x {low_max:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mask", MASKS.keys())
def test_backward_masks_match_reference(mask: str, dtype: torch.dtype) -> None:
    options = _mask_options(mask)
    _check_backward(LENGTHS, dtype=dtype, **options)


@pytest.mark.parametrize("dim", [64, 128, 256])  # 256: the Triton backward behind backend=CUTLASS
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_backward_head_dims_and_offset_dtypes(dim: int, offsets_dtype: torch.dtype) -> None:
    _check_backward(LENGTHS, dim=dim, offsets_dtype=offsets_dtype, targets=_targets(LENGTHS), heads=3)


def test_backward_single_tokens_empty_and_long_batches() -> None:
    _check_backward(LENGTHS, max_seq_len=1000, dim=64)
    _check_backward((1, 1, 1), heads=1, dim=64)
    _check_backward((0, 0), dim=64)
    gen = torch.Generator().manual_seed(5)
    lengths = tuple(torch.randint(1, 2049, (4,), generator=gen).tolist())
    _check_backward(lengths, heads=2, dim=128, targets=tuple(min(n, 9) for n in lengths), max_seq_len=2048)


def test_backward_strided_heads_view_direct_call() -> None:
    lengths = (100, 0, 33)
    heads, dim = 2, 64
    packed = torch.randn(sum(lengths), heads, 4 * dim, device="cuda").to(torch.bfloat16)
    q, k, v, grad_out = packed.split(dim, dim=2)
    offsets = torch.tensor([0, 100, 100, 133], device="cuda")
    dq, dk, dv, drab, dposition, dtime = hstu_attn_cutlass_backward(
        grad_out, q, k, v, offsets, 100, alpha=0.125, scale=0.01, causal=True, num_targets=None,
        contextual_seq_len=0, max_attn_len=0,
    )  # fmt: skip
    assert drab is None and dposition is None and dtime is None
    leaves = [t.float().clone().requires_grad_() for t in (q, k, v)]
    hstu_attn_reference(*leaves, offsets, 100, alpha=0.125, scaling_seqlen=100).backward(grad_out.float())
    for got, leaf in zip((dq, dk, dv), leaves):
        assert got.shape == leaf.shape and _errors(got.float(), leaf.grad)[1] < 2e-2


def test_deterministic_backward_equals_itself() -> None:
    """deterministic=True (the CUTLASS backward adding dQ in a fixed order): two runs give the same bits."""
    q, k, v, offsets = _inputs((300, 77), 2, 64, torch.bfloat16, seed=3)
    grad = torch.randn(q.shape, device="cuda").to(torch.bfloat16)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        hstu_attn_varlen_func(*leaves, offsets, 300, backend=KernelBackend.CUTLASS, deterministic=True).backward(grad)
        runs.append([leaf.grad for leaf in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("tensor", ["v", "k"])
@pytest.mark.parametrize("position", [150, 197, 0])  # a history token, a target token, the first token
def test_non_finite_values_reach_only_rows_that_attend_them(tensor: str, position: int) -> None:
    """Forward: the (token, head) rows holding a non-finite entry are the reference's, the other rows match it.

    Compared per row, not per entry: the reference makes a row that attends a non-finite v entry NaN in all its
    columns, the kernel only in the columns of the non-finite v entries (NaN in masked key tiles, IEEE inf or NaN in
    key tiles without masked pairs; the other columns are computed with those entries as 0 or stay finite)."""
    lengths, targets = (200, 0, 70), (5, 0, 3)
    q, k, v, offsets = _inputs(lengths, 2, 64, torch.bfloat16, seed=position)
    poisoned = {"v": v, "k": k}[tensor]
    poisoned[position, 1, 3] = float("inf")
    poisoned[position, 1, 5] = float("nan")
    num_targets = torch.tensor(targets, device="cuda")
    kwargs = dict(num_targets=num_targets, contextual_seq_len=2)
    got = hstu_attn_varlen_func(q, k, v, offsets, 200, backend=KernelBackend.CUTLASS, **kwargs).float()
    want = hstu_attn_reference(q.float(), k.float(), v.float(), offsets, 200, **kwargs)
    assert want.isnan().any() and not want.isnan().all()
    finite_rows = want.isfinite().all(dim=-1)  # [L, H]
    assert torch.equal(got.isfinite().all(dim=-1), finite_rows), "non-finite (token, head) rows differ from reference's"
    assert _errors(got[finite_rows], want[finite_rows])[1] < 2e-2


POISONED = ("q", "k", "v", "grad_out")
NON_FINITE = (float("nan"), float("inf"), float("-inf"))


def _poison_options(mask: str) -> dict:
    """MASKS[mask] as the poison tests' options: `targets=True` becomes `num_targets` (a tuple, LENGTHS' targets).
    (Named apart from `_mask_options`: sharing its name, it replaced that one for every test in this module.)"""
    options = dict(MASKS[mask])
    if options.pop("targets", False):
        options["num_targets"] = _targets(LENGTHS)
    return options


def _reached_by_poison(tensor: str, valid: Tensor, p: int) -> dict[str, Tensor]:
    """Positions of one sequence, per result (out, dq, dk, dv), that may depend on a poison at position p of
    `tensor` (valid: the sequence's [n, n] mask; rows whose output is reached get a zero output gradient)."""
    n = valid.shape[0]
    attend_p, seen_by_p = valid[:, p], valid[p, :]
    only_p, nothing = torch.arange(n) == p, torch.zeros(n, dtype=torch.bool)
    if tensor in ("k", "v"):
        return {"out": attend_p, "dq": attend_p, "dk": only_p, "dv": only_p if tensor == "k" else nothing}
    return {"out": only_p if tensor == "q" else nothing, "dq": only_p, "dk": seen_by_p, "dv": seen_by_p}


def _poison_plan(tensor: str, options: dict, seed: int, heads: int) -> tuple[list[tuple[int, float]], dict]:
    """One poisoned (token, value) per non-empty sequence, at head 0, and the [L, H] map of reached pairs per
    result. Positions cycle through the first token (reached through key tiles without masked pairs when the
    sequence is long), the middle, the last history token, the first target and the last token."""
    reached = {key: torch.zeros(sum(LENGTHS), heads, dtype=torch.bool) for key in ("out", "dq", "dk", "dv")}
    targets = options.get("num_targets") or (0,) * len(LENGTHS)
    poisons, start = [], 0
    for b, n in enumerate(LENGTHS):
        if n:
            u = n - targets[b]
            p = (0, n // 2, max(u - 1, 0), min(u, n - 1), n - 1)[(seed + b) % 5]
            poisons.append((start + p, NON_FINITE[(seed + b) % len(NON_FINITE)]))
            valid = hstu_attn_valid_mask(
                n, causal=options.get("causal", True), num_targets=targets[b],
                contextual_seq_len=options.get("contextual_seq_len", 0), max_attn_len=options.get("max_attn_len", 0),
            )  # fmt: skip
            for key, rows in _reached_by_poison(tensor, valid, p).items():
                reached[key][start : start + n, 0] |= rows
        start += n
    return poisons, reached


def _run_cutlass(tensors: dict[str, Tensor], options: dict, offsets: Tensor) -> dict[str, Tensor]:
    leaves = {name: tensors[name].clone().requires_grad_() for name in ("q", "k", "v")}
    kwargs = dict(options)
    if kwargs.get("num_targets") is not None:
        kwargs["num_targets"] = torch.tensor(kwargs["num_targets"], device="cuda")
    out = hstu_attn_varlen_func(
        leaves["q"], leaves["k"], leaves["v"], offsets, max(LENGTHS), backend=KernelBackend.CUTLASS, **kwargs
    )
    out.backward(tensors["grad_out"])
    results = {"out": out, **{f"d{name}": leaf.grad for name, leaf in leaves.items()}}
    return {key: value.detach().float().cpu() for key, value in results.items()}


def _run_to_run_tolerance(key: str, dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances between two CUTLASS runs: exact for out, dk, dv (each entry is written once); two
    units of `dtype`'s last place for dq, whose fp32 atomic adds from several key blocks arrive in a varying order
    (key blocks that reach a query block in the same loop step, e.g. non-causal or contextual rows), so its sum can
    round to a neighbouring `dtype` value from one run to the next."""
    return {"rtol": 2 * torch.finfo(dtype).eps, "atol": 1e-5} if key == "dq" else {}  # {}: assert_close's defaults


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("tensor", POISONED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mask", MASKS.keys())
def test_masked_non_finite_values_stay_out(mask: str, dtype: torch.dtype, tensor: str, dim: int) -> None:
    """nan/inf/-inf in q, k, v or grad_out at one token per sequence (head 0): every (token, head) of out, dq, dk, dv
    that cannot depend on it equals the clean run and is finite; every one that does is non-finite."""
    seed = list(MASKS).index(mask) + POISONED.index(tensor)
    options = _poison_options(mask)
    heads = 2
    gen = torch.Generator(device="cuda").manual_seed(seed)
    clean = {name: torch.randn(sum(LENGTHS), heads, dim, device="cuda", generator=gen).to(dtype) for name in POISONED}
    offsets = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], device="cuda")
    poisons, reached = _poison_plan(tensor, options, seed, heads)
    clean["grad_out"][reached["out"].cuda()] = 0  # rows that see a poisoned value are left out of the loss
    poisoned = {name: t.clone() for name, t in clean.items()}
    for token, value in poisons:
        poisoned[tensor][token, 0, 5] = value
    want, got = _run_cutlass(clean, options, offsets), _run_cutlass(poisoned, options, offsets)
    for key in ("out", "dq", "dk", "dv"):
        kept = ~reached[key]
        assert torch.isfinite(want[key]).all(), f"{key}: the clean run is not finite"
        assert torch.isfinite(got[key][kept]).all(), f"{key}: a non-finite value leaked to a pair that cannot see it"
        torch.testing.assert_close(
            got[key][kept], want[key][kept], **_run_to_run_tolerance(key, dtype), msg=lambda m, key=key: f"{key}: {m}"
        )
        finite_rows = torch.isfinite(got[key]).all(dim=-1)
        assert not finite_rows[reached[key]].any(), f"{key}: a pair that attends a non-finite value came out finite"


def test_unsupported_inputs_raise_naming_why() -> None:
    q, k, v, offsets = _inputs((5, 3), 2, 64, torch.float32)
    with pytest.raises(NotImplementedError, match="bfloat16 and float16"):
        hstu_attn_varlen_func(q, k, v, offsets, 5, backend=KernelBackend.CUTLASS)
    q, k, v, offsets = _inputs((5, 3), 2, 32, torch.bfloat16)
    with pytest.raises(NotImplementedError, match="Dqk == Dv in"):
        hstu_attn_varlen_func(q, k, v, offsets, 5, backend=KernelBackend.CUTLASS)
    q, k, v, offsets = _inputs((5, 3), 2, 64, torch.bfloat16)
    times = torch.arange(8, device="cuda", dtype=torch.int16)
    bias = RelativeBias(time_weights=torch.zeros(1, 9, device="cuda"), timestamps=times)
    with pytest.raises(NotImplementedError, match="timestamps of dtype int32, int64"):
        hstu_attn_varlen_func(q, k, v, offsets, 5, relative_bias=bias, backend=KernelBackend.CUTLASS)


# ---- materialized rab [B, H or 1, N, N] ------------------------------------------------------------------------


def _rab(lengths, heads, dtype, *, max_seq_len, seed, padding=float("nan")):
    """A random rab of `heads` heads, with `padding` past each sequence's end (the kernels must never read it)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rab = torch.randn(len(lengths), heads, max_seq_len, max_seq_len, device="cuda", generator=gen).to(dtype)
    for b, n in enumerate(lengths):
        rab[b, :, n:, :] = padding
        rab[b, :, :, n:] = padding
    return rab


def _judge(name: str, got: Tensor, want: Tensor, low: Tensor) -> None:
    """Kernel error against the fp32 reference within 2x (L2) / 4x (max) the bf16/fp16 reference's error."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"non-finite {name}"
    low_max, low_l2 = _errors(low.float(), want)
    err_max, err_l2 = _errors(got.float(), want)
    assert err_l2 <= 2.0 * low_l2 + 1e-4, f"{name}: relative L2 error {err_l2:.3g} > 2 x {low_l2:.3g}"
    assert err_max <= 4.0 * low_max + 1e-3, f"{name}: relative max error {err_max:.3g} > 4 x {low_max:.3g}"


def _check_rab(lengths, *, rab_heads, heads=2, dim=64, dtype=torch.bfloat16, backward=True, **options):
    """Forward (and backward with drab) of backend=CUTLASS with a rab, against the reference run in fp32 and in the
    input dtype; rab holds NaN past each sequence's end, which must stay out (the reference zeroes those scores)."""
    q, k, v, offsets = _inputs(lengths, heads, dim, dtype, seed=len(options) + dim + rab_heads)
    max_seq_len = options.pop("max_seq_len", max(lengths, default=0))
    targets = options.pop("targets", None)
    num_targets = None if targets is None else torch.tensor(targets, device="cuda")
    kwargs = dict(num_targets=num_targets, **options)
    rab = _rab(lengths, rab_heads, dtype, max_seq_len=max_seq_len, seed=len(lengths) + rab_heads)
    grad_out = torch.randn(q.shape, device="cuda").to(dtype)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, rab)]
    out = hstu_attn_varlen_func(
        *leaves[:3], offsets, max_seq_len, rab=leaves[3], backend=KernelBackend.CUTLASS, **kwargs
    )
    assert out.dtype == dtype
    want = hstu_attn_reference(q.float(), k.float(), v.float(), offsets, max_seq_len, rab=rab.float(), **kwargs)
    low = hstu_attn_reference(q, k, v, offsets, max_seq_len, rab=rab, **kwargs)
    _judge("out", out, want, low)
    if not backward:
        return
    out.backward(grad_out)
    want_grads = hstu_attn_reference_backward(
        grad_out.float(), q.float(), k.float(), v.float(), offsets, max_seq_len, rab=rab.float(), **kwargs
    )
    low_grads = hstu_attn_reference_backward(grad_out, q, k, v, offsets, max_seq_len, rab=rab, **kwargs)
    for name, leaf, w, lo in zip(("dq", "dk", "dv", "drab"), leaves, want_grads, low_grads):
        assert leaf.grad.dtype == dtype, name
        _judge(name, leaf.grad, w, lo)


RAB_HEADS = {"shared": 1, "per_head": 2}


@pytest.mark.parametrize("rab_heads", RAB_HEADS.values(), ids=RAB_HEADS.keys())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mask", MASKS.keys())
def test_rab_forward_backward_match_reference(mask: str, dtype: torch.dtype, rab_heads: int) -> None:
    """Every mask option (causal, targets, contextual, window, alpha/scaling), odd lengths, length 1 and empty
    sequences; out, dq, dk, dv and drab (summed over heads for a shared rab)."""
    options = _mask_options(mask)
    _check_rab(LENGTHS, rab_heads=rab_heads, dtype=dtype, **options)


@pytest.mark.parametrize("rab_heads", [1, 3], ids=["shared", "per_head"])
@pytest.mark.parametrize("dim", [64, 128, 256])  # 256: CUTLASS forward, Triton backward (with drab)
def test_rab_head_dims(dim: int, rab_heads: int) -> None:
    _check_rab(LENGTHS, rab_heads=rab_heads, heads=3, dim=dim, targets=_targets(LENGTHS), contextual_seq_len=3)


def test_rab_single_tokens_empty_and_padded_batches() -> None:
    _check_rab(LENGTHS, rab_heads=2, max_seq_len=600)  # rab padded beyond the longest sequence
    _check_rab((1, 1, 1), rab_heads=1, heads=1)
    _check_rab((0, 0), rab_heads=2)
    _check_rab((0, 5, 0), rab_heads=1, heads=4, causal=False)


def test_rab_long_jagged_batch() -> None:
    gen = torch.Generator().manual_seed(6)
    lengths = tuple(torch.randint(1, 1025, (3,), generator=gen).tolist())
    _check_rab(lengths, rab_heads=1, heads=2, dim=128, targets=tuple(min(n, 9) for n in lengths), max_seq_len=1024)


def test_rab_strided_and_expanded_views() -> None:
    """A rab view with padded rows (row stride > N) and a per-head rab expanded from one head (head stride 0)
    give what their contiguous copies give."""
    lengths, heads, dim = (100, 0, 33), 2, 64
    q, k, v, offsets = _inputs(lengths, heads, dim, torch.bfloat16, seed=11)
    base = _rab(lengths, heads, torch.bfloat16, max_seq_len=128, seed=12)
    views = {"strided": base[:, :, :100, :100], "expanded": base[:, :1, :100, :100].expand(-1, heads, -1, -1)}
    grad_out = torch.randn(q.shape, device="cuda").to(torch.bfloat16)
    for name, view in views.items():
        results = []
        for rab in (view, view.contiguous()):
            # detach() keeps the view's strides (clone() would make it contiguous)
            leaves = [*(t.clone().requires_grad_() for t in (q, k, v)), rab.detach().requires_grad_()]
            out = hstu_attn_varlen_func(*leaves[:3], offsets, 100, rab=leaves[3], backend=KernelBackend.CUTLASS)
            out.backward(grad_out)
            results.append([out, *(leaf.grad for leaf in leaves)])
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, msg=lambda m, name=name: f"{name}: {m}")


def test_rab_without_gradient_and_direct_call() -> None:
    """rab that needs no gradient: dq, dk, dv as with one that does; the direct backward returns drab None then."""
    lengths = (77, 0, 129)
    q, k, v, offsets = _inputs(lengths, 2, 64, torch.float16, seed=13)
    rab = _rab(lengths, 1, torch.float16, max_seq_len=129, seed=14)
    grad_out = torch.randn(q.shape, device="cuda").to(torch.float16)
    options = dict(alpha=0.125, scale=1 / 129, causal=True, num_targets=None, contextual_seq_len=0, max_attn_len=0)
    dq, dk, dv, drab, _, _ = hstu_attn_cutlass_backward(
        grad_out, q, k, v, offsets, 129, rab=rab, rab_requires_grad=False, **options
    )
    assert drab is None
    *with_rab_grad, drab, _, _ = hstu_attn_cutlass_backward(grad_out, q, k, v, offsets, 129, rab=rab, **options)
    assert drab is not None and drab.shape == rab.shape and drab.dtype == rab.dtype
    for got, want in zip((dq, dk, dv), with_rab_grad):
        torch.testing.assert_close(got, want)


def _rab_poison_runs(poison_valid: bool, rab_heads: int, mask: str):
    """One clean and one poisoned CUTLASS run (out, dq, dk, dv, drab as float on CPU) plus the reference's poisoned
    forward and backward. Poison: nan/inf/-inf at invalid pairs of every sequence (and, with `poison_valid`, at one
    valid pair (i, j) of one head)."""
    options = _poison_options(mask)
    lengths, heads, dim = LENGTHS, 2, 64
    q, k, v, offsets = _inputs(lengths, heads, dim, torch.bfloat16, seed=21 + rab_heads)
    max_seq_len = max(lengths)
    rab = _rab(lengths, rab_heads, torch.bfloat16, max_seq_len=max_seq_len, seed=22, padding=float("inf"))
    grad_out = torch.randn(q.shape, device="cuda").to(torch.bfloat16)
    poisoned = rab.clone()
    targets = options.get("num_targets") or (0,) * len(lengths)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        valid = hstu_attn_valid_mask(
            n, causal=options.get("causal", True), num_targets=targets[b],
            contextual_seq_len=options.get("contextual_seq_len", 0), max_attn_len=options.get("max_attn_len", 0),
        ).cuda()  # fmt: skip
        block = poisoned[b, :, :n, :n]
        block[:, ~valid] = NON_FINITE[b % len(NON_FINITE)]
        if poison_valid and b == 0:
            i, j = valid.nonzero()[len(valid.nonzero()) // 2].tolist()
            block[0, i, j] = float("nan")
    kwargs = dict(options)
    if kwargs.get("num_targets") is not None:
        kwargs["num_targets"] = torch.tensor(kwargs["num_targets"], device="cuda")

    def run(bias):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = hstu_attn_varlen_func(
            *leaves[:3], offsets, max_seq_len, rab=leaves[3], backend=KernelBackend.CUTLASS, **kwargs
        )
        out.backward(grad_out)
        return [t.detach().float().cpu() for t in (out, *(leaf.grad for leaf in leaves))]

    reference = [
        hstu_attn_reference(q.float(), k.float(), v.float(), offsets, max_seq_len, rab=poisoned.float(), **kwargs),
        *hstu_attn_reference_backward(
            grad_out.float(), q.float(), k.float(), v.float(), offsets, max_seq_len, rab=poisoned.float(), **kwargs
        )[:4],
    ]
    return run(rab), run(poisoned), [t.cpu() for t in reference]


RESULTS = ("out", "dq", "dk", "dv", "drab")
# bf16 results compared as float: dq (and a shared rab's drab) are summed with fp32 atomics in no fixed order, so two
# runs may round to neighbouring bf16 values.
BF16_ATOMICS = dict(rtol=1.6e-2, atol=1e-5)


@pytest.mark.parametrize("rab_heads", RAB_HEADS.values(), ids=RAB_HEADS.keys())
@pytest.mark.parametrize("mask", ["causal", "targets_noncausal", "everything_causal", "window_noncausal"])
def test_rab_non_finite_at_invalid_pairs_stays_out(mask: str, rab_heads: int) -> None:
    """inf/nan in rab at every invalid pair and past every sequence's end: every result equals the clean run's."""
    clean, poisoned, _ = _rab_poison_runs(False, rab_heads, mask)
    for name, got, want in zip(RESULTS, poisoned, clean):
        assert torch.isfinite(got).all(), f"{name}: a non-finite rab entry of an invalid pair leaked"
        torch.testing.assert_close(got, want, **BF16_ATOMICS, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("rab_heads", RAB_HEADS.values(), ids=RAB_HEADS.keys())
@pytest.mark.parametrize("mask", ["causal", "everything_noncausal"])
def test_rab_nan_at_a_valid_pair_reaches_what_the_reference_says(mask: str, rab_heads: int) -> None:
    """A NaN in rab at one valid pair (i, j): out and dq of row i, dk and dv of key j and drab[i, j] are NaN
    exactly where the reference's are; the finite entries match the clean run's."""
    clean, poisoned, reference = _rab_poison_runs(True, rab_heads, mask)
    for name, got, want, ref in zip(RESULTS, poisoned, clean, reference):
        assert ref.isnan().any(), f"{name}: the reference has no NaN (bad poison)"
        assert torch.equal(got.isfinite(), ref.isfinite()), f"{name}: non-finite pattern differs from the reference's"
        finite = ref.isfinite()
        torch.testing.assert_close(got[finite], want[finite], **BF16_ATOMICS, msg=lambda m, name=name: f"{name}: {m}")


# ---- fused relative bias (RelativeBias: position and time tables) ---------------------------------------------


def _timestamps(lengths: tuple[int, ...], dtype: torch.dtype, *, seed: int, max_gap: int) -> Tensor:
    """Per sequence, non-decreasing times (random gaps in [0, max_gap], repeats included) from a random start, so
    that |t_j - t_i| spans many log buckets; in `dtype` (float16/bfloat16 from small integers, exact there)."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for n in lengths:
        gaps = torch.randint(0, max_gap + 1, (n,), generator=gen)
        start = torch.randint(0, 10 * max_gap + 1, (1,), generator=gen)
        parts.append(start + gaps.cumsum(0))
    times = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    return times.to(dtype).cuda()


def _bias(
    lengths: tuple[int, ...], *, position_heads: int, time_heads: int, reach: int, num_buckets: int, divisor: float,
    timestamps_dtype: torch.dtype, max_gap: int, table_dtype: torch.dtype, seed: int,
) -> RelativeBias:  # fmt: skip
    """Random tables (0 heads: no such table) and timestamps as a RelativeBias of leaf tensors needing gradients."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def table(rows: int, width: int) -> Tensor | None:
        if rows == 0:
            return None
        return (0.5 * torch.randn(rows, width, device="cuda", generator=gen)).to(table_dtype).requires_grad_()

    time = table(time_heads, num_buckets)
    return RelativeBias(
        position_weights=table(position_heads, 2 * reach + 1),
        time_weights=time,
        timestamps=None if time is None else _timestamps(lengths, timestamps_dtype, seed=seed, max_gap=max_gap),
        time_bucket_divisor=divisor,
    )


def _detached(bias: RelativeBias, dtype: torch.dtype | None = None) -> RelativeBias:
    """The same bias with detached tables needing gradients, cast to `dtype` when given."""

    def leaf(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        return t.detach().to(dtype or t.dtype).requires_grad_()

    return RelativeBias(leaf(bias.position_weights), leaf(bias.time_weights), bias.timestamps, bias.time_bucket_divisor)


def _float64_time_buckets(delta: torch.Tensor, divisor: float, num_buckets: int) -> torch.Tensor:
    """`bucketize_time_delta` with the logarithm and division in float64: the bucket of the exact log."""
    magnitude = delta.abs().to(torch.float64).clamp_min(1.0)
    return torch.floor(torch.log(magnitude) / divisor).clamp(0, num_buckets - 1).to(torch.int64)


def _exact_reference_buckets():
    """The reference's time buckets from float64 logs while the context is open. The CUTLASS kernels give every pair
    the bucket of the exact log (tools/gpu/relative_bucket_probe.py, H100, 2026-12-07, 048363b: 0 of 379836 pairs of
    the many_buckets case differ from float64 logs), while torch's float32 log on CUDA moves 14 pairs across a bucket
    boundary; with 3000 buckets of width 0.004 that alone exceeds the error bound."""
    return mock.patch("hstu_attn.relative_bias.bucketize_time_delta", _float64_time_buckets)


def _check_relative(
    lengths: tuple[int, ...],
    *,
    heads: int = 2,
    dim: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    position_heads: int = 2,
    time_heads: int = 2,
    reach: int = 40,
    num_buckets: int = 32,
    divisor: float = 0.301,
    timestamps_dtype: torch.dtype = torch.int64,
    max_gap: int = 5000,
    table_dtype: torch.dtype = torch.float32,
    with_rab: bool = False,
    backward: bool = True,
    deterministic: bool = False,
    **options: Any,
) -> None:
    """Forward and backward of backend=CUTLASS with a fused relative bias (and optionally a rab), against the reference
    run in fp32 and in the input dtype: out, dq, dk, dv, drab (with a rab) and the table gradients."""
    seed = len(lengths) + dim + 3 * position_heads + 5 * time_heads + reach + num_buckets
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim, device="cuda", generator=gen).to(dtype) for _ in range(3))
    offsets = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], device="cuda")
    max_seq_len = options.pop("max_seq_len", max(lengths, default=0))
    targets = options.pop("targets", None)
    kwargs = dict(num_targets=None if targets is None else torch.tensor(targets, device="cuda"), **options)
    bias = _bias(
        lengths, position_heads=position_heads, time_heads=time_heads, reach=reach, num_buckets=num_buckets,
        divisor=divisor, timestamps_dtype=timestamps_dtype, max_gap=max_gap, table_dtype=table_dtype, seed=seed,
    )  # fmt: skip
    rab = None
    if with_rab:
        rab = torch.randn(len(lengths), 1, max_seq_len, max_seq_len, device="cuda", generator=gen).to(dtype)
        rab.requires_grad_()
    grad_out = torch.randn(q.shape, device="cuda", generator=gen).to(dtype)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = hstu_attn_varlen_func(
        *leaves, offsets, max_seq_len, rab=rab, relative_bias=bias, backend=KernelBackend.CUTLASS,
        deterministic=deterministic, **kwargs,
    )  # fmt: skip
    assert out.dtype == dtype and out.shape == q.shape
    fp32_bias = _detached(bias, torch.float32)
    fp32_rab = None if rab is None else rab.detach().float()
    low_rab = None if rab is None else rab.detach()
    with _exact_reference_buckets():
        want = hstu_attn_reference(
            q.float(), k.float(), v.float(), offsets, max_seq_len, rab=fp32_rab, relative_bias=fp32_bias, **kwargs
        )
        low = hstu_attn_reference(q, k, v, offsets, max_seq_len, rab=low_rab, relative_bias=_detached(bias), **kwargs)
    _judge("out", out, want, low)
    if not backward:
        return
    out.backward(grad_out)
    with _exact_reference_buckets():
        want_grads = hstu_attn_reference_backward(
            grad_out.float(), q.float(), k.float(), v.float(), offsets, max_seq_len, rab=fp32_rab,
            relative_bias=fp32_bias, **kwargs,
        )  # fmt: skip
        low_grads = hstu_attn_reference_backward(
            grad_out, q, k, v, offsets, max_seq_len, rab=low_rab, relative_bias=_detached(bias), **kwargs
        )
    got_grads = [
        *(leaf.grad for leaf in leaves),
        None if rab is None else rab.grad,
        None if bias.position_weights is None else bias.position_weights.grad,
        None if bias.time_weights is None else bias.time_weights.grad,
    ]
    names = ("dq", "dk", "dv", "drab", "dposition_weights", "dtime_weights")
    for name, got, w, lo in zip(names, got_grads, want_grads, low_grads):
        if w is None:
            assert got is None, f"{name} given without its input"
            continue
        assert got is not None, f"no {name}"
        _judge(name, got, w, lo)
    for table in (bias.position_weights, bias.time_weights):
        if table is not None:
            assert table.grad.dtype == table.dtype and table.grad.shape == table.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mask", MASKS.keys())
def test_relative_bias_masks_match_reference(mask: str, dtype: torch.dtype) -> None:
    """Every mask option with per-head position and time tables: out, dq, dk, dv and both table gradients."""
    options = _mask_options(mask)
    _check_relative(LENGTHS, dtype=dtype, **options)


TABLES = {
    "position_shared": dict(position_heads=1, time_heads=0),
    "position_per_head": dict(position_heads=3, time_heads=0),
    "time_shared": dict(position_heads=0, time_heads=1),
    "time_per_head": dict(position_heads=0, time_heads=3),
    "both_shared": dict(position_heads=1, time_heads=1),
    "position_shared_time_per_head": dict(position_heads=1, time_heads=3),
    "position_per_head_time_shared": dict(position_heads=3, time_heads=1),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("tables", TABLES.keys())
def test_relative_bias_tables_shared_or_per_head(tables: str, dtype: torch.dtype) -> None:
    _check_relative(LENGTHS, heads=3, dim=128, dtype=dtype, targets=_targets(LENGTHS), **TABLES[tables])


@pytest.mark.parametrize("dim", [64, 128, 256])  # 256: CUTLASS forward, Triton backward (with table gradients)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_relative_bias_head_dims(dim: int, dtype: torch.dtype) -> None:
    _check_relative(LENGTHS, heads=3, dim=dim, dtype=dtype, position_heads=3, time_heads=1, contextual_seq_len=3)


@pytest.mark.parametrize(
    "timestamps_dtype",
    [torch.int32, torch.int64, torch.float32, torch.float64, torch.float16, torch.bfloat16],
    ids=["int32", "int64", "fp32", "fp64", "fp16", "bf16"],
)
def test_relative_bias_timestamp_dtypes(timestamps_dtype: torch.dtype) -> None:
    """t_j - t_i taken in the timestamps' dtype as the reference takes it (small gaps: fp16/bf16 stay finite)."""
    max_gap = 3 if timestamps_dtype in (torch.float16, torch.bfloat16) else 5000
    options = dict(timestamps_dtype=timestamps_dtype, max_gap=max_gap, divisor=0.1)
    _check_relative(LENGTHS, position_heads=0, time_heads=2, **options)


@pytest.mark.parametrize(
    "sizes",
    [
        dict(reach=0, num_buckets=1),  # one column each: every pair in it
        dict(reach=3, num_buckets=4),  # most distances and times clamped
        dict(reach=600, num_buckets=64),  # no distance clamped (reach > the longest sequence)
        dict(reach=10, num_buckets=3000, divisor=0.004),  # more buckets than the kernel sums in shared memory
    ],
    ids=["single_columns", "clamped", "unclamped", "many_buckets"],
)
def test_relative_bias_clamping_and_bucket_counts(sizes: dict) -> None:
    _check_relative(LENGTHS, targets=_targets(LENGTHS), **sizes)


def test_relative_bias_single_tokens_empty_and_padded_batches() -> None:
    _check_relative(LENGTHS, max_seq_len=600)  # max_seq_len beyond the longest sequence
    _check_relative((1, 1, 1), heads=1, position_heads=1, time_heads=1)
    _check_relative((0, 0))
    _check_relative((0, 5, 0), heads=4, position_heads=1, time_heads=4, causal=False)


def test_relative_bias_long_jagged_batch() -> None:
    gen = torch.Generator().manual_seed(7)
    lengths = tuple(torch.randint(1, 2049, (3,), generator=gen).tolist())
    _check_relative(lengths, heads=2, dim=128, targets=tuple(min(n, 9) for n in lengths), max_seq_len=2048)


def test_relative_bias_beside_rab_and_low_precision_tables() -> None:
    """A shared rab beside the tables (drab too), and bf16/fp16 tables (their gradients cast to their dtype)."""
    _check_relative(LENGTHS, with_rab=True, targets=_targets(LENGTHS))
    _check_relative(LENGTHS, table_dtype=torch.bfloat16)
    _check_relative(LENGTHS, dtype=torch.float16, table_dtype=torch.float16, causal=False)


def test_relative_bias_deterministic_backward_matches_and_repeats() -> None:
    """deterministic=True runs the Triton backward after the CUTLASS forward: it matches the reference and repeats
    its bits."""
    _check_relative(LENGTHS, deterministic=True)
    lengths = (300, 77)
    q, k, v = (torch.randn(377, 2, 64, device="cuda").to(torch.bfloat16) for _ in range(3))
    offsets = torch.tensor([0, 300, 377], device="cuda")
    bias = _bias(
        lengths, position_heads=2, time_heads=1, reach=20, num_buckets=16, divisor=0.301,
        timestamps_dtype=torch.int64, max_gap=1000, table_dtype=torch.float32, seed=1,
    )  # fmt: skip
    grad = torch.randn(q.shape, device="cuda").to(torch.bfloat16)
    runs = []
    for _ in range(2):
        run_bias = _detached(bias)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = hstu_attn_varlen_func(
            *leaves, offsets, 300, relative_bias=run_bias, backend=KernelBackend.CUTLASS, deterministic=True
        )
        out.backward(grad)
        runs.append([*(leaf.grad for leaf in leaves), run_bias.position_weights.grad, run_bias.time_weights.grad])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_relative_bias_direct_calls() -> None:
    """The direct entry points: the forward equals the one through hstu_attn_varlen_func; the backward returns
    (dq, dk, dv, drab, dposition_weights, dtime_weights) with None for the absent rab and time table."""
    lengths = (77, 0, 129)
    q, k, v = (torch.randn(206, 2, 64, device="cuda").to(torch.float16) for _ in range(3))
    offsets = torch.tensor([0, 77, 77, 206], device="cuda", dtype=torch.int32)
    bias = _bias(
        lengths, position_heads=1, time_heads=0, reach=30, num_buckets=1, divisor=0.301,
        timestamps_dtype=torch.int64, max_gap=1, table_dtype=torch.float32, seed=2,
    )  # fmt: skip
    options = dict(alpha=0.125, scale=1 / 129, causal=True, num_targets=None, contextual_seq_len=0, max_attn_len=0)
    out = hstu_attn_cutlass_forward(q, k, v, offsets, 129, relative_bias=bias, **options)
    through = hstu_attn_varlen_func(
        q, k, v, offsets, 129, alpha=0.125, scaling_seqlen=129, relative_bias=_detached(bias),
        backend=KernelBackend.CUTLASS,
    )  # fmt: skip
    torch.testing.assert_close(out, through, rtol=0, atol=0)
    grad_out = torch.randn(q.shape, device="cuda").to(torch.float16)
    dq, dk, dv, drab, dposition, dtime = hstu_attn_cutlass_backward(
        grad_out, q, k, v, offsets, 129, relative_bias=bias, **options
    )
    assert drab is None and dtime is None
    assert dposition is not None and dposition.shape == (1, 61) and dposition.dtype == torch.float32
    want = hstu_attn_reference_backward(
        grad_out.float(), q.float(), k.float(), v.float(), offsets, 129, alpha=0.125, scaling_seqlen=129,
        relative_bias=_detached(bias),
    )  # fmt: skip
    for got, w in zip((dq, dk, dv, dposition), (*want[:3], want[4])):
        assert _errors(got.float(), w.float())[1] < 2e-2
