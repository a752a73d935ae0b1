"""Fused `dropout(LayerNorm(attn) * u)` (`hstu_attn.norm_gate`) against its PyTorch reference, forward and backward.

On CPU the Triton kernels run under `TRITON_INTERPRET=1` (set by the root conftest) at tiny sizes; the `gpu` tests
repeat them at the HSTU layer's sizes. Inputs are fresh random draws per case. The reference runs in float32 on
the same (rounded) inputs, so a bf16/fp16 result may differ from it by the one final rounding (relative 2^-8 and
2^-11): the tolerance is one unit in the last place, plus a small absolute term for values near zero. Dropout
masks come from different generators in the two, so p > 0 is checked through the mask the output reveals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import Tensor

from hstu_attn.norm_gate import launch as norm_gate_launch
from hstu_attn.norm_gate import layer_norm_gate, layer_norm_gate_reference, layer_norm_gate_supported
from hstu_attn.norm_gate import ops as norm_gate_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1"
)
ULP = {torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def make_inputs(
    rows: int, width: int, dtype: torch.dtype, affine: bool, strided: bool, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """(attn, uvqk, u, weight, bias): leaf attn `[L, W]`; u the second quarter of a leaf uvqk `[L, 4W]` (strided)
    or a leaf of its own; float32 weight/bias (as master weights under autocast) or None."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape: int, dtype: torch.dtype = dtype, shift: float = 0.0) -> Tensor:
        return (torch.randn(shape, generator=gen) + shift).to(device=DEVICE, dtype=dtype).requires_grad_()

    attn = leaf(rows, width, shift=0.5)
    uvqk = leaf(rows, 4 * width) if strided else leaf(rows, width)
    u = uvqk[:, width : 2 * width] if strided else uvqk
    weight = leaf(width, dtype=torch.float32, shift=1.0) if affine else None
    bias = leaf(width, dtype=torch.float32) if affine else None
    return attn, uvqk, u, weight, bias


def float_copies(*tensors: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.detach().float().requires_grad_() for t in tensors]


def assert_near(actual: Tensor | None, expected: Tensor | None, dtype: torch.dtype, name: str) -> None:
    """Within one unit in the last place of `dtype` of the float32 `expected`, plus 1e-5 of its largest value."""
    assert actual is not None and expected is not None, name
    assert actual.shape == expected.shape, name
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=ULP[dtype], atol=1e-5 * scale + 1e-7, msg=lambda m: f"{name}: {m}"
    )


def check_against_reference(
    rows: int, width: int, dtype: torch.dtype, affine: bool, strided: bool, seed: int, eps: float = 1e-5
) -> None:
    attn, uvqk, u, weight, bias = make_inputs(rows, width, dtype, affine, strided, seed)
    out = layer_norm_gate(attn, u, weight, bias, eps=eps, dropout_p=0.0)
    assert out.dtype == dtype and out.shape == (rows, width)
    attn32, uvqk32, weight32, bias32 = float_copies(attn, uvqk, weight, bias)
    u32 = uvqk32[:, width : 2 * width] if strided else uvqk32  # type: ignore[index]
    expected = layer_norm_gate_reference(attn32, u32, weight32, bias32, eps=eps)  # type: ignore[arg-type]
    assert_near(out, expected, dtype, "out")
    grad = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    leaves = [t for t in (attn, uvqk, weight, bias) if t is not None]
    leaves32 = [t for t in (attn32, uvqk32, weight32, bias32) if t is not None]
    grads = torch.autograd.grad(out, leaves, grad)
    expected_grads = torch.autograd.grad(expected, leaves32, grad.float())
    for name, actual, reference in zip(("dattn", "du", "dweight", "dbias"), grads, expected_grads):
        assert_near(actual, reference, dtype if name in ("dattn", "du") else torch.float32, name)
    if strided and rows:  # the u slice's gradient lands in its columns of uvqk only
        outside = torch.cat([grads[1][:, :width], grads[1][:, 2 * width :]], dim=1)
        assert float(outside.abs().max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [50, 100, 1000])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_matches_reference(dtype: torch.dtype, width: int, affine: bool) -> None:
    check_against_reference(rows=37, width=width, dtype=dtype, affine=affine, strided=True, seed=width)


@pytest.mark.parametrize("rows", [0, 1, 2, 130])  # 130 rows at W=50: 5 row blocks over 2 backward programs
def test_row_counts(rows: int) -> None:
    check_against_reference(rows=rows, width=50, dtype=torch.float32, affine=True, strided=True, seed=rows)


@pytest.mark.parametrize("strided", [True, False], ids=["strided_u", "contiguous_u"])
def test_float16_and_layouts(strided: bool) -> None:
    check_against_reference(rows=9, width=64, dtype=torch.float16, affine=True, strided=strided, seed=3, eps=1e-3)


