"""The Triton kernels compile for a Hopper GPU (sm_90) with the arguments the API really passes, on any machine.

The CPU tests run the kernels under ``TRITON_INTERPRET=1``, which accepts code the compiler rejects (a loop
variable whose type changes, a constexpr used as a tensor, ...). Here a child process without the interpreter
calls the forward and backward entry points on small CPU tensors with kernel launches intercepted: each launch
is recorded (kernel, arguments, launch options) instead of run, then compiled ahead of time for ``cuda:90``, so
such errors fail in CI instead of on the GPU machine. Option sets cover every mask, the materialized and the
fused bias, both dQ paths, the deterministic backward, the split dK/dV launches, and fp32/bf16/fp16 with head dims
32 to 256 (few sets: each compiles three kernels for sm_90, seconds apiece).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # compiles the Triton kernels for sm_90 in a child process

CASES = {
    "bf16 d128 causal, fused bias, dq kernel": dict(dtype="bfloat16", dqk=128, dv=128, bias=True, atomic_dq=False),
    "fp32 d64/32 targets context window rab, deterministic": dict(dtype="float32", dqk=64, dv=32, targets=True,
                                                                  context=2, window=5, rab=True, deterministic=True),
    # fp32 dots at head dim 128 as three TF32 products: as full-IEEE FMAs the dK/dV kernel took minutes to compile
    "fp32 d128 causal targets (tf32x3)": dict(dtype="float32", dqk=128, dv=128, targets=True),
    "fp16 d256 non-causal, dq atomics": dict(dtype="float16", dqk=256, dv=256, causal=False, atomic_dq=True),
    "bf16 d128 split dK/dV, fused bias, dq atomics": dict(dtype="bfloat16", dqk=128, dv=128, bias=True,
                                                          atomic_dq=True, split=True),
}  # fmt: skip

_CHILD = r"""
import json, os, sys, traceback
os.environ.pop("TRITON_INTERPRET", None)
os.environ["HSTU_ATTN_TRITON_AUTOTUNE"] = "0"
import torch
sys.path.insert(0, sys.argv[2])  # the tests folder
from triton_aot import LAUNCHES, compile_for_sm90, record_launches

record_launches()

from hstu_attn.triton import hstu_attn_triton_backward, hstu_attn_triton_forward

def run_case(case):
    if case.get("split"):  # every dK/dV candidate as a split config (LaunchConfig.split_dkdv): two launches
        from hstu_attn.triton import api
        tuned = api._backward_dkdv
        tuned.candidates = {dim: [(*c[:4], True) for c in configs] for dim, configs in tuned.candidates.items()}
    dtype = getattr(torch, case["dtype"])
    gen = torch.Generator().manual_seed(0)
    lengths = [0, 1, 19, 7]
    offsets = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int64)
    total, n, heads = int(offsets[-1]), max(lengths), 2
    q = torch.randn(total, heads, case["dqk"], generator=gen).to(dtype)
    k = torch.randn(total, heads, case["dqk"], generator=gen).to(dtype)
    v = torch.randn(total, heads, case["dv"], generator=gen).to(dtype)
    kw = dict(alpha=0.1, scale=1.0 / n, causal=case.get("causal", True),
              num_targets=torch.tensor([0, 1, 3, 2]) if case.get("targets") else None,
              contextual_seq_len=case.get("context", 0), max_attn_len=case.get("window", 0),
              rab=torch.randn(4, heads, n, n, generator=gen).to(dtype) if case.get("rab") else None,
              position_weights=None, time_weights=None, timestamps=None, time_bucket_divisor=1.0)
    if case.get("bias"):
        kw.update(position_weights=torch.randn(heads, 2 * n - 1, generator=gen),
                  time_weights=torch.randn(heads, 16, generator=gen),
                  timestamps=torch.randint(0, 100, (total,), generator=gen).cumsum(0))
    hstu_attn_triton_forward(q, k, v, offsets, n, **kw)
    hstu_attn_triton_backward(torch.randn_like(v), q, k, v, offsets, n, **kw,
                              deterministic=case.get("deterministic", False), atomic_dq=case.get("atomic_dq"))

results = {}
for name, case in json.loads(sys.argv[1]).items():
    LAUNCHES.clear()
    try:
        run_case(case)
        compiled = [bool(compile_for_sm90(*launch).asm.get("cubin")) for launch in LAUNCHES]
        passes = sorted({kwargs["PASS"] for _, _, kwargs in LAUNCHES if "PASS" in kwargs})
        ok = compiled and all(compiled)
        results[name] = f"ok: {len(compiled)} kernels, passes {passes}" if ok else f"compiled {compiled}"
    except Exception:
        results[name] = traceback.format_exc()[-2000:]
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def compile_results() -> dict[str, str]:
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # one child per option set, run side by side (compiling is single-threaded)
    children = {
        name: subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps({name: case}), str(Path(__file__).parent)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, case in CASES.items()
    }
    results: dict[str, str] = {}
    for name, child in children.items():
        out, err = child.communicate(timeout=900)
        line = next((x for x in out.splitlines() if x.startswith("RESULTS ")), None)
        failed = f"the compile process failed:\n{err[-3000:]}"
        results[name] = json.loads(line[len("RESULTS ") :])[name] if line else failed
    return results


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_compile_for_sm90(name: str, compile_results: dict[str, str]) -> None:
    assert compile_results[name].startswith("ok: "), f"{name}: {compile_results[name]}"
    assert int(compile_results[name].split()[1]) >= 2, "the forward and at least one backward kernel were compiled"
    if "split" in name:
        assert compile_results[name].endswith("passes [1, 2]"), f"{name}: no dV and dK launches compiled"
