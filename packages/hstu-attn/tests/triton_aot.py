"""Record the Triton launches the hstu_attn API makes and compile them ahead of time for sm_90, on any machine.

Used by test_triton_sm90_compile.py (in a child process) and tools/triton_dkdv_registers.py. Import it only with
`TRITON_INTERPRET` unset and before hstu_attn's Triton modules: `record_launches()` replaces `JITFunction.run`, so
every kernel launch is appended to `LAUNCHES` as `(kernel, args, kwargs)` instead of run.
"""

from __future__ import annotations

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

__all__ = ["LAUNCHES", "compile_for_sm90", "record_launches"]

LAUNCHES: list[tuple[JITFunction, tuple, dict]] = []
_TYPES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32",
    torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
}  # fmt: skip


def _record(self: JITFunction, *args, grid, warmup, **kwargs) -> None:
    LAUNCHES.append((self, args, kwargs))


def record_launches() -> None:
    """From now on every Triton launch in this process is recorded in `LAUNCHES`, not run."""
    JITFunction.run = _record


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected argument {value!r}")


def compile_for_sm90(kernel: JITFunction, args: tuple, kwargs: dict):
    """A recorded launch compiled for `cuda:90` (a triton CompiledKernel; `.asm["cubin"]` holds the binary).
    Constexprs the launch left out take their defaults."""
    kwargs = dict(kwargs)
    options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages") if name in kwargs}
    values = {**dict(zip(kernel.arg_names, args)), **kwargs}
    constexpr_names = {kernel.arg_names[i] for i in kernel.constexprs}
    signature, constexprs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = values[name] if name in values else kernel.params[index].default
        if name in constexpr_names or value is None:
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = _arg_type(value)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