def test_weight_only_and_bias_only() -> None:
    attn, uvqk, u, weight, bias = make_inputs(7, 50, torch.float32, True, True, seed=11)
    for w, b in ((weight, None), (None, bias)):
        out = layer_norm_gate(attn, u, w, b)
        expected = layer_norm_gate_reference(attn, u, w, b)
        assert_near(out, expected, torch.float32, "out")
        present = [t for t in (attn, uvqk, w, b) if t is not None]
        grad = torch.ones_like(out)
        actual_grads = torch.autograd.grad(out, present, grad)
        for actual, reference in zip(actual_grads, torch.autograd.grad(expected, present, grad)):
            assert_near(actual, reference, torch.float32, "grad")


def test_strided_inputs_are_not_copied() -> None:
    uvqk = torch.randn(6, 40, device=DEVICE)
    u = uvqk[:, 10:20]
    assert norm_gate_ops._row_major(u) is u
    transposed = torch.randn(10, 6, device=DEVICE).t()
    assert norm_gate_ops._row_major(transposed).is_contiguous()


def dropout_case(rows: int, width: int, dtype: torch.dtype, p: float, seed: int) -> None:
    """The output reveals the mask: out == ref * mask / (1 - p); the backward applies the same mask."""
    attn, uvqk, u, weight, bias = make_inputs(rows, width, dtype, True, True, seed)
    torch.manual_seed(seed)
    out = layer_norm_gate(attn, u, weight, bias, dropout_p=p, training=True)
    attn32, uvqk32, weight32, bias32 = float_copies(attn, uvqk, weight, bias)
    u32 = uvqk32[:, width : 2 * width]  # type: ignore[index]
    no_drop = layer_norm_gate_reference(attn32, u32, weight32, bias32, dropout_p=0.0)  # type: ignore[arg-type]
    nonzero = no_drop.detach() != 0
    kept = out.detach() != 0
    assert bool(nonzero.all()), "the check needs nonzero reference values"
    kept_fraction = float(kept.float().mean())
    assert abs(kept_fraction - (1 - p)) < 4 * ((p * (1 - p)) / kept.numel()) ** 0.5 + 1e-3, kept_fraction
    expected = no_drop * kept / (1 - p)
    assert_near(out, expected, dtype, "out")
    grad = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (attn, uvqk, weight, bias), grad)
    expected_grads = torch.autograd.grad(expected, (attn32, uvqk32, weight32, bias32), grad.float())
    for name, actual, reference in zip(("dattn", "du", "dweight", "dbias"), grads, expected_grads):
        assert_near(actual, reference, dtype if name in ("dattn", "du") else torch.float32, name)
    du = grads[1][:, width : 2 * width]
    assert bool((du[~kept] == 0).all()), "du must be zero where the output was dropped"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dropout_mask_is_revealed_and_reused(dtype: torch.dtype) -> None:
    dropout_case(rows=64, width=100, dtype=dtype, p=0.3, seed=5)


def test_dropout_mask_does_not_depend_on_the_block_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backward programs of 1 row (forward: 32) regenerate the forward's mask; fp16 columns of every class mod 4."""
    monkeypatch.setattr(norm_gate_launch, "_BACKWARD_ELEMENTS", 64)
    dropout_case(rows=40, width=50, dtype=torch.float16, p=0.5, seed=6)


def test_dropout_seed_comes_from_torch_generator() -> None:
    attn, _, u, weight, bias = make_inputs(8, 50, torch.float32, True, True, seed=2)
    with torch.no_grad():
        torch.manual_seed(123)
        first = layer_norm_gate(attn, u, weight, bias, dropout_p=0.5)
        second = layer_norm_gate(attn, u, weight, bias, dropout_p=0.5)
        torch.manual_seed(123)
        again = layer_norm_gate(attn, u, weight, bias, dropout_p=0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first != 0, second != 0)


def test_dropout_off_when_not_training_and_p_one() -> None:
    attn, _, u, weight, bias = make_inputs(8, 50, torch.float32, True, True, seed=4)
    with torch.no_grad():
        evaluated = layer_norm_gate(attn, u, weight, bias, dropout_p=0.5, training=False)
        plain = layer_norm_gate(attn, u, weight, bias, dropout_p=0.0)
        dropped = layer_norm_gate(attn, u, weight, bias, dropout_p=1.0)
    assert torch.equal(evaluated, plain)
    assert float(dropped.abs().max()) == 0.0


