"""Triton HSTU attention against the PyTorch reference, forward and backward, with every option.

On CPU these run under `TRITON_INTERPRET=1` at tiny sizes (16x16 tiles); the `gpu` tests repeat them at real
sizes. Errors are judged against the reference's own low-precision error: for bf16/fp16 inputs the relative L2 error
`||triton - ref_fp32|| / ||ref_fp32||` may exceed the error caused by rounding the inputs by at most 2x (the
relative max error by 4x) the same error of ref_lowprec, the reference run in the input dtype (see
`check_case`); fp32 inputs must match the fp32 reference closely.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

from hstu_attn.reference import hstu_attn_reference
from hstu_attn.relative_bias import RelativeBias
from hstu_attn.triton import hstu_attn_triton_backward, hstu_attn_triton_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY_LENGTHS = (5, 37, 0, 1, 20)


@dataclass
class Case:
    lengths: tuple[int, ...] = TINY_LENGTHS
    heads: int = 2
    dqk: int = 32
    dv: int = 32
    dtype: torch.dtype = torch.float32
    causal: bool = True
    targets: tuple[int, ...] | None = None
    contextual: int = 0
    window: int = 0
    rab_heads: int | None = None  # None: no rab; 1: shared across heads; H: per head
    position_rows: int | None = None  # rows of the position table (1 or H), None: none
    position_reach: int = 6
    time_rows: int | None = None
    time_buckets: int = 16
    deterministic: bool = False
    atomic_dq: bool = True
    offsets_dtype: torch.dtype = torch.int64
    max_seq_len: int | None = None  # defaults to max(lengths)
    extra: dict = field(default_factory=dict)


@dataclass
class Inputs:
    q: Tensor
    k: Tensor
    v: Tensor
    grad_out: Tensor
    seq_offsets: Tensor
    max_seq_len: int
    num_targets: Tensor | None
    rab: Tensor | None
    position_weights: Tensor | None
    time_weights: Tensor | None
    timestamps: Tensor | None


def make_inputs(case: Case, seed: int) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(case.lengths, dtype=torch.int64)
    offsets = torch.zeros(len(case.lengths) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    total = int(offsets[-1])
    max_len = case.max_seq_len or max(max(case.lengths), 1)

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen).to(DEVICE)

    targets = None
    if case.targets is not None:
        targets = torch.tensor([min(t, n) for t, n in zip(case.targets, case.lengths)], dtype=torch.int32)
    timestamps = None
    if case.time_rows is not None:
        timestamps = torch.randint(0, 3000, (total,), generator=gen).cumsum(0).to(DEVICE)
    return Inputs(
        q=randn(total, case.heads, case.dqk),
        k=randn(total, case.heads, case.dqk),
        v=randn(total, case.heads, case.dv),
        grad_out=randn(total, case.heads, case.dv),
        seq_offsets=offsets.to(device=DEVICE, dtype=case.offsets_dtype),
        max_seq_len=max_len,
        num_targets=None if targets is None else targets.to(DEVICE),
        rab=None if case.rab_heads is None else randn(len(case.lengths), case.rab_heads, max_len, max_len),
        position_weights=None
        if case.position_rows is None
        else 0.5 * randn(case.position_rows, 2 * case.position_reach + 1),
        time_weights=None if case.time_rows is None else 0.5 * randn(case.time_rows, case.time_buckets),
        timestamps=timestamps,
    )


def mask_kwargs(case: Case, x: Inputs) -> dict:
    return dict(
        causal=case.causal,
        num_targets=x.num_targets,
        contextual_seq_len=case.contextual,
        max_attn_len=case.window,
    )


def reference(case: Case, x: Inputs, dtype: torch.dtype, rounded_to: torch.dtype | None = None) -> list[Tensor]:
    """Reference output and gradients (q, k, v, rab, position, time) computed in `dtype`.

    `rounded_to` first rounds q, k, v, rab and grad_out to that dtype (then computes in `dtype`).
    """
    leaves = {name: getattr(x, name) for name in ("q", "k", "v", "rab") if getattr(x, name) is not None}
    grad_out = x.grad_out
    if rounded_to is not None:
        leaves = {name: t.to(rounded_to) for name, t in leaves.items()}
        grad_out = grad_out.to(rounded_to)
    leaves = {name: t.detach().to(dtype).clone().requires_grad_() for name, t in leaves.items()}
    tables = {
        name: getattr(x, name).detach().clone().requires_grad_()
        for name in ("position_weights", "time_weights")
        if getattr(x, name) is not None
    }
    bias = None
    if tables:
        bias = RelativeBias(timestamps=x.timestamps, time_bucket_divisor=0.301, **tables)
    out = hstu_attn_reference(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        x.seq_offsets,
        x.max_seq_len,
        alpha=1.0 / math.sqrt(case.dqk),
        scaling_seqlen=x.max_seq_len,
        rab=leaves.get("rab"),
        relative_bias=bias,
        **mask_kwargs(case, x),
    )
    out.backward(grad_out.to(dtype))
    grads = [leaves[name].grad for name in ("q", "k", "v")]
    grads += [leaves["rab"].grad] if "rab" in leaves else []
    grads += [t.grad for t in tables.values()]
    return [out.detach().float()] + [g.float() for g in grads]


def triton_run(case: Case, x: Inputs) -> list[Tensor]:
    cast = case.dtype
    common = dict(
        alpha=1.0 / math.sqrt(case.dqk),
        scale=1.0 / x.max_seq_len,
        rab=None if x.rab is None else x.rab.to(cast),
        position_weights=x.position_weights,
        time_weights=x.time_weights,
        timestamps=x.timestamps,
        time_bucket_divisor=0.301,
        **mask_kwargs(case, x),
    )
    q, k, v = x.q.to(cast), x.k.to(cast), x.v.to(cast)
    out = hstu_attn_triton_forward(q, k, v, x.seq_offsets, x.max_seq_len, **common)
    grads = hstu_attn_triton_backward(
        x.grad_out.to(cast),
        q,
        k,
        v,
        x.seq_offsets,
        x.max_seq_len,
        deterministic=case.deterministic,
        atomic_dq=case.atomic_dq,
        **common,
    )
    assert out.dtype == cast and out.shape == (x.q.shape[0], case.heads, case.dv)
    return [out.float()] + [g.float() for g in grads if g is not None]


NAMES = ("out", "dq", "dk", "dv", "bias grads...")


def _errors(got: Tensor, want: Tensor) -> tuple[float, float]:
    """(max |got - want| / max |want|, ||got - want|| / ||want||); zeros for empty tensors."""
    if want.numel() == 0:
        return 0.0, 0.0
    diff = got - want
    scale_max = max(want.abs().max().item(), 1e-6)
    scale_l2 = max(want.norm().item(), 1e-6)
    return diff.abs().max().item() / scale_max, diff.norm().item() / scale_l2


def check_case(case: Case, seed: int = 0) -> None:
    """Triton output and gradients vs the fp32 reference.

    For low-precision inputs the allowed error is the error that rounding the inputs alone causes (the fp32
    reference on rounded inputs) plus twice (relative L2) or four times (relative max) the error of the
    reference run in that precision: rounding is shared by every backend, the rest must be no worse.
    """
    x = make_inputs(case, seed)
    got = triton_run(case, x)
    want = reference(case, x, torch.float32)
    assert len(got) == len(want)
    low = rounded = None
    if case.dtype != torch.float32:
        low = reference(case, x, case.dtype)
        rounded = reference(case, x, torch.float32, rounded_to=case.dtype)
    for index, (g, w) in enumerate(zip(got, want)):
        name = NAMES[min(index, len(NAMES) - 1)]
        assert g.shape == w.shape, name
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err_max, err_l2 = _errors(g, w)
        if low is None or rounded is None:
            bound_max, bound_l2 = 2e-4, 1e-4
        else:
            low_max, low_l2 = _errors(low[index], w)
            rounded_max, rounded_l2 = _errors(rounded[index], w)
            bound_max = rounded_max + 4.0 * low_max + 1e-3
            bound_l2 = rounded_l2 + 2.0 * low_l2 + 1e-4
        assert err_l2 <= bound_l2, f"{name}: relative L2 error {err_l2:.3g} > {bound_l2:.3g}"
        assert err_max <= bound_max, f"{name}: relative max error {err_max:.3g} > {bound_max:.3g}"


# ---- CPU (interpreter) and GPU: the same option matrix; lengths include empty and length-1 sequences --------

MASK_CASES = {
    "causal": dict(),
    "noncausal": dict(causal=False),
    "targets": dict(targets=(2, 5, 0, 1, 20)),  # partial, full (=n), zero
    "targets_noncausal": dict(causal=False, targets=(5, 3, 0, 0, 7)),
    "contextual": dict(contextual=3),
    "contextual_targets": dict(contextual=4, targets=(1, 30, 0, 1, 2)),
    "window": dict(window=4),
    "window_noncausal": dict(causal=False, window=5),
    "everything_causal": dict(contextual=2, targets=(2, 4, 0, 1, 3), window=6),
    "everything_noncausal": dict(causal=False, contextual=2, targets=(2, 4, 0, 1, 3), window=6),
}

BIAS_CASES = {
    "rab_per_head": dict(rab_heads=2, targets=(1, 3, 0, 0, 2)),
    "rab_shared_head": dict(rab_heads=1, causal=False),
    "position_per_head": dict(position_rows=2, window=7),
    "position_shared_time_per_head": dict(position_rows=1, time_rows=2, contextual=2),
    "time_shared": dict(time_rows=1, targets=(2, 4, 0, 1, 3)),
    "everything_bias": dict(rab_heads=1, position_rows=2, time_rows=1, targets=(2, 4, 0, 1, 3), window=9),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask", MASK_CASES.keys())
def test_masks_match_reference(mask: str, dtype: torch.dtype) -> None:
    check_case(Case(dtype=dtype, **MASK_CASES[mask]), seed=sum(map(ord, mask)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", BIAS_CASES.keys())
def test_bias_matches_reference(bias: str, dtype: torch.dtype) -> None:
    check_case(Case(dtype=dtype, **BIAS_CASES[bias]), seed=sum(map(ord, bias)) + 1)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(dqk=32, dv=16, offsets_dtype=torch.int32, heads=1),
        dict(dqk=16, dv=32, max_seq_len=45, targets=(0, 9, 0, 1, 4)),
        dict(dtype=torch.float16, heads=3, lengths=(17, 1, 16)),
        dict(atomic_dq=False, contextual=3, causal=False),
        dict(atomic_dq=False, dtype=torch.bfloat16, targets=(2, 5, 0, 1, 3), window=3),
    ],
    ids=["dqk_ne_dv_int32_offsets", "max_len_above_longest", "fp16_three_heads", "dq_kernel", "dq_kernel_bf16"],
)
def test_shapes_and_paths_match_reference(overrides: dict) -> None:
    check_case(Case(**overrides), seed=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic_backward_matches_reference_and_repeats_bitwise(dtype: torch.dtype) -> None:
    case = Case(
        dtype=dtype,
        deterministic=True,
        rab_heads=1,
        position_rows=2,
        time_rows=1,
        targets=(2, 4, 0, 1, 3),
        contextual=2,
    )
    check_case(case, seed=11)
    x = make_inputs(case, seed=12)
    first, second = triton_run(case, x), triton_run(case, x)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# Keyword arguments of a plain causal call without any bias or mask option.
_PLAIN_CAUSAL: dict = dict(
    alpha=1.0,
    scale=1.0,
    causal=True,
    num_targets=None,
    contextual_seq_len=0,
    max_attn_len=0,
    rab=None,
    position_weights=None,
    time_weights=None,
    timestamps=None,
    time_bucket_divisor=1.0,
)


def test_empty_batch_and_all_empty_sequences() -> None:
    check_case(Case(lengths=(0, 0), max_seq_len=4))
    q = torch.empty(0, 2, 32, device=DEVICE)
    offsets = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    kwargs = _PLAIN_CAUSAL
    assert hstu_attn_triton_forward(q, q, q, offsets, 0, **kwargs).shape == (0, 2, 32)
    grads = hstu_attn_triton_backward(q, q, q, q, offsets, 0, deterministic=False, **kwargs)
    assert [g.shape for g in grads[:3]] == [(0, 2, 32)] * 3 and grads[3:] == (None, None, None)


def test_unsupported_head_dim_and_dtype_raise() -> None:
    kwargs = _PLAIN_CAUSAL
    offsets = torch.tensor([0, 3], device=DEVICE)
    odd = torch.randn(3, 1, 48, device=DEVICE)
    with pytest.raises(NotImplementedError, match="head dims"):
        hstu_attn_triton_forward(odd, odd, odd, offsets, 3, **kwargs)
    doubles = torch.randn(3, 1, 32, device=DEVICE, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        hstu_attn_triton_forward(doubles, doubles, doubles, offsets, 3, **kwargs)


# ---- GPU only: real sizes ----------------------------------------------------------------------------------


def _real_lengths(batch: int, max_len: int, seed: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    lengths[0] = max_len
    lengths[-1] = 0
    return tuple(lengths)


def _real_targets(lengths: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(min(n, t) for n, t in zip(lengths, (0, 37, 500, 3, 1, 0)))


GPU_CASES = {
    "bf16_causal_d128": dict(),
    "bf16_noncausal_targets_contextual_window": dict(causal=False, contextual=5, window=100, targets=True),
    "bf16_causal_everything_rab_shared": dict(contextual=3, window=64, targets=True, rab_heads=1),
    "bf16_fused_position_time": dict(position_rows=2, time_rows=1, position_reach=300, time_buckets=40),
    "bf16_deterministic_position_rab": dict(deterministic=True, rab_heads=2, position_rows=1, position_reach=200),
    "fp32_causal_targets": dict(dtype=torch.float32, targets=True),
    "fp16_dqk64_dv32_int32": dict(dtype=torch.float16, dqk=64, dv=32, offsets_dtype=torch.int32),
    "bf16_d256_causal": dict(dqk=256, dv=256),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_CASES.keys())
def test_gpu_real_sizes_match_reference(name: str) -> None:
    overrides = dict(GPU_CASES[name])
    lengths = _real_lengths(6, 512, seed=3)
    if overrides.pop("targets", False):
        overrides["targets"] = _real_targets(lengths)
    overrides.setdefault("dtype", torch.bfloat16)
    overrides.setdefault("dqk", 128)
    overrides.setdefault("dv", 128)
    check_case(Case(lengths=lengths, heads=2, **overrides), seed=5)


@pytest.mark.gpu
def test_gpu_benchmark_shape_matches_reference() -> None:
    gen = torch.Generator().manual_seed(9)
    lengths = tuple(torch.randint(512, 4097, (16,), generator=gen).tolist())
    check_case(Case(lengths=lengths, heads=4, dqk=128, dv=128, dtype=torch.bfloat16, max_seq_len=4096), seed=9)


def test_fp32_dots_use_three_tf32_products_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled (not interpreted) fp32 launches ask for "tf32x3" unless TF32 is allowed (then "tf32"); other dtypes
    and the interpreter keep "ieee" (full-IEEE fp32 dots at head dim 128 took minutes to compile)."""
    from hstu_attn.triton import api

    matmul = torch.backends.cuda.matmul  # allow_tf32 is a property of torch's cuBLAS module, not monkeypatchable
    allowed = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        monkeypatch.setattr(api, "INTERPRET", False)
        assert api._input_precision(torch.float32) == "tf32x3"
        assert api._input_precision(torch.bfloat16) == "ieee"
        matmul.allow_tf32 = True
        assert api._input_precision(torch.float32) == "tf32"
        matmul.allow_tf32 = False
        monkeypatch.setattr(api, "INTERPRET", True)
        assert api._input_precision(torch.float32) == "ieee"
    finally:
        matmul.allow_tf32 = allowed


