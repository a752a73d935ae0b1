#!/usr/bin/env bash
# hstu-attn on the lent GPU machine, from the repository root: GPU tests of the Triton backend and/or the
# side-by-side benchmark. Logs and the benchmark JSON go to $OUT (the device tool brings that folder back).
#
#   bash tools/gpu_hstu_attn.sh tests [pytest -k expression]
#   bash tools/gpu_hstu_attn.sh bench [bench_attention.py arguments...]
#
# Meta's kernel must be in .peers/ (git-ignored; pass carry=[".peers"] to the device tool).
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="packages/hstu-attn/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/hstu_attn_out}"
mkdir -p "$OUT"

mode="${1:-tests}"
shift || true
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,memory.used --format=csv \
  | tee -a "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

case "$mode" in
  tests)
    expr="${1:-}"
    HSTU_ATTN_TRITON_AUTOTUNE=0 python -m pytest packages/hstu-attn/tests/test_hstu_triton.py -m gpu -q \
      -p no:cacheprovider --durations=20 ${expr:+-k "$expr"} 2>&1 | tee "$OUT/tests.log"
    ;;
  bench)
    python packages/hstu-attn/benchmarks/bench_attention.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
    ;;
  *)
    echo "unknown mode $mode (tests|bench)" >&2
    exit 2
    ;;
esac
