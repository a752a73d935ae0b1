#!/usr/bin/env bash
# One call on the lent GPU machine (issue 16): install, the hstu-attn host-overhead benchmark, the no-autotune
# head-dim-256 launch check, then tools/bench_e2e.py at the small and NVIDIA configurations. Everything lands in $OUT.
#   run(command="bash tools/gpu/bench_e2e.sh", carry=[".gpu-wheels"], kind="nvidia-h200")
# E2E_ARGS adds arguments to bench_e2e.py (e.g. "--compile --lengths fixed"); COMMIT names the commit measured.
set -o pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/bench-e2e}
mkdir -p "$out"
GR_SKIP_TESTS=1 source tools/gpu/setup.sh > "$out/setup.log" 2>&1 || { tail -20 "$out/setup.log"; exit 1; }
grep -E "^device|^torch|^triton" "$out/setup.log"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw --format=csv | tee "$out/nvidia-smi.txt"

echo "== head dim 256 without autotuning"
HSTU_ATTN_TRITON_AUTOTUNE=0 timeout 120 python3 - <<'PY' 2>&1 | tail -5
import torch
from hstu_attn import hstu_attn_varlen_func
from hstu_attn.triton import api
q, k, v = (torch.randn(4096, 4, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
offsets = torch.tensor([0, 1024, 4096], device="cuda")
hstu_attn_varlen_func(q, k, v, offsets, 3072).sum().backward()
torch.cuda.synchronize()
print("forward configs:", api._forward.chosen.values(), "backward:", api._backward_dkdv.chosen.values())
PY

echo "== hstu-attn host overhead"
timeout 180 python3 packages/hstu-attn/benchmarks/bench_host_overhead.py --out "$out/host-overhead.json" ${COMMIT:+--commit $COMMIT} 2>&1 | tail -8

echo "== end to end"
timeout ${E2E_TIMEOUT:-420} python3 tools/bench_e2e.py --configs small nvidia --out "$out/e2e.json" ${COMMIT:+--commit $COMMIT} ${E2E_ARGS:-} \
  2>&1 | grep -v fx_tracing | tee "$out/e2e.log" | grep -vE "^\s*$" | tail -80
