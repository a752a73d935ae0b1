#!/usr/bin/env bash
# One GPU call for issues 13, 15 and 22, most needed first, within about 580 s:
#   1. install (tools/gpu/setup.sh), then build libhstu_attn_cutlass.so for this GPU's architecture in the
#      background (CMake + ninja; CPU work) while the whole hstu-attn test directory runs on CUDA
#      (NaN containment, check_finite, Triton forward/backward against the reference);
#   2. the gr-train pipeline run (tools/gpu/gr_train_pipeline.sh, timed, nothing else running);
#   3. the CUTLASS forward/backward GPU tests (tests/test_cutlass_gpu.py);
#   4. if time is left: the Triton attention timed at this commit beside a baseline commit's kernels
#      (.baseline/packages/hstu-attn/src from `git archive BASE packages/hstu-attn/src`), alternating, and the
#      CUTLASS kernels beside Triton and cuDNN.
#   run(command="cd .snapshot && COMMIT=$(cat COMMIT) bash tools/gpu/pipeline_and_attention.sh", carry=[".snapshot"])
# Environment: COMMIT, BASE_COMMIT, STEPS / ROUNDS (pipeline), ATTN_TEST_TIMEOUT_S (default 150), DEADLINE_S (580),
# SKIP_CUTLASS=1 (no build, tests or bench of the CUTLASS kernels), CUTLASS_TESTS_S (time kept for the CUTLASS tests, default 80), PIPELINE_TEST_TIMEOUT_S (its pytest -m gpu, 60),
# ATTN_TEST_MARKS (a pytest -m expression for the hstu-attn tests, e.g. "not slow" in a short call),
# PIPELINE_FIRST=1 (the pipeline run right after the install, within PIPELINE_S seconds, default 240; then the rest).
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/pipeline-and-attention}
mkdir -p "$out"
started=$(date +%s)
deadline=${DEADLINE_S:-580}
stamp() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$out/steps.txt"; }
left() { echo $(( deadline - ($(date +%s) - started) )); }

GR_SKIP_TESTS=1 source tools/gpu/setup.sh > "$out/setup.log" 2>&1 || { tail -20 "$out/setup.log"; exit 1; }
stamp "installed"; grep -E "^device|^torch|^triton" "$out/setup.log"
site=${GR_GPU_SITE:-/tmp/gr-site}
export CUTLASS_INCLUDE_DIR="$site/cutlass_library/source/include"
pipeline() {  # the gr-train pipeline run, nothing else running; keeps CUTLASS_TESTS_S for later unless PIPELINE_FIRST
  stamp "gr-train pipeline"
  local pipeline_s=$(( $(left) - ${CUTLASS_TESTS_S:-80} ))
  [ -z "${PIPELINE_FIRST:-}" ] || pipeline_s=${PIPELINE_S:-240}
  OUT="$out" STEPS=${STEPS:-200} ROUNDS=${ROUNDS:-2} TEST_TIMEOUT_S=${PIPELINE_TEST_TIMEOUT_S:-60} timeout "$pipeline_s" \
    bash tools/gpu/gr_train_pipeline.sh
  stamp "gr-train pipeline exit $?"
}
[ -z "${PIPELINE_FIRST:-}" ] || pipeline
arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}' + ('a' if m >= 9 else ''))")
if [ -z "${SKIP_CUTLASS:-}" ]; then
# A plain CMake build of the package's CMake project (no reinstall, so the tests running meanwhile keep their
# imports); the library is then found through HSTU_ATTN_CUTLASS_LIB.
( cmake -S packages/hstu-attn -B /tmp/hstu-attn-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DHSTU_ATTN_BUILD_CUDA=1 \
    -DHSTU_ATTN_CUDA_ARCHS="$arch" -DCUTLASS_INCLUDE_DIR="$CUTLASS_INCLUDE_DIR" > "$out/cutlass-build.log" 2>&1 &&
  cmake --build /tmp/hstu-attn-build -j "$(nproc)" -v >> "$out/cutlass-build.log" 2>&1
  echo "build exit $?" >> "$out/cutlass-build.log" ) &
build_pid=$!
fi

stamp "hstu-attn tests on CUDA (CUTLASS build for sm_$arch in the background)"
HSTU_ATTN_TRITON_AUTOTUNE=0 timeout -s INT -k 10 "${ATTN_TEST_TIMEOUT_S:-150}" python3 -m pytest packages/hstu-attn/tests -q -rfEs --tb=line \
  ${ATTN_TEST_MARKS:+-m "$ATTN_TEST_MARKS"} -p no:cacheprovider --durations=10 --deselect packages/hstu-attn/tests/test_cutlass_gpu.py > "$out/attn-tests.log" 2>&1
stamp "hstu-attn tests exit $?"
tail -15 "$out/attn-tests.log"
[ -n "${SKIP_CUTLASS:-}" ] || { wait "$build_pid"; stamp "$(tail -1 "$out/cutlass-build.log")"; }
if [ -z "${SKIP_CUTLASS:-}" ]; then
  grep -E "Compiling entry|registers|spill" "$out/cutlass-build.log" > "$out/cutlass-ptxas.txt"
  export HSTU_ATTN_CUTLASS_LIB=$(find /tmp/hstu-attn-build -name libhstu_attn_cutlass.so | head -1)
  python3 -c "from hstu_attn.cutlass import _library; print('CUTLASS library:', _library.load())"
fi

[ -n "${PIPELINE_FIRST:-}" ] || pipeline

[ -z "${SKIP_CUTLASS:-}" ] || { stamp "done (SKIP_CUTLASS)"; exit 0; }
stamp "CUTLASS GPU tests"
timeout -s INT -k 10 $(( $(left) > 150 ? 150 : $(left) - 15 )) python3 -m pytest packages/hstu-attn/tests/test_cutlass_gpu.py -q -rfEs --tb=line \
  -p no:cacheprovider --durations=10 > "$out/cutlass-tests.log" 2>&1
stamp "CUTLASS tests exit $?"
tail -25 "$out/cutlass-tests.log"

bench() {  # name, source folder, commit, backends...
  local name=$1 src=$2 commit=$3; shift 3
  [ "$(left)" -gt 60 ] || { stamp "no time left for bench $name"; return 1; }
  mkdir -p "$out/bench-$name"
  PYTHONPATH="$src:$PYTHONPATH" timeout $(( $(left) - 10 )) python3 packages/hstu-attn/benchmarks/bench_attention.py \
    --backends "$@" --shapes N1024 "B8 N4096 H4 D128" --memory-shape none --commit "$commit" \
    --out "$out/bench-$name" > "$out/bench-$name.log" 2>&1
  stamp "bench $name exit $?"; grep -E "ours|cutlass|sdpa" "$out/bench-$name.log" | tail -12
}
if [ -d .baseline/packages/hstu-attn/src ]; then
  bench baseline-1 .baseline/packages/hstu-attn/src "${BASE_COMMIT:-unknown}" ours &&
  bench current-1 packages/hstu-attn/src "${COMMIT:-unknown}" ours cutlass sdpa_cudnn &&
  bench baseline-2 .baseline/packages/hstu-attn/src "${BASE_COMMIT:-unknown}" ours &&
  bench current-2 packages/hstu-attn/src "${COMMIT:-unknown}" ours cutlass sdpa_cudnn
fi
stamp done