# ---- split dK/dV (LaunchConfig.split_dkdv): dV in one launch, dK with dQ and the bias gradients in a second ----


class _PassRecorder:
    """Stands in for a Triton kernel: records the PASS of every launch, then launches the kernel."""

    def __init__(self, kernel) -> None:
        self.kernel, self.passes = kernel, []
        self.__name__ = kernel.__name__

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.passes.append(kwargs.get("PASS", 0))
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def split_dkdv(monkeypatch: pytest.MonkeyPatch) -> _PassRecorder:
    """Every tuned dK/dV launch split in two passes: the interpreter's config and, on a GPU, every candidate."""
    from hstu_attn.triton import api

    tuned = api._backward_dkdv
    recorder = _PassRecorder(tuned.kernel)
    monkeypatch.setattr(tuned, "kernel", recorder)
    monkeypatch.setattr(tuned, "chosen", {})
    monkeypatch.setattr(tuned, "interpreter", dataclasses.replace(tuned.interpreter, split_dkdv=True))
    split = {dim: [(*c[:4], True) for c in configs] for dim, configs in tuned.candidates.items()}
    monkeypatch.setattr(tuned, "candidates", split)
    return recorder


SPLIT_CASES = {
    **{f"{name}_fp32": dict(mask, dtype=torch.float32) for name, mask in MASK_CASES.items()},
    **{f"{name}_bf16": dict(bias, dtype=torch.bfloat16) for name, bias in BIAS_CASES.items()},
    "dq_kernel_targets_bf16": dict(targets=(2, 5, 0, 1, 20), atomic_dq=False, dtype=torch.bfloat16),
    "dq_kernel_position_time_fp32": dict(position_rows=2, time_rows=1, atomic_dq=False),
    "dqk64_dv16": dict(dqk=64, dv=16, rab_heads=2),
}


