#!/usr/bin/env bash
# hstu-attn CUTLASS/CuTe backend on the lent GPU machine, in one call, from the repository root:
# build libhstu_attn_cutlass.so with HSTU_ATTN_BUILD_CUDA=1 (scikit-build-core, editable), record registers/spills
# and the SASS instruction mix, run its GPU tests against the PyTorch reference, then (only if they pass, or with
# BENCH_ANYWAY=1) time the CUTLASS forward beside the Triton kernels and cuDNN with bench_attention.py.
# Everything goes to $OUT: build.log, ptxas.txt, sass_counts.txt, tests.log, bench.log, <device>.json.
#
#   run(command="bash tools/gpu/hstu_attn_cutlass.sh", carry=[".gpu-wheels"], timeout_s=600)
#
# Options (environment): BENCH_SHAPES (comma-separated bench_attention.py --shapes substrings; default: the N1024
# shapes and full B8 N4096 D128), BENCH_BACKENDS (space-separated; default "ours cutlass sdpa_cudnn"), BENCH_ANYWAY=1,
# TEST_ARGS (extra pytest arguments, e.g. "-k causal -x").
set -uo pipefail
export PYTHONUNBUFFERED=1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
OUT="${OUT:-/tmp/hstu_attn_cutlass_out}"
mkdir -p "$OUT"
site=${GR_GPU_SITE:-/tmp/gr-site}
build_dir=/tmp/hstu-attn-build
started=$(date +%s)
stamp() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$OUT/steps.txt"; }

nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv | tee "$OUT/gpu.txt"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "commit $commit" | tee -a "$OUT/gpu.txt"

stamp "install nvidia-cutlass headers"
wheel=$(ls .gpu-wheels/nvidia_cutlass-*.whl 2>/dev/null | head -1)
if [ -z "$wheel" ]; then echo "error: carry .gpu-wheels (nvidia_cutlass wheel missing)" >&2; exit 1; fi
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$wheel"
export CUTLASS_INCLUDE_DIR="$site/cutlass_library/source/include"

stamp "build (HSTU_ATTN_BUILD_CUDA=1)"
HSTU_ATTN_BUILD_CUDA=1 SKBUILD_BUILD_DIR="$build_dir" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  python3 -m pip install -v --no-index --no-deps --no-build-isolation -e packages/hstu-attn > "$OUT/build.log" 2>&1
build_rc=$?
stamp "build exit $build_rc"
grep -E "Compiling entry|registers|spill" "$OUT/build.log" | sed 's/_ZN9hstu_attn20hstu_attn_fwd_kernelINS_9FwdTraits//' \
  > "$OUT/ptxas.txt"
if [ "$build_rc" != 0 ]; then tail -60 "$OUT/build.log"; exit "$build_rc"; fi

library=$(find "$build_dir" -name libhstu_attn_cutlass.so | head -1)
if ! python3 -c "from hstu_attn.cutlass import cutlass_available as a; raise SystemExit(not a())"; then
  echo "the installed package does not find the library; using HSTU_ATTN_CUTLASS_LIB=$library" | tee -a "$OUT/steps.txt"
  export HSTU_ATTN_CUTLASS_LIB="$library"
fi
python3 -c "from hstu_attn.cutlass import _library; print('library:', _library.load())" | tee -a "$OUT/steps.txt"
cuobjdump=$(command -v cuobjdump || python3 -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), \
  'backends/nvidia/bin/cuobjdump'))")  # Triton bundles one
if [ -x "$cuobjdump" ] && [ -n "$library" ]; then
  for arch in sm_80 sm_90a; do
    echo "== $arch" >> "$OUT/sass_counts.txt"
    "$cuobjdump" -sass -arch "$arch" "$library" | grep -oE "\b(HGMMA|HMMA|LDSM|LDGSTS|STG|LDL|STL|MUFU)[.A-Z0-9_]*" \
      | sort | uniq -c >> "$OUT/sass_counts.txt"
  done
fi

stamp "GPU tests"
timeout 240 python3 -m pytest packages/hstu-attn/tests/test_cutlass_gpu.py packages/hstu-attn/tests/test_hstu_interface.py \
  -q -p no:cacheprovider -rs --durations=10 ${TEST_ARGS:-} > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -30 "$OUT/tests.log"
stamp "tests exit $tests_rc"

if [ "$tests_rc" = 0 ] || [ -n "${BENCH_ANYWAY:-}" ]; then
  stamp "benchmark"
  IFS=',' read -r -a shapes <<< "${BENCH_SHAPES:-N1024,B8 N4096 H4 D128}"
  read -r -a backends <<< "${BENCH_BACKENDS:-ours cutlass sdpa_cudnn}"
  left=$(( 570 - ($(date +%s) - started) ))
  BENCH_COMMIT=$commit timeout "$left" python3 packages/hstu-attn/benchmarks/bench_attention.py \
    --out "$OUT" --backends "${backends[@]}" --shapes "${shapes[@]}" --memory-shape none > "$OUT/bench.log" 2>&1
  stamp "benchmark exit $?"
  grep -E "ours_|sdpa_" "$OUT/bench.log"
fi
exit "$tests_rc"
