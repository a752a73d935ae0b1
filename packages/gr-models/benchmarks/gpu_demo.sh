#!/usr/bin/env bash
# One call on the lent GPU machine: the GPU-marked gr-models tests (the tutorial script, unchanged, with the
# TRITON backend), then the default demo on CUDA (bfloat16, Triton attention). Logs and run records go to $OUT.
#   run(command="bash packages/gr-models/benchmarks/gpu_demo.sh", carry=[".gpu-wheels"])
set -eo pipefail
export PYTHONUNBUFFERED=1
GR_SKIP_TESTS=1 source tools/gpu/setup.sh
out=${OUT:-/tmp/gr-models-gpu}
mkdir -p "$out"
python3 -m pytest -q -p no:cacheprovider -m gpu packages/gr-models/tests 2>&1 | tee "$out/pytest_gpu.log" | tail -20
gr-train --config packages/gr-models/configs/synthetic_ranking.yaml device=cuda train.progress_bar=false \
  output_dir="$out/synthetic_ranking" 2>&1 | grep -v fx_tracing | tee "$out/demo.log"