def test_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    attn = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        layer_norm_gate(attn, torch.randn(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="one dtype"):
        layer_norm_gate(attn, attn.double())
    with pytest.raises(ValueError, match="weight must be"):
        layer_norm_gate(attn, attn, torch.ones(9, device=DEVICE))
    with pytest.raises(ValueError, match="dropout_p"):
        layer_norm_gate(attn, attn, dropout_p=1.5)
    wide = torch.zeros(1, norm_gate_ops.MAX_WIDTH + 1, device=DEVICE)
    assert not layer_norm_gate_supported(wide, wide)
    with pytest.raises(ValueError, match="whole rows"):
        layer_norm_gate(wide, wide)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not layer_norm_gate_supported(attn.cpu(), attn.cpu())
    with pytest.raises(ValueError, match="CUDA tensors"):
        layer_norm_gate(attn.cpu(), attn.cpu())


def test_compiled_call_matches_eager() -> None:
    """Under torch.compile the call goes through the custom ops (opaque to the compiler): same values."""
    attn, uvqk, _, weight, bias = make_inputs(9, 50, torch.float32, True, True, seed=8)

    def step(a: Tensor, full: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return layer_norm_gate(a, full[:, 50:100], w, b) * 2.0

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    leaves = (attn, uvqk, weight, bias)
    eager_out = step(*leaves)  # type: ignore[arg-type]
    compiled_out = compiled(*leaves)
    torch.testing.assert_close(compiled_out, eager_out)
    grad = torch.randn_like(eager_out)
    for a, b in zip(torch.autograd.grad(compiled_out, leaves, grad), torch.autograd.grad(eager_out, leaves, grad)):
        torch.testing.assert_close(a, b)


def test_custom_ops_pass_opcheck() -> None:
    attn, _, u, weight, bias = make_inputs(5, 50, torch.float32, True, True, seed=9)
    args = (attn.detach().requires_grad_(), u.detach(), weight, bias, None, 1e-5, 0.0)
    torch.library.opcheck(norm_gate_ops._forward_op, args)


_SM90_CHILD = r"""
import json, os, sys, traceback
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hstu_attn.norm_gate import kernels, launch

POINTERS = {"X", "U", "Y", "DY", "DX", "DU", "WEIGHT", "BIAS", "MEAN", "RSTD", "DWEIGHT", "DBIAS", "SEED"}
FLOATS = {"eps", "p", "scale"}

def compile_kernel(kernel, elements, case):
    block_l, block_w, num_warps = launch._block_shape(case["width"], elements)
    constexprs = dict(HAS_WEIGHT=case["weight"], HAS_BIAS=case["bias"], DROPOUT=case["dropout"],
                      BLOCK_L=block_l, BLOCK_W=block_w)
    pointee = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}[case["dtype"]]
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            fp32 = name in ("WEIGHT", "BIAS", "MEAN", "RSTD", "DWEIGHT", "DBIAS")
            signature[name] = "*i64" if name == "SEED" else "*fp32" if fp32 else pointee
            attrs[(index,)] = [["tt.divisibility", 16]]  # as a launch on fresh allocations specializes
        elif name in FLOATS:
            signature[name] = "fp32"
        else:  # rows, width, row strides: divisible by 16 when the width is
            signature[name] = "i32"
            if case["width"] % 16 == 0 and name != "rows":
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    return bool(compiled.asm.get("cubin"))

results = {}
for name, case in json.loads(sys.argv[1]).items():
    try:
        ok = [compile_kernel(kernels.layer_norm_gate_forward_kernel, launch._FORWARD_ELEMENTS, case),
              compile_kernel(kernels.layer_norm_gate_backward_kernel, launch._BACKWARD_ELEMENTS, case)]
        results[name] = "ok" if all(ok) else f"no cubin: {ok}"
    except Exception:
        results[name] = traceback.format_exc()[-2000:]
print("RESULTS " + json.dumps(results))
"""
SM90_CASES = {
    "bf16 W1024 affine dropout": dict(dtype="bfloat16", width=1024, weight=True, bias=True, dropout=True),
    "fp32 W50 plain": dict(dtype="float32", width=50, weight=False, bias=False, dropout=False),
    "fp16 W1000 weight only, dropout": dict(dtype="float16", width=1000, weight=True, bias=False, dropout=True),
    "bf16 W8192 (16 warps) bias only": dict(dtype="bfloat16", width=8192, weight=False, bias=True, dropout=False),
}


@pytest.mark.slow
def test_kernels_compile_for_sm90() -> None:
    """The interpreter accepts code the compiler rejects: compile both kernels for sm_90 in a child process."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run(
        [sys.executable, "-c", _SM90_CHILD, json.dumps(SM90_CASES)], env=env, capture_output=True, text=True
    )
    line = next((x for x in child.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, child.stderr[-3000:]
    results = json.loads(line[len("RESULTS ") :])
    assert results == dict.fromkeys(SM90_CASES, "ok"), results


@pytest.mark.gpu
@pytest.mark.parametrize("width", [1024, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_sizes(width: int, dtype: torch.dtype) -> None:
    check_against_reference(rows=4099, width=width, dtype=dtype, affine=True, strided=True, seed=width)
    dropout_case(rows=2049, width=width, dtype=dtype, p=0.1, seed=width + 1)
