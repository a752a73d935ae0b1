"""`hstu_attn_varlen_func`: results and gradients per backend, backend selection, and input validation."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import hstu_attn
from hstu_attn import KernelBackend, RelativeBias, hstu_attn_reference, hstu_attn_varlen_func
from hstu_attn.backend import resolve_backend
from hstu_attn.cutlass import cutlass_available
from hstu_attn.reference import hstu_attn_reference_backward

LENGTHS = [5, 0, 1, 4]
MAX_LEN = 6
HEADS = 2


def _offsets(lengths: list[int], dtype: torch.dtype = torch.int64) -> Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype)


def _inputs(dtype: torch.dtype, dim_qk: int = 4, dim_v: int = 3, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)

    def leaf(*shape: int, dtype: torch.dtype = dtype) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_(True)

    return {
        "q": leaf(total, HEADS, dim_qk),
        "k": leaf(total, HEADS, dim_qk),
        "v": leaf(total, HEADS, dim_v),
        "seq_offsets": _offsets(LENGTHS),
        "max_seq_len": MAX_LEN,
        "num_targets": torch.tensor([2, 0, 1, 4]),
        "contextual_seq_len": 1,
        "max_attn_len": 3,
        "alpha": 0.6,
        "scaling_seqlen": 4,
        "rab": leaf(len(LENGTHS), 1, MAX_LEN, MAX_LEN),
        "relative_bias": RelativeBias(
            position_weights=leaf(HEADS, 5, dtype=torch.float32),
            time_weights=leaf(1, 6, dtype=torch.float32),
            timestamps=torch.randint(0, 1000, (total,), generator=generator),
            time_bucket_divisor=0.7,
        ),
    }


def _differentiable(inputs: dict) -> list[Tensor]:
    bias = inputs["relative_bias"]
    return [inputs["q"], inputs["k"], inputs["v"], inputs["rab"], bias.position_weights, bias.time_weights]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", [KernelBackend.PYTORCH, "pytorch", KernelBackend.AUTO])
def test_pytorch_backend_matches_reference_forward_and_backward(
    dtype: torch.dtype, causal: bool, backend: KernelBackend | str
) -> None:
    inputs = _inputs(dtype)
    grad_out = torch.randn(sum(LENGTHS), HEADS, 3, dtype=dtype)
    out = hstu_attn_varlen_func(**inputs, causal=causal, backend=backend)
    grads = torch.autograd.grad(out, _differentiable(inputs), grad_out)
    expected = hstu_attn_reference(**inputs, causal=causal)
    expected_grads = torch.autograd.grad(expected, _differentiable(inputs), grad_out)
    assert out.dtype == dtype and out.shape == (sum(LENGTHS), HEADS, 3)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # The op's backward is the explicit reference backward; autograd rounds differently in bfloat16.
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == expected_grad.dtype
        rtol = max(tolerance[dtype], tolerance[grad.dtype])
        torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=rtol * float(expected_grad.abs().max()))


def test_interface_gradients_match_finite_differences() -> None:
    inputs = _inputs(torch.float64)
    bias = inputs.pop("relative_bias")
    timestamps = bias.timestamps

    def attention(q: Tensor, k: Tensor, v: Tensor, rab: Tensor, position: Tensor) -> Tensor:
        rest = {key: value for key, value in inputs.items() if key not in ("q", "k", "v", "rab")}
        relative = RelativeBias(position_weights=position, time_weights=None, timestamps=timestamps)
        return hstu_attn_varlen_func(q, k, v, rab=rab, relative_bias=relative, backend="pytorch", **rest)

    position = bias.position_weights.detach().double().requires_grad_(True)
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["rab"], position)
    assert torch.autograd.gradcheck(attention, args, fast_mode=True)


def test_defaults_without_bias_and_int32_offsets_match_reference() -> None:
    generator = torch.Generator().manual_seed(1)
    q, k = (torch.randn(10, 3, 8, generator=generator) for _ in range(2))
    v = torch.randn(10, 3, 5, generator=generator)
    offsets = _offsets([0, 3, 7, 0], torch.int32)
    out = hstu_attn_varlen_func(q, k, v, offsets, 7)
    torch.testing.assert_close(out, hstu_attn_reference(q, k, v, offsets, 7), rtol=0, atol=0)


def test_empty_batch_and_empty_sequences() -> None:
    q = torch.randn(0, 2, 4, requires_grad=True)
    out = hstu_attn_varlen_func(q, q, q, torch.zeros(1, dtype=torch.int64), 0)
    assert out.shape == (0, 2, 4)
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape
    out = hstu_attn_varlen_func(
        q, q, q, torch.zeros(3, dtype=torch.int32), 8, num_targets=torch.zeros(2, dtype=torch.int64)
    )
    assert out.shape == (0, 2, 4)


def test_auto_picks_pytorch_on_cpu_and_for_float64() -> None:
    assert resolve_backend(KernelBackend.AUTO, torch.empty(1, 1, 64), 64) is KernelBackend.PYTORCH
    assert resolve_backend(KernelBackend.TRITON, torch.empty(1, 1, 64), 64) is KernelBackend.TRITON


@pytest.mark.skipif(cutlass_available(), reason="the CUTLASS library is built here (see test_cutlass_gpu.py)")
def test_cutlass_backend_raises_not_implemented() -> None:
    inputs = _inputs(torch.float32)
    with pytest.raises(NotImplementedError, match="CUTLASS backend not built yet"):
        hstu_attn_varlen_func(**inputs, backend=KernelBackend.CUTLASS)


def test_unknown_backend_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="'cudnn' is not a valid KernelBackend"):
        hstu_attn_varlen_func(**_inputs(torch.float32), backend="cudnn")


def _triton_shaped_inputs() -> dict:
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(6, 1, 32, generator=generator) for _ in range(3))
    return {"q": q, "k": k, "v": v, "seq_offsets": _offsets([4, 2]), "max_seq_len": 4}


def test_explicit_triton_without_kernels_raises_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "hstu_attn.triton", None)
    monkeypatch.delattr(hstu_attn, "triton", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ImportError, match=r"needs the Triton kernels \(hstu_attn.triton\)"):
        hstu_attn_varlen_func(**_triton_shaped_inputs(), backend="triton")


def test_explicit_triton_on_cpu_without_interpreter_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON backend needs CUDA tensors"):
        hstu_attn_varlen_func(**_triton_shaped_inputs(), backend="triton")


def _recording_triton_module(calls: list[tuple[str, dict]]) -> types.ModuleType:
    """A stand-in for hstu_attn.triton that computes with the reference from exactly the arguments it receives."""

    def reference_arguments(kw: dict) -> dict:
        tables = kw["position_weights"], kw["time_weights"]
        bias = None
        if any(table is not None for table in tables):
            bias = RelativeBias(*tables, kw["timestamps"], kw["time_bucket_divisor"])
        names = ("alpha", "causal", "num_targets", "contextual_seq_len", "max_attn_len", "rab")
        return {**{name: kw[name] for name in names}, "scaling_seqlen": 1.0 / kw["scale"], "relative_bias": bias}

    def forward(*args: object, **kw: object) -> Tensor:
        calls.append(("forward", kw))
        return hstu_attn_reference(*args, **reference_arguments(kw))

    def backward(*args: object, **kw: object) -> tuple:
        calls.append(("backward", kw))
        return hstu_attn_reference_backward(*args, **reference_arguments(kw))

    module = types.ModuleType("hstu_attn.triton")
    module.hstu_attn_triton_forward = forward  # type: ignore[attr-defined]
    module.hstu_attn_triton_backward = backward  # type: ignore[attr-defined]
    return module


def test_triton_dispatch_passes_every_option_to_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict]] = []
    fake = _recording_triton_module(calls)
    monkeypatch.setitem(sys.modules, "hstu_attn.triton", fake)
    monkeypatch.setattr(hstu_attn, "triton", fake, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs = _inputs(torch.float32, dim_qk=32, dim_v=64)
    grad_out = torch.randn(sum(LENGTHS), HEADS, 64)

    out = hstu_attn_varlen_func(**inputs, backend=KernelBackend.TRITON, deterministic=True)
    grads = torch.autograd.grad(out, _differentiable(inputs), grad_out)
    expected = hstu_attn_reference(**inputs)
    expected_grads = torch.autograd.grad(expected, _differentiable(inputs), grad_out)

    assert [name for name, _ in calls] == ["forward", "backward"]
    assert calls[0][1]["scale"] == pytest.approx(1 / 4)
    assert calls[1][1]["deterministic"] is True and calls[1][1]["alpha"] == 0.6
    assert calls[1][1]["rab_requires_grad"] is True
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.skipif(
    not hstu_attn.backend.triton_backend_available(), reason="hstu_attn.triton (Triton kernels) not importable"
)
def test_triton_backend_tiny_case_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = {key: value.to(device) for key, value in _triton_shaped_inputs().items() if isinstance(value, Tensor)}
    q, k, v = (inputs[name].requires_grad_(True) for name in ("q", "k", "v"))
    offsets = inputs["seq_offsets"]
    out = hstu_attn_varlen_func(q, k, v, offsets, 4, backend="triton")
    expected = hstu_attn_reference(q, k, v, offsets, 4)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


Mutation = Callable[[dict], None]


def _set(**changes: object) -> Mutation:
    return lambda inputs: inputs.update(changes)


def _cast(name: str, dtype: torch.dtype) -> Mutation:
    return lambda inputs: inputs.update({name: inputs[name].detach().to(dtype)})


def _reshape(name: str, shape: tuple[int, ...]) -> Mutation:
    return lambda inputs: inputs.update({name: torch.zeros(shape, dtype=inputs[name].dtype)})


def _bias(**changes: object) -> Mutation:
    def mutate(inputs: dict) -> None:
        bias = inputs["relative_bias"]
        fields = {
            "position_weights": bias.position_weights,
            "time_weights": bias.time_weights,
            "timestamps": bias.timestamps,
        }
        inputs["relative_bias"] = RelativeBias(**{**fields, **changes})

    return mutate


TOTAL = sum(LENGTHS)
VALIDATION_CASES = [
    ("q not a tensor", _set(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ("q rank", _reshape("q", (TOTAL, HEADS * 4)), ValueError, r"q, k, v must be 3-D jagged tensors"),
    ("k shape", _reshape("k", (TOTAL, HEADS, 5)), ValueError, "k must have the shape of q"),
    ("v heads", _reshape("v", (TOTAL, HEADS + 1, 3)), ValueError, r"v must be \[L, H, Dv\] with q's L and H"),
    ("mixed dtypes", _cast("k", torch.float64), TypeError, "q, k, v must share one dtype"),
    ("integer dtype", lambda i: [_cast(n, torch.int32)(i) for n in "qkv"], TypeError, "dtype torch.int32 is not"),
    ("offsets rank", _set(seq_offsets=torch.zeros(2, 3, dtype=torch.int64)), ValueError, "seq_offsets must be 1-D"),
    ("offsets dtype", _cast("seq_offsets", torch.float32), TypeError, "seq_offsets must be int32 or int64"),
    ("offsets start", _set(seq_offsets=torch.tensor([1, 5, 5, 6, 10])), ValueError, "must start at 0"),
    ("offsets order", _set(seq_offsets=torch.tensor([0, 5, 4, 6, 10])), ValueError, "must be non-decreasing"),
    ("offsets end", _set(seq_offsets=torch.tensor([0, 5, 5, 6, 9])), ValueError, r"seq_offsets\[-1\] must equal"),
    ("max_seq_len short", _set(max_seq_len=4, rab=None), ValueError, r"max_seq_len = 4 is smaller than .* \(5\)"),
    ("max_seq_len negative", _set(max_seq_len=-1, rab=None), ValueError, "max_seq_len must be >= 0"),
    ("alpha tensor", _set(alpha=torch.tensor(0.5)), TypeError, "alpha must be a Python float"),
    ("contextual negative", _set(contextual_seq_len=-1), ValueError, "contextual_seq_len must be >= 0"),
    ("window negative", _set(max_attn_len=-2), ValueError, "max_attn_len must be >= 0"),
    ("scaling zero", _set(scaling_seqlen=0), ValueError, "scaling_seqlen must be > 0"),
    ("targets shape", _set(num_targets=torch.tensor([1, 0, 1])), ValueError, r"num_targets must be 1-D \[B\] = \[4\]"),
    ("targets dtype", _cast("num_targets", torch.float32), TypeError, "num_targets must be int32 or int64"),
    ("targets negative", _set(num_targets=torch.tensor([1, 0, -1, 0])), ValueError, "num_targets must be >= 0"),
    ("targets too many", _set(num_targets=torch.tensor([1, 1, 0, 0])), ValueError, "must not exceed its sequence"),
    (
        "rab shape",
        _reshape("rab", (4, 1, MAX_LEN, MAX_LEN + 1)),
        ValueError,
        r"rab must have shape \[B, H or 1, N, N\]",
    ),
    ("rab heads", _reshape("rab", (4, 3, MAX_LEN, MAX_LEN)), ValueError, "got 3 heads"),
    ("rab dtype", _cast("rab", torch.float64), TypeError, "rab must have q's dtype"),
    ("bias type", _set(relative_bias=torch.zeros(3)), TypeError, "relative_bias must be a hstu_attn.RelativeBias"),
    ("bias heads", _bias(position_weights=torch.zeros(3, 5)), ValueError, "position_weights has 3 rows"),
    ("timestamps length", _bias(timestamps=torch.zeros(TOTAL + 1)), ValueError, r"one entry per token \[L\] = \[10\]"),
    ("triton fp64", _set(backend="triton"), TypeError, "TRITON backend supports float32, bfloat16 and float16"),
]


@pytest.mark.parametrize(
    ("mutate", "error", "message"), [c[1:] for c in VALIDATION_CASES], ids=[c[0] for c in VALIDATION_CASES]
)
def test_invalid_input_raises_error_naming_the_problem(mutate: Mutation, error: type, message: str) -> None:
    inputs = _inputs(torch.float64 if message.startswith("TRITON") else torch.float32)
    mutate(inputs)
    with pytest.raises(error, match=message):
        hstu_attn_varlen_func(**inputs)


@pytest.mark.parametrize(("dim_qk", "dim_v", "name"), [(48, 64, "Dqk=48"), (64, 96, "Dv=96")])
def test_triton_rejects_unsupported_head_dims(dim_qk: int, dim_v: int, name: str) -> None:
    with pytest.raises(ValueError, match=rf"head dims \(32, 64, 128, 256\); got {name}"):
        hstu_attn_varlen_func(**_inputs(torch.float32, dim_qk=dim_qk, dim_v=dim_v), backend="triton")


def test_inputs_on_different_devices_are_rejected() -> None:
    inputs = _inputs(torch.float32)
    inputs["k"] = inputs["k"].detach().to("meta")
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        hstu_attn_varlen_func(**inputs)


@pytest.mark.parametrize("backend", ["pytorch", "triton"])
def test_rab_without_grad_is_not_differentiated(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict]] = []
    fake = _recording_triton_module(calls)
    monkeypatch.setitem(sys.modules, "hstu_attn.triton", fake)
    monkeypatch.setattr(hstu_attn, "triton", fake, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs = _inputs(torch.float32, dim_qk=32, dim_v=32)
    inputs["rab"] = inputs["rab"].detach()
    out = hstu_attn_varlen_func(**inputs, backend=backend)
    grads = torch.autograd.grad(out.sum(), [inputs["q"], inputs["relative_bias"].time_weights])
    expected = hstu_attn_reference(**inputs)
    expected_grads = torch.autograd.grad(expected.sum(), [inputs["q"], inputs["relative_bias"].time_weights])
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    if backend == "triton":
        assert calls[-1][1]["rab_requires_grad"] is False
