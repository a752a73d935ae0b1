"""Time the Triton backward at head dim 256 with each dK/dV launch config (fused and split), one process each.

Children compile side by side into a shared Triton cache, then time one at a time. Each takes one dK/dV candidate
(`BACKWARD_CANDIDATES[256][i]`) and `HSTU_ATTN_TRITON_AUTOTUNE=0` (so the dQ kernel gets the same config in every
child), and times the whole backward on jagged B16 N4096 H4 D256 bf16 (lengths U[512, 4096], causal). Prints one
JSON line per candidate and a table. Run it inside a checkout whose hstu_attn is the installed one.
    python3 tools/gpu/dkdv_split_timing.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, torch, triton.testing
from hstu_attn.triton import api, hstu_attn_triton_backward
index = int(sys.argv[1])
candidate = api._backward_dkdv.candidates[256][index]
api._backward_dkdv.candidates = {256: [candidate]}
gen = torch.Generator().manual_seed(0)
lengths = torch.randint(512, 4097, (16,), generator=gen)
offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).cuda()
total = int(lengths.sum())
q, k, v, grad = (torch.randn(total, 4, 256, device="cuda", dtype=torch.bfloat16) for _ in range(4))
kw = dict(alpha=1 / 16, scale=1 / 4096, causal=True, num_targets=None, contextual_seq_len=0, max_attn_len=0,
          rab=None, position_weights=None, time_weights=None, timestamps=None, time_bucket_divisor=1.0,
          deterministic=False)
run = lambda: hstu_attn_triton_backward(grad, q, k, v, offsets, 4096, **kw)
run()
if sys.argv[2] == "compile":
    sys.exit(0)
ms = triton.testing.do_bench(run, warmup=5, rep=50, return_mode="median")
flops = 3.5 * 4 * sum(int(n) * int(n) for n in lengths) * 256 * 4 / 2  # 7 products of 2*n*n/2*D, causal
print("ROW " + json.dumps({"candidate": list(candidate), "ms": ms, "tflops": flops / ms / 1e9}))
"""


def _child(index: int, mode: str, env: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "-c", _CHILD, str(index), mode]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from hstu_attn.triton.configs import BACKWARD_CANDIDATES

    env = {**os.environ, "HSTU_ATTN_TRITON_AUTOTUNE": "0", "TRITON_CACHE_DIR": tempfile.mkdtemp()}
    env.pop("TRITON_INTERPRET", None)
    candidates = range(len(BACKWARD_CANDIDATES[256]))
    compiling = [_child(i, "compile", env) for i in candidates]  # side by side: fills the shared Triton cache
    for child in compiling:
        child.communicate(timeout=400)
    rows = []
    for index in candidates:  # one at a time: nothing else on the GPU while a candidate is timed
        out, err = _child(index, "time", env).communicate(timeout=400)
        line = next((x for x in out.splitlines() if x.startswith("ROW ")), None)
        row = json.loads(line[4:]) if line else {"candidate": BACKWARD_CANDIDATES[256][index], "error": err[-600:]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        if "ms" in row:
            print(f"{row['candidate']!s:28s} {row['ms']:8.3f} ms {row['tflops']:7.1f} TFLOP/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