@pytest.mark.parametrize("name", SPLIT_CASES.keys())
def test_split_dkdv_matches_reference(name: str, split_dkdv: _PassRecorder) -> None:
    check_case(Case(**SPLIT_CASES[name]), seed=11)
    # One dV launch then one dK launch per run of the kernel; on a GPU the first call of a key also runs the
    # config it chooses once before the launch that counts (TunedKernel._choose), so there are two pairs.
    passes = split_dkdv.passes
    assert passes and passes == [1, 2] * (len(passes) // 2), f"expected dV-then-dK launch pairs, got PASS {passes}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["bf16_d256_causal", "bf16_fused_position_time", "bf16_causal_everything_rab_shared"])
def test_gpu_split_dkdv_real_sizes_match_reference(name: str, split_dkdv: _PassRecorder) -> None:
    test_gpu_real_sizes_match_reference(name)
    assert split_dkdv.passes and set(split_dkdv.passes) == {1, 2}, split_dkdv.passes


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_every_launch_config_matches_reference(head_dim: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each candidate launch config of each kernel (forward, dK/dV fused and split, dQ), one at a time with the other
    kernels on their first candidate, against the reference; the other GPU tests see only the configs autotuning
    (or HSTU_ATTN_TRITON_AUTOTUNE=0) picks. Configs that need more shared memory than the GPU has are skipped."""
    from hstu_attn.triton import api, configs

    monkeypatch.setattr(configs, "AUTOTUNE", False)
    lengths = _real_lengths(4, 300, seed=7)
    case = Case(lengths=lengths, heads=2, dqk=head_dim, dv=head_dim, dtype=torch.bfloat16, atomic_dq=False)
    case_atomic = dataclasses.replace(case, atomic_dq=True, targets=_real_targets(lengths), position_rows=1)
    key = 64 if head_dim <= 64 else head_dim
    ran = 0
    for tuned in (api._forward, api._backward_dkdv, api._backward_dq):
        with monkeypatch.context() as patch:  # restores this kernel's candidates before the next kernel's turn
            for candidate in tuned.candidates[key]:
                patch.setattr(tuned, "candidates", {**tuned.candidates, key: [candidate]})
                patch.setattr(tuned, "chosen", {})
                try:
                    check_case(case if tuned is not api._backward_dkdv else case_atomic, seed=13)
                except RuntimeError as error:
                    if "no launch configuration" not in str(error):
                        raise
                    continue
                ran += 1
    assert ran >= 3, "at least one config of each kernel must fit"
