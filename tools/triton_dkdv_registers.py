"""Registers and spills of the Triton dK/dV kernel for each backward launch config, compiled for sm_90a on any machine.

Records the launches `hstu_attn_triton_backward` makes (no GPU: kernel launches are intercepted), compiles each
for sm_90a, and reads the cubin's registers, stack (spills land there) and SASS counts (wgmma HGMMA or mma.sync
HMMA, spill loads LDL and stores STL) with cuobjdump. Spills suggest a slow config; the GPU timing
(tools/gpu/dkdv_split_timing.py, autotuning) decides. Needs triton's NVIDIA backend (its cuobjdump, or one on PATH).

    python tools/triton_dkdv_registers.py --head-dim 256 --out /tmp/dkdv-registers.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ["HSTU_ATTN_TRITON_AUTOTUNE"] = "0"

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "hstu-attn" / "tests"))
from triton_aot import LAUNCHES, compile_for_sm90, record_launches

record_launches()  # before hstu_attn's Triton modules: their launches are recorded, not run

from hstu_attn.triton import api, hstu_attn_triton_backward  # noqa: E402
from hstu_attn.triton.configs import LaunchConfig  # noqa: E402


def _sass_counts(path: str, cuobjdump: str) -> dict[str, int]:
    """Instructions of the cubin at `path` by kind: wgmma (HGMMA), mma.sync (HMMA), spill loads/stores (LDL/STL)."""
    sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9]+)", sass)
    return {name.lower(): sum(1 for op in opcodes if op == name) for name in ("HGMMA", "HMMA", "LDL", "STL")}


def _resource_usage(cubin: bytes, cuobjdump: str) -> dict[str, int]:
    """Registers per thread, local and stack bytes per thread (spills land on the stack) and `_sass_counts`."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        done = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"cuobjdump failed: {done.stderr[-2000:]}")
        counts = _sass_counts(path, cuobjdump)
    usage = {name.lower(): int(value) for name, value in re.findall(r"(REG|LOCAL|SHARED|STACK):(\d+)", done.stdout)}
    usage.update(counts)
    return {
        "registers": usage.get("reg", -1),
        "local_bytes": usage.get("local", -1),
        "stack_bytes": usage.get("stack", -1),
        **{name: usage[name] for name in ("hgmma", "hmma", "ldl", "stl")},
    }


def _backward_inputs(head_dim: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    lengths = [0, 1, 300, 77]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    total, heads = int(offsets[-1]), 2
    q, k, v, grad = (torch.randn(total, heads, head_dim, generator=gen).to(dtype) for _ in range(4))
    return grad, q, k, v, offsets, max(lengths)


def measure(head_dim: int, dtype: torch.dtype, tool: str) -> list[dict]:
    grad, q, k, v, offsets, n = _backward_inputs(head_dim, dtype)
    rows = []
    for candidate in api._backward_dkdv.candidates[head_dim]:
        config = LaunchConfig(*candidate)
        api._backward_dkdv.candidates = {**api._backward_dkdv.candidates, head_dim: [candidate]}
        api._backward_dkdv.chosen.clear()
        LAUNCHES.clear()
        hstu_attn_triton_backward(
            grad, q, k, v, offsets, n, alpha=0.1, scale=1.0 / n, causal=True, num_targets=None,
            contextual_seq_len=0, max_attn_len=0, rab=None, position_weights=None, time_weights=None,
            timestamps=None, time_bucket_divisor=1.0, deterministic=False, atomic_dq=False,
        )  # fmt: skip
        seen = set()
        for kernel, args, kwargs in LAUNCHES:
            if kernel.__name__ != "hstu_attn_backward_dkdv_kernel" or kwargs.get("PASS", 0) in seen:
                continue  # the untuned path launches a config twice (once to compile it)
            seen.add(kwargs.get("PASS", 0))
            row = {
                "config": list(candidate),
                "pass": kwargs.get("PASS", 0),
                **_resource_usage(compile_for_sm90(kernel, args, kwargs).asm["cubin"], tool),
            }
            counts = ", ".join(f"{name.upper()} {row[name]}" for name in ("hgmma", "hmma", "ldl", "stl"))
            print(f"{config}  PASS {row['pass']}: {row['registers']} registers, stack {row['stack_bytes']} B, {counts}")
            rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=256, choices=sorted(api._backward_dkdv.candidates))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cuobjdump = bundled if os.path.exists(bundled) else shutil.which("cuobjdump") or ""
    if not os.path.exists(cuobjdump):
        print("error: no cuobjdump in triton's NVIDIA backend or on PATH", file=sys.stderr)
        return 1
    rows = measure(args.head_dim, getattr(torch, args.dtype), cuobjdump)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"head_dim": args.head_dim, "dtype": args.dtype, "arch": "sm_90a", "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
